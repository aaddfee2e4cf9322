#!lua flags=no-writes
-- audit and receipts, newest first: ARGV[3] 'audit' or 'receipts', [4] intent id ('' = all),
-- [5] limit. Audit events come as stream entries {0-<seq>, {field, value, ...}}, receipts
-- as JSON.

local what, iid, limit = ARGV[3], ARGV[4], tonumber(ARGV[5])
local out = {}
if limit <= 0 then
  return out
end
if what == 'audit' then
  if iid == '' then
    return redis.call('XREVRANGE', P .. 'audit', '+', '-', 'COUNT', limit)
  end
  local seqs = {}
  for seq in string.gmatch(redis.call('HGET', record(iid), 'audit') or '', '[^,]+') do
    seqs[#seqs + 1] = seq
  end
  for k = #seqs, math.max(1, #seqs - limit + 1), -1 do
    local id = '0-' .. seqs[k]
    local e = redis.call('XRANGE', P .. 'audit', id, id)[1]
    if e then
      out[#out + 1] = e
    end
  end
  return out
end
if iid ~= '' then
  local n = tonumber(redis.call('HGET', record(iid), 'nrc') or '0')
  for k = n, math.max(1, n - limit + 1), -1 do
    out[#out + 1] = redis.call('HGET', record(iid), 'rc:' .. k)
  end
  return out
end
local refs = redis.call('LRANGE', P .. 'receipts', -limit, -1)
for k = #refs, 1, -1 do
  local at = string.find(refs[k], ' ', 1, true)
  local id, n = string.sub(refs[k], 1, at - 1), string.sub(refs[k], at + 1)
  out[#out + 1] = redis.call('HGET', record(id), 'rc:' .. n)
end
return out
