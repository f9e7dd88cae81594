-- Gives back the part of an allowance's reservation its replica holds unreserved, so a
-- request refused for budget is not refused while budget sits idle in an allowance. What the
-- allowance's requests in flight reserved stays, for their settlements.
-- KEYS: 1 lease amounts, 2 reserved
-- ARGV: 1 allowance id, 2 nano-dollars to give back
local stored = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local give = math.min(tonumber(ARGV[2]), stored)
if give <= 0 then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[1], -give)
write(KEYS[2], (read(KEYS[2]) or 0) - give, 'keep')
commit()
return give
