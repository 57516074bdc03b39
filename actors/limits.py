"""Distributed limits on what reaches a vLLM endpoint: concurrency slots and request rate.

Both are shared through Redis by every worker process and pod, keyed by endpoint and model.
A job that finds no free slot (or the window's requests used up) is put back on the queue
with a short jittered delay and its message acked: no retry is consumed and no worker thread
sleeps on it. A slot is a lease in a sorted set (member = message id, score = expiry), renewed
every few seconds while the job runs and removed when it ends in any way; a crashed worker's
leases expire after ``LEASE_MS``, however long its jobs were meant to run.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any, Dict, Tuple

import dramatiq
from dramatiq.middleware import SkipMessage

from actors import metrics
from actors.runtime import WorkerRuntime
from core.keys import Keys
from core.logs import message_context, redact
from core.settings import Settings

logger = logging.getLogger("ray_executor.limits")

LEASE_MS = 30_000
RENEW_SECONDS = 5.0

_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZSCORE', KEYS[1], ARGV[3]) then
  redis.call('ZADD', KEYS[1], ARGV[1] + ARGV[4], ARGV[3])
  return 1
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
if tonumber(ARGV[5]) > 0 then
  local used = redis.call('INCR', KEYS[2])
  if used == 1 then redis.call('PEXPIRE', KEYS[2], ARGV[6]) end
  if used > tonumber(ARGV[5]) then return -1 end
end
redis.call('ZADD', KEYS[1], ARGV[1] + ARGV[4], ARGV[3])
return 1
"""


def endpoint_key(message: dramatiq.Message) -> str:
    kwargs = message.kwargs or {}
    return f"{kwargs.get('vllm_url', '')}|{kwargs.get('model', '')}"


class ConcurrencyLimiter(dramatiq.Middleware):
    """Caps jobs in flight (and optionally requests per window) per vLLM endpoint and model.

    Parameters:
      settings: default limits.
      runtime: the process's ``WorkerRuntime``, whose shared Redis connection carries the
        limiter's calls (batched with the other calls of the moment, not one connection per
        worker thread).

    Actor options / per-message overrides (``message.options``):
      concurrency_limit: slots per endpoint (default ``RAY_EXECUTOR_VLLM_CONCURRENCY``).
      rate_limit: requests per window, 0 for none (default ``RAY_EXECUTOR_VLLM_RATE_LIMIT``).
      limit_requeue_ms: most ms a refused job waits before it is tried again (default 100).
    """

    actor_options = {"concurrency_limit", "rate_limit", "limit_requeue_ms"}

    def __init__(self, settings: Settings, runtime: WorkerRuntime) -> None:
        self.settings = settings
        self.runtime = runtime
        self.keys = Keys(settings.key_prefix)
        self._held: Dict[str, Tuple[str, str]] = {}  # message id -> (slots key, member)
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        threading.Thread(target=self._renew, name="rx-limit-renew", daemon=True).start()

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        self._stop.set()  # every job has ended: no lease left to renew

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        actor = broker.get_actor(message.actor_name)
        option = lambda name, default: message.options.get(  # noqa: E731
            name, actor.options.get(name, default))
        limit = int(option("concurrency_limit", self.settings.vllm_concurrency))
        rate = int(option("rate_limit", self.settings.vllm_rate_limit))
        window_ms = int(self.settings.vllm_rate_window * 1000)
        endpoint = endpoint_key(message)
        slots = self.keys.limit_slots(endpoint)
        window = self.keys.limit_window(endpoint, int(time.time() * 1000) // window_ms)
        now = int(time.time() * 1000)
        got = self.runtime.eval(_ACQUIRE, [slots, window],
                                [now, limit, message.message_id, LEASE_MS, rate, window_ms])
        if got == 1:
            with self._lock:
                self._held[message.message_id] = (slots, message.message_id)
            metrics.get().slots_in_use.inc()
            return
        metrics.get().limiter_waits.labels("rate" if got == -1 else "concurrency").inc()
        wait = int(option("limit_requeue_ms", 100))
        if got == -1:  # the rate window is used up: wait for the next one
            wait = max(wait, window_ms - now % window_ms)
        delay = int(random.uniform(0.5, 1.0) * wait)
        broker.enqueue(message.copy(), delay=delay)
        logger.debug("no slot for %s on %s; back in %d ms", message.message_id, redact(endpoint),
                     delay, extra=message_context(message))
        raise SkipMessage("no free slot")

    def after_process_message(self, broker: dramatiq.Broker, message: Any, *,
                              result: Any = None, exception: Any = None) -> None:
        self.release(message.message_id)

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        self.release(message.message_id)

    def release(self, message_id: str) -> None:
        """Free the slot ``message_id`` holds, if any (safe from any thread, and again).

        Job kinds call this as soon as their Ray call ends, so the slot is not held while the
        outcome is recorded and published (the vLLM call is over by then).
        """
        with self._lock:
            held = self._held.pop(message_id, None)
        if held is not None:
            metrics.get().slots_in_use.dec()
            # Not waited for: the job's thread moves on to its ack (if this fails, the lease
            # expires by itself).
            self.runtime.redis_soon(("ZREM", *held),
                                    failed=f"slot release failed (it expires in {LEASE_MS} ms)")

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_SECONDS):
            with self._lock:
                held = list(self._held.values())
            if not held:
                continue
            expiry = int(time.time() * 1000) + LEASE_MS
            try:
                self.runtime.redis(*(("ZADD", slots, "XX", expiry, member)
                                     for slots, member in held))
            except Exception as exc:
                logger.warning("slot lease renewal failed: %s", exc)
