-- Renew, complete or release a running claim, only if this request still holds it (a claim
-- whose lease ran out may have been taken by a retry since: that one is left alone).
-- KEYS[1]: the key; ARGV[1]: the exact running claim this request wrote
-- ARGV[2]: renew | complete | release; ARGV[3]: lease or TTL in ms; ARGV[4]: the completed record
-- Returns 1 when done, 0 when the key is no longer this request's.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local op = ARGV[2]
if op == 'renew' then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
elseif op == 'complete' then
  redis.call('SET', KEYS[1], ARGV[4], 'PX', ARGV[3])
else
  redis.call('DEL', KEYS[1])
end
return 1
