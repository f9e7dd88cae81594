-- Gives back what an unanswered request held (its lease, slot and tokens), once.
-- KEYS: 1 slots, 2 key tpm, 3 model tpm, 4 leases, 5 lease amounts, 6 reserved, 7 settled marker
-- ARGV: 1 request id, 2 key tpm limit, 3 key tokens, 4 model tpm limit, 5 model tokens
if not redis.call('SET', KEYS[7], '1', 'NX', 'EX', 86400) then return 0 end
end_lease(ARGV[1], KEYS[4], KEYS[5], KEYS[6], KEYS[1])
gcra_refund(KEYS[2], tonumber(ARGV[2]), tonumber(ARGV[3]))
gcra_refund(KEYS[3], tonumber(ARGV[4]), tonumber(ARGV[5]))
return 1
