-- redis-pubsub: take held messages back under a new lease: first those whose holder let
-- the lease run out (it died), then those staged (overflow the holder handed back as it
-- was received; their records stayed), oldest first.
-- KEYS[1]  held sorted set (id key -> lease expiry)
-- KEYS[2]  staged sorted set (id key -> when it was first received)
-- KEYS[3]  held messages hash (id key -> queue and message)
-- ARGV[1]  now (Unix seconds)
-- ARGV[2]  lease expiry for what is taken now
-- ARGV[3]  limit
-- returns  {how many had a dead holder, id key, record, received ('' if not staged), ...}
local out = {0}
local limit = tonumber(ARGV[3])
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, limit)
for _, key in ipairs(expired) do
  redis.call('ZADD', KEYS[1], ARGV[2], key)
  out[#out + 1] = key
  out[#out + 1] = redis.call('HGET', KEYS[3], key) or ''
  out[#out + 1] = ''
end
out[1] = #expired
local left = limit - #expired
if left > 0 then
  local staged = redis.call('ZRANGE', KEYS[2], 0, left - 1, 'WITHSCORES')
  for i = 1, #staged, 2 do
    local key = staged[i]
    redis.call('ZREM', KEYS[2], key)
    local record = redis.call('HGET', KEYS[3], key)
    if record then  -- (gone only if its result was published meanwhile)
      redis.call('ZADD', KEYS[1], ARGV[2], key)
      out[#out + 1] = key
      out[#out + 1] = record
      out[#out + 1] = staged[i + 1]
    end
  end
end
return out
