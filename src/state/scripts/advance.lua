-- Advances a key's month totals and returns them after this request, or {-1} when the month
-- must first be seeded from the ledger. KEYS: 1 totals; ARGV: tokens, list cost, micro-credits
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
return {redis.call('HINCRBY', KEYS[1], 'tokens', ARGV[1]),
        redis.call('HINCRBY', KEYS[1], 'list_cost', ARGV[2]),
        redis.call('HINCRBY', KEYS[1], 'micro_credits', ARGV[3])}
