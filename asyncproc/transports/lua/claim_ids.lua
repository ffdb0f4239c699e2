-- Claim request ids at intake so that one replica processes each (pub/sub delivers every
-- message to every subscriber), skip ids whose result is already published, and record
-- each message won under a lease: from here on Redis has it, so a holder's death (kill -9)
-- loses nothing; the record goes when its result is published or its retry scheduled.
-- KEYS[1]     held sorted set ({hash tag}:held: id key -> lease expiry)
-- KEYS[2]     held messages hash ({hash tag}:held-messages: id key -> queue and message)
-- KEYS[1+2i]  claim key of id i   ({hash tag}:claim:<id>)
-- KEYS[2+2i]  done key of id i    ({hash tag}:done:<id>), set when its result was published
-- ARGV[1]     owner (host:pid), stored in the claim for operators
-- ARGV[2]     claim TTL, seconds
-- ARGV[3]     lease expiry (Unix seconds)
-- ARGV[4]     '1' to claim, '0' to only record (claims turned off)
-- ARGV[3+2i]  id key of id i
-- ARGV[4+2i]  record of id i
-- returns     one flag per id: 1 = ours to process, 0 = another replica's or already done
local won = {}
local claim = ARGV[4] == '1'
for i = 1, (#KEYS - 2) / 2 do
  local claim_key, done_key = KEYS[1 + 2 * i], KEYS[2 + 2 * i]
  if not claim or (redis.call('EXISTS', done_key) == 0
                   and redis.call('SET', claim_key, ARGV[1], 'NX', 'EX', tonumber(ARGV[2]))) then
    local id_key = ARGV[3 + 2 * i]
    redis.call('ZADD', KEYS[1], ARGV[3], id_key)
    redis.call('HSET', KEYS[2], id_key, ARGV[4 + 2 * i])
    won[#won + 1] = 1
  else
    won[#won + 1] = 0
  end
end
return won
