#!lua
-- apply: each change whose precondition holds (the lease token, or one of the from-states),
-- with its receipt and audit event; optionally an approval appended after them.
-- ARGV[3]: JSON list of changes [id, to, actor, action, reason or null, token ('' = none),
-- from-states (comma-separated), ready ('' = now), receipt JSON ('' = none), receipt
-- attempt, extra attempts]. ARGV[4..11], optionally, an approval: intent id, JSON, at,
-- approver, action, has_reason (1/0), reason, detail (JSON).
-- Returns one character per change, '1' (applied) or '0'. A holding precondition with an
-- illegal transition fails the whole call before anything is written (Redis does not roll a
-- script back).

local changes = cjson.decode(ARGV[3])
local now = clock()
local stamp = fmt(now)
local FIELDS = { 'state', 'token', 'scope', 'entry', 'seq', 'audit', 'nrc' }

local function holds(c, state, token)
  if not state then
    return false
  end
  if c[6] ~= '' then
    return state == 'running' and token == c[6]
  end
  for s in string.gmatch(c[7], '[^,]+') do
    if s == state then
      return true
    end
  end
  return false
end

-- pass 1: decide every change in order, on the states the earlier ones leave behind
local records, from = {}, {}
for k, c in ipairs(changes) do
  local r = records[c[1]]
  if r then
    direct = true
  else
    r = redis.call('HMGET', record(c[1]), unpack(FIELDS))
    records[c[1]] = r
  end
  local state = r[1]
  if holds(c, state, r[2]) then
    if not ALLOWED[state][c[2]] then
      return redis.error_reply('FARMHAND_TRANSITION intent ' .. c[1] .. ' is ' .. state
        .. '; it cannot become ' .. c[2])
    end
    from[k] = state
    r[1] = c[2]
  end
end

-- pass 2: write the changes that hold; `records` is kept current for repeated intents
local out, acked = {}, {}
for k, c in ipairs(changes) do
  local state = from[k]
  if state then
    local id, to = c[1], c[2]
    local key, r = record(id), records[id]
    local sc = r[3]
    dequeue(id, sc, state, r[4])
    if state == 'running' then
      acked[sc] = true
    end
    local reason = c[5] ~= cjson.null and c[5] or nil
    local ready = now
    if WAITING[to] and c[8] ~= '' then
      ready = tonumber(c[8])
    end
    local seq = audit(now, c[3], c[4], id, state, to, reason)
    r[6] = with_seq(r[6], seq)
    local set = { 'HSET', key, 'state', to, 'ready', fmt(ready), 'updated', stamp, 'audit', r[6] }
    local del = { 'HDEL', key, 'owner', 'expires', 'entry' }
    if reason then
      set[#set + 1] = 'reason'
      set[#set + 1] = reason
    else
      del[#del + 1] = 'reason'
    end
    r[4] = false
    if WAITING[to] then
      changed = true
      r[4] = enqueue(id, sc, ready, now)
      if r[4] then
        set[#set + 1] = 'entry'
        set[#set + 1] = r[4]
      end
    end
    if c[9] ~= '' then
      local n = tonumber(r[7] or '0') + 1
      r[7] = n
      for _, v in ipairs({ 'nrc', n, 'rc:' .. n, c[9], 'r:' .. c[10], 1 }) do
        set[#set + 1] = v
      end
      later({ 'RPUSH', P .. 'receipts' }, id .. ' ' .. n)
    end
    -- deletes first: a new stream entry replaces the old one
    redis.call(unpack(del))
    redis.call(unpack(set))
    if c[11] ~= 0 then
      redis.call('HINCRBY', key, 'max', c[11])
    end
    index(id, r[5], state, to)
    out[k] = 1
  else
    out[k] = 0
  end
end

flush()
for sc in pairs(acked) do
  trim(sc)
end

if ARGV[4] then
  if #changes > 0 and out[1] == 0 then
    return '0'
  end
  local iid = ARGV[4]
  redis.call('RPUSH', P .. 'ap:' .. iid, ARGV[5])
  local reason = ARGV[9] == '1' and ARGV[10] or nil
  local seq = audit(ARGV[6], ARGV[7], ARGV[8], iid, nil, nil, reason, ARGV[11])
  changed = true
  local key = record(iid)
  if redis.call('EXISTS', key) == 1 then
    redis.call('HSET', key, 'audit', with_seq(redis.call('HGET', key, 'audit'), seq))
  end
end

done()
return table.concat(out)
