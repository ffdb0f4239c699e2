-- Append results to a list (RPUSH, or LPUSH as llm-d-async does) or a stream (XADD, trimmed), each once per id within
-- the dedupe window, so a repeated flush or a redelivered request adds no second result.
-- KEYS[1]     result list or stream
-- KEYS[1+i]   done key of result i (same hash slot as KEYS[1])
-- ARGV[1]     dedupe window, seconds (0 = append every result)
-- ARGV[2]     'list' (RPUSH), 'lpush' or 'stream'
-- ARGV[3]     approximate MAXLEN of the stream (0 = no trimming)
-- ARGV[3+i]   encoded result i
-- returns     how many results were appended
local window = tonumber(ARGV[1])
local appended = 0
for i = 2, #KEYS do
  if window == 0 or redis.call('SET', KEYS[i], '1', 'NX', 'EX', window) then
    local result = ARGV[2 + i]
    if ARGV[2] == 'stream' then
      if tonumber(ARGV[3]) > 0 then
        redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'message', result)
      else
        redis.call('XADD', KEYS[1], '*', 'message', result)
      end
    elseif ARGV[2] == 'lpush' then
      redis.call('LPUSH', KEYS[1], result)
    else
      redis.call('RPUSH', KEYS[1], result)
    end
    appended = appended + 1
  end
end
return appended
