-- Claim request ids at intake so that one replica processes each (pub/sub delivers every
-- message to every subscriber), and skip ids whose result is already published.
-- KEYS[2i-1]  claim key of id i   ({hash tag}:claim:<id>)
-- KEYS[2i]    done key of id i    ({hash tag}:done:<id>), set when its result was published
-- ARGV[1]     owner (host:pid), stored in the claim for operators
-- ARGV[2]     claim TTL, seconds
-- returns     one flag per id: 1 = ours to process, 0 = another replica's or already done
local won = {}
for i = 1, #KEYS, 2 do
  if redis.call('EXISTS', KEYS[i + 1]) == 0
     and redis.call('SET', KEYS[i], ARGV[1], 'NX', 'EX', tonumber(ARGV[2])) then
    won[#won + 1] = 1
  else
    won[#won + 1] = 0
  end
end
return won
