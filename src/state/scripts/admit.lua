-- Admits one request against every limit at once, all or nothing.
-- KEYS: 1 slots, 2 key rpm, 3 key tpm, 4 model rpm, 5 model tpm, 6 spend, 7 leases,
--       8 lease amounts, 9 reserved
-- ARGV: 1 request id, 2 lease ms, 3 max concurrency (-1: none), 4 key rpm, 5 key tpm,
--       6 model rpm, 7 model tpm (0: none), 8 tokens, 9 cap (-1: uncapped), 10 cost
-- Returns {0, reserved, snapshots...} admitted, {1, reason, retry_us, remaining, snapshots...}
-- refused (reason 1 concurrency, 2 key rpm, 3 key tpm, 4 model rpm, 5 model tpm, 6 budget),
-- or {2} when the period's spend must first be seeded from the ledger.
local id = ARGV[1]
local lease_ms = tonumber(ARGV[2])
local max_conc = tonumber(ARGV[3])
local key_rpm, key_tpm = tonumber(ARGV[4]), tonumber(ARGV[5])
local model_rpm, model_tpm = tonumber(ARGV[6]), tonumber(ARGV[7])
local tokens, cap, cost = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])

purge(KEYS[7], KEYS[8], KEYS[9], KEYS[1])
local spent = redis.call('GET', KEYS[6])
if not spent then return {2} end
spent = tonumber(spent or '0')
local reserved = tonumber(redis.call('GET', KEYS[9]) or '0')

local limits = {key_rpm, key_tpm, model_rpm, model_tpm}
local keys = {KEYS[2], KEYS[3], KEYS[4], KEYS[5]}
local units = {1, tokens, 1, tokens}
-- Each throttle's TAT as read, then as it would be after this request.
local read, taken = {}, {}

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
    if read[i] == nil and limits[i] > 0 then read[i] = tonumber(redis.call('GET', keys[i]) or '0') end
  end
  return snapshots({1, reason, int(retry_us), int(math.max(cap - spent - reserved, 0))}, read)
end

if max_conc >= 0 and redis.call('ZCARD', KEYS[1]) >= max_conc then
  return refuse(1, 1000000)
end
for i = 1, 4 do
  local ok, value, tat = gcra_try(keys[i], limits[i], units[i])
  read[i] = tat
  if not ok then return refuse(i + 1, value) end
  taken[i] = value
end
local reserve = 0
if cap >= 0 then
  reserve = math.max(cost, 0)
  if spent + reserved + reserve > cap then return refuse(6, 0) end
end

for i = 1, 4 do
  if taken[i] then gcra_set(keys[i], taken[i]) end
end
local expiry = now_ms + lease_ms
redis.call('ZADD', KEYS[1], expiry, id)
redis.call('PEXPIRE', KEYS[1], lease_ms * 2)
if reserve > 0 then
  redis.call('ZADD', KEYS[7], expiry, id)
  redis.call('HSET', KEYS[8], id, int(reserve))
  redis.call('INCRBY', KEYS[9], int(reserve))
end
return snapshots({0, int(reserve)}, taken)
