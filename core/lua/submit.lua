-- submit: record a deliberation and enqueue its agent jobs, or return the existing one.
-- KEYS: idempotency, record, agents, events, active, stats, queue list, queue msgs, outbox, outbox due
-- ARGV: id, now ms, ttl s, record json, agents json, event json, outbox entry json, due ms,
--       wake channel, queue name,
--       then (redis message id, encoded Dramatiq message) pairs, pushed as Dramatiq enqueue does.
local existing = redis.call('GET', KEYS[1])
if existing then return {0, existing} end
local id = ARGV[1]
redis.call('SET', KEYS[1], id, 'EX', ARGV[3])
local record = cjson.decode(ARGV[4])
for k, v in pairs(record) do redis.call('HSET', KEYS[2], k, v) end
for _, agent in ipairs(cjson.decode(ARGV[5])) do redis.call('HSET', KEYS[3], agent[1], agent[2]) end
redis.call('XADD', KEYS[4], '*', 'event', ARGV[6])
redis.call('ZADD', KEYS[5], ARGV[2], id)
redis.call('HINCRBY', KEYS[6], 'total', 1)
redis.call('HSET', KEYS[9], id .. ':submitted', ARGV[7])
redis.call('ZADD', KEYS[10], ARGV[8], id .. ':submitted')
for i = 11, #ARGV, 2 do
  redis.call('HSET', KEYS[8], ARGV[i], ARGV[i + 1])
  redis.call('RPUSH', KEYS[7], ARGV[i])
end
-- Idle workers sleep between polls; this wakes them (actors.broker) to fetch at once.
redis.call('PUBLISH', ARGV[9], ARGV[10])
return {1, id}
