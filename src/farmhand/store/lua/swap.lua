#!lua
-- Compare-and-set for rate-limit buckets and circuit breakers: the decision is made in
-- Python (farmhand.store.limits_logic, shared with the SQL stores) on rows read a moment
-- earlier; it is written only if none of those rows changed since, all or nothing.
-- ARGV[2] is the time the decision was made at (the audit time); ARGV[3] the most seconds
-- that time may lag this server's TIME ('' = no limit): the SQL stores decide on the time
-- read under their lock, and a decision that waited long would take tokens as of the past.
-- ARGV[4] hash ('buckets' or 'breakers'), [5] number of rows, then per row: field, value
-- read ('' = none), value to write ('' = unchanged); then actor, number of audit notes, and
-- per note: action, has_reason, reason, detail (JSON). Returns 1, or 0 when a row had
-- changed or the decision is too old.

if ARGV[3] ~= '' then
  local t = redis.call('TIME')
  if tonumber(t[1]) + tonumber(t[2]) / 1000000 - tonumber(ARGV[2]) > tonumber(ARGV[3]) then
    return 0
  end
end
local hash = P .. ARGV[4]
local rows = tonumber(ARGV[5])
local i = 6
for _ = 1, rows do
  if (redis.call('HGET', hash, ARGV[i]) or '') ~= ARGV[i + 1] then
    return 0
  end
  i = i + 3
end
i = 6
for _ = 1, rows do
  if ARGV[i + 2] ~= '' then
    redis.call('HSET', hash, ARGV[i], ARGV[i + 2])
    changed = true
  end
  i = i + 3
end
local actor = ARGV[i]
local notes = tonumber(ARGV[i + 1])
i = i + 2
for _ = 1, notes do
  local reason = ARGV[i + 1] == '1' and ARGV[i + 2] or nil
  audit(clock(), actor, ARGV[i], nil, nil, nil, reason, ARGV[i + 3])
  i = i + 4
end
done()
return 1
