-- Publish each result once per id within the dedupe window, even when a flush is repeated
-- after a lost reply or a request is redelivered after a crash, and drop the id's intake
-- record (its lease): it is answered.
-- KEYS[1]     held sorted set ({hash tag}:held)
-- KEYS[2]     held messages hash ({hash tag}:held-messages)
-- KEYS[2+i]   done key of result i ({hash tag}:done:<id>)
-- ARGV[1]     dedupe window, seconds (0 = publish every result)
-- ARGV[2]     result channel
-- ARGV[1+2i]  id key of result i
-- ARGV[2+2i]  encoded result i
-- returns     how many results were published
local window = tonumber(ARGV[1])
local published = 0
for i = 1, #KEYS - 2 do
  if window == 0 or redis.call('SET', KEYS[2 + i], '1', 'NX', 'EX', window) then
    redis.call('PUBLISH', ARGV[2], ARGV[2 + 2 * i])
    published = published + 1
  end
  redis.call('ZREM', KEYS[1], ARGV[1 + 2 * i])
  redis.call('HDEL', KEYS[2], ARGV[1 + 2 * i])
end
return published
