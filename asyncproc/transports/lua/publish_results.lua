-- Publish each result once per id within the dedupe window, even when a flush is repeated
-- after a lost reply or a request is redelivered after a crash.
-- KEYS[i]     done key of result i ({hash tag}:done:<id>)
-- ARGV[1]     dedupe window, seconds (0 = publish every result)
-- ARGV[2]     result channel
-- ARGV[2+i]   encoded result i
-- returns     how many results were published
local window = tonumber(ARGV[1])
local published = 0
for i, key in ipairs(KEYS) do
  if window == 0 or redis.call('SET', key, '1', 'NX', 'EX', window) then
    redis.call('PUBLISH', ARGV[2], ARGV[2 + i])
    published = published + 1
  end
end
return published
