"""The workers' Dramatiq broker: Redis, JSON messages, our middleware.

Messages are JSON (Dramatiq's ``JSONEncoder``), never pickle. ``heartbeat_timeout`` is short
because ``WorkerRuntime`` keeps every live process's heartbeat fresh (see its ``_heartbeat``):
a process killed mid-job has its messages requeued within about ``heartbeat_timeout`` plus one
heartbeat interval instead of Dramatiq's default minute-or-more.
"""

from __future__ import annotations

import threading
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
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
from bridge.settings import Settings


class PromptConsumer(_RedisConsumer):
    """Dramatiq's Redis consumer that, while its prefetch is full, waits for a worker thread
    to ack or nack instead of sleeping through its backoff, so the freed place is refilled at
    once rather than up to a poll later (with short jobs and a small prefetch, that pause was a
    large share of each job's time)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._room = threading.Event()

    def ack(self, message: Any) -> None:
        try:
            super().ack(message)
        finally:
            self._room.set()

    def nack(self, message: Any) -> None:
        try:
            super().nack(message)
        finally:
            self._room.set()

    def __next__(self) -> Any:
        if not self.message_cache and self.outstanding_message_count >= self.prefetch:
            self._room.clear()
            if self.outstanding_message_count >= self.prefetch:  # no ack since the check
                self._room.wait(self.timeout / 1000)
            return None  # the consumer thread moves due delayed messages, then asks again
        return super().__next__()


class WorkerBroker(RedisBroker):
    """Dramatiq's Redis broker whose consumers poll at most every ``poll_ms`` when they find
    nothing to fetch, and refill a full prefetch as soon as a job ends (``PromptConsumer``).
    Dramatiq backs off up to the worker's 1 s timeout in both cases, which its CLI does not let
    us change: a job arriving at an idle worker waited up to a second, and a full prefetch was
    refilled late.

    Parameters:
      poll_ms: the longest pause between fetches.
      **kwargs: ``RedisBroker``'s.
    """

    def __init__(self, *, poll_ms: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.poll_ms = poll_ms

    @property
    def consumer_class(self) -> Any:
        return PromptConsumer

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Any:
        return super().consume(queue_name, prefetch, min(timeout, self.poll_ms))


def make_broker(settings: Settings) -> RedisBroker:
    dramatiq.set_encoder(JSONEncoder())
    runtime = WorkerRuntime(settings)
    middleware = [
        AgeLimit(), TimeLimit(), ShutdownNotifications(), Callbacks(), Pipelines(),
        # Delays come from actors.backoff through dramatiq.Retry; these are Retries' defaults
        # for anything else.
        Retries(max_retries=settings.max_retries, min_backoff=int(settings.backoff_min * 1000),
                max_backoff=int(settings.backoff_max * 1000)),
        CurrentMessage(), runtime,
        # Order matters: an open circuit sends a job back before it takes a slot.
        CircuitBreaker(settings, runtime), ConcurrencyLimiter(settings, runtime),
        # Last, since Dramatiq runs after_* hooks in reverse order: its after_process_boot must
        # set up the multiprocess directory before any other hook creates a metric.
        Prometheus(),
    ]
    broker = WorkerBroker(url=settings.redis_url, middleware=middleware,
                          heartbeat_timeout=settings.worker_heartbeat_timeout * 1000,
                          poll_ms=settings.worker_poll_ms)
    broker.declare_queue(settings.queue)
    return broker
