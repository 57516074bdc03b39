-- start: an agent job begins an attempt. Returns run, done (already finished), missing, or
-- the deliberation final status.
-- Counts every start, redeliveries after a crash included: {'run', attempts}.
-- KEYS: record, agents, events.  ARGV: agent id, now ms, (unused), event json
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing'} end
if status == 'cancelled' or status == 'completed' or status == 'failed' then return {status} end
local raw = redis.call('HGET', KEYS[2], ARGV[1])
if not raw then return {'missing'} end
local agent = cjson.decode(raw)
if agent.status == 'completed' or agent.status == 'failed' then return {'done'} end
agent.status = 'running'
agent.attempts = (tonumber(agent.attempts) or 0) + 1
if not agent.start_ms or agent.start_ms == 0 then agent.start_ms = tonumber(ARGV[2]) end
redis.call('HSET', KEYS[2], ARGV[1], cjson.encode(agent))
if status == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'running', 'started_ms', ARGV[2])
end
redis.call('XADD', KEYS[3], '*', 'event', ARGV[4])
return {'run', agent.attempts}
