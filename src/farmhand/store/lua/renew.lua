#!lua
-- renew: extend each lease whose token is still current (an expired lease nobody took over
-- yet may be renewed too). The stream entry is re-claimed by its holder, which resets its
-- idle time: XAUTOCLAIM's real-time idle then measures time since the holder's last sign
-- of life. As in start.lua, the owner must match as well as the token.
-- ARGV[3] ttl, [4] JSON list of [id, token, owner]. Returns the expiry, then '1' or '0'
-- per lease, separated by spaces. Wakes no one (see done() in the prelude).

local now = clock()
local expires = now + tonumber(ARGV[3])
local out = { fmt(expires) }
for _, lease in ipairs(cjson.decode(ARGV[4])) do
  local id = lease[1]
  local key = record(id)
  local f = redis.call('HMGET', key, 'state', 'token', 'scope', 'entry', 'owner')
  if f[1] == 'running' and f[2] == lease[2] and f[5] == lease[3] then
    redis.call('HSET', key, 'expires', fmt(expires))
    redis.call('ZADD', P .. 'l:' .. f[3], expires, id)
    if f[4] then
      redis.call('XCLAIM', P .. 'q:' .. f[3], GROUP, f[5], 0, f[4], 'JUSTID')
    end
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return table.concat(out, ' ')
