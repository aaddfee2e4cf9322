#!lua flags=no-writes
-- list_intents, one page: intents submitted before `before` (a submission number,
-- exclusive; '' for the newest), newest first, matching the filters.
-- ARGV[3] state, [4] kind, [5] account ('' = any), [6] page size, [7] before.
-- Returns JSON: [next `before` ('' when nothing older is left), statuses...]. At most a few
-- thousand intents are looked at per call, so a long listing never blocks the server.

local state, kind, account = ARGV[3], ARGV[4], ARGV[5]
local size = tonumber(ARGV[6])
local out = { '' }
local budget = math.max(size * 4, 2000)
local page

local function keep(id)
  if kind == '' and account == '' then
    return true
  end
  local k, a = split_scope(redis.call('HGET', record(id), 'scope'))
  return (kind == '' or kind == k) and (account == '' or account == a)
end

if state == '' then
  -- every intent, by position in the submission list
  local before = tonumber(ARGV[7] ~= '' and ARGV[7] or redis.call('LLEN', P .. 'all') + 1)
  while #out - 1 < size and budget > 0 and before > 1 do
    local first = math.max(1, before - math.min(budget, 500))
    budget = budget - (before - first)
    page = redis.call('LRANGE', P .. 'all', first - 1, before - 2)
    for k = #page, 1, -1 do
      before = first + k - 1
      if keep(page[k]) then
        out[#out + 1] = status_of(page[k])
        if #out - 1 >= size then
          break
        end
      end
    end
  end
  out[1] = before > 1 and tostring(before) or ''
  return cjson.encode(out)
end

local before = ARGV[7] ~= '' and ('(' .. ARGV[7]) or '+inf'
local exhausted = false
while #out - 1 < size and budget > 0 and not exhausted do
  local chunk = math.min(budget, 500)
  budget = budget - chunk
  page = redis.call('ZREVRANGEBYSCORE', P .. 'state:' .. state, before, '-inf', 'WITHSCORES',
    'LIMIT', 0, chunk)
  local full = false
  for k = 1, #page, 2 do
    before = '(' .. page[k + 1]
    if keep(page[k]) then
      out[#out + 1] = status_of(page[k])
      if #out - 1 >= size then
        full = true
        break
      end
    end
  end
  exhausted = not full and #page < 2 * chunk
end
out[1] = exhausted and '' or string.sub(before, 2)
return cjson.encode(out)
