-- Claim an Idempotency-Key, or read who holds it: one atomic round trip.
-- KEYS[1]: gw:{t<tenant>}:idem:<sha256 of the key>
-- ARGV[1]: the running claim (JSON); ARGV[2]: its lease in ms
-- Returns nil when this request now holds the key, else the record already there
-- (a running claim, or a completed response).
local current = redis.call('GET', KEYS[1])
if current then
  return current
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
