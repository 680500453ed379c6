-- Admission: check every limit, then reserve all of them, in one atomic step.
-- Each scope (the tenant, and an API key with limits of its own) keeps one hash and one sorted
-- set, so a request costs a handful of Redis calls whatever its number of limits:
--   hash: token buckets (field <name> = level, <name>:ts = ms of the last change) and the spend
--         of the current day and month (d / m = integer nano-dollars, d:p / m:p = the period
--         it counts, d:a / m:a = the highest alert threshold raised in that period);
--   set:  concurrency slots, request id scored by expiry (a dead worker's slot frees itself).
-- KEYS: per scope: hash, slot set
-- ARGV[1..3]: n_scopes, request id, slot ttl (ms)
-- then per scope: n_buckets, slot limit (0 = none), n_budgets, hash ttl (ms),
--   per bucket: field, capacity, refill per ms, cost
--   per budget: field (d|m), period label, cap, estimate, seconds left in the period
-- Returns {0, failed_index, retry_after_ms} on refusal (index 1-based over every limit in the
-- order: per scope its buckets, its slot limit, its budgets), or on admission
-- {1, remaining_1, reset_ms_1, remaining_2, reset_ms_2, ...} for each bucket in order.
local n_scopes, rid, slot_ttl = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local a, index = 4, 0
local writes, out = {}, {1}

for s = 1, n_scopes do
  local hash, slots = KEYS[2 * s - 1], KEYS[2 * s]
  local nb, slot_limit, nm, ttl = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), ARGV[a + 3]
  a = a + 4
  local fields, m0 = {}, a + 4 * nb
  for i = 0, nb - 1 do
    local f = ARGV[a + 4 * i]
    fields[#fields + 1] = f
    fields[#fields + 1] = f .. ':ts'
  end
  for m = 0, nm - 1 do
    local f = ARGV[m0 + 5 * m]
    fields[#fields + 1] = f
    fields[#fields + 1] = f .. ':p'
  end
  local v = {}
  if #fields > 0 then v = redis.call('HMGET', hash, unpack(fields)) end
  local set = {}
  for i = 1, nb do
    local f, cap, rate, cost = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
    index = index + 1
    local level, ts = tonumber(v[2 * i - 1]), tonumber(v[2 * i])
    if level == nil or ts == nil then level, ts = cap, now end
    level = math.min(cap, level + math.max(0, now - ts) * rate)
    if level < cost then
      return {0, index, math.ceil((cost - level) / rate)}
    end
    local left = level - cost
    set[#set + 1] = f
    set[#set + 1] = left
    set[#set + 1] = f .. ':ts'
    set[#set + 1] = now
    out[#out + 1] = math.floor(left)
    out[#out + 1] = math.ceil((cap - left) / rate)
    a = a + 4
  end
  if slot_limit > 0 then
    index = index + 1
    redis.call('ZREMRANGEBYSCORE', slots, '-inf', now)
    if redis.call('ZCARD', slots) >= slot_limit then
      return {0, index, 1000}
    end
  end
  for m = 1, nm do
    local f, period, cap, estimate, left_s = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
    index = index + 1
    local j = 2 * nb + 2 * m - 1
    local spent = 0
    if v[j + 1] == period then
      spent = tonumber(v[j]) or 0
    else  -- a new period: its spend and alerts start from nothing
      set[#set + 1] = f .. ':p'
      set[#set + 1] = period
      set[#set + 1] = f .. ':a'
      set[#set + 1] = 0
    end
    if spent + estimate > cap then
      return {0, index, left_s * 1000}
    end
    set[#set + 1] = f
    set[#set + 1] = string.format('%d', spent + estimate)
    a = a + 5
  end
  writes[s] = {hash, slots, slot_limit, ttl, set}
end

-- Every limit allows it: reserve.
for s = 1, n_scopes do
  local w = writes[s]
  if #w[5] > 0 then
    redis.call('HSET', w[1], unpack(w[5]))
    redis.call('PEXPIRE', w[1], w[4])
  end
  if w[3] > 0 then
    redis.call('ZADD', w[2], now + slot_ttl, rid)
    redis.call('PEXPIRE', w[2], slot_ttl + 60000)
  end
end
return out
