-- A key's budget as it stands: {spend (-1: not seeded), reserved, requests in flight}.
-- KEYS: 1 spend, 2 leases, 3 lease amounts, 4 reserved
purge(KEYS[2], KEYS[3], KEYS[4])
commit()
return {read(KEYS[1]) or -1, read(KEYS[4]) or 0, redis.call('ZCARD', KEYS[2])}
