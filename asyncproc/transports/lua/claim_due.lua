-- Take retry-set entries that are due under a lease, atomically, so two replicas never take
-- one and a holder that dies (or a reply lost with the connection) loses none: an entry
-- leaves the lease set only when what replaces it is written. First leases whose holder
-- let them run out, then due entries of the retry set.
-- KEYS[1]  retry sorted set (member: request state; score: due time, Unix seconds)
-- KEYS[2]  its lease sorted set (same hash slot; member -> lease expiry)
-- ARGV[1]  now (Unix seconds)
-- ARGV[2]  lease expiry for what is taken now
-- ARGV[3]  limit (how many entries at most)
-- returns  the members taken, lapsed leases first, then earliest due first
local limit = tonumber(ARGV[3])
local out = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, limit)
for _, member in ipairs(out) do
  redis.call('ZADD', KEYS[2], ARGV[2], member)
end
local left = limit - #out
if left > 0 then
  local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, left)
  for _, member in ipairs(due) do
    redis.call('ZREM', KEYS[1], member)
    redis.call('ZADD', KEYS[2], ARGV[2], member)
    out[#out + 1] = member
  end
end
return out
