-- Claims an alert episode once across replicas: the first claim while none runs wins, and
-- every claim, won or not, keeps the episode running ARGV[1] ms more; an episode no replica
-- claims for that long has ended, and the next claim starts another.
-- KEYS: 1 the episode
if redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then return 1 end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 0
