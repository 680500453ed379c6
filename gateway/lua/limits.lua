-- Limits: the admissions and settlements of many requests, in one atomic step.
-- Each scope (the tenant, and an API key with limits of its own) keeps one hash and one sorted
-- set, read at most once per call however many requests it serves:
--   hash: token buckets (field <name> = level, <name>:ts = ms of the last change) and the spend
--         of the current day and month (d / m = integer nano-dollars, d:p / m:p = the period
--         it counts, d:a / m:a = the highest alert threshold raised in that period);
--   set:  concurrency slots, request id scored by expiry (a dead worker's slot frees itself).
-- A plan is one principal's limits, sent once per call however many of its requests the call
-- carries; an operation names its plan and carries only its request's own values.
-- KEYS: per plan, per scope: hash, slot set; then the usage stream and the alert stream.
-- ARGV[1]: the number of plans; then per plan: slot ttl (ms), tenant id, key id, n_scopes,
--   per scope: label, n_buckets, slot limit (0 = none), n_budgets, hash ttl (ms),
--     per bucket: field, capacity, refill per ms, whether it counts tokens (1) or requests (0)
--     per budget: field (d|m), period label, cap (nano-dollars)
-- then the operations, each one of:
--   'a', plan, request id, tokens, estimated cost (nano-dollars), seconds left today, this month
--   's', plan, request id, tokens reserved - used (negative charges more),
--        actual - estimated cost (nano-dollars), the usage row (JSON)
-- Operations run in the order given (callers put settlements first, so that the tokens and
-- slots they free serve the admissions). One reply per operation: an admission's
-- {0, failed_index, retry_after_ms} on refusal (index 1-based over every limit in the order: per
-- scope its buckets, its slot limit, its budgets), or {1, remaining_1, reset_ms_1, ...} for each
-- bucket in order; a settlement's number of budget alerts raised.
local A, K = ARGV, KEYS
local usage_stream, alert_stream = K[#K - 1], K[#K]
local floor, ceil, min, max, tonumber = math.floor, math.ceil, math.min, math.max, tonumber
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
local function level_of(h, b)
  local level, ts = tonumber(h.f[b.f]), tonumber(h.f[b.ts])
  if level == nil or ts == nil then return b.cap end
  return min(b.cap, level + max(0, now - ts) * b.rate)
end

local function slotset(key)
  local z = slotsets[key]
  if z == nil then
    z = {ttl = 0}
    slotsets[key] = z
  end
  return z
end

local plans, a, k = {}, 2, 1
for p = 1, tonumber(A[1]) do
  local plan = {slot_ttl = tonumber(A[a]), tenant = A[a + 1], key = A[a + 2], scopes = {}}
  local n_scopes = tonumber(A[a + 3])
  a = a + 4
  for s = 1, n_scopes do
    local nb, nm = tonumber(A[a + 1]), tonumber(A[a + 3])
    local scope = {hash = K[k], slots = K[k + 1], label = A[a], slot_limit = tonumber(A[a + 2]),
                   ttl = tonumber(A[a + 4]), buckets = {}, budgets = {}}
    k = k + 2
    a = a + 5
    for i = 1, nb do
      scope.buckets[i] = {f = A[a], ts = A[a] .. ':ts', cap = tonumber(A[a + 1]), rate = tonumber(A[a + 2]),
                          tokens = A[a + 3] == '1'}
      a = a + 4
    end
    for i = 1, nm do
      local f = A[a]
      scope.budgets[i] = {f = f, p = f .. ':p', al = f .. ':a', day = f == 'd', period = A[a + 1],
                          cap = tonumber(A[a + 2]), cap_text = A[a + 2]}
      a = a + 3
    end
    plan.scopes[s] = scope
  end
  plans[p] = plan
end

local function admit(plan, rid, tokens, estimate, day_left, month_left)
  local index, out, writes = 0, {1}, {}
  for s, scope in ipairs(plan.scopes) do
    local h = hash(scope.hash)
    local set = {}
    for _, b in ipairs(scope.buckets) do
      index = index + 1
      local cost = b.tokens and tokens or 1
      local level = level_of(h, b)
      if level < cost then
        return {0, index, ceil((cost - level) / b.rate)}
      end
      local left = level - cost
      set[#set + 1] = b.f
      set[#set + 1] = left
      set[#set + 1] = b.ts
      set[#set + 1] = now
      out[#out + 1] = floor(left)
      out[#out + 1] = ceil((b.cap - left) / b.rate)
    end
    if scope.slot_limit > 0 then
      index = index + 1
      local z = slotset(scope.slots)
      if z.n == nil then z.n = redis.call('ZCARD', scope.slots) end
      if z.n >= scope.slot_limit then  -- expired slots (a dead worker's) are swept when it looks full
        redis.call('ZREMRANGEBYSCORE', scope.slots, '-inf', now)
        z.n = redis.call('ZCARD', scope.slots)
        if z.n >= scope.slot_limit then
          return {0, index, 1000}
        end
      end
    end
    for _, m in ipairs(scope.budgets) do
      index = index + 1
      local spent = 0
      if h.f[m.p] == m.period then
        spent = tonumber(h.f[m.f]) or 0
      else  -- a new period: its spend and alerts start from nothing
        set[#set + 1] = m.p
        set[#set + 1] = m.period
        set[#set + 1] = m.al
        set[#set + 1] = 0
      end
      if spent + estimate > m.cap then
        return {0, index, (m.day and day_left or month_left) * 1000}
      end
      set[#set + 1] = m.f
      set[#set + 1] = spent + estimate
    end
    writes[s] = set
  end
  -- Every limit allows it: reserve.
  for s, scope in ipairs(plan.scopes) do
    local set = writes[s]
    if #set > 0 then
      local h = hashes[scope.hash]
      for i = 1, #set, 2 do put(h, set[i], set[i + 1]) end
      h.ttl = max(h.ttl, scope.ttl)
    end
    if scope.slot_limit > 0 then
      redis.call('ZADD', scope.slots, now + plan.slot_ttl, rid)
      local z = slotsets[scope.slots]
      z.n = z.n + 1
      z.ttl = max(z.ttl, plan.slot_ttl + 60000)
    end
  end
  return out
end

local function settle(plan, rid, refund, delta, row)
  local alerts = 0
  for _, scope in ipairs(plan.scopes) do
    local h = (#scope.buckets > 0 or #scope.budgets > 0) and hash(scope.hash) or nil
    local wrote = false
    if refund ~= 0 then
      for _, b in ipairs(scope.buckets) do
        if b.tokens then
          put(h, b.f, min(b.cap, level_of(h, b) + refund))
          put(h, b.ts, now)
          wrote = true
        end
      end
    end
    for _, m in ipairs(scope.budgets) do
      -- A request admitted in a period that has since ended settles nothing: that period is closed.
      if h.f[m.p] == m.period then
        local spent = (tonumber(h.f[m.f]) or 0) + delta
        if delta ~= 0 then
          put(h, m.f, spent)
          wrote = true
        end
        local raised = tonumber(h.f[m.al]) or 0
        for _, pct in ipairs({80, 100}) do
          if raised < pct and spent * 100 >= m.cap * pct then
            raised = pct
            redis.call('XADD', alert_stream, '*', 'tenant_id', plan.tenant, 'scope', scope.label,
              'key_id', scope.label == 'key' and plan.key or '', 'period', m.period,
              'threshold', pct, 'spent_nano', string.format('%d', spent), 'cap_nano', m.cap_text, 'request_id', rid)
            alerts = alerts + 1
            put(h, m.al, pct)
            wrote = true
          end
        end
      end
    end
    if wrote then h.ttl = max(h.ttl, scope.ttl) end
    if scope.slot_limit > 0 then
      local removed = redis.call('ZREM', scope.slots, rid)
      local z = slotsets[scope.slots]
      if z ~= nil and z.n ~= nil then z.n = z.n - removed end
    end
  end
  redis.call('XADD', usage_stream, '*', 'row', row)
  return alerts
end

-- An operation that fails (a key of the wrong type, say) answers an error of its own; the others
-- in the call go on.
local function answer(ok, reply)
  if ok then return reply end
  if type(reply) == 'table' and reply.err then return reply end
  return {err = tostring(reply)}
end

local replies = {}
while a <= #A do
  local plan = plans[tonumber(A[a + 1])]
  if A[a] == 'a' then
    replies[#replies + 1] = answer(pcall(admit, plan, A[a + 2], tonumber(A[a + 3]), tonumber(A[a + 4]),
                                         tonumber(A[a + 5]), tonumber(A[a + 6])))
    a = a + 7
  else
    replies[#replies + 1] = answer(pcall(settle, plan, A[a + 2], tonumber(A[a + 3]), tonumber(A[a + 4]), A[a + 5]))
    a = a + 6
  end
end

for key, h in pairs(hashes) do
  local set = {}
  for f in pairs(h.dirty) do
    local v = h.f[f]
    if f == 'd' or f == 'm' then v = string.format('%d', v) end  -- money: exact integers
    set[#set + 1] = f
    set[#set + 1] = v
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
