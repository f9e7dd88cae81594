-- Seeds a key's month totals from the ledger unless another replica already has.
-- KEYS: 1 totals; ARGV: tokens, plan cost, micro-credits, ttl ms
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'tokens', ARGV[1], 'plan_cost', ARGV[2], 'micro_credits', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
