-- Admits a batch of requests, in order, each against every limit at once, all or nothing.
-- Per request, KEYS: 1 leases, 2 key rpm, 3 key tpm, 4 model rpm, 5 model tpm, 6 spend,
--   7 lease amounts, 8 reserved, 9 key dollars per minute, 10 key dollars per hour
-- ARGV: 1 lease ms, 2 replicas, then per request: 1 request id, 2 max concurrency (-1: none),
--   3 key rpm, 4 key tpm, 5 model rpm, 6 model tpm (0: none), 7 tokens, 8 cap (-1: uncapped),
--   9 cost, 10 allowance id to grant to ('' for none), 11 nano-dollars per minute, 12 per hour
--   (0: none)
-- Returns per request {0, reserved, snapshots..., [requests, tokens, budget granted]}
-- admitted, {1, reason, retry_us, remaining, snapshots...} refused (reason 1 concurrency,
-- 2 key rpm, 3 key tpm, 4 model rpm, 5 model tpm, 6 budget, 7 dollars per minute, 8 per
-- hour), or {2} when the period's spend must first be seeded from the ledger.
--
-- An allowance is a share of a key's remaining RPM, TPM and budget taken for one replica,
-- which admits from it locally (see `redis.rs`). It is granted only far from every limit — at
-- most a quarter of what remains divided among the replicas, and only if that still covers
-- eight requests like this one — so requests near a limit are admitted here, one by one.
local lease_ms = tonumber(ARGV[1])
local replicas = tonumber(ARGV[2])
local expiry = now_ms + lease_ms
local held = {}      -- leases key -> requests holding a lease now
local new_leases = {} -- leases key -> {expiry, id, ...}
local new_amounts = {} -- amounts key -> {id, amount, ...}
local order = {}      -- leases key -> its amounts key, in first-seen order
local answers = {}

local function admit(K, A)
  local id = A[1]
  local max_conc = tonumber(A[2])
  local limits = {tonumber(A[3]), tonumber(A[4]), tonumber(A[5]), tonumber(A[6])}
  local tokens, cap, cost = tonumber(A[7]), tonumber(A[8]), tonumber(A[9])
  local allowance = A[10]
  local throttles = {K[2], K[3], K[4], K[5]}
  local units = {1, tokens, 1, tokens}
  -- The spend-rate throttles take the request's worst-case cost, after the four above.
  local spending = spend_throttles(K[9], tonumber(A[11]), K[10], tonumber(A[12]))
  local spend_units = math.max(cost, 0)

  purge(K[1], K[7], K[8])
  local spent = read(K[6])
  if not spent then return {2} end
  local reserved = read(K[8]) or 0
  -- Each throttle's TAT as read, then as it would be after this request.
  local seen, taken = {}, {}

  local function snapshots(out, tats)
    for i = 1, 4 do
      local s = gcra_snapshot(tats[i] or 0, limits[i])
      table.insert(out, s[1])
      table.insert(out, s[2])
    end
    return out
  end
  local function refuse(reason, retry_us)
    for i = 1, 4 do
      if seen[i] == nil and limits[i] > 0 then seen[i] = read(throttles[i]) or 0 end
    end
    return snapshots({1, reason, retry_us, math.max(cap - spent - reserved, 0)}, seen)
  end

  if max_conc >= 0 then
    if held[K[1]] == nil then held[K[1]] = redis.call('ZCARD', K[1]) end
    if held[K[1]] >= max_conc then return refuse(1, 1000000) end
  end
  for i = 1, 4 do
    local ok, value, tat = gcra_try(throttles[i], limits[i], units[i])
    seen[i] = tat
    if not ok then return refuse(i + 1, value) end
    taken[i] = value
  end
  local spent_tats = {}
  for i, throttle in ipairs(spending) do
    local ok, value = gcra_try(throttle[1], throttle[2], spend_units, throttle[3])
    if not ok then return refuse(6 + i, value) end
    spent_tats[i] = value
  end
  local reserve = 0
  if cap >= 0 then
    reserve = math.max(cost, 0)
    if spent + reserved + reserve > cap then return refuse(6, 0) end
  end

  for i = 1, 4 do
    if taken[i] then write(throttles[i], taken[i], 'tat') end
  end
  for i, throttle in ipairs(spending) do
    if spent_tats[i] then write(throttle[1], spent_tats[i], 'tat') end
  end
  if held[K[1]] then held[K[1]] = held[K[1]] + 1 end
  if not new_leases[K[1]] then
    new_leases[K[1]] = {}
    new_amounts[K[7]] = {}
    table.insert(order, {K[1], K[7]})
  end
  table.insert(new_leases[K[1]], expiry)
  table.insert(new_leases[K[1]], id)
  if reserve > 0 then
    table.insert(new_amounts[K[7]], id)
    table.insert(new_amounts[K[7]], reserve)
    reserved = reserved + reserve
    write(K[8], reserved, 'keep')
  end
  local answer = snapshots({0, reserve}, taken)
  if allowance == '' then return answer end

  local share = 4 * replicas
  local function units_left(i)
    local tat = read(throttles[i]) or 0
    return math.floor((WINDOW - math.min(math.max(tat - now_us, 0), WINDOW)) / (WINDOW / limits[i]))
  end
  local requests, token_units, budget = -1, -1, -1
  if limits[1] > 0 then
    requests = math.floor(units_left(1) / share)
    if requests < 8 then return answer end
  end
  if limits[2] > 0 then
    token_units = math.floor(units_left(2) / share)
    if token_units < 8 * math.max(tokens, 1) then return answer end
  end
  if cap >= 0 then
    budget = math.floor((cap - spent - reserved) / share)
    if budget <= 0 or budget < 8 * cost then return answer end
  end
  if requests > 0 then
    write(throttles[1], math.max(read(throttles[1]) or 0, now_us) + math.ceil(WINDOW / limits[1] * requests), 'tat')
  end
  if token_units > 0 then
    write(throttles[2], math.max(read(throttles[2]) or 0, now_us) + math.ceil(WINDOW / limits[2] * token_units), 'tat')
  end
  if budget > 0 then
    write(K[8], reserved + budget, 'keep')
    redis.call('HINCRBY', K[7], allowance, budget)
    redis.call('ZADD', K[1], expiry, allowance)
  end
  table.insert(answer, requests)
  table.insert(answer, token_units)
  table.insert(answer, budget)
  return answer
end

for K, A in calls(10, 12, 2) do
  table.insert(answers, admit(K, A))
end
commit()
for _, keys in ipairs(order) do
  -- No expiry on either: a lease ends by settlement, release or purge, which keeps
  -- `reserved` equal to the sum of `amounts`.
  redis.call('ZADD', keys[1], unpack(new_leases[keys[1]]))
  if #new_amounts[keys[2]] > 0 then redis.call('HSET', keys[2], unpack(new_amounts[keys[2]])) end
end
return answers
