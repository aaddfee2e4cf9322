#!lua
-- start_attempts: the durable "attempt started" record, for each lease whose token is
-- current and whose expiry (by the store's clock) has not passed. The owner must match
-- too: a failover that lost a claim can hand the same token number out again, and then only
-- the owner tells the lost lease from the new one.
-- ARGV[3]: JSON list of [id, token, owner] or, guarded, [id, token, owner, kind, account,
-- [bucket, ...], breaker or false]: then the attempt starts only if no closed gate covers
-- kind and account, no bucket named is paused and the breaker (if named) is closed, all
-- judged here, atomically with the start (limits_logic.held_by says the same in Python).
-- A guard that takes rate-limit tokens ends in what Python decided on the buckets as read
-- a moment earlier (redis_limits.py): 't', the lease took its tokens; 'l', the limiter
-- refused them (it does not start). With a 't' lease, ARGV[4] is the time the tokens were
-- taken at (its attempt is stamped with it), ARGV[5] the most seconds that may lag this
-- server's TIME ('' = no limit), ARGV[6] the number of buckets read, then per bucket: name,
-- value read, value to write (see "optimistic writes" in the prelude). The tokens and the
-- starts are written only if no bucket changed and every 't' lease starts: a token is never
-- taken for a lease that does not.
-- Returns, separated by spaces, now and per lease the attempt number, 0 where the lease
-- was lost, or what held it back: g(ate), p(aused), b(reaker), l(imited). 'again' instead
-- of now: a 't' lease was lost or held, nothing was written (Python takes the tokens again
-- without it). A bucket changed or the decision is too old: {'stale', now, the buckets'
-- values, false where missing}, what to decide on again. Wakes no one (see done()): neither
-- a start nor a token taken makes anything claimable or any wait shorter.

local now = clock()
local stamp = fmt(now)
local taken = ARGV[4]
if taken then
  local buckets = tonumber(ARGV[6])
  if not unchanged(P .. 'buckets', 7, buckets, tonumber(taken), ARGV[5]) then
    local out = { 'stale', stamp }
    for i = 7, 4 + 3 * buckets, 3 do
      out[#out + 1] = redis.call('HGET', P .. 'buckets', ARGV[i])
    end
    return out
  end
  taken = fmt(tonumber(taken))
end

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

-- judged first, written after: a 't' lease that does not start undoes the whole call
local out = { stamp }
local starts = {}
local counted = {} -- attempts per record so far: a lease named twice starts twice
for _, lease in ipairs(cjson.decode(ARGV[3])) do
  local id, token, owner = lease[1], lease[2], lease[3]
  local key = record(id)
  local f = redis.call('HMGET', key, 'state', 'token', 'expires', 'attempts', 'owner')
  local answer, starting = 0, false
  if f[1] == 'running' and f[2] == token and f[5] == owner and tonumber(f[3]) > now then
    answer = lease[4] and held(lease)
    if not answer and lease[8] == 'l' then
      answer = 'l'
    elseif not answer then
      answer, starting = (counted[key] or tonumber(f[4])) + 1, true
      counted[key] = answer
      starts[#starts + 1] = { key, answer, owner, token, lease[8] == 't' and taken or stamp }
    end
  end
  if lease[8] == 't' and not starting then
    out[1] = 'again'
  end
  out[#out + 1] = answer
end
if out[1] == 'again' then
  return table.concat(out, ' ')
end

if taken then
  write_rows(P .. 'buckets', 7, tonumber(ARGV[6]))
end
for _, s in ipairs(starts) do
  local n, at = s[2], s[5]
  redis.call('HSET', s[1], 'attempts', n, 'a:' .. n, cjson.encode({ s[3], tonumber(s[4]), at }),
    'updated', at)
end
return table.concat(out, ' ')
