-- Settles a batch of requests: ends each one's lease, corrects the token throttles to what
-- was used, adds its cost to the period's spend, and reports which alert thresholds this
-- settlement crossed first in the period (once for all replicas). A request with its own
-- lease settles once, by that lease: a second settlement finds it gone and changes nothing.
-- (A request admitted from an allowance holds no lease of its own; the gateway sends its one
-- settlement once and never again.)
-- Per request, KEYS: 1 leases, 2 key tpm, 3 model tpm, 4 spend, 5 lease amounts, 6 reserved,
--   7 alerted thresholds, 8 the month's rating totals, 9 key dollars per minute, 10 per hour
-- ARGV: 1 number of alert thresholds n, 2..n+1 thresholds in percent, then per request:
--   1 request id, 2 key tpm limit, 3 key tokens held, 4 model tpm limit, 5 model tokens held,
--   6 tokens used, 7 admitted at (us), 8 cost, 9 cap (-1: uncapped), 10 alert ttl ms,
--   11 the allowance it was admitted from ('' for its own lease), whose budget pays its cost,
--   12..14 what the request adds to the month's totals (tokens, plan cost, micro-credits), or
--   -1 when it was rated against them (which advanced them already); totals not seeded yet
--   are left for the first request that needs them; 15 nano-dollars per minute, 16 per hour
--   (0: none), 17 nano-dollars the request took from those throttles
-- Returns per request {settled (1) or already settled (0), spend, newly crossed threshold mask}.
local thresholds = {}
for i = 2, tonumber(ARGV[1]) + 1 do table.insert(thresholds, tonumber(ARGV[i])) end
local ended = {}  -- lease amounts key -> ids
local order, answers = {}, {}
local allowances, allowance_order = {}, {} -- amounts key .. id -> {amounts key, id, amount}

local function settle(K, A)
  local id = A[1]
  local allowance = A[11]
  if allowance == '' then
    if redis.call('ZREM', K[1], id) == 0 then return {0, read(K[4]) or 0, 0} end
    local amount = redis.call('HGET', K[5], id)
    if amount then write(K[6], (read(K[6]) or 0) - tonumber(amount), 'keep') end
    if amount then
      if not ended[K[5]] then
        ended[K[5]] = {}
        table.insert(order, K[5])
      end
      table.insert(ended[K[5]], id)
    end
  else
    -- The cost leaves the allowance's reservation and becomes spend.
    local slot = K[5] .. '\0' .. allowance
    local held = allowances[slot]
    if not held then
      local stored = redis.call('HGET', K[5], allowance)
      held = {K[5], allowance, tonumber(stored or '0'), stored}
      allowances[slot] = held
      table.insert(allowance_order, slot)
    end
    local take = math.min(math.max(tonumber(A[8]), 0), held[3])
    held[3] = held[3] - take
    if take > 0 then write(K[6], (read(K[6]) or 0) - take, 'keep') end
  end

  local used, admitted = tonumber(A[6]), tonumber(A[7])
  gcra_settle(K[2], tonumber(A[2]), tonumber(A[3]), used, admitted)
  gcra_settle(K[3], tonumber(A[4]), tonumber(A[5]), used, admitted)
  local cost, spend_taken = math.max(tonumber(A[8]), 0), tonumber(A[17])
  for _, throttle in ipairs(spend_throttles(K[9], tonumber(A[15]), K[10], tonumber(A[16]))) do
    gcra_settle(throttle[1], throttle[2], spend_taken, cost, admitted, throttle[3])
  end
  if tonumber(A[12]) >= 0 then
    local month = month_totals(K[8])
    if month then
      for j = 1, 3 do month[j] = month[j] + tonumber(A[11 + j]) end
    end
  end
  local spent = (read(K[4]) or 0) + tonumber(A[8])
  write(K[4], spent, 'keep')

  local cap = tonumber(A[9])
  local first = 0
  if cap > 0 and #thresholds > 0 then
    local pct = math.floor(spent * 100 / cap)
    local before = read(K[7]) or 0
    for bit, threshold in ipairs(thresholds) do
      local b = 2 ^ (bit - 1)
      if pct >= threshold and before % (2 * b) < b then first = first + b end
    end
    if first > 0 then write(K[7], before + first, tonumber(A[10])) end
  end
  return {1, spent, first}
end

for K, A in calls(10, 17, tonumber(ARGV[1]) + 1) do
  table.insert(answers, settle(K, A))
end
commit()
for _, slot in ipairs(allowance_order) do
  local held = allowances[slot]
  -- An allowance whose lease ended meanwhile has no reservation left to keep.
  if held[4] then redis.call('HSET', held[1], held[2], held[3]) end
end
for _, amounts in ipairs(order) do
  redis.call('HDEL', amounts, unpack(ended[amounts]))
end
return answers
