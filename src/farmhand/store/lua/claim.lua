#!lua
-- claim: lease up to `limit` intents of scopes no closed gate blocks, in three passes:
--   1. leases whose expiry (in the record, by the store's clock) has passed: takeover;
--   2. XAUTOCLAIM sweep of stream entries idle for longer than the lease TTL (real time),
--      each scope at most once per half TTL or second, whichever is shorter, settled by
--      the record: a lapsed lease is taken over, a live one handed back to its holder, an
--      entry no record stands behind acknowledged;
--   3. due intents: moved from the waiting set to the ready stream, read with XREADGROUP.
-- ARGV[3] owner, [4] limit, [5] ttl (seconds), [6] rotation, [7] sweep min-idle (ms),
-- [8..] closed gate rules. Returns, separated by \30, the lease expiry and per claim id,
-- token, attempts, max_attempts, previous state, open attempt (JSON, or '') and body,
-- separated by \31, and when it claimed fewer than `limit` a last line '' \31 running \31
-- time (or ''): the readiness of the same scopes (see readiness.lua) once these leases are
-- taken, which the executor asks for next; or, when it claimed nothing, that readiness
-- alone as {running, time or false}.

local owner, limit, ttl = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local rotation, min_idle = tonumber(ARGV[6]), ARGV[7]
local scopes = open_scopes(read_rules(8))
if not scopes then
  return { 0, false }
end
if #scopes == 0 or limit <= 0 then
  return readiness_of(scopes)
end
local now = clock()
local expires = now + ttl
local stamp, until_ = fmt(now), fmt(expires)
local left = limit
local out = { until_ }
local FIELDS = { 'state', 'entry', 'body', 'attempts', 'max', 'seq', 'token', 'audit',
  'expires', 'owner' }

-- start at a different scope each time so that one scope's backlog cannot starve the rest
local order = {}
for k = 1, #scopes do
  order[k] = scopes[((k - 1 + rotation) % #scopes) + 1]
end

local function fetch(id)
  return redis.call('HMGET', record(id), unpack(FIELDS))
end

-- f: the record's FIELDS
local function grant(id, sc, f)
  local key, prev = record(id), f[1]
  local token = tonumber(f[7]) + 1
  local seq = audit(now, owner, 'claim', id, prev, 'running')
  redis.call('HSET', key, 'state', 'running', 'owner', owner, 'expires', until_, 'updated',
    stamp, 'token', token, 'audit', with_seq(f[8], seq))
  later({ 'ZADD', P .. 'l:' .. sc }, expires, id)
  if prev == 'running' then
    -- the stream entry follows the lease: the new holder's consumer owns it now
    if f[2] then
      redis.call('XCLAIM', P .. 'q:' .. sc, GROUP, owner, 0, f[2], 'JUSTID')
    end
  else
    index(id, f[6], prev, 'running')
  end
  local attempts = tonumber(f[4])
  local open = false
  if attempts > 0 then
    local a = redis.call('HMGET', key, 'r:' .. attempts, 'a:' .. attempts)
    if not a[1] then
      open = a[2]
    end
  end
  -- one line per claim; JSON never holds a raw control character, so \31 and \30 separate
  out[#out + 1] = table.concat({ id, token, attempts, f[5], prev, open or '', f[3] }, '\31')
  left = left - 1
end

local function forget(stream, entry)
  redis.call('XACK', stream, GROUP, entry)
  redis.call('XDEL', stream, entry)
end

-- Executors come and go under new names; drop consumers that hold nothing and have been
-- idle for ten minutes (at most once a minute per scope). Holding nothing is checked in
-- the same script, so no pending entry can be dropped with its consumer.
local function tidy(sc, stream)
  local last = tonumber(redis.call('HGET', P .. 'tidied', sc) or '0')
  if now - last < 60 and now >= last then
    return
  end
  redis.call('HSET', P .. 'tidied', sc, stamp)
  for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', stream, GROUP)) do
    local info = {}
    for k = 1, #c, 2 do
      info[c[k]] = c[k + 1]
    end
    if info['pending'] == 0 and info['idle'] > 600000 then
      redis.call('XGROUP', 'DELCONSUMER', stream, GROUP, info['name'])
    end
  end
end

-- XAUTOCLAIM scans the pending entries from its cursor on every call; an entry is only
-- found once it has been idle for min_idle, so sweeping a scope more often than every
-- min_idle / 2 (real time, at most a second) finds nothing new but costs each claim a scan.
local real_ms = nil
local function sweep_due(sc)
  if not real_ms then
    local t = redis.call('TIME')
    real_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  local last = tonumber(redis.call('HGET', P .. 'swept', sc) or '0')
  if real_ms >= last and real_ms - last < math.min(1000, tonumber(min_idle) / 2) then
    return false
  end
  redis.call('HSET', P .. 'swept', sc, real_ms)
  return true
end

local function sweep(sc)
  if not sweep_due(sc) then
    return
  end
  local stream = P .. 'q:' .. sc
  local cursor = redis.call('HGET', P .. 'cursor', sc) or '0-0'
  local res = redis.call('XAUTOCLAIM', stream, GROUP, owner, min_idle, cursor, 'COUNT',
    math.min(left, 10))
  if res[1] ~= cursor then
    redis.call('HSET', P .. 'cursor', sc, res[1])
  end
  if res[1] == '0-0' then
    tidy(sc, stream)
  end
  for _, e in ipairs(res[2]) do
    local entry, fields = e[1], e[2]
    local id = fields and fields[2]
    local f = id and fetch(id)
    if not f or not f[1] or f[2] ~= entry then
      forget(stream, entry)
    elseif f[1] == 'running' then
      if tonumber(f[9] or '0') <= now then
        grant(id, sc, f)
      else
        redis.call('XCLAIM', stream, GROUP, f[10], 0, entry, 'JUSTID')
      end
    elseif WAITING[f[1]] then
      -- delivered but never leased (a script that failed half-way): lease it now
      grant(id, sc, f)
    else
      forget(stream, entry)
      redis.call('HDEL', record(id), 'entry')
    end
  end
end

for _, sc in ipairs(order) do
  if left <= 0 then
    break
  end
  local lapsed = redis.call('ZRANGEBYSCORE', P .. 'l:' .. sc, '-inf', now, 'LIMIT', 0, left)
  for _, id in ipairs(lapsed) do
    local f = fetch(id)
    if f[1] == 'running' then
      grant(id, sc, f)
    end
  end
end

for _, sc in ipairs(order) do
  if left <= 0 then
    break
  end
  sweep(sc)
end

for _, sc in ipairs(order) do
  if left <= 0 then
    break
  end
  local stream = P .. 'q:' .. sc
  local due = redis.call('ZRANGEBYSCORE', P .. 'w:' .. sc, '-inf', now, 'WITHSCORES', 'LIMIT',
    0, left)
  for k = 1, #due, 2 do
    local entry = redis.call('XADD', stream, '*', 'id', due[k], 'ready', due[k + 1])
    redis.call('HSET', record(due[k]), 'entry', entry)
    redis.call('ZREM', P .. 'w:' .. sc, due[k])
  end
  local res = redis.call('XREADGROUP', 'GROUP', GROUP, owner, 'COUNT', left, 'STREAMS', stream,
    '>')
  if res then
    for _, e in ipairs(res[1][2]) do
      local entry, id = e[1], e[2][2]
      local f = fetch(id)
      if WAITING[f[1]] and f[2] == entry then
        grant(id, sc, f)
      else
        forget(stream, entry)
      end
    end
  end
end

flush()
-- a claim only leaves intents running: it wakes no one (see done() in the prelude)
if #out == 1 then
  return readiness_of(scopes)
end
if left > 0 then
  local ready = readiness_of(scopes)
  out[#out + 1] = table.concat({ '', ready[1], ready[2] or '' }, '\31')
end
return table.concat(out, '\30')
