-- Shared by every tollgate script: one clock (the server's), GCRA over a stored theoretical
-- arrival time in microseconds, and the purge of leases whose replica stopped renewing them.
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now_us / 1000)
local WINDOW = 60000000

local function int(x)
  return string.format('%.0f', x)
end

-- How a throttle stands if `units` were taken now: ok and the new TAT, or the wait; and the
-- TAT as it stands.
local function gcra_try(key, limit, units)
  if limit <= 0 then return true, nil, nil end
  local tat = tonumber(redis.call('GET', key) or '0')
  if units > limit then return false, WINDOW, tat end
  local new_tat = math.max(tat, now_us) + math.ceil(WINDOW / limit * units)
  local ahead = new_tat - now_us
  if ahead > WINDOW then return false, math.max(ahead - WINDOW, 1), tat end
  return true, new_tat, tat
end

local function gcra_set(key, tat)
  local ttl_ms = math.ceil((tat - now_us) / 1000) + 1000
  if ttl_ms < 1000 then ttl_ms = 1000 end
  redis.call('SET', key, int(tat), 'PX', ttl_ms)
end

-- Gives units back; a throttle whose state expired has nothing left to refund.
local function gcra_refund(key, limit, units)
  if limit <= 0 or units <= 0 then return end
  local tat = redis.call('GET', key)
  if tat then
    redis.call('SET', key, int(tonumber(tat) - math.ceil(WINDOW / limit * units)), 'KEEPTTL')
  end
end

local function gcra_charge(key, limit, units)
  if limit <= 0 or units <= 0 then return end
  local tat = tonumber(redis.call('GET', key) or '0')
  gcra_set(key, math.max(tat, now_us) + math.ceil(WINDOW / limit * units))
end

-- Remaining units and microseconds until whole at a given TAT, for the x-ratelimit headers.
local function gcra_snapshot(tat, limit)
  if limit <= 0 then return {-1, 0} end
  local used = math.min(math.max(tat - now_us, 0), WINDOW)
  local remaining = math.floor((WINDOW - used) / (WINDOW / limit))
  return {math.min(remaining, limit), used}
end

-- Leases past their expiry belong to a replica that died: their reservations and slots end.
local function purge(leases, amounts, reserved, slots)
  local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', now_ms)
  for _, id in ipairs(expired) do
    local amount = redis.call('HGET', amounts, id)
    if amount then
      redis.call('HDEL', amounts, id)
      redis.call('DECRBY', reserved, amount)
    end
  end
  if #expired > 0 then redis.call('ZREMRANGEBYSCORE', leases, '-inf', now_ms) end
  redis.call('ZREMRANGEBYSCORE', slots, '-inf', now_ms)
end

-- Ends one request's lease and slot; what it had reserved stops counting.
local function end_lease(id, leases, amounts, reserved, slots)
  local amount = redis.call('HGET', amounts, id)
  if amount then
    redis.call('HDEL', amounts, id)
    redis.call('DECRBY', reserved, amount)
  end
  redis.call('ZREM', leases, id)
  redis.call('ZREM', slots, id)
end
