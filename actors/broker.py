"""The workers' Dramatiq broker: Redis, JSON messages, our middleware.

Messages are JSON (Dramatiq's ``JSONEncoder``), never pickle. ``heartbeat_timeout`` is short
because ``WorkerRuntime`` keeps every live process's heartbeat fresh (see its ``_heartbeat``):
a process killed mid-job has its messages requeued within about ``heartbeat_timeout`` plus one
heartbeat interval instead of Dramatiq's default minute-or-more.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Dict, List, Optional

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.encoder import JSONEncoder
from dramatiq.middleware import (
    AgeLimit,
    Callbacks,
    CurrentMessage,
    Pipelines,
    Prometheus,
    Retries,
    ShutdownNotifications,
    TimeLimit,
)

from actors.circuit import CircuitBreaker
from actors.limits import ConcurrencyLimiter
from actors.runtime import WorkerRuntime
from core import dramatiq_internals
from core.dramatiq_internals import PromptConsumer
from core.keys import WAKE_CHANNEL
from core.settings import Settings

logger = logging.getLogger("ray_executor.broker")


class WorkerBroker(RedisBroker):
    """Dramatiq's Redis broker whose consumers poll at most every ``poll_ms`` when they find
    nothing to fetch, refill a full prefetch as soon as a job ends, and wake when a submit
    announces their queue on ``WAKE_CHANNEL`` (``PromptConsumer``). Dramatiq backs off up to
    the worker's 1 s timeout in both cases, which its CLI does not let us change: a job
    arriving at an idle worker waited up to a second, and a full prefetch was refilled late.

    Parameters:
      poll_ms: the longest pause between fetches.
      **kwargs: ``RedisBroker``'s.
    """

    def __init__(self, *, poll_ms: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.poll_ms = poll_ms
        self._consumers: Dict[str, List[PromptConsumer]] = {}  # by queue, to wake
        self._lock = threading.Lock()
        self._listener: Optional[threading.Thread] = None
        self._pubsub: Optional[Any] = None
        self._closing = False

    @property
    def consumer_class(self) -> Any:
        return PromptConsumer

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Any:
        consumer = super().consume(queue_name, prefetch, min(timeout, self.poll_ms))
        with self._lock:  # in the worker process: Dramatiq forks before consuming
            self._consumers.setdefault(queue_name, []).append(consumer)
            if self._listener is None:
                self._listener = threading.Thread(target=self._listen, name="rx-wake",
                                                  daemon=True)
                self._listener.start()
        return consumer

    def close(self) -> None:
        self._closing = True
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                self._pubsub.close()
        super().close()

    def _listen(self) -> None:
        """Wake this process's consumers of each queue a submit announces. Polling goes on
        regardless, so a dropped subscription costs latency only: it is renewed after 1 s."""
        while not self._closing:
            try:
                self._pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                self._pubsub.subscribe(WAKE_CHANNEL)
                for message in self._pubsub.listen():
                    queue = message["data"].decode()
                    for consumer in self._consumers.get(queue, ()):
                        consumer.wake()
            except Exception as exc:
                if self._closing:
                    return
                logger.warning("wake-up subscription lost (%s); renewing it in 1 s", exc)
                time.sleep(1)


def make_broker(settings: Settings) -> RedisBroker:
    dramatiq.set_encoder(JSONEncoder())
    runtime = WorkerRuntime(settings)
    limiter = ConcurrencyLimiter(settings, runtime)
    middleware = [
        AgeLimit(), TimeLimit(), ShutdownNotifications(), Callbacks(), Pipelines(),
        # Delays come from actors.backoff through dramatiq.Retry; these are Retries' defaults
        # for anything else.
        Retries(max_retries=settings.max_retries, min_backoff=int(settings.backoff_min * 1000),
                max_backoff=int(settings.backoff_max * 1000)),
        CurrentMessage(), runtime, limiter,
        # After the limiter, which chooses the job's endpoint: Dramatiq runs after_* hooks in
        # reverse order, so the breaker records the outcome while the choice is still known.
        CircuitBreaker(settings, runtime, limiter.chosen),
        # Last, since Dramatiq runs after_* hooks in reverse order: its after_process_boot must
        # set up the multiprocess directory before any other hook creates a metric.
        Prometheus(),
    ]
    broker = WorkerBroker(url=settings.redis_url, middleware=middleware,
                          heartbeat_timeout=settings.worker_heartbeat_timeout * 1000,
                          poll_ms=settings.worker_poll_ms)
    if settings.worker_id:  # the group's restart finds this process's unacked messages
        broker.broker_id = dramatiq_internals.process_id(settings.worker_id)
    broker.declare_queue(settings.queue)
    return broker
