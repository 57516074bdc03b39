"""A circuit breaker per vLLM endpoint, shared through Redis by every worker.

After ``RAY_EXECUTOR_CIRCUIT_FAILURES`` consecutive server-side failures (5xx, 429, timeouts,
refused or reset connections) the endpoint's circuit opens: its jobs are put back with a
delay instead of hammering it (no retry consumed). After the cooldown one job at a time is let
through as a probe (half-open); a success closes the circuit, a failure opens it again.

A process that found an endpoint's circuit clean (no failure recorded) trusts that for
``CLEAN_SECONDS`` without asking Redis again, unless one of its own jobs fails there: a burst
of jobs costs one check per endpoint, and a circuit opened by another process is seen at most
that much later.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any, Dict, Set

import dramatiq
from dramatiq.middleware import SkipMessage

from actors import metrics
from actors.limits import endpoint_key
from actors.runtime import WorkerRuntime
from core.errors import SERVER_SIDE, ClassifiedError
from core.keys import Keys
from core.logs import message_context, redact
from core.settings import Settings

logger = logging.getLogger("ray_executor.circuit")

CLEAN_SECONDS = 1.0

_ALLOW = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'clean' end
local opened_until = tonumber(redis.call('HGET', KEYS[1], 'opened_until') or 0)
if opened_until == 0 then return 'closed' end
if tonumber(ARGV[1]) < opened_until then return 'open' end
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then return 'probe' end
return 'open'
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


class CircuitBreaker(dramatiq.Middleware):
    """Parameters:
      settings: failure threshold and cooldown.
      runtime: the process's ``WorkerRuntime``, whose shared Redis connection carries the
        breaker's calls.

    Actor options / per-message overrides: ``circuit_failures``, ``circuit_cooldown`` (s).
    """

    actor_options = {"circuit_failures", "circuit_cooldown"}

    def __init__(self, settings: Settings, runtime: WorkerRuntime) -> None:
        self.settings = settings
        self.runtime = runtime
        self.keys = Keys(settings.key_prefix)
        # Messages that found failures recorded for their endpoint: only their success needs
        # to reset the count (a Redis round trip saved on every other job).
        self._dirty: Set[str] = set()
        self._clean_until: Dict[str, float] = {}  # endpoint -> monotonic time

    def _keys(self, endpoint: str) -> list:
        return [self.keys.circuit(endpoint), self.keys.circuit_probe(endpoint)]

    def _cooldown_ms(self, broker: dramatiq.Broker, message: Any) -> int:
        actor = broker.get_actor(message.actor_name)
        seconds = message.options.get("circuit_cooldown", actor.options.get(
            "circuit_cooldown", self.settings.circuit_cooldown))
        return int(float(seconds) * 1000)

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        endpoint = endpoint_key(message)
        if self._clean_until.get(endpoint, 0.0) > time.monotonic():
            return
        cooldown = self._cooldown_ms(broker, message)
        verdict = self.runtime.eval(_ALLOW, self._keys(endpoint),
                                    [int(time.time() * 1000), message.message_id, cooldown])
        if verdict == "clean":
            self._clean_until[endpoint] = time.monotonic() + CLEAN_SECONDS
        if verdict == "open":
            delay = int(random.uniform(0.5, 1.0) * cooldown)
            broker.enqueue(message.copy(), delay=delay)
            logger.info("circuit open for %s; job back in %d ms", redact(endpoint),
                        delay, extra=message_context(message))
            metrics.get().circuit_waits.inc()
            raise SkipMessage("circuit open")
        if verdict != "clean":
            self._dirty.add(message.message_id)
        if verdict == "probe":
            logger.info("circuit half-open for %s: probing", redact(endpoint),
                        extra=message_context(message))

    def after_process_message(self, broker: dramatiq.Broker, message: Any, *,
                              result: Any = None, exception: Any = None) -> None:
        dirty = message.message_id in self._dirty
        self._dirty.discard(message.message_id)
        endpoint = endpoint_key(message)
        keys = self._keys(endpoint)
        error_type = exception.error_type if isinstance(exception, ClassifiedError) else ""
        if exception is None or error_type not in SERVER_SIDE:
            if exception is None and dirty:  # a success closes the circuit
                self.runtime.redis(("DEL", *keys), ("HDEL", self.keys.circuit_index, endpoint))
            return
        self._clean_until.pop(endpoint, None)
        actor = broker.get_actor(message.actor_name)
        threshold = int(message.options.get("circuit_failures", actor.options.get(
            "circuit_failures", self.settings.circuit_failures)))
        opened = self.runtime.eval(_FAILURE, [*keys, self.keys.circuit_index],
                                   [int(time.time() * 1000), threshold,
                                    self._cooldown_ms(broker, message), message.message_id,
                                    endpoint])
        if opened:
            metrics.get().circuit_open.inc()
            logger.warning("circuit opened for %s after %s", redact(endpoint),
                           error_type, extra=message_context(message))

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        self._dirty.discard(message.message_id)  # refused later (e.g. by the limiter)
