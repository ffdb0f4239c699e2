-- Claim the retry-set entries that are due, atomically, so two replicas never take one.
-- KEYS[1]  retry sorted set (score = due time, Unix seconds)
-- ARGV[1]  now (Unix seconds)
-- ARGV[2]  limit (how many entries at most)
-- returns  the claimed members, earliest first
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #due > 0 then
  redis.call('ZREM', KEYS[1], unpack(due))
end
return due
