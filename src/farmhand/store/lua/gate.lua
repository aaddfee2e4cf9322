#!lua
-- set_gate: record one scope's kill-switch rule and its audit event.
-- ARGV[3] field ("<kind>/<account>", '' = every), [4] rule JSON, [5] at, [6] actor,
-- [7] action, [8] has_reason, [9] reason, [10] detail JSON.

redis.call('HSET', P .. 'gates', ARGV[3], ARGV[4])
-- readers keep a copy of the gates while this version, read with the change counter, stays
redis.call('INCR', P .. 'gatesv')
local reason = ARGV[8] == '1' and ARGV[9] or nil
audit(ARGV[5], ARGV[6], ARGV[7], nil, nil, nil, reason, ARGV[10])
changed = true
done()
return 1
