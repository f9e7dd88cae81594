-- Shared by every tollgate script: one clock (the server's), numbers read once and written
-- once per script (a batch of calls on one key then costs about the commands of one call),
-- GCRA over a stored theoretical arrival time in microseconds, and the purge of leases whose
-- replica stopped renewing them.
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now_us / 1000)
local WINDOW = 60000000
local HOUR = 60 * WINDOW

-- Numbers (Redis writes a Lua number's integer digits exactly; formatting them here costs
-- more than the command): `read` gives false for a key that does not exist; `write` keeps
-- the value for this script's later calls and `commit` stores it: 'tat' sets a throttle's
-- expiry from its value, 'keep' keeps the key's expiry, a number is an expiry in ms.
local cache, expiry_of, written = {}, {}, {}

local function read(key)
  local value = cache[key]
  if value == nil then
    local raw = redis.call('GET', key)
    value = raw and tonumber(raw) or false
    cache[key] = value
  end
  return value
end

local function write(key, value, expiry)
  if expiry_of[key] == nil then table.insert(written, key) end
  cache[key] = value
  expiry_of[key] = expiry
end

-- A key's month rating totals {tokens, plan cost, micro-credits}, read once per script and
-- stored by `commit`; false while the month is not seeded (the first request that needs the
-- totals seeds them from the ledger).
local months, months_read = {}, {}

local function month_totals(key)
  local month = months[key]
  if month == nil then
    local stored = redis.call('HMGET', key, 'tokens', 'plan_cost', 'micro_credits')
    month = stored[1] and {tonumber(stored[1]), tonumber(stored[2]), tonumber(stored[3])} or false
    months[key] = month
    if month then table.insert(months_read, key) end
  end
  return month
end

local function commit()
  for _, key in ipairs(months_read) do
    local month = months[key]
    redis.call('HSET', key, 'tokens', month[1], 'plan_cost', month[2], 'micro_credits', month[3])
  end
  for _, key in ipairs(written) do
    local value, expiry = cache[key], expiry_of[key]
    if expiry == 'tat' then
      expiry = math.max(math.ceil((value - now_us) / 1000) + 1000, 1000)
    end
    if expiry == 'keep' then
      redis.call('SET', key, value, 'KEEPTTL')
    else
      redis.call('SET', key, value, 'PX', expiry)
    end
  end
end

-- How a throttle stands if `units` were taken now: ok and the new TAT, or the wait; and the
-- TAT as it stands. The window is a minute unless given (an hour for spend).
local function gcra_try(key, limit, units, window)
  window = window or WINDOW
  if limit <= 0 then return true, nil, nil end
  local tat = read(key) or 0
  if units > limit then return false, window, tat end
  local new_tat = math.max(tat, now_us) + math.ceil(window / limit * units)
  local ahead = new_tat - now_us
  if ahead > window then return false, math.max(ahead - window, 1), tat end
  return true, new_tat, tat
end

-- Gives units back; a throttle whose state expired has nothing left to refund.
local function gcra_refund(key, limit, units, window)
  if limit <= 0 or units <= 0 then return end
  local tat = read(key)
  if tat then write(key, tat - math.ceil((window or WINDOW) / limit * units), 'keep') end
end

local function gcra_charge(key, limit, units, window)
  if limit <= 0 or units <= 0 then return end
  write(key, math.max(read(key) or 0, now_us) + math.ceil((window or WINDOW) / limit * units), 'tat')
end

-- Replaces units reserved at `admitted_us` by the units used: what was not used is given
-- back, unless the request outlived the window (its reservation aged out already, and a
-- refund would let the current window take more than its limit); the excess is charged.
local function gcra_settle(key, limit, reserved, used, admitted_us, window)
  window = window or WINDOW
  if used < reserved then
    if now_us - admitted_us < window then gcra_refund(key, limit, reserved - used, window) end
  elseif used > reserved then
    gcra_charge(key, limit, used - reserved, window)
  end
end

-- A key's spend-rate throttles: {key, limit in nano-dollars, window}, per minute and per hour.
local function spend_throttles(per_minute_key, per_minute, per_hour_key, per_hour)
  return {{per_minute_key, per_minute, WINDOW}, {per_hour_key, per_hour, HOUR}}
end

-- Remaining units and microseconds until whole at a given TAT, for the x-ratelimit headers.
local function gcra_snapshot(tat, limit)
  if limit <= 0 then return {-1, 0} end
  local used = math.min(math.max(tat - now_us, 0), WINDOW)
  local remaining = math.floor((WINDOW - used) / (WINDOW / limit))
  return {math.min(remaining, limit), used}
end

-- Every admitted request holds a lease (a member of `leases`, scored by its expiry), which is
-- its concurrency slot, and what it reserved of the budget (a field of `amounts`, summed in
-- `reserved`). Leases past their expiry belong to a replica that died: they end, once per key
-- per script.
local purged = {}
local function purge(leases, amounts, reserved)
  if purged[leases] then return end
  purged[leases] = true
  -- Bounded, so one script stays short (and within Lua's unpack limit); later calls take the
  -- rest.
  local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', now_ms, 'LIMIT', 0, 1000)
  if #expired == 0 then return end
  local held = redis.call('HMGET', amounts, unpack(expired))
  local total = 0
  for _, amount in ipairs(held) do
    if amount then total = total + tonumber(amount) end
  end
  redis.call('HDEL', amounts, unpack(expired))
  redis.call('ZREM', leases, unpack(expired))
  if total > 0 then write(reserved, (read(reserved) or 0) - total, 'keep') end
end

-- The calls of a batch: `per_keys` keys and `per_args` arguments each, after `prefix`
-- arguments shared by all of them.
local function calls(per_keys, per_args, prefix)
  local count = #KEYS / per_keys
  local i = 0
  return function()
    if i >= count then return nil end
    local keys = {unpack(KEYS, i * per_keys + 1, (i + 1) * per_keys)}
    local args = {unpack(ARGV, prefix + i * per_args + 1, prefix + (i + 1) * per_args)}
    i = i + 1
    return keys, args
  end
end
