"""Distributed limits on what reaches a vLLM endpoint, and the choice of the endpoint.

A job's endpoints (``actors.endpoints``: its route's pool, or the one URL its caller chose)
each have their own concurrency slots, request rate and circuit (``actors.circuit``), shared
through Redis by every worker process and pod and keyed by the endpoint's URL. One Lua call
over the pool's keys chooses and takes, atomically: a half-open endpoint's probe first (a
success there closes its circuit), else the endpoint with the most free slots whose circuit
is closed. The job then calls that endpoint (``actors.jobs``), and its outcome counts for
that endpoint's circuit. An open circuit thus moves work to the pool's other endpoints.

A job that finds no endpoint to take (all full, the rate window used up, or every circuit
open) is put back on the queue with a jittered delay and its message acked: no retry is
consumed and no worker thread sleeps on it. A slot is a lease in a sorted set (member =
message id, score = expiry), renewed every few seconds while the job runs and removed when
it ends in any way; a crashed worker's leases expire after ``LEASE_MS``, however long its
jobs were meant to run.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
from typing import Any, Dict, List, Optional

import dramatiq
from dramatiq.middleware import SkipMessage

from actors import metrics
from actors.circuit import CIRCUIT_STATE_LUA, cooldown_ms
from actors.endpoints import EndpointPools
from actors.runtime import WorkerRuntime
from core.keys import Keys
from core.logs import message_context, redact
from core.settings import Settings

logger = logging.getLogger("ray_executor.limits")

LEASE_MS = 30_000
RENEW_SECONDS = 5.0

# KEYS: per endpoint, its slots, rate window, circuit and probe keys. ARGV: now ms, message
# id, lease ms, rate (0: none), rate window ms, circuit cooldown ms, then each endpoint's
# slots. Returns {endpoint number (1-based), circuit state} or {0, why none was taken}.
_CHOOSE = CIRCUIT_STATE_LUA + """
local now, member, lease = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local rate, window_ms = tonumber(ARGV[4]), ARGV[5]
local count = #KEYS / 4
local best, best_free, best_state, probe = 0, 0, '', 0
local open, rated = 0, false
for i = 1, count do
  local slots, window = KEYS[4 * i - 3], KEYS[4 * i - 2]
  local state = circuit_state(KEYS[4 * i - 1], KEYS[4 * i], now)
  redis.call('ZREMRANGEBYSCORE', slots, '-inf', now)
  if state == 'open' then
    open = open + 1
  elseif state ~= 'half-open' and redis.call('ZSCORE', slots, member) then
    redis.call('ZADD', slots, now + lease, member)  -- a redelivery that still holds a slot
    return {i, state}
  else
    local free = tonumber(ARGV[6 + i]) - redis.call('ZCARD', slots)
    if free > 0 and rate > 0 and tonumber(redis.call('GET', window) or 0) >= rate then
      free, rated = 0, true
    end
    if free > 0 and state == 'half-open' then
      if probe == 0 then probe = i end
    elseif free > best_free then
      best, best_free, best_state = i, free, state
    end
  end
end
if probe > 0 then
  best, best_state = probe, 'probe'
  redis.call('SET', KEYS[4 * probe], member, 'PX', ARGV[6])
end
if best == 0 then
  if open == count then return {0, 'open'} end
  return {0, rated and 'rate' or 'full'}
end
redis.call('ZADD', KEYS[4 * best - 3], now + lease, member)
if rate > 0 and redis.call('INCR', KEYS[4 * best - 2]) == 1 then
  redis.call('PEXPIRE', KEYS[4 * best - 2], window_ms)
