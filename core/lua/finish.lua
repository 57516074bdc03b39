-- finish: record an agent outcome and its outbox entry; the last outcome ends the deliberation.
-- KEYS: record, agents, events, active, outbox, outbox due, stats, messages
-- ARGV: agent id, now ms, outcome json, event json, outbox id, outbox entry json, ttl s, lease ms
-- In a retried round (the record's and the agent's `round` from 2 on, retry.lua) the outbox
-- ids end in ':r<round>' (contract.event_id) and the entries and final event carry the round.
-- Returns {what, final status or '', record fields, agent json} or, when this outcome ended the
-- deliberation, {'final', status, record fields, every agent's json}: the writer publishes its
-- events from these without reading the state back.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing'} end
local raw = redis.call('HGET', KEYS[2], ARGV[1])
if not raw then return {'missing'} end
local agent = cjson.decode(raw)
if agent.status == 'completed' or agent.status == 'failed' then return {'duplicate'} end
local outcome = cjson.decode(ARGV[3])
for k, v in pairs(outcome) do agent[k] = v end
local agent_json = cjson.encode(agent)
redis.call('HSET', KEYS[2], ARGV[1], agent_json)
local counter = outcome.status == 'completed' and 'completed' or 'failed'
local done = redis.call('HINCRBY', KEYS[1], counter, 1)
redis.call('XADD', KEYS[3], '*', 'event', ARGV[4])
if status == 'cancelled' then return {'cancelled'} end
local agent_event_id, agent_entry = ARGV[5], ARGV[6]
local agent_round = tonumber(agent.round) or 1
if agent_round > 1 then
  agent_event_id = agent_event_id .. ':r' .. agent_round
  local entry = cjson.decode(agent_entry)
  entry.round = agent_round
  agent_entry = cjson.encode(entry)
end
redis.call('HSET', KEYS[5], agent_event_id, agent_entry)
redis.call('ZADD', KEYS[6], ARGV[2] + ARGV[8], agent_event_id)
local finished = tonumber(redis.call('HGET', KEYS[1], 'completed') or 0)
  + tonumber(redis.call('HGET', KEYS[1], 'failed') or 0)
if finished < tonumber(redis.call('HGET', KEYS[1], 'num_agents')) then
  return {'recorded', '', redis.call('HGETALL', KEYS[1]), agent_json}
end
local final = tonumber(redis.call('HGET', KEYS[1], 'completed') or 0) > 0 and 'completed' or 'failed'
redis.call('HSET', KEYS[1], 'status', final, 'finished_ms', ARGV[2])
redis.call('ZREM', KEYS[4], redis.call('HGET', KEYS[1], 'id'))
local created = tonumber(redis.call('HGET', KEYS[1], 'created_ms'))
redis.call('HINCRBY', KEYS[7], final, 1)
redis.call('HINCRBY', KEYS[7], 'duration_ms', ARGV[2] - created)
local final_event = {event = final, status = final, time_ms = tonumber(ARGV[2])}
local final_id = redis.call('HGET', KEYS[1], 'id') .. ':' .. final
local final_entry = {kind = 'deliberation', event = final, deliberation_id = redis.call('HGET', KEYS[1], 'id')}
local round = tonumber(redis.call('HGET', KEYS[1], 'round') or 1)
if round > 1 then
  final_event.round, final_entry.round = round, round
  final_id = final_id .. ':r' .. round
end
redis.call('XADD', KEYS[3], '*', 'event', cjson.encode(final_event))
redis.call('HSET', KEYS[5], final_id, cjson.encode(final_entry))
redis.call('ZADD', KEYS[6], ARGV[2] + ARGV[8], final_id)
for _, key in ipairs({KEYS[1], KEYS[2], KEYS[3], KEYS[8]}) do redis.call('EXPIRE', key, ARGV[7]) end
return {'final', final, redis.call('HGETALL', KEYS[1]), redis.call('HVALS', KEYS[2])}
