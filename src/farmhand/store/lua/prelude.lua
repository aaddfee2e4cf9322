-- Shared by every farmhand script: redis_setup.py puts it (and, for scripts that use it,
-- ALLOWED, the legal transitions, generated from farmhand.contracts.state) in front of each
-- script body.
--
-- ARGV[1] is the key prefix, "{namespace}:"; ARGV[2] the store clock's time in epoch seconds,
-- or '' to use this server's TIME so that every executor shares one timeline.
-- Numbers become text with fmt(): Lua's own tostring() keeps only 14 digits, which would
-- cut epoch seconds to a tenth of a millisecond.

local P = ARGV[1]
local GROUP = 'farmhand'
local WAITING = { pending = true, retry_wait = true }

-- A script formats the same time (its `now`) for every intent it touches: remember the
-- last one, string.format costs more than the command it goes into.
local fmt_last, fmt_text = nil, nil
local function fmt(x)
  if x ~= fmt_last then
    fmt_last, fmt_text = x, string.format('%.17g', x)
  end
  return fmt_text
end

local function server_time()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local function clock()
  if ARGV[2] ~= '' then
    return tonumber(ARGV[2])
  end
  return server_time()
end

local function record(id)
  return P .. 'i:' .. id
end

-- -- change counter ---------------------------------------------------------------------

local changed = false

