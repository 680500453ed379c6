-- Take the journal's calls whose owner stopped renewing them: exactly one caller gets each.
-- KEYS[1] the journal (sorted set, score = ms after which a call counts as lost)
-- ARGV[1] now in ms, ARGV[2] at most this many
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  redis.call('ZREM', KEYS[1], member)
end
return due
