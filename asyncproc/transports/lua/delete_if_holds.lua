-- Delete a key only if it still holds the given value: llm-d-async's request-active:<id>
-- (and request-cancel:<id>) of the request generation just answered, never a newer one's.
-- KEYS[1]     the key
-- ARGV[1]     the value it must hold (a request token)
-- returns     1 if deleted, 0 if not
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
