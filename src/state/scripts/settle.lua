-- Settles one request exactly once (by request id): ends its lease and slot, corrects the
-- token throttles to what was used, adds its cost to the period's spend, and reports which
-- alert thresholds this settlement crossed first in the period (once for all replicas).
-- KEYS: 1 slots, 2 key tpm, 3 model tpm, 4 spend, 5 leases, 6 lease amounts, 7 reserved,
--       8 settled marker, 9 alerted thresholds
-- ARGV: 1 request id, 2 key tpm limit, 3 key tokens held, 4 model tpm limit, 5 model tokens
--       held, 6 tokens used, 7 admitted at (us), 8 cost, 9 cap (-1: uncapped),
--       10 alert ttl ms, 11.. alert thresholds in percent
-- Returns {settled (1) or already settled (0), spend, newly crossed threshold mask}.
if not redis.call('SET', KEYS[8], '1', 'NX', 'EX', 86400) then
  return {0, redis.call('GET', KEYS[4]) or '0', 0}
end
local id = ARGV[1]
purge(KEYS[5], KEYS[6], KEYS[7], KEYS[1])
end_lease(id, KEYS[5], KEYS[6], KEYS[7], KEYS[1])
local used = tonumber(ARGV[6])
-- A request that outlived the window has had its reservation age out already: refunding it
-- would let the current minute take more than its limit.
local aged = now_us - tonumber(ARGV[7]) >= WINDOW
for _, t in ipairs({{KEYS[2], tonumber(ARGV[2]), tonumber(ARGV[3])}, {KEYS[3], tonumber(ARGV[4]), tonumber(ARGV[5])}}) do
  if used < t[3] then
    if not aged then gcra_refund(t[1], t[2], t[3] - used) end
  elseif used > t[3] then
    gcra_charge(t[1], t[2], used - t[3])
  end
end
local spent = tonumber(redis.call('INCRBY', KEYS[4], ARGV[8]))
local cap = tonumber(ARGV[9])
local first = 0
if cap > 0 and #ARGV > 10 then
  local pct = math.floor(spent * 100 / cap)
  local crossed = 0
  for i = 11, #ARGV do
    if pct >= tonumber(ARGV[i]) then crossed = crossed + 2 ^ (i - 11) end
  end
  if crossed > 0 then
    local before = tonumber(redis.call('GET', KEYS[9]) or '0')
    for bit = 0, #ARGV - 11 do
      local b = 2 ^ bit
      if crossed % (2 * b) >= b and before % (2 * b) < b then first = first + b end
    end
    if first > 0 then
      redis.call('SET', KEYS[9], int(before + first), 'PX', tonumber(ARGV[10]))
    end
  end
end
return {1, int(spent), first}
