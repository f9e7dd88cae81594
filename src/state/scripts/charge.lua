-- Charges an amount known before it is spent (a reported outcome) to a key's budget, whole or
-- not at all: refused when the period's spend, what is reserved and the amount pass the cap.
-- KEYS: 1 spend, 2 leases, 3 lease amounts, 4 reserved
-- ARGV: 1 amount, 2 cap (-1: uncapped)
-- Returns {0, spend} charged, {1, remaining} refused, or {2} when the period's spend must
-- first be seeded from the ledger.
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
commit()
return {0, spent + amount}
