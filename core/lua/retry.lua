-- retry: put a finished deliberation's failed agents back in the queue, as a new round.
-- The caller read the state and encoded the messages; this checks, atomically, that the state
-- is still what they were made for, then applies and enqueues as submit.lua does.
-- KEYS: record, agents, events, messages, active, stats, queue list, queue msgs,
--       dead-letter set, dead-letter msgs, outbox
-- ARGV: id, now ms, the round read, action json, retried event json, wake channel, queue name,
--       outbox ids of the round read's events (count, ids...),
--       then per agent: agent id, its last redis message id, new redis message id, new message
-- Returns {'retried', action json}; {'moved'} when the round or an agent changed since the
-- read (the caller reads again); {'unpublished'} while an event of the round read still
-- waits in the outbox; {'not_found'}.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'not_found'} end
local round = tonumber(redis.call('HGET', KEYS[1], 'round') or 1)
if round ~= tonumber(ARGV[3]) or (status ~= 'completed' and status ~= 'failed') then
  return {'moved'}
end
local pending = tonumber(ARGV[8])
for i = 9, 8 + pending do
  if redis.call('HEXISTS', KEYS[11], ARGV[i]) == 1 then return {'unpublished'} end
end
local first = 9 + pending
for j = first, #ARGV, 4 do
  local raw = redis.call('HGET', KEYS[2], ARGV[j])
  if not raw or cjson.decode(raw).status ~= 'failed' then return {'moved'} end
end

local action = cjson.decode(ARGV[4])
local agents = 0
for j = first, #ARGV, 4 do
  local agent = cjson.decode(redis.call('HGET', KEYS[2], ARGV[j]))
  -- A new attempt: the failure's fields go, attempts keep counting every start.
  for _, field in ipairs({'error', 'error_type', 'retryable', 'end_ms', 'duration_ms', 'result'}) do
    agent[field] = nil
  end
  agent.status, agent.round, agent.start_ms = 'queued', action.round, 0
  redis.call('HSET', KEYS[2], ARGV[j], cjson.encode(agent))
  -- A dead-lettered message of the last round would run the agent a second time if requeued
  -- from the dashboard: the retry takes its place.
  if redis.call('ZREM', KEYS[9], ARGV[j + 1]) == 1 then redis.call('HDEL', KEYS[10], ARGV[j + 1]) end
  redis.call('HSET', KEYS[4], ARGV[j], ARGV[j + 3])
  redis.call('HSET', KEYS[8], ARGV[j + 2], ARGV[j + 3])  -- as Dramatiq's enqueue does
  redis.call('RPUSH', KEYS[7], ARGV[j + 2])
  agents = agents + 1
end

-- The record leaves its final status: the stats count it again when this round ends.
local created = tonumber(redis.call('HGET', KEYS[1], 'created_ms'))
local finished = tonumber(redis.call('HGET', KEYS[1], 'finished_ms') or created)
redis.call('HINCRBY', KEYS[6], status, -1)
redis.call('HINCRBY', KEYS[6], 'duration_ms', created - finished)
redis.call('HINCRBY', KEYS[6], 'retried', 1)
local retries = cjson.decode(redis.call('HGET', KEYS[1], 'retries') or '[]')
retries[#retries + 1] = action
redis.call('HINCRBY', KEYS[1], 'failed', -agents)
redis.call('HSET', KEYS[1], 'status', 'queued', 'round', action.round, 'retries', cjson.encode(retries))
redis.call('HDEL', KEYS[1], 'finished_ms')
redis.call('ZADD', KEYS[5], created, ARGV[1])
-- Unfinished state does not expire (finish.lua sets the TTL again when the round ends).
for _, key in ipairs({KEYS[1], KEYS[2], KEYS[3], KEYS[4]}) do redis.call('PERSIST', key) end
redis.call('XADD', KEYS[3], '*', 'event', ARGV[5])
redis.pcall('PUBLISH', ARGV[6], ARGV[7])
return {'retried', ARGV[4]}
