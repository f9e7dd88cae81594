-- Gives back what an unanswered request held (its lease and tokens), once, by its lease; or
-- what is left of an allowance (its reservation, requests and tokens).
-- KEYS: 1 leases, 2 key rpm, 3 key tpm, 4 model tpm, 5 lease amounts, 6 reserved,
--       7 key dollars per minute, 8 per hour
-- ARGV: 1 request or allowance id, 2 key rpm limit, 3 requests, 4 key tpm limit, 5 key tokens,
--       6 model tpm limit, 7 model tokens, 8 1 for a request, 0 for an allowance,
--       9 nano-dollars per minute, 10 per hour (0: none), 11 nano-dollars taken from those
local id = ARGV[1]
if redis.call('ZREM', KEYS[1], id) == 0 and ARGV[8] == '1' then return 0 end
local amount = redis.call('HGET', KEYS[5], id)
if amount then
  write(KEYS[6], (read(KEYS[6]) or 0) - tonumber(amount), 'keep')
  redis.call('HDEL', KEYS[5], id)
end
gcra_refund(KEYS[2], tonumber(ARGV[2]), tonumber(ARGV[3]))
gcra_refund(KEYS[3], tonumber(ARGV[4]), tonumber(ARGV[5]))
gcra_refund(KEYS[4], tonumber(ARGV[6]), tonumber(ARGV[7]))
for _, throttle in ipairs(spend_throttles(KEYS[7], tonumber(ARGV[9]), KEYS[8], tonumber(ARGV[10]))) do
  gcra_refund(throttle[1], throttle[2], tonumber(ARGV[11]), throttle[3])
end
commit()
return 1
