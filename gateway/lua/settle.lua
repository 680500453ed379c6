-- Settlement: correct token reservations, release concurrency, settle spend, raise budget
-- alerts once per period, and buffer the usage row, in one atomic step.
-- KEYS: token buckets..., concurrency sets..., budget counters..., usage stream, alert stream
-- ARGV[1..4]: n_buckets, n_slots, n_budgets, request id
-- then per bucket: capacity, refill per ms, refund (reserved - used; negative charges more)
-- then per budget: cap (0 = none), delta (actual - estimate), ttl (s), scope label, period label
-- then: usage row (JSON), tenant id
local nb, ns, nm = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local rid = ARGV[4]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local a = 5

for i = 1, nb do
  local cap, rate, refund = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  if refund ~= 0 then
    local v = redis.call('HMGET', KEYS[i], 't', 'ts')
    local level, ts = tonumber(v[1]), tonumber(v[2])
    if level == nil then level, ts = cap, now end
    level = math.min(cap, level + math.max(0, now - ts) * rate)
    redis.call('HSET', KEYS[i], 't', math.min(cap, level + refund), 'ts', now)
    redis.call('PEXPIRE', KEYS[i], math.ceil(cap / rate) + 60000)
  end
  a = a + 3
end
for j = 1, ns do
  redis.call('ZREM', KEYS[nb + j], rid)
end
local usage_stream, alert_stream = KEYS[nb + ns + nm + 1], KEYS[nb + ns + nm + 2]
local alerts = 0
for m = 1, nm do
  local key = KEYS[nb + ns + m]
  local cap, delta, ttl = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local scope, period = ARGV[a + 3], ARGV[a + 4]
  local spent = redis.call('INCRBY', key, delta)
  if delta ~= 0 or spent > 0 then redis.call('EXPIRE', key, ttl + 86400) end
  if cap > 0 then
    for _, pct in ipairs({80, 100}) do
      if spent * 100 >= cap * pct then
        if redis.call('SET', key .. ':alert:' .. pct, '1', 'NX', 'EX', ttl + 86400) then
          redis.call('XADD', alert_stream, '*', 'tenant_id', ARGV[#ARGV], 'scope', scope,
            'period', period, 'threshold', pct, 'spent_nano', spent, 'cap_nano', cap, 'request_id', rid)
          alerts = alerts + 1
        end
      end
    end
  end
  a = a + 5
end
redis.call('XADD', usage_stream, '*', 'row', ARGV[a])
return alerts
