#!lua
-- start_attempts: the durable "attempt started" record, for each lease whose token is
-- current and whose expiry (by the store's clock) has not passed. The owner must match
-- too: a failover that lost a claim can hand the same token number out again, and then only
-- the owner tells the lost lease from the new one.
-- ARGV[3]: JSON list of [id, token, owner] or, guarded, [id, token, owner, kind, account,
-- [bucket, ...], breaker or false]: then the attempt starts only if no closed gate covers
-- kind and account, no bucket named is paused and the breaker (if named) is closed, all
-- judged here, atomically with the start (limits_logic.held_by says the same in Python).
-- Returns, separated by spaces, now and per lease the attempt number, 0 where the lease
-- was lost, or what held it back: g(ate), p(aused), b(reaker). Wakes no one (see done()).

local now = clock()
local stamp = fmt(now)
local out = { stamp }

local closed = nil
local function closed_rules()
  if closed == nil then
    closed = {}
    local all = redis.call('HGETALL', P .. 'gates')
    for i = 1, #all, 2 do
      if not cjson.decode(all[i + 1]).open then
        local kind, account = split_scope(all[i])
        closed[#closed + 1] = { kind, account }
      end
    end
  end
  return closed
end

local function held(lease)
  if blocked(closed_rules(), lease[4], lease[5]) then
    return 'g'
  end
  for _, name in ipairs(lease[6]) do
    local raw = redis.call('HGET', P .. 'buckets', name)
    if raw and tonumber(cjson.decode(raw)[2]) > now then
      return 'p'
    end
  end
  if lease[7] then
    local raw = redis.call('HGET', P .. 'breakers', lease[7])
    if raw and cjson.decode(raw)[1] ~= 'closed' then
      return 'b'
    end
  end
  return nil
end

for _, lease in ipairs(cjson.decode(ARGV[3])) do
  local id, token, owner = lease[1], lease[2], lease[3]
  local key = record(id)
  local f = redis.call('HMGET', key, 'state', 'token', 'expires', 'attempts', 'owner')
  if f[1] == 'running' and f[2] == token and f[5] == owner and tonumber(f[3]) > now then
    local why = lease[4] and held(lease)
    if why then
      out[#out + 1] = why
    else
      local n = tonumber(f[4]) + 1
      redis.call('HSET', key, 'attempts', n, 'a:' .. n,
        cjson.encode({ owner, tonumber(token), stamp }), 'updated', stamp)
      out[#out + 1] = n
    end
  else
    out[#out + 1] = 0
  end
end
return table.concat(out, ' ')
