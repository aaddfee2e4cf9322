#!lua
-- start_attempts: the durable "attempt started" record, for each lease whose token is
-- current and whose expiry (by the store's clock) has not passed. The owner must match
-- too: a failover that lost a claim can hand the same token number out again, and then only
-- the owner tells the lost lease from the new one.
-- ARGV[3]: JSON list of [id, token, owner]. Returns, separated by spaces, now and per lease
-- the attempt number, 0 where the lease was lost. Wakes no one (see done() in the prelude).

local now = clock()
local stamp = fmt(now)
local out = { stamp }
for _, lease in ipairs(cjson.decode(ARGV[3])) do
  local id, token, owner = lease[1], lease[2], lease[3]
  local key = record(id)
  local f = redis.call('HMGET', key, 'state', 'token', 'expires', 'attempts', 'owner')
  if f[1] == 'running' and f[2] == token and f[5] == owner and tonumber(f[3]) > now then
    local n = tonumber(f[4]) + 1
    redis.call('HSET', key, 'attempts', n, 'a:' .. n,
      cjson.encode({ owner, tonumber(token), stamp }), 'updated', stamp)
    out[#out + 1] = n
  else
    out[#out + 1] = 0
  end
end
return table.concat(out, ' ')
