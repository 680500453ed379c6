-- Admission: check every limit, then reserve all of them, in one atomic step.
-- KEYS: token buckets..., concurrency sets..., budget counters...
-- ARGV[1..5]: n_buckets, n_slots, n_budgets, request id, slot ttl (ms)
-- then per bucket: capacity, refill per ms, cost
-- then per slot: limit
-- then per budget: cap, estimate, ttl (s)       (money in integer nano-dollars)
-- Returns {0, failed_index, retry_after_ms} on refusal (index 1-based over all limits), or
-- {1, remaining_1, reset_ms_1, remaining_2, reset_ms_2, ...} for each bucket on admission.
local nb, ns, nm = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local rid, slot_ttl = ARGV[4], tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local a = 6
local tokens = {}

for i = 1, nb do
  local cap, rate, cost = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local v = redis.call('HMGET', KEYS[i], 't', 'ts')
  local level, ts = tonumber(v[1]), tonumber(v[2])
  if level == nil then level, ts = cap, now end
  level = math.min(cap, level + math.max(0, now - ts) * rate)
  if level < cost then
    return {0, i, math.ceil((cost - level) / rate)}
  end
  tokens[i] = level
  a = a + 3
end
for j = 1, ns do
  local key, limit = KEYS[nb + j], tonumber(ARGV[a])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if redis.call('ZCARD', key) >= limit then
    return {0, nb + j, 1000}
  end
  a = a + 1
end
for m = 1, nm do
  local key = KEYS[nb + ns + m]
  local cap, estimate, ttl = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local spent = tonumber(redis.call('GET', key) or '0')
  if spent + estimate > cap then
    return {0, nb + ns + m, ttl * 1000}
  end
  a = a + 3
end

-- Every limit allows it: reserve.
local out = {1}
a = 6
for i = 1, nb do
  local cap, rate, cost = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local left = tokens[i] - cost
  redis.call('HSET', KEYS[i], 't', left, 'ts', now)
  redis.call('PEXPIRE', KEYS[i], math.ceil(cap / rate) + 60000)
  out[#out + 1] = math.floor(left)
  out[#out + 1] = math.ceil((cap - left) / rate)
  a = a + 3
end
for j = 1, ns do
  redis.call('ZADD', KEYS[nb + j], now + slot_ttl, rid)
  redis.call('PEXPIRE', KEYS[nb + j], slot_ttl + 60000)
  a = a + 1
end
for m = 1, nm do
  local key = KEYS[nb + ns + m]
  redis.call('INCRBY', key, tonumber(ARGV[a + 1]))
  redis.call('EXPIRE', key, tonumber(ARGV[a + 2]) + 86400)
  a = a + 3
end
return out
