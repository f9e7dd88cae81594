-- Advances keys' month totals by a batch of requests, in order, and returns each request's
-- totals after it, or {-1} when its key's month must first be seeded from the ledger.
-- Per request, KEYS: 1 totals; ARGV: 1 tokens, 2 list cost, 3 micro-credits
local totals, order, answers = {}, {}, {}
for i = 1, #KEYS do
  local key = KEYS[i]
  local now = totals[key]
  if now == nil then
    local stored = redis.call('HMGET', key, 'tokens', 'list_cost', 'micro_credits')
    now = stored[1] and {tonumber(stored[1]), tonumber(stored[2]), tonumber(stored[3])} or false
    totals[key] = now
    if now then table.insert(order, key) end
  end
  if now then
    for j = 1, 3 do now[j] = now[j] + tonumber(ARGV[(i - 1) * 3 + j]) end
    table.insert(answers, {now[1], now[2], now[3]})
  else
    table.insert(answers, {-1})
  end
end
for _, key in ipairs(order) do
  local now = totals[key]
  redis.call('HSET', key, 'tokens', now[1], 'list_cost', now[2], 'micro_credits', now[3])
end
return answers
