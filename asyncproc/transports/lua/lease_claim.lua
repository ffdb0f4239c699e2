-- Claim work under a lease: first what is due in the lease set (retries whose time has
-- come, put-backs, and leases whose holder died), then new requests from the ready set.
-- Claimed members get a lease until ARGV[2]; a holder that dies lets it expire.
-- KEYS[1]  ready sorted set (the request queue; its score orders it, e.g. the deadline)
-- KEYS[2]  lease sorted set (member -> lease expiry, or due time of a retry)
-- KEYS[3]  state hash (member -> request state JSON stored with a retry)
-- ARGV[1]  now (Unix seconds)
-- ARGV[2]  lease expiry for what is claimed now
-- ARGV[3]  limit
-- ARGV[4]  '1' to take new requests from KEYS[1] too, '0' not to
-- returns  flat list: member, state ('' if none), member, state, ...
local out = {}
local limit = tonumber(ARGV[3])
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, limit)
for _, member in ipairs(due) do
  redis.call('ZADD', KEYS[2], ARGV[2], member)
  out[#out + 1] = member
  out[#out + 1] = redis.call('HGET', KEYS[3], member) or ''
end
local left = limit - #due
if left > 0 and ARGV[4] == '1' then
  local fresh = redis.call('ZRANGE', KEYS[1], 0, left - 1)
  for _, member in ipairs(fresh) do
    redis.call('ZREM', KEYS[1], member)
    redis.call('ZADD', KEYS[2], ARGV[2], member)
    out[#out + 1] = member
    out[#out + 1] = ''
  end
end
return out
