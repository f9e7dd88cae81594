-- Charges an amount known before it is spent (a reported outcome) to a key's budget, whole or
-- not at all, once per idempotency key across every replica: refused when the period's
-- spend, what is reserved and the amount pass the cap.
-- The amount counts against the key's spend-rate throttles (never refused by them: the
-- requests after it are paced).
-- KEYS: 1 spend, 2 leases, 3 lease amounts, 4 reserved, 5 the charge's idempotency key,
--   6 key dollars per minute, 7 per hour
-- ARGV: 1 amount, 2 cap (-1: uncapped), 3 what to remember of the charge, 4 for how long (ms),
--   5 nano-dollars per minute, 6 per hour (0: none)
-- Returns {0, spend} charged, {1, remaining} refused, {2} when the period's spend must first
-- be seeded from the ledger, or {3, remembered} when the idempotency key was charged before.
local first = redis.call('GET', KEYS[5])
if first then return {3, first} end
purge(KEYS[2], KEYS[3], KEYS[4])
local spent = read(KEYS[1])
if not spent then
  commit()
  return {2}
end
local amount, cap = tonumber(ARGV[1]), tonumber(ARGV[2])
local reserved = read(KEYS[4]) or 0
if cap >= 0 and spent + reserved + amount > cap then
  commit()
  return {1, math.max(cap - spent - reserved, 0)}
end
write(KEYS[1], spent + amount, 'keep')
for _, throttle in ipairs(spend_throttles(KEYS[6], tonumber(ARGV[5]), KEYS[7], tonumber(ARGV[6]))) do
  gcra_charge(throttle[1], throttle[2], math.max(amount, 0), throttle[3])
end
commit()
redis.call('SET', KEYS[5], ARGV[3], 'PX', ARGV[4])
return {0, spent + amount}
