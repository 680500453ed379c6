-- May this process call this lane now? Checks, in order: a coordinated 429 hold, the circuit
-- breaker (moving open -> half-open after the cool-down and counting probes), and the lane's
-- upstream budget (the provider account's requests/tokens per minute).
-- KEYS: hold, breaker hash, events stream, rpm bucket, tpm bucket
-- ARGV: cooldown_ms, max_probes, rpm (0 = none), tpm (0 = none), tokens, lane name
-- Returns {1, probe(0/1)} or {0, reason, retry_after_ms}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local hold = redis.call('PTTL', KEYS[1])
if hold > 0 then return {0, 'held', hold} end

local state = redis.call('HGET', KEYS[2], 'state') or 'closed'
local probe = 0
if state == 'open' then
  local until_ms = tonumber(redis.call('HGET', KEYS[2], 'until') or '0')
  if now < until_ms then return {0, 'open', until_ms - now} end
  redis.call('HSET', KEYS[2], 'state', 'half_open', 'probes', 0, 'ok', 0)
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', 10000, '*', 'lane', ARGV[6], 'from', 'open', 'to', 'half_open',
    'reason', 'cool-down elapsed', 'at', now)
  state = 'half_open'
end
if state == 'half_open' then
  local probes = tonumber(redis.call('HGET', KEYS[2], 'probes') or '0')
  if probes >= tonumber(ARGV[2]) then return {0, 'probing', 1000} end
  probe = 1
end

local function bucket(key, per_min, cost)
  local cap, rate = per_min, per_min / 60000
  local v = redis.call('HMGET', key, 't', 'ts')
  local level, ts = tonumber(v[1]), tonumber(v[2])
  if level == nil then level, ts = cap, now end
  level = math.min(cap, level + math.max(0, now - ts) * rate)
  if level < cost then return math.ceil((cost - level) / rate) end
  redis.call('HSET', key, 't', level - cost, 'ts', now)
  redis.call('PEXPIRE', key, 120000)
  return 0
end
local rpm, tpm, tokens = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
if rpm > 0 then
  local wait = bucket(KEYS[4], rpm, 1)
  if wait > 0 then return {0, 'upstream_budget', wait} end
end
if tpm > 0 then
  local wait = bucket(KEYS[5], tpm, math.min(tokens, tpm))
  if wait > 0 then return {0, 'upstream_budget', wait} end
end
if probe == 1 then
  redis.call('HINCRBY', KEYS[2], 'probes', 1)
  redis.call('PEXPIRE', KEYS[2], 86400000)
end
return {1, probe}
