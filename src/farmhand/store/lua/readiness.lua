#!lua flags=no-writes
-- readiness: running intents and the earliest time something becomes claimable (a waiting
-- intent's ready time, a ready stream's oldest undelivered entry, a lease's expiry), over
-- the scopes no closed gate blocks. ARGV[3..] closed gate rules. Returns {running, time or
-- false}.

local scopes = open_scopes(read_rules(3))
if not scopes then
  return { 0, false }
end
return readiness_of(scopes)
