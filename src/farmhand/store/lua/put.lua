#!lua
-- put_intents: insert each intent unless its idempotency key is taken.
-- ARGV[3]: JSON list of [id, key, scope, state, ready ('' = now), max_attempts, actor, body].
-- Returns, separated by \31: now, then per intent the stored id and 1 if it was inserted
-- (else 0).

local now = clock()
local stamp = fmt(now)
local out = { stamp }
for _, m in ipairs(cjson.decode(ARGV[3])) do
  local id, key, sc, state = m[1], m[2], m[3], m[4]
  if redis.call('HSETNX', P .. 'keys', key, id) == 0 then
    out[#out + 1] = redis.call('HGET', P .. 'keys', key)
    out[#out + 1] = 0
  else
    local ready = now
    if m[5] ~= '' then
      ready = tonumber(m[5])
    end
    register_scope(sc)
    -- the submission order: the position in the list of every intent
    local seq = redis.call('RPUSH', P .. 'all', id)
    local fields = { 'HSET', record(id), 'body', m[8], 'key', key, 'scope', sc, 'seq', seq,
      'state', state, 'attempts', 0, 'max', m[6], 'token', 0, 'ready', fmt(ready),
      'updated', stamp, 'audit', audit(now, m[7], 'submit', id, nil, state) }
    if WAITING[state] then
      local entry = enqueue(id, sc, ready, now)
      if entry then
        fields[#fields + 1] = 'entry'
        fields[#fields + 1] = entry
      end
    end
    redis.call(unpack(fields))
    index(id, seq, nil, state)
    changed = true
    out[#out + 1] = id
    out[#out + 1] = 1
  end
end
flush()
done()
return table.concat(out, '\31')
