-- Advances keys' month totals by a batch of requests, in order, and returns each request's
-- totals after it, or {-1} when its key's month must first be seeded from the ledger.
-- Per request, KEYS: 1 totals; ARGV: 1 tokens, 2 plan cost, 3 micro-credits
local answers = {}
for i = 1, #KEYS do
  local month = month_totals(KEYS[i])
  if month then
    for j = 1, 3 do month[j] = month[j] + tonumber(ARGV[(i - 1) * 3 + j]) end
    table.insert(answers, {month[1], month[2], month[3]})
  else
    table.insert(answers, {-1})
  end
end
commit()
return answers
