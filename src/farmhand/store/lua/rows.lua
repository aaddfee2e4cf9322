#!lua flags=no-writes
-- The store clock's time and some fields of one hash, in one read: what a rate-limit or
-- breaker decision is made on (redis_limits.py). ARGV[3] hash name, ARGV[4..] fields.
-- Returns {now, values (false where missing)...}.

local out = redis.call('HMGET', P .. ARGV[3], unpack(ARGV, 4))
table.insert(out, 1, fmt(clock()))
return out