end
return {best, best_state}
"""


@dataclasses.dataclass(frozen=True)
class Choice:
    """The endpoint a job took: its URL (the key of its slots and circuit) and its circuit's
    state then (``clean``: no failure recorded; ``closed``; ``probe``: the half-open
    circuit's one probe)."""

    url: str
    circuit: str


class ConcurrencyLimiter(dramatiq.Middleware):
    """Chooses each job's vLLM endpoint and takes a slot there (module docstring).

    Parameters:
      settings: default limits, the routes (``RAY_EXECUTOR_ROUTES_FILE``) and the worker's
        route (``RAY_EXECUTOR_ROUTE``).
      runtime: the process's ``WorkerRuntime``, whose shared Redis connection carries the
        limiter's calls (batched with the other calls of the moment, not one connection per
        worker thread).

    Actor options / per-message overrides (``message.options``):
      concurrency_limit: slots of a fixed endpoint (default ``RAY_EXECUTOR_VLLM_CONCURRENCY``;
        a pool's endpoints have their own).
      rate_limit: requests per window and endpoint, 0 for none (default
        ``RAY_EXECUTOR_VLLM_RATE_LIMIT``).
      limit_requeue_ms: most ms a refused job waits before it is tried again (default 100).
      circuit_cooldown (``actors.circuit``): how long a probe may take, and about how long a
        job waits when every endpoint's circuit is open.
    """

    actor_options = {"concurrency_limit", "rate_limit", "limit_requeue_ms"}

    def __init__(self, settings: Settings, runtime: WorkerRuntime) -> None:
        self.settings = settings
        self.runtime = runtime
        self.keys = Keys(settings.key_prefix)
        self.pools = EndpointPools(settings)
        self._held: Dict[str, str] = {}  # message id -> the endpoint whose slot it holds
        self._chosen: Dict[str, Choice] = {}  # message id -> its endpoint, until it ends
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        threading.Thread(target=self._renew, name="rx-limit-renew", daemon=True).start()

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        self._stop.set()  # every job has ended: no lease left to renew

    def chosen(self, message_id: str) -> Optional[Choice]:
        """The endpoint the message's job took, while it runs."""
        return self._chosen.get(message_id)

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        actor = broker.get_actor(message.actor_name)
        option = lambda name, default: message.options.get(  # noqa: E731
            name, actor.options.get(name, default))
        fixed = option("concurrency_limit", None)
        endpoints = self.pools.for_job(message.kwargs or {},
                                       int(fixed) if fixed is not None else None)
        rate = int(option("rate_limit", self.settings.vllm_rate_limit))
        window_ms = int(self.settings.vllm_rate_window * 1000)
        cooldown = cooldown_ms(self.settings, actor, message)
        now = int(time.time() * 1000)
        keys: List[str] = []
        for endpoint in endpoints:
            keys += [self.keys.limit_slots(endpoint.url),
                     self.keys.limit_window(endpoint.url, now // window_ms),
                     self.keys.circuit(endpoint.url), self.keys.circuit_probe(endpoint.url)]
        number, state = self.runtime.eval(
            _CHOOSE, keys, [now, message.message_id, LEASE_MS, rate, window_ms, cooldown,
                            *(endpoint.concurrency for endpoint in endpoints)])
        if number:
            self._take(message, endpoints[int(number) - 1].url, _text(state))
            return
        self._refused(broker, message, _text(state), option("limit_requeue_ms", 100),
                      window_ms - now % window_ms, cooldown, endpoints[0].url)

    def _take(self, message: Any, url: str, state: str) -> None:
        with self._lock:
            self._held[message.message_id] = url
            self._chosen[message.message_id] = Choice(url, state)
        metrics.get().slots_in_use.labels(redact(url)).inc()
        if state == "probe":
            logger.info("circuit half-open for %s: probing", redact(url),
                        extra=message_context(message))

    def _refused(self, broker: dramatiq.Broker, message: Any, why: str, requeue_ms: int,
                 window_left_ms: int, cooldown: int, first: str) -> None:
        if why == "open":  # every endpoint's circuit is open: wait about a cooldown
            wait = cooldown
            metrics.get().circuit_waits.inc()
        else:
            wait = int(requeue_ms)
            if why == "rate":  # the rate window is used up: wait for the next one
                wait = max(wait, window_left_ms)
            metrics.get().limiter_waits.labels("rate" if why == "rate" else "concurrency").inc()
        delay = int(random.uniform(0.5, 1.0) * wait)
        broker.enqueue(message.copy(), delay=delay)
        log = logger.info if why == "open" else logger.debug
        log("no endpoint for %s (%s: %s); back in %d ms", message.message_id, redact(first),
            "circuit open" if why == "open" else f"no free {why} slot", delay,
            extra=message_context(message))
        raise SkipMessage(f"no endpoint: {why}")

    def after_process_message(self, broker: dramatiq.Broker, message: Any, *,
                              result: Any = None, exception: Any = None) -> None:
        self.release(message.message_id)
        self._chosen.pop(message.message_id, None)

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        self.release(message.message_id)
        self._chosen.pop(message.message_id, None)

    def release(self, message_id: str) -> None:
        """Free the slot ``message_id`` holds, if any (safe from any thread, and again).

        Job kinds call this as soon as their Ray call ends, so the slot is not held while the
        outcome is recorded and published (the vLLM call is over by then).
        """
        with self._lock:
            held = self._held.pop(message_id, None)
        if held is not None:
            metrics.get().slots_in_use.labels(redact(held)).dec()
            # Not waited for: the job's thread moves on to its ack (if this fails, the lease
            # expires by itself).
            self.runtime.redis_soon(("ZREM", self.keys.limit_slots(held), message_id),
                                    failed=f"slot release failed (it expires in {LEASE_MS} ms)")

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_SECONDS):
            with self._lock:
                held = [(self.keys.limit_slots(url), member)
                        for member, url in self._held.items()]
            if not held:
                continue
            expiry = int(time.time() * 1000) + LEASE_MS
            try:
                self.runtime.redis(*(("ZADD", slots, "XX", expiry, member)
                                     for slots, member in held))
            except Exception as exc:
                logger.warning("slot lease renewal failed: %s", exc)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
