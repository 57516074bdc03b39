-- submit: record deliberations and enqueue their agent jobs, or return the existing ones.
-- Group commit: one call carries every submission of a moment. Each is applied in its own
-- pcall, so one that Redis refuses (its idempotency key holds another type: the GET, before
-- any write of it, fails) is answered with the error while the others are applied. Each
-- submission goes to its own route's queue: one call may fill several queues.
-- KEYS: active, stats, outbox, outbox due, index,
--       then per submission: idempotency, record, agents, events, messages, queue list,
--       queue msgs
-- ARGV: now ms, ttl s, due ms, wake channel, submitted event json, idempotency ttl s,
--       then per submission: id, queue name, record field count, (field, value)...,
--       agent count, (agent id, agent json, redis message id, encoded Dramatiq message)...
-- Returns per submission: 1, id (recorded); 0, the existing id; -1, Redis's error.
local now, ttl, due, event, once = ARGV[1], ARGV[2], ARGV[3], ARGV[5], ARGV[6]

local function submit(k, i)
  local id = ARGV[i]
  local existing = redis.call('GET', KEYS[k])
  if existing then return {0, existing} end
  redis.call('SET', KEYS[k], id, 'EX', once)
  local fields = tonumber(ARGV[i + 2])
  redis.call('HSET', KEYS[k + 1], unpack(ARGV, i + 3, i + 2 + 2 * fields))
  i = i + 3 + 2 * fields
  local agents = tonumber(ARGV[i])
  for j = i + 1, i + 4 * agents, 4 do
    redis.call('HSET', KEYS[k + 2], ARGV[j], ARGV[j + 1])
    redis.call('HSET', KEYS[k + 4], ARGV[j], ARGV[j + 3])  -- kept for a retry (retry.lua)
    redis.call('HSET', KEYS[k + 6], ARGV[j + 2], ARGV[j + 3])  -- as Dramatiq's enqueue does
    redis.call('RPUSH', KEYS[k + 5], ARGV[j + 2])
  end
  redis.call('XADD', KEYS[k + 3], '*', 'event', event)
  redis.call('ZADD', KEYS[1], now, id)
  redis.call('ZADD', KEYS[5], now, id)
  redis.call('HINCRBY', KEYS[2], 'total', 1)
  -- The submitted event and the vllm.streaming start event, each kept until published.
  for _, name in ipairs({'submitted', 'vllm_stream_start'}) do
    redis.call('HSET', KEYS[3], id .. ':' .. name, '{"kind": "deliberation", "event": "' ..
               name .. '", "deliberation_id": "' .. id .. '"}')
    redis.call('ZADD', KEYS[4], due, id .. ':' .. name)
  end
  return {1, id}
end

-- The listing index keeps what the state TTL keeps (records expire that long after they end).
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now - ttl * 1000)
local results, woken = {}, {}
local i, k = 7, 6
while i <= #ARGV do
  local ok, result = pcall(submit, k, i)
  if not ok then result = {-1, type(result) == 'table' and result.err or tostring(result)} end
  if result[1] == 1 then woken[ARGV[i + 1]] = true end
  results[#results + 1] = result[1]
  results[#results + 1] = result[2]
  i = i + 3 + 2 * tonumber(ARGV[i + 2])  -- past the record, to the agent count
  i = i + 1 + 4 * tonumber(ARGV[i])  -- past the agents, to the next submission
  k = k + 7
end
-- Idle workers sleep between polls; this wakes them (actors.broker) to fetch at once. A
-- failed wake-up only leaves them to their next poll, so it must not fail the call.
for queue in pairs(woken) do redis.pcall('PUBLISH', ARGV[4], queue) end
return results
