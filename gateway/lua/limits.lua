#!lua name=gw_limits
-- Limits: the admissions and settlements of many requests, in one atomic step. A Redis Function
-- library (FUNCTION LOAD; gateway/limits/wire.py loads it under a name carrying its source's hash, so
-- that two versions of the platform run side by side during a deploy): its top-level locals
-- live as long as the library, which keeps each plan parsed between calls.
-- Each scope (the tenant, and an API key with limits of its own) keeps one hash and one sorted
-- set, read at most once per call however many requests it serves:
--   hash: token buckets (field <name> = level, <name>:ts = ms of the last change), the spend
--         of the current day and month (d / m = integer nano-dollars, d:p / m:p = the period
--         it counts, d:a / m:a = the highest alert threshold raised in that period), and x = the
--         ms at which the hash expires, as last set;
--   set:  concurrency slots, request id scored by expiry (a dead worker's slot frees itself).
-- A plan is one principal's limits, named by a digest of its keys and arguments. A call sends a
-- plan's arguments the first time, then only its name: the library keeps the plans it has
-- parsed (up to MAX_PLANS; then it forgets them all), and a call naming a plan it does not have
-- is refused whole, before anything runs, with the error NOPLAN: the caller sends it again with
-- every plan spelled out. An operation names its plan and carries only its request's own values.
-- KEYS: per plan, per scope: hash, slot set; then the alert stream. (Usage rows do not pass
-- through here: billing/recorder.py XADDs them, in the same write as the settlement.)
-- ARGV[1]: the number of plans; ARGV[2], ARGV[3]: seconds left today, this month; then per plan:
--   its name, the number of its arguments that follow (0: the library has it), then those:
--   slot ttl (ms), tenant id, key id, n_scopes,
--   per scope: label, n_buckets, slot limit (0 = none), n_budgets, hash ttl (ms),
--     per bucket: field, capacity, refill per ms, whether it counts tokens (1) or requests (0)
--     per budget: field (d|m), period label, cap (nano-dollars)
-- then the operations, each one of:
--   'a', plan, request id, tokens, estimated cost (nano-dollars)
--   'L', plan, request id, tokens, estimated cost, lease units wanted, lease id, slots wanted:
--        an admission that also asks for a lease (below)
--   'l', plan, lease id, tokens, estimated cost, units wanted, slots wanted: a lease alone
--   'r', plan, lease id, its slots (members), requests unused, tokens unused (negative charges more),
--        nano-dollars unused (negative: spent beyond the lease): a lease given back
--   's', plan, request id, tokens reserved - used (negative charges more),
--        actual - estimated cost (nano-dollars)
-- Operations run in the order given (callers put settlements first, so that the tokens and
-- slots they free serve the admissions). One reply per operation (an operation that fails
-- answers an error reply of its own; the others go on), a flat list of tag/value pairs
-- (gateway/limits/wire.py reads them by tag, in any order):
--   'a' admitted:  ok 1, then per bucket <tag> {remaining, ms until full}, then
--                  crowded 1 when a limit that settlement gives back to (a slot set, a tokens
--                  bucket, a budget) now has room for fewer than two more requests like this
--                  one, else 0 (the caller then settles this request before its answer ends)
--   'a' refused:   ok 0, limit <tag of the limit that refused>, retry_ms <ms until it allows>
--   'L':           as 'a', and when admitted also lease <units granted, 0 or more>,
--                  lease_slots <slot members granted>
--   'l':           as an admitted 'L' (its buckets' remaining before the lease, crowded 0)
--   's', 'r':      alerts <budget alerts raised>
-- A limit's tag is its scope's initial and its field: t:rpm, t:rph, t:tpm, t:slots, t:d, t:m
-- for the tenant, k:... for a key with limits of its own.
-- A lease is capacity taken from every limit of the plan at once, for `units` more requests
-- shaped like the admitting one (per unit: one request from each requests bucket, its tokens
-- from each tokens bucket, its estimate from each budget; and up to the slots asked for, held
-- as members <lease id>~<i>, where the plan limits concurrency), which the process then admits on its own without a round
-- trip, and gives back unused. It is granted only far from every limit (each keeps at least half its room
-- after it, and the lease takes at most 1/LEASE_SHARE of a bucket or slot set, a quarter of
-- that of a budget), so that no limit is ever exceeded and the room held out of sight of other
-- processes stays small and short-lived. Fewer than LEASE_MIN units: none.
-- While a library loads, it sees no globals but `redis`: the builtins it keeps as locals are
-- taken at its first call.
local function builtins() return redis.call, tonumber, math.floor, math.ceil, unpack end
local call, tonumber, floor, ceil, unpack
local THRESHOLDS = {80, 100}
local LEASE_SHARE, LEASE_MIN = 64, 4
local MAX_PLANS = 10000
local plans_by_name, n_plans_kept = {}, 0

-- The call in progress (Redis runs one at a time): set at its start.
local now, hashes, slotsets, alert_stream, day_left, month_left

-- A scope hash's fields, read once; changes are written back once, at the end.
local function hash(key)
  local h = hashes[key]
  if h == nil then
    local flat, f = call('HGETALL', key), {}
    for i = 1, #flat, 2 do f[flat[i]] = flat[i + 1] end
    h = {f = f, dirty = {}, ttl = 0}
    hashes[key] = h
  end
  return h
end

-- A bucket's level now: refilled since its last change, full if it never changed.
local function level_of(f, b)
  local level, ts = tonumber(f[b.f]), tonumber(f[b.ts])
  if level == nil or ts == nil then return b.cap end
  if now > ts then level = level + (now - ts) * b.rate end
  if level > b.cap then return b.cap end
  return level
end

-- A slot set's changes wait for the end of the call too (one ZADD, one ZREM), except where a
-- count needs them: `n` is its live count once known, `add` (score, member, ...) and `rem`
-- (member, ...) the changes not yet sent.
local function slotset(key)
  local z = slotsets[key]
  if z == nil then
    z = {key = key, add = {}, rem = {}, ttl = 0}
    slotsets[key] = z
  end
  return z
end

local function send_slots(z)
  if #z.add > 0 then
    call('ZADD', z.key, unpack(z.add))
    z.add = {}
  end
  if #z.rem > 0 then
    local removed = call('ZREM', z.key, unpack(z.rem))
    if z.n ~= nil then z.n = z.n - removed end
    z.rem = {}
  end
end

local function slot_count(z)
  if #z.rem > 0 then send_slots(z) end
  if z.n == nil then z.n = call('ZCARD', z.key) end
  return z.n
end

-- One plan from its arguments at A[a] (n of them), its scopes' keys from K[k]: a table kept
-- as long as the library (the name covers the keys as well as the arguments).
local function parse_plan(K, k, A, a)
  local plan = {slot_ttl = tonumber(A[a]), tenant = A[a + 1], key = A[a + 2], scopes = {}}
  local n_scopes = tonumber(A[a + 3])
  a = a + 4
  for s = 1, n_scopes do
    local nb, nm = tonumber(A[a + 1]), tonumber(A[a + 3])
    local label = A[a]
    local tag = string.sub(label, 1, 1) .. ':'  -- the reply names each limit <scope initial>:<field>
    local scope = {hash = K[k], slots = K[k + 1], label = label, slot_limit = tonumber(A[a + 2]),
                   ttl = tonumber(A[a + 4]), buckets = {}, budgets = {}, nb = nb, nm = nm, slots_tag = tag .. 'slots'}
    k = k + 2
    a = a + 5
    for i = 1, nb do
      scope.buckets[i] = {f = A[a], ts = A[a] .. ':ts', cap = tonumber(A[a + 1]), rate = tonumber(A[a + 2]),
                          tokens = A[a + 3] == '1', tag = tag .. A[a]}
      a = a + 4
    end
    for i = 1, nm do
      local f = A[a]
      scope.budgets[i] = {f = f, p = f .. ':p', al = f .. ':a', day = f == 'd', period = A[a + 1],
                          cap = tonumber(A[a + 2]), cap_text = A[a + 2], tag = tag .. f}
      a = a + 3
    end
    plan.scopes[s] = scope
  end
  plan.n_scopes = n_scopes
  return plan
end

-- The units of lease (for requests of `tokens` and `estimate`) every limit can spare, given
-- `levels` (each bucket's, in order) and `spends` (each budget's spend, in order); 0 below
-- LEASE_MIN; and the slots (up to `slots`) every slot limit can spare.
local function lease_room(plan, want, tokens, estimate, levels, spends, slots)
  local units, nl, ns = want, 0, 0
  for s = 1, plan.n_scopes do
    local scope = plan.scopes[s]
    for i = 1, scope.nb do
      local b = scope.buckets[i]
      nl = nl + 1
      local cost = b.tokens and tokens or 1
      if cost > 0 then
        local room = math.min(levels[nl] - b.cap / 2, b.cap / LEASE_SHARE)
        if room < units * cost then units = floor(room / cost) end
      end
    end
    if scope.slot_limit > 0 then
      local room = floor(math.min(scope.slot_limit / 2 - slotsets[scope.slots].n, scope.slot_limit / LEASE_SHARE))
      if room < slots then slots = room end
      if slots < 1 then units = 0 end
    end
    for i = 1, scope.nm do
      local m = scope.budgets[i]
      ns = ns + 1
      if estimate > 0 then
        local room = math.min(m.cap / 2 - spends[ns], m.cap / (4 * LEASE_SHARE))
        if room < units * estimate then units = floor(room / estimate) end
      end
    end
  end
  if units < LEASE_MIN then return 0, 0 end
  return units, slots
end

-- Reserve `units` requests of `tokens` and `estimate` from every limit of the plan: `levels`
-- and `spends` (each bucket's level and each budget's spend, in order) are what they are before
-- them, and become what they are after. The slots: one, member `member` (a request id), or with
-- `slots`, that many, members <member>~1..slots (a lease's). Returns the least room any slot
-- set has left (a large number without one).
local function reserve(plan, units, tokens, estimate, levels, spends, member, slots)
  local nl, ns, least = 0, 0, math.huge
  for s = 1, plan.n_scopes do
    local scope = plan.scopes[s]
    local h = hashes[scope.hash]
    local f, dirty = h.f, h.dirty
    for i = 1, scope.nb do
      local b = scope.buckets[i]
      nl = nl + 1
      levels[nl] = levels[nl] - units * (b.tokens and tokens or 1)
      f[b.f], f[b.ts] = levels[nl], now
      dirty[b.f], dirty[b.ts] = true, true
    end
    for i = 1, scope.nm do
      local m = scope.budgets[i]
      ns = ns + 1
      if f[m.p] ~= m.period then  -- a new period: its spend and alerts start from nothing
        f[m.p], f[m.al] = m.period, 0
        dirty[m.p], dirty[m.al] = true, true
      end
      spends[ns] = spends[ns] + units * estimate
      f[m.f] = spends[ns]
      dirty[m.f] = true
    end
    if scope.nb + scope.nm > 0 and h.ttl < scope.ttl then h.ttl = scope.ttl end
    if scope.slot_limit > 0 then
      local z = slotsets[scope.slots]
      local add, expiry = z.add, now + plan.slot_ttl
      if slots == nil then
        add[#add + 1], add[#add + 2] = expiry, member
        z.n = z.n + 1
      else
        for j = 1, slots do
          add[#add + 1] = expiry
          add[#add + 1] = member .. '~' .. j
        end
        z.n = z.n + slots
      end
      if z.ttl < plan.slot_ttl + 60000 then z.ttl = plan.slot_ttl + 60000 end
      if scope.slot_limit - z.n < least then least = scope.slot_limit - z.n end
    end
  end
  return least
end

-- A lease alone ('l'), for requests of `tokens` and `estimate`: replies as an admission that
-- asked for one would, its buckets' remaining being before the lease.
local function lease_only(plan, lid, tokens, estimate, want, slots)
  local out, n_out, levels, spends = {'ok', 1}, 2, {}, {}
  for s = 1, plan.n_scopes do
    local scope = plan.scopes[s]
    local f = hash(scope.hash).f
    for i = 1, scope.nb do
      local b = scope.buckets[i]
      local level = level_of(f, b)
      levels[#levels + 1] = level
      out[n_out + 1] = b.tag
      out[n_out + 2] = {floor(level), ceil((b.cap - level) / b.rate)}
      n_out = n_out + 2
    end
    if scope.slot_limit > 0 then slot_count(slotset(scope.slots)) end
    for i = 1, scope.nm do
      local m = scope.budgets[i]
      local spent = 0
      if f[m.p] == m.period then spent = tonumber(f[m.f]) or 0 end
      spends[#spends + 1] = spent
    end
  end
  local units, granted = lease_room(plan, want, tokens, estimate, levels, spends, slots)
  if units > 0 then reserve(plan, units, tokens, estimate, levels, spends, lid, granted) end
  out[n_out + 1], out[n_out + 2], out[n_out + 3], out[n_out + 4] = 'crowded', 0, 'lease', units
  out[n_out + 5], out[n_out + 6] = 'lease_slots', granted
  return out
end

local function admit(plan, rid, tokens, estimate, want, lid, slots)
  local out, n_out = {'ok', 1}, 2
  local levels, spends, crowded = {}, {}, 0
  -- Check every limit first; nothing is reserved unless all of them allow it.
  for s = 1, plan.n_scopes do
    local scope = plan.scopes[s]
    local f = hash(scope.hash).f
    for i = 1, scope.nb do
      local b = scope.buckets[i]
      local cost = b.tokens and tokens or 1
      local level = level_of(f, b)
      if level < cost then
        return {'ok', 0, 'limit', b.tag, 'retry_ms', ceil((cost - level) / b.rate)}
      end
      local left = level - cost
      if b.tokens and left < 2 * cost then crowded = 1 end  -- settlement refunds tokens
      levels[#levels + 1] = level
      out[n_out + 1] = b.tag
      out[n_out + 2] = {floor(left), ceil((b.cap - left) / b.rate)}
      n_out = n_out + 2
    end
    if scope.slot_limit > 0 then
      local z = slotset(scope.slots)
      if slot_count(z) >= scope.slot_limit then  -- expired slots (a dead worker's) are swept when it looks full
        send_slots(z)
        call('ZREMRANGEBYSCORE', scope.slots, '-inf', now)
        z.n = call('ZCARD', scope.slots)
        if z.n >= scope.slot_limit then
          return {'ok', 0, 'limit', scope.slots_tag, 'retry_ms', 1000}
        end
      end
    end
    for i = 1, scope.nm do
      local m = scope.budgets[i]
      local spent = 0
      if f[m.p] == m.period then spent = tonumber(f[m.f]) or 0 end  -- else a new period: from nothing
      if spent + estimate > m.cap then
        return {'ok', 0, 'limit', m.tag, 'retry_ms', (m.day and day_left or month_left) * 1000}
      end
      if m.cap - spent - estimate < 2 * estimate then crowded = 1 end  -- settlement corrects the estimate
      spends[#spends + 1] = spent
    end
  end
  -- Every limit allows it: reserve (a slot set left with room for fewer than two more: crowded).
  if reserve(plan, 1, tokens, estimate, levels, spends, rid) < 2 then crowded = 1 end
  out[n_out + 1], out[n_out + 2] = 'crowded', crowded
  if want ~= nil then
    local units, granted = 0, 0
    if crowded == 0 and want > 0 then units, granted = lease_room(plan, want, tokens, estimate, levels, spends, slots) end
    if units > 0 then reserve(plan, units, tokens, estimate, levels, spends, lid, granted) end
    out[n_out + 3], out[n_out + 4], out[n_out + 5], out[n_out + 6] = 'lease', units, 'lease_slots', granted
  end
  return out
end

-- The 80% and 100% alerts of budget m (scope's, hash fields f) that `spent` crosses, each
-- once per period: how many were raised.
local function raise_alerts(plan, scope, m, f, dirty, spent, rid)
  local raised, alerts = tonumber(f[m.al]) or 0, 0
  for j = 1, 2 do
    local pct = THRESHOLDS[j]
    if raised < pct and spent * 100 >= m.cap * pct then
      raised = pct
      call('XADD', alert_stream, '*', 'tenant_id', plan.tenant, 'scope', scope.label,
        'key_id', scope.label == 'key' and plan.key or '', 'period', m.period,
        'threshold', pct, 'spent_nano', string.format('%d', spent), 'cap_nano', m.cap_text, 'request_id', rid)
      alerts = alerts + 1
      f[m.al] = pct
      dirty[m.al] = true
    end
  end
  return alerts
end

-- A request's settlement, or a lease given back (`rid` the lease id, `lease_units` its slot
-- members, `refund` per bucket: `requests` unused from requests buckets, tokens from tokens
-- buckets).
local function settle(plan, rid, refund, delta, lease_units, requests)
  local alerts = 0
  for s = 1, plan.n_scopes do
    local scope = plan.scopes[s]
    if scope.nb + scope.nm > 0 then
      local h = hash(scope.hash)
      local f, dirty = h.f, h.dirty
      local wrote = false
      if refund ~= 0 or (requests or 0) ~= 0 then
        for i = 1, scope.nb do
          local b = scope.buckets[i]
          local back = refund
          if not b.tokens then back = requests or 0 end
          if back ~= 0 then
            local level = level_of(f, b) + back
            if level > b.cap then level = b.cap end
            f[b.f], f[b.ts] = level, now
            dirty[b.f], dirty[b.ts] = true, true
            wrote = true
          end
        end
      end
      for i = 1, scope.nm do
        local m = scope.budgets[i]
        -- A request admitted in a period that has since ended settles nothing: that period is closed.
        if f[m.p] == m.period then
          local spent = (tonumber(f[m.f]) or 0) + delta
          if delta ~= 0 then
            f[m.f] = spent
            dirty[m.f] = true
            wrote = true
          end
          local raised = raise_alerts(plan, scope, m, f, dirty, spent, rid)
          if raised > 0 then
            alerts = alerts + raised
            wrote = true
          end
        end
      end
      if wrote and h.ttl < scope.ttl then h.ttl = scope.ttl end
    end
    if scope.slot_limit > 0 then
      local z = slotset(scope.slots)
      if #z.add > 0 then send_slots(z) end  -- admitted earlier in this call: its ZADD goes first
      if lease_units == nil then
        z.rem[#z.rem + 1] = rid
      else
        for j = 1, lease_units do z.rem[#z.rem + 1] = rid .. '~' .. j end
      end
    end
  end
  return {'alerts', alerts}
end

-- An operation that fails (a key of the wrong type, say) answers an error of its own; the others
-- in the call go on.
local function answer(ok, reply)
  if ok then return reply end
  if type(reply) == 'table' and reply.err then return reply end
  return {err = tostring(reply)}
end

local function run(K, A)
  if call == nil then call, tonumber, floor, ceil, unpack = builtins() end
  local t = call('TIME')
  now = tonumber(t[1]) * 1000 + floor(tonumber(t[2]) / 1000)
  hashes, slotsets = {}, {}
  alert_stream = K[#K]
  day_left, month_left = tonumber(A[2]), tonumber(A[3])
  -- The plans, each parsed or found; nothing runs unless every one of them is known.
  local plans, a, k = {}, 4, 1
  for p = 1, tonumber(A[1]) do
    local name, n = A[a], tonumber(A[a + 1])
    local plan = plans_by_name[name]
    if n > 0 then
      if plan == nil then
        plan = parse_plan(K, k, A, a + 2)
        if n_plans_kept >= MAX_PLANS then plans_by_name, n_plans_kept = {}, 0 end
        plans_by_name[name], n_plans_kept = plan, n_plans_kept + 1
      end
    elseif plan == nil then
      return redis.error_reply('NOPLAN this call names a plan the library does not have: send every plan')
    end
    plans[p] = plan
    k = k + 2 * plan.n_scopes
    a = a + 2 + n
  end

  local replies, n_replies = {}, 0
  local n_args = #A
  while a <= n_args do
    local plan = plans[tonumber(A[a + 1])]
    n_replies = n_replies + 1
    local kind = A[a]
    if kind == 'a' then
      replies[n_replies] = answer(pcall(admit, plan, A[a + 2], tonumber(A[a + 3]), tonumber(A[a + 4])))
      a = a + 5
    elseif kind == 's' then
      replies[n_replies] = answer(pcall(settle, plan, A[a + 2], tonumber(A[a + 3]), tonumber(A[a + 4])))
      a = a + 5
    elseif kind == 'L' then
      replies[n_replies] = answer(pcall(admit, plan, A[a + 2], tonumber(A[a + 3]), tonumber(A[a + 4]),
                                        tonumber(A[a + 5]), A[a + 6], tonumber(A[a + 7])))
      a = a + 8
    elseif kind == 'l' then
      replies[n_replies] = answer(pcall(lease_only, plan, A[a + 2], tonumber(A[a + 3]), tonumber(A[a + 4]),
                                        tonumber(A[a + 5]), tonumber(A[a + 6])))
      a = a + 7
    else  -- 'r': lease id, slots, requests, tokens, nano-dollars unused (spend moves by minus that)
      replies[n_replies] = answer(pcall(settle, plan, A[a + 2], tonumber(A[a + 5]), -tonumber(A[a + 6]),
                                        tonumber(A[a + 3]), tonumber(A[a + 4])))
      a = a + 7
    end
  end

  local now_text  -- every bucket changed in this call changed now: its time is formatted once
  for key, h in pairs(hashes) do
    local set, n, f = {}, 0, h.f
    for field in pairs(h.dirty) do
      local v = f[field]
      if v == now then
        if now_text == nil then now_text = string.format('%d', now) end
        v = now_text
      elseif field == 'd' or field == 'm' then
        v = string.format('%d', v)  -- money: exact integers
      end
      set[n + 1], set[n + 2] = field, v
      n = n + 2
    end
    if n > 0 then
      -- The hash must outlive its last change by h.ttl. Its expiry is pushed to twice that, and
      -- noted in field x, only when less than h.ttl is left: a PEXPIRE per minute, not per call.
      local until_ms = tonumber(f.x)
      local push = until_ms == nil or until_ms - now < h.ttl
      if push then set[n + 1], set[n + 2] = 'x', string.format('%d', now + 2 * h.ttl) end
      call('HSET', key, unpack(set))
      if push then call('PEXPIRE', key, 2 * h.ttl) end
    end
  end
  -- A slot set must outlive its newest slot's expiry (z.ttl covers it). As for a hash, its expiry
  -- is pushed, to twice that, only when less is left: PTTL is a read, far cheaper than a write.
  for key, z in pairs(slotsets) do
    local ok = pcall(send_slots, z)  -- a slot set of the wrong type: its operations answered their errors
    if z.ttl > 0 and ok then
      local left = call('PTTL', key)
      if left == -1 or (left >= 0 and left < z.ttl) then call('PEXPIRE', key, 2 * z.ttl) end
    end
  end
  return replies
end

redis.register_function('gw_limits', run)
