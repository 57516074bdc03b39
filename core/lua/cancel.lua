-- cancel: cancel a deliberation unless it has ended; returns the status after the call.
-- KEYS: record, events, active, stats, outbox, outbox due, agents, messages
-- ARGV: id, now ms, reason, event json, ttl s, lease ms
-- Returns {1, 'cancelled'} when this call cancelled it, else {0, status}.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {0, 'not_found'} end
if status == 'cancelled' or status == 'completed' or status == 'failed' then return {0, status} end
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_ms', ARGV[2], 'cancel_reason', ARGV[3])
-- Agents not finished end as cancelled (one that finishes later still records its outcome).
local agents = redis.call('HGETALL', KEYS[7])
for i = 1, #agents, 2 do
  local agent = cjson.decode(agents[i + 1])
  if agent.status == 'queued' or agent.status == 'running' then
    agent.status = 'cancelled'
    agent.end_ms = tonumber(ARGV[2])
    redis.call('HSET', KEYS[7], agents[i], cjson.encode(agent))
  end
end
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HINCRBY', KEYS[4], 'cancelled', 1)
redis.call('XADD', KEYS[2], '*', 'event', ARGV[4])
local event_id = ARGV[1] .. ':cancelled'
redis.call('HSET', KEYS[5], event_id, cjson.encode({kind = 'deliberation', event = 'cancelled', deliberation_id = ARGV[1]}))
redis.call('ZADD', KEYS[6], ARGV[2] + ARGV[6], event_id)
for _, key in ipairs({KEYS[1], KEYS[2], KEYS[7], KEYS[8]}) do redis.call('EXPIRE', key, ARGV[5]) end
return {1, 'cancelled'}
