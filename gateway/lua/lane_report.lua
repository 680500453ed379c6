-- Report how a call on a lane went; move the breaker if that changes its state.
-- KEYS: breaker hash, hold, events stream
-- ARGV: outcome (ok | ok_batch | error | timeout | slow | limited), probe (0/1), hold_ms,
--       error_rate, min_calls, window_s, cooldown_ms, close_after, lane name, detail, count
-- `ok_batch` adds `count` successes a process saw on a closed breaker (sent once a second).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local outcome, probe, hold_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local rate, min_calls, window_s = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local cooldown, close_after, lane, detail = tonumber(ARGV[7]), tonumber(ARGV[8]), ARGV[9], ARGV[10]
local b = KEYS[1]

local function event(from, to, reason)
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', 10000, '*', 'lane', lane, 'from', from, 'to', to, 'reason', reason, 'at', now)
end
local function open(from, reason)
  redis.call('DEL', b)
  redis.call('HSET', b, 'state', 'open', 'until', now + cooldown, 'reason', reason)
  redis.call('PEXPIRE', b, 86400000)
  event(from, 'open', reason)
end

if hold_ms > 0 then
  -- The provider asked us to back off: every process holds the lane until its window reopens.
  redis.call('SET', KEYS[2], '1', 'PX', hold_ms)
end
local state = redis.call('HGET', b, 'state') or 'closed'
local count = tonumber(ARGV[11] or '1')
if outcome == 'ok_batch' then
  if state ~= 'closed' then return state end  -- they were counted against an older state
  outcome = 'ok'
end
if outcome == 'limited' then
  if probe == 1 and state == 'half_open' then redis.call('HINCRBY', b, 'probes', -1) end
  return state
end
local failed = outcome ~= 'ok'

if state == 'half_open' then
  if probe == 1 then redis.call('HINCRBY', b, 'probes', -1) end
  if failed then
    open('half_open', 'probe failed: ' .. detail)
    return 'open'
  end
  local ok = redis.call('HINCRBY', b, 'ok', 1)
  if ok >= close_after then
    redis.call('DEL', b)
    redis.call('HSET', b, 'state', 'closed')
    redis.call('PEXPIRE', b, 86400000)
    event('half_open', 'closed', ok .. ' consecutive probe successes')
    return 'closed'
  end
  return 'half_open'
end
if state == 'open' then return 'open' end

-- Closed: count this call in the rolling window (6 slices of window_s / 6).
local slice_ms = math.max(1000, math.floor(window_s * 1000 / 6))
local slice = math.floor(now / slice_ms)
local idx = slice % 6
if tonumber(redis.call('HGET', b, 'id' .. idx) or '-1') ~= slice then
  redis.call('HSET', b, 'id' .. idx, slice, 'n' .. idx, 0, 'e' .. idx, 0, 'x' .. idx, 0)
end
redis.call('HINCRBY', b, 'n' .. idx, count)
if failed then
  redis.call('HINCRBY', b, 'e' .. idx, 1)
  if outcome == 'timeout' or outcome == 'slow' then redis.call('HINCRBY', b, 'x' .. idx, 1) end
end
redis.call('PEXPIRE', b, 86400000)
if not failed then return 'closed' end
local n, e, x = 0, 0, 0
for i = 0, 5 do
  local id = tonumber(redis.call('HGET', b, 'id' .. i) or '-1')
  if id > slice - 6 then
    n = n + tonumber(redis.call('HGET', b, 'n' .. i) or '0')
    e = e + tonumber(redis.call('HGET', b, 'e' .. i) or '0')
    x = x + tonumber(redis.call('HGET', b, 'x' .. i) or '0')
  end
end
if n >= min_calls and e >= rate * n then
  local why = 'error rate'
  if x * 2 >= e then why = (outcome == 'slow') and 'slow calls' or 'timeouts' end
  open('closed', string.format('%s: %d of %d calls failed in %ds (last: %s)', why, e, n, window_s, detail))
  return 'open'
end
return 'closed'
