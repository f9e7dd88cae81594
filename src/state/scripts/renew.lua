-- Extends the leases of requests this replica still serves.
-- KEYS: 1 leases; ARGV: 1 lease ms, 2.. request ids
local expiry = now_ms + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i])
end
return 1
