-- Restore: raise a scope's day and month spend to at least what PostgreSQL has recorded (after
-- Redis lost them), keeping a larger running total (reservations in flight) where there is one.
-- KEYS[1]: the scope's hash (layout: limits.lua)
-- ARGV[1]: the hash's ttl (ms); then per budget: field (d|m), period label, spent (nano-dollars),
--   the highest alert threshold already recorded for that period (0, 80 or 100)
local hash, ttl = KEYS[1], tonumber(ARGV[1])
for i = 2, #ARGV, 4 do
  local f, period, spent, alerted = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  local v = redis.call('HMGET', hash, f, f .. ':p', f .. ':a')
  if v[2] ~= period then
    redis.call('HSET', hash, f, spent, f .. ':p', period, f .. ':a', alerted)
  else
    if (tonumber(v[1]) or 0) < tonumber(spent) then redis.call('HSET', hash, f, spent) end
    if (tonumber(v[3]) or 0) < alerted then redis.call('HSET', hash, f .. ':a', alerted) end
  end
end
if redis.call('PTTL', hash) < ttl then redis.call('PEXPIRE', hash, ttl) end
return 1
