-- Settlement: correct token reservations, release concurrency, settle spend, raise budget
-- alerts once per period, and buffer the usage row, in one atomic step (layout: admit.lua).
-- KEYS: per scope: hash, slot set; then the usage stream, the alert stream
-- ARGV[1..3]: n_scopes, request id, tenant id
-- then per scope: n_buckets, has slot (0/1), n_budgets, hash ttl (ms), scope label,
--   per bucket: field, capacity, refill per ms, refund (reserved - used; negative charges more)
--   per budget: field (d|m), period label, cap, delta (actual - estimate, nano-dollars)
-- then: the usage row (JSON). Returns the number of alerts raised.
local n_scopes, rid, tenant = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local usage_stream, alert_stream = KEYS[2 * n_scopes + 1], KEYS[2 * n_scopes + 2]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local a, alerts = 4, 0

for s = 1, n_scopes do
  local hash, slots = KEYS[2 * s - 1], KEYS[2 * s]
  local nb, has_slot, nm, ttl, scope = tonumber(ARGV[a]), ARGV[a + 1], tonumber(ARGV[a + 2]), ARGV[a + 3], ARGV[a + 4]
  a = a + 5
  local fields, m0 = {}, a + 4 * nb
  for i = 0, nb - 1 do
    local f = ARGV[a + 4 * i]
    fields[#fields + 1] = f
    fields[#fields + 1] = f .. ':ts'
  end
  for m = 0, nm - 1 do
    local f = ARGV[m0 + 4 * m]
    fields[#fields + 1] = f
    fields[#fields + 1] = f .. ':p'
    fields[#fields + 1] = f .. ':a'
  end
  local v = {}
  if #fields > 0 then v = redis.call('HMGET', hash, unpack(fields)) end
  local set = {}
  for i = 1, nb do
    local f, cap, rate, refund = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
    if refund ~= 0 then
      local level, ts = tonumber(v[2 * i - 1]), tonumber(v[2 * i])
      if level == nil or ts == nil then level, ts = cap, now end
      level = math.min(cap, level + math.max(0, now - ts) * rate)
      set[#set + 1] = f
      set[#set + 1] = math.min(cap, level + refund)
      set[#set + 1] = f .. ':ts'
      set[#set + 1] = now
    end
    a = a + 4
  end
  for m = 1, nm do
    local f, period, cap, delta = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
    local j = 2 * nb + 3 * m - 2
    -- A request admitted in a period that has since ended settles nothing: that period is closed.
    if v[j + 1] == period then
      local spent = (tonumber(v[j]) or 0) + delta
      if delta ~= 0 then
        set[#set + 1] = f
        set[#set + 1] = string.format('%d', spent)
      end
      local raised = tonumber(v[j + 2]) or 0
      for _, pct in ipairs({80, 100}) do
        if raised < pct and spent * 100 >= cap * pct then
          raised = pct
          redis.call('XADD', alert_stream, '*', 'tenant_id', tenant, 'scope', scope, 'period', period,
            'threshold', pct, 'spent_nano', string.format('%d', spent), 'cap_nano', ARGV[a + 2], 'request_id', rid)
          alerts = alerts + 1
          set[#set + 1] = f .. ':a'
          set[#set + 1] = pct
        end
      end
    end
    a = a + 4
  end
  if #set > 0 then
    redis.call('HSET', hash, unpack(set))
    redis.call('PEXPIRE', hash, ttl)
  end
  if has_slot == '1' then
    redis.call('ZREM', slots, rid)
  end
end
redis.call('XADD', usage_stream, '*', 'row', ARGV[a])
return alerts
