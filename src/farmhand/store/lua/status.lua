#!lua flags=no-writes
-- get: each intent named by id or idempotency key (an id match wins), with its receipts.
-- ARGV[3..] references. Returns JSON: one status (see status_of) or false per reference.

local out = {}
for i = 3, #ARGV do
  local ref = ARGV[i]
  local found = status_of(ref)
  if not found then
    local id = redis.call('HGET', P .. 'keys', ref)
    found = id and status_of(id) or false
  end
  out[#out + 1] = found
end
return cjson.encode(out)
