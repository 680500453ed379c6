-- Limits: the admissions and settlements of many requests, in one atomic step.
-- Each scope (the tenant, and an API key with limits of its own) keeps one hash and one sorted
-- set, read at most once per call however many requests it serves:
--   hash: token buckets (field <name> = level, <name>:ts = ms of the last change) and the spend
--         of the current day and month (d / m = integer nano-dollars, d:p / m:p = the period
--         it counts, d:a / m:a = the highest alert threshold raised in that period);
--   set:  concurrency slots, request id scored by expiry (a dead worker's slot frees itself).
-- KEYS: per operation, per scope: hash, slot set; then the usage stream and the alert stream.
-- ARGV[1]: the number of operations; then per operation: kind ('a' admission, 's' settlement),
--   the number of arguments that follow for it, then:
--   admission: n_scopes, request id, slot ttl (ms),
--     per scope: n_buckets, slot limit (0 = none), n_budgets, hash ttl (ms),
--       per bucket: field, capacity, refill per ms, cost
--       per budget: field (d|m), period label, cap, estimate, seconds left in the period
--   settlement: n_scopes, request id, tenant id,
--     per scope: n_buckets, has slot (0/1), n_budgets, hash ttl (ms), scope label,
--       per bucket: field, capacity, refill per ms, refund (reserved - used; negative charges more)
--       per budget: field (d|m), period label, cap, delta (actual - estimate, nano-dollars)
--     then the usage row (JSON).
-- Operations run in the order given (callers put settlements first, so that the tokens and
-- slots they free serve the admissions). One reply per operation: an admission's
-- {0, failed_index, retry_after_ms} on refusal (index 1-based over every limit in the order: per
-- scope its buckets, its slot limit, its budgets), or {1, remaining_1, reset_ms_1, ...} for each
-- bucket in order; a settlement's number of budget alerts raised.
local A, K = ARGV, KEYS
local usage_stream, alert_stream = K[#K - 1], K[#K]
local floor, ceil, min, max = math.floor, math.ceil, math.min, math.max
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + floor(tonumber(t[2]) / 1000)
local hashes, slotsets = {}, {}

-- A scope hash's fields, read once; changes are written back once, at the end.
local function hash(key)
  local h = hashes[key]
  if h == nil then
    local flat, f = redis.call('HGETALL', key), {}
    for i = 1, #flat, 2 do f[flat[i]] = flat[i + 1] end
    h = {f = f, dirty = {}, ttl = 0}
    hashes[key] = h
  end
  return h
end

local function put(h, field, value)
  h.f[field] = value
  h.dirty[field] = true
end

-- A bucket's level now: refilled since its last change, full if it never changed.
local function level_of(h, f, cap, rate)
  local level, ts = tonumber(h.f[f]), tonumber(h.f[f .. ':ts'])
  if level == nil or ts == nil then return cap end
  return min(cap, level + max(0, now - ts) * rate)
end

local function slotset(key)
  local z = slotsets[key]
  if z == nil then
    z = {ttl = 0}
    slotsets[key] = z
  end
  return z
end

local function admit(a, k)
  local n_scopes, rid, slot_ttl = tonumber(A[a]), A[a + 1], tonumber(A[a + 2])
  a = a + 3
  local index, out, writes = 0, {1}, {}
  for s = 1, n_scopes do
    local h, slots = hash(K[k]), K[k + 1]
    k = k + 2
    local nb, slot_limit, nm, ttl = tonumber(A[a]), tonumber(A[a + 1]), tonumber(A[a + 2]), tonumber(A[a + 3])
    a = a + 4
    local set = {}
    for _ = 1, nb do
      local f, cap, rate, cost = A[a], tonumber(A[a + 1]), tonumber(A[a + 2]), tonumber(A[a + 3])
      index = index + 1
      local level = level_of(h, f, cap, rate)
      if level < cost then
        return {0, index, ceil((cost - level) / rate)}
      end
      local left = level - cost
      set[#set + 1] = f
      set[#set + 1] = left
      set[#set + 1] = f .. ':ts'
      set[#set + 1] = now
      out[#out + 1] = floor(left)
      out[#out + 1] = ceil((cap - left) / rate)
      a = a + 4
    end
    if slot_limit > 0 then
      index = index + 1
      local z = slotset(slots)
      if z.n == nil then z.n = redis.call('ZCARD', slots) end
      if z.n >= slot_limit then  -- expired slots (a dead worker's) are swept when it looks full
        redis.call('ZREMRANGEBYSCORE', slots, '-inf', now)
        z.n = redis.call('ZCARD', slots)
        if z.n >= slot_limit then
          return {0, index, 1000}
        end
      end
    end
    for _ = 1, nm do
      local f, period, cap, estimate = A[a], A[a + 1], tonumber(A[a + 2]), tonumber(A[a + 3])
      index = index + 1
      local spent = 0
      if h.f[f .. ':p'] == period then
        spent = tonumber(h.f[f]) or 0
      else  -- a new period: its spend and alerts start from nothing
        set[#set + 1] = f .. ':p'
        set[#set + 1] = period
        set[#set + 1] = f .. ':a'
        set[#set + 1] = 0
      end
      if spent + estimate > cap then
        return {0, index, tonumber(A[a + 4]) * 1000}
      end
      set[#set + 1] = f
      set[#set + 1] = string.format('%d', spent + estimate)
      a = a + 5
    end
    writes[s] = {h, slots, slot_limit, ttl, set}
  end
  -- Every limit allows it: reserve.
  for s = 1, n_scopes do
    local h, slots, slot_limit, ttl, set = unpack(writes[s])
    if #set > 0 then
      for i = 1, #set, 2 do put(h, set[i], set[i + 1]) end
      h.ttl = max(h.ttl, ttl)
    end
    if slot_limit > 0 then
      redis.call('ZADD', slots, now + slot_ttl, rid)
      local z = slotsets[slots]
      z.n = z.n + 1
      z.ttl = max(z.ttl, slot_ttl + 60000)
    end
  end
  return out
end

local function settle(a, k)
  local n_scopes, rid, tenant = tonumber(A[a]), A[a + 1], A[a + 2]
  a = a + 3
  local alerts = 0
  for _ = 1, n_scopes do
    local key, slots = K[k], K[k + 1]
    k = k + 2
    local nb, has_slot, nm, ttl, scope = tonumber(A[a]), A[a + 1], tonumber(A[a + 2]), tonumber(A[a + 3]), A[a + 4]
    a = a + 5
    local h = (nb > 0 or nm > 0) and hash(key) or nil
    local wrote = false
    for _ = 1, nb do
      local f, cap, rate, refund = A[a], tonumber(A[a + 1]), tonumber(A[a + 2]), tonumber(A[a + 3])
      if refund ~= 0 then
        put(h, f, min(cap, level_of(h, f, cap, rate) + refund))
        put(h, f .. ':ts', now)
        wrote = true
      end
      a = a + 4
    end
    for _ = 1, nm do
      local f, period, cap, delta = A[a], A[a + 1], tonumber(A[a + 2]), tonumber(A[a + 3])
      -- A request admitted in a period that has since ended settles nothing: that period is closed.
      if h.f[f .. ':p'] == period then
        local spent = (tonumber(h.f[f]) or 0) + delta
        if delta ~= 0 then
          put(h, f, string.format('%d', spent))
          wrote = true
        end
        local raised = tonumber(h.f[f .. ':a']) or 0
        for _, pct in ipairs({80, 100}) do
          if raised < pct and spent * 100 >= cap * pct then
            raised = pct
            redis.call('XADD', alert_stream, '*', 'tenant_id', tenant, 'scope', scope, 'period', period,
              'threshold', pct, 'spent_nano', string.format('%d', spent), 'cap_nano', A[a + 2], 'request_id', rid)
            alerts = alerts + 1
            put(h, f .. ':a', pct)
            wrote = true
          end
        end
      end
      a = a + 4
    end
    if wrote then h.ttl = max(h.ttl, ttl) end
    if has_slot == '1' then
      local removed = redis.call('ZREM', slots, rid)
      local z = slotsets[slots]
      if z ~= nil and z.n ~= nil then z.n = z.n - removed end
    end
  end
  redis.call('XADD', usage_stream, '*', 'row', A[a])
  return alerts
end

local replies, a, k = {}, 2, 1
for i = 1, tonumber(A[1]) do
  local kind, length, n_scopes = A[a], tonumber(A[a + 1]), tonumber(A[a + 2])
  if kind == 'a' then
    replies[i] = admit(a + 2, k)
  else
    replies[i] = settle(a + 2, k)
  end
  a = a + 2 + length
  k = k + 2 * n_scopes
end

for key, h in pairs(hashes) do
  local set = {}
  for f in pairs(h.dirty) do
    set[#set + 1] = f
    set[#set + 1] = h.f[f]
  end
  if #set > 0 then
    redis.call('HSET', key, unpack(set))
    redis.call('PEXPIRE', key, h.ttl)
  end
end
for key, z in pairs(slotsets) do
  if z.ttl > 0 then redis.call('PEXPIRE', key, z.ttl) end
end
return replies
