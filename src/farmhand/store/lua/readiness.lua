#!lua flags=no-writes
-- readiness: running intents and the earliest time something becomes claimable (a waiting
-- intent's ready time, a ready stream's oldest undelivered entry, a lease's expiry), over
-- the scopes no closed gate blocks. ARGV[3..] closed gate rules. Returns {running, time or
-- false}.

local scopes = open_scopes(read_rules(3))
if not scopes then
  return { 0, false }
end
local running, best = 0, nil
local function consider(t)
  t = tonumber(t)
  if t and (best == nil or t < best) then
    best = t
  end
end

local function undelivered(stream)
  local first = redis.call('XRANGE', stream, '(' .. last_delivered(stream), '+', 'COUNT', 1)[1]
  return first and first[2][4]
end

for _, sc in ipairs(scopes) do
  local leases = P .. 'l:' .. sc
  running = running + redis.call('ZCARD', leases)
  consider(redis.call('ZRANGE', leases, 0, 0, 'WITHSCORES')[2])
  consider(redis.call('ZRANGE', P .. 'w:' .. sc, 0, 0, 'WITHSCORES')[2])
  consider(undelivered(P .. 'q:' .. sc))
end
return { running, best and fmt(best) or false }
