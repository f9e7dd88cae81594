-- Extends the leases and slots of requests this replica still serves.
-- KEYS: 1 slots, 2 leases; ARGV: 1 lease ms, 2.. request ids
local expiry = now_ms + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i])
  redis.call('ZADD', KEYS[2], 'XX', expiry, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) * 2)
return 1
