#!lua
-- Compare-and-set for rate-limit buckets and circuit breakers (see "optimistic writes" in
-- the prelude): the decision is written only if none of the rows it was made on changed
-- since, all or nothing.
-- ARGV[2] is the time the decision was made at (the audit time); ARGV[3] the most seconds
-- that time may lag this server's TIME ('' = no limit).
-- ARGV[4] hash ('buckets' or 'breakers'), [5] number of rows, then per row: field, value
-- read ('' = none), value to write ('' = unchanged); then actor, number of audit notes, and
-- per note: action, has_reason, reason, detail (JSON). Returns 1, or 0 when a row had
-- changed or the decision is too old.

local hash = P .. ARGV[4]
local rows = tonumber(ARGV[5])
if not unchanged(hash, 6, rows, tonumber(ARGV[2]), ARGV[3]) then
  return 0
end
local wrote, i = write_rows(hash, 6, rows)
changed = wrote
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
