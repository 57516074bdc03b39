"""A circuit breaker per vLLM endpoint, shared through Redis by every worker.

After ``RAY_EXECUTOR_CIRCUIT_FAILURES`` consecutive server-side failures (5xx, 429, timeouts,
refused or reset connections) the endpoint's circuit opens: no job takes it until the
cooldown ends, so its pool's other endpoints get the work, and when the pool has no other
the jobs are put back with a delay instead of hammering it (no retry consumed). After the
cooldown one job at a time is let through as a probe (half-open); a success closes the
circuit, a failure opens it again.

The limiter reads each circuit's state when it chooses a job's endpoint, in the same Lua
call (``actors.limits``, with ``CIRCUIT_STATE_LUA``); this middleware records the outcome of
the job on the endpoint it took.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional

import dramatiq

from actors import metrics
from actors.runtime import WorkerRuntime
from core.errors import SERVER_SIDE, ClassifiedError
from core.keys import Keys
from core.logs import message_context, redact
from core.settings import Settings

logger = logging.getLogger("ray_executor.circuit")

# A Lua function of the limiter's choice: the state of the circuit whose record and probe keys
# are given: 'clean' (no failure recorded), 'closed' (failures, below the threshold), 'open'
# (cooling down, or its probe still out) or 'half-open' (a probe may go).
CIRCUIT_STATE_LUA = """
local function circuit_state(circuit, probe, now)
  if redis.call('EXISTS', circuit) == 0 then return 'clean' end
  local opened_until = tonumber(redis.call('HGET', circuit, 'opened_until') or 0)
  if opened_until == 0 then return 'closed' end
  if now < opened_until or redis.call('EXISTS', probe) == 1 then return 'open' end
  return 'half-open'
end
"""

_FAILURE = """
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[3] * 10)
if failures >= tonumber(ARGV[2]) or redis.call('GET', KEYS[2]) == ARGV[4] then
  local opened_until = ARGV[1] + ARGV[3]
  redis.call('HSET', KEYS[1], 'opened_until', opened_until)
  redis.call('HSET', KEYS[3], ARGV[5], opened_until)
  redis.call('DEL', KEYS[2])
  return 1
end
redis.call('HSETNX', KEYS[3], ARGV[5], 0)
return 0
"""


def cooldown_ms(settings: Settings, actor: Any, message: Any) -> int:
    """The message's circuit cooldown (its option, its actor's, else the setting) in ms."""
    seconds = message.options.get("circuit_cooldown", actor.options.get(
        "circuit_cooldown", settings.circuit_cooldown))
    return int(float(seconds) * 1000)


class CircuitBreaker(dramatiq.Middleware):
    """Parameters:
      settings: failure threshold and cooldown.
      runtime: the process's ``WorkerRuntime``, whose shared Redis connection carries the
        breaker's calls.
      chosen: the endpoint a running message took and its circuit's state then
        (``actors.limits.ConcurrencyLimiter.chosen``, listed before this middleware so that
        its choice is still known in this one's ``after_process_message``).

    Actor options / per-message overrides: ``circuit_failures``, ``circuit_cooldown`` (s).
    """

    actor_options = {"circuit_failures", "circuit_cooldown"}

    def __init__(self, settings: Settings, runtime: WorkerRuntime,
                 chosen: Callable[[str], Optional[Any]]) -> None:
        self.settings = settings
        self.runtime = runtime
        self.chosen = chosen
        self.keys = Keys(settings.key_prefix)

    def after_process_message(self, broker: dramatiq.Broker, message: Any, *,
                              result: Any = None, exception: Any = None) -> None:
        choice = self.chosen(message.message_id)
        if choice is None:
            return
        endpoint = choice.url
        keys = [self.keys.circuit(endpoint), self.keys.circuit_probe(endpoint)]
        error_type = exception.error_type if isinstance(exception, ClassifiedError) else ""
        if exception is None or error_type not in SERVER_SIDE:
            # A success closes the circuit; when the choice found no failure recorded there
            # is nothing to close (a Redis round trip saved on most jobs).
            if exception is None and choice.circuit != "clean":
                self.runtime.redis(("DEL", *keys), ("HDEL", self.keys.circuit_index, endpoint))
            return
        actor = broker.get_actor(message.actor_name)
        threshold = int(message.options.get("circuit_failures", actor.options.get(
            "circuit_failures", self.settings.circuit_failures)))
        opened = self.runtime.eval(_FAILURE, [*keys, self.keys.circuit_index],
                                   [int(time.time() * 1000), threshold,
                                    cooldown_ms(self.settings, actor, message),
                                    message.message_id, endpoint])
        if opened:
            metrics.get().circuit_open.labels(redact(endpoint)).inc()
            logger.warning("circuit opened for %s after %s", redact(endpoint),
                           error_type, extra=message_context(message))