-- Every write script ends here: when it did something a waiting executor may act on
-- (`changed`), bump the counter and leave its value n as the one entry 0-n of the wake
-- stream that wait_for_change blocks on (XREAD), with the gate version (see gate.lua) so
-- that a woken executor learns both without another read. What wakes: new intents, an
-- intent left pending or retry_wait, gates, rate-limit and breaker rows. Taking, starting
-- and renewing leases and finishing one make nothing claimable, so they wake no one:
-- otherwise every idle executor would wake and claim in vain for each step of its peers
-- (a draining executor waiting for its peers' leases to end looks on its own).
local function done()
  if changed then
    local n = redis.call('INCR', P .. 'changes')
    local g = redis.call('GET', P .. 'gatesv') or '0'
    redis.call('XADD', P .. 'wake', 'MAXLEN', '1', '0-' .. n, 'n', n, 'g', g)
  end
end

-- -- optimistic writes -------------------------------------------------------------------

-- Rate-limit and breaker rows are decided on in Python (farmhand.store.limits_logic, shared
-- with the SQL stores) from rows read a moment earlier (redis_limits.py): a decision is
-- written only if none of the rows it read has changed since, all or nothing (swap.lua,
-- start.lua). The rows are `n` triples of ARGV from `i` on: field of `hash`, value read
-- ('' = none), value to write ('' = unchanged).

-- Whether the rows are as read and the decision, made at `decided`, lags this server's TIME
-- by at most `fresh` seconds ('' = no limit): the SQL stores decide on the time read under
-- their lock, and a decision that waited long would take tokens as of the past.
local function unchanged(hash, i, n, decided, fresh)
  if fresh ~= '' and server_time() - decided > tonumber(fresh) then
    return false
  end
  for _ = 1, n do
    if (redis.call('HGET', hash, ARGV[i]) or '') ~= ARGV[i + 1] then
      return false
    end
    i = i + 3
  end
  return true
end

-- Write the rows that `unchanged` found as read. Returns whether any was written, and the
-- index of the ARGV after the rows.
local function write_rows(hash, i, n)
  local wrote = false
  for _ = 1, n do
    if ARGV[i + 2] ~= '' then
      redis.call('HSET', hash, ARGV[i], ARGV[i + 2])
      wrote = true
    end
    i = i + 3
  end
  return wrote, i
end

-- -- batched commands --------------------------------------------------------------------

-- later({'ZADD', key}, score, member) gathers the arguments of index and queue updates that
-- many intents of one script make on the same key, and flush() sends each gathered command
-- once: a batch of a hundred claims costs a handful of calls instead of hundreds. Only for
-- updates whose order does not matter because each intent appears once in the script;
-- apply.lua turns batching off (`direct`) for a call that names an intent twice.
local direct = false
local gathered, gathered_order = {}, {}

local function later(head, ...)
  if direct then
    local args = { unpack(head) }
    for i = 1, select('#', ...) do
      args[#args + 1] = (select(i, ...))
    end
    return redis.call(unpack(args))
  end
  local id = table.concat(head, '\0')
  local entry = gathered[id]
  if not entry then
    entry = { head, {} }
    gathered[id] = entry
    gathered_order[#gathered_order + 1] = entry
  end
  local args = entry[2]
  for i = 1, select('#', ...) do
    args[#args + 1] = (select(i, ...))
  end
end

local function flush()
  for _, entry in ipairs(gathered_order) do
    local head, args = entry[1], entry[2]
    -- at most 500 arguments per call (Lua's unpack has a limit); pairs stay together
    for first = 1, #args, 500 do
      local call = { unpack(head) }
      for k = first, math.min(first + 499, #args) do
        call[#call + 1] = args[k]
      end
      redis.call(unpack(call))
    end
  end
  gathered, gathered_order = {}, {}
end

-- -- audit ---------------------------------------------------------------------------------

-- Append one event to the audit stream; its id is 0-<seq>. Returns the seq, which the caller
-- appends to the intent record's `audit` field (the intent's own history, see with_seq).
-- `at` is a number or already-formatted text.
local function audit(at, actor, action, iid, from, to, reason, detail)
  if type(at) == 'number' then
    at = fmt(at)
  end
  local args = { 'XADD', P .. 'audit', '0-*', 'at', at, 'actor', actor, 'action', action }
  if iid then
    args[#args + 1] = 'intent'
    args[#args + 1] = iid
  end
  if from then
    args[#args + 1] = 'from'
    args[#args + 1] = from
  end
  if to then
    args[#args + 1] = 'to'
    args[#args + 1] = to
  end
  if reason then
    args[#args + 1] = 'reason'
    args[#args + 1] = reason
  end
  if detail then
    args[#args + 1] = 'detail'
    args[#args + 1] = detail
  end
  return string.sub(redis.call(unpack(args)), 3)
end

local function with_seq(list, seq)
  if list then
    return list .. ',' .. seq
  end
  return seq
end

-- -- scopes and gates ----------------------------------------------------------------------

-- A scope is "<kind>/<account>" (neither may contain '/'): each has its own ready stream,
-- waiting set and lease set, so a closed gate simply leaves its scopes unread.
local function split_scope(sc)
  local at = string.find(sc, '/', 1, true)
  return string.sub(sc, 1, at - 1), string.sub(sc, at + 1)
end

-- Closed gate rules from ARGV[i]: a count, then (kind, account) pairs, '' = any.
local function read_rules(i)
  local n = tonumber(ARGV[i])
  local rules = {}
  for k = 1, n do
    rules[k] = { ARGV[i + 2 * k - 1], ARGV[i + 2 * k] }
  end
  return rules
end

local function blocked(rules, kind, account)
  for _, rule in ipairs(rules) do
    if (rule[1] == '' or rule[1] == kind) and (rule[2] == '' or rule[2] == account) then
      return true
    end
  end
  return false
end

-- The scopes no rule blocks, sorted; nil when a rule blocks everything.
local function open_scopes(rules)
  for _, rule in ipairs(rules) do
    if rule[1] == '' and rule[2] == '' then
      return nil
    end
  end
  local out = {}
  for _, sc in ipairs(redis.call('SMEMBERS', P .. 'scopes')) do
    local kind, account = split_scope(sc)
    if not blocked(rules, kind, account) then
      out[#out + 1] = sc
    end
  end
  table.sort(out)
  return out
end

local registered = {}
local function register_scope(sc)
  if not registered[sc] then
    registered[sc] = true
    if redis.call('SADD', P .. 'scopes', sc) == 1 then
      redis.call('XGROUP', 'CREATE', P .. 'q:' .. sc, GROUP, '0', 'MKSTREAM')
    end
  end
end

-- -- where an intent waits ------------------------------------------------------------------

-- A pending/retry_wait intent goes to its scope's ready stream when due (returns the entry
-- id, for the record's `entry` field), else to the waiting set, scored by ready time, until
-- a claim moves it over (returns false).
local function enqueue(id, sc, ready, now)
  if ready <= now then
    return redis.call('XADD', P .. 'q:' .. sc, '*', 'id', id, 'ready', fmt(ready))
  end
  redis.call('ZADD', P .. 'w:' .. sc, ready, id)
  return false
end

-- Take an intent that was in `state` out of the claim structures: lease set or waiting set,
-- and its stream entry. A leased intent's entry (delivered, pending) is acknowledged and
-- left for trim(); an undelivered one is deleted so that nothing delivers it. The caller
-- removes the record's `entry` field.
local function dequeue(id, sc, state, entry)
  if state == 'running' then
    later({ 'ZREM', P .. 'l:' .. sc }, id)
    if entry then
      later({ 'XACK', P .. 'q:' .. sc, GROUP }, entry)
    end
  elseif WAITING[state] then
    redis.call('ZREM', P .. 'w:' .. sc, id)
    if entry then
      redis.call('XDEL', P .. 'q:' .. sc, entry)
    end
  end
end

local function id_before(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  ams, bms = tonumber(ams), tonumber(bms)
  return ams < bms or (ams == bms and tonumber(aseq) < tonumber(bseq))
end

-- The id of the last entry the consumer group delivered on a ready stream.
local function last_delivered(stream)
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local info = {}
    for k = 1, #g, 2 do
      info[g[k]] = g[k + 1]
    end
    if info['name'] == GROUP then
      return info['last-delivered-id']
    end
  end
  return '0-0'
end

-- Drop acknowledged entries from the front of a scope's ready stream (call it after flush()):
-- everything older than both the oldest entry still pending (leased) and the next one to
-- deliver. Deleting each entry as it is acknowledged (XDEL) costs several times more than the
-- whole acknowledgement.
local function trim(sc)
  local stream = P .. 'q:' .. sc
  local ms, seq = string.match(last_delivered(stream), '^(%d+)-(%d+)$')
  local floor = ms .. '-' .. string.format('%d', tonumber(seq) + 1)
  local pending = redis.call('XPENDING', stream, GROUP)
  if pending[1] > 0 and id_before(pending[2], floor) then
    floor = pending[2]
  end
  redis.call('XTRIM', stream, 'MINID', '~', floor)
end

-- Move an intent between the per-state indexes (scored by submission order).
local function index(id, seq, from, to)
  if from ~= to then
    if from then
      later({ 'ZREM', P .. 'state:' .. from }, id)
    end
    later({ 'ZADD', P .. 'state:' .. to }, seq, id)
  end
end

-- -- reads ---------------------------------------------------------------------------------

-- An intent as {id, body, state, attempts, max, reason, updated, ready, owner, token,
-- receipts} (reason and owner false when unset), or false. Receipts are the record's fields
-- rc:1..rc:<nrc>, oldest first.
local function status_of(id)
  local key = record(id)
  local f = redis.call('HMGET', key, 'body', 'state', 'attempts', 'max', 'reason', 'updated',
    'ready', 'owner', 'token', 'nrc')
  if not f[1] then
    return false
  end
  local receipts = {}
  local n = tonumber(f[10] or '0')
  if n > 0 then
    local fields = {}
    for k = 1, n do
      fields[k] = 'rc:' .. k
    end
    receipts = redis.call('HMGET', key, unpack(fields))
  end
  return { id, f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8], f[9], receipts }
end

-- Running intents and the earliest time something becomes claimable (a waiting intent's
-- ready time, a ready stream's oldest undelivered entry, a lease's expiry) over `scopes`:
-- {running, time or false}.
local function readiness_of(scopes)
  local running, best = 0, nil
  local function consider(t)
    t = tonumber(t)
    if t and (best == nil or t < best) then
      best = t
    end
  end
  for _, sc in ipairs(scopes) do
    local leases = P .. 'l:' .. sc
    running = running + redis.call('ZCARD', leases)
    consider(redis.call('ZRANGE', leases, 0, 0, 'WITHSCORES')[2])
    consider(redis.call('ZRANGE', P .. 'w:' .. sc, 0, 0, 'WITHSCORES')[2])
    local stream = P .. 'q:' .. sc
    local first = redis.call('XRANGE', stream, '(' .. last_delivered(stream), '+', 'COUNT', 1)[1]
    consider(first and first[2][4])
  end
  return { running, best and fmt(best) or false }
end
