"""The workers' Dramatiq broker: Redis, JSON messages, our middleware.

Messages are JSON (Dramatiq's ``JSONEncoder``), never pickle. ``heartbeat_timeout`` is short
because ``WorkerRuntime`` keeps every live process's heartbeat fresh (see its ``_heartbeat``):
a process killed mid-job has its messages requeued within about ``heartbeat_timeout`` plus one
heartbeat interval instead of Dramatiq's default minute-or-more.
"""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.encoder import JSONEncoder
from dramatiq.middleware import (
    AgeLimit,
    Callbacks,
    CurrentMessage,
    Pipelines,
    Retries,
    ShutdownNotifications,
    TimeLimit,
)

from actors.runtime import WorkerRuntime
from bridge.settings import Settings

MIN_BACKOFF_MS = 1_000
MAX_BACKOFF_MS = 60_000


def make_broker(settings: Settings) -> RedisBroker:
    dramatiq.set_encoder(JSONEncoder())
    middleware = [
        AgeLimit(), TimeLimit(), ShutdownNotifications(), Callbacks(), Pipelines(),
        Retries(max_retries=settings.max_retries, min_backoff=MIN_BACKOFF_MS,
                max_backoff=MAX_BACKOFF_MS),
        CurrentMessage(), WorkerRuntime(settings),
    ]
    broker = RedisBroker(url=settings.redis_url, middleware=middleware,
                         heartbeat_timeout=settings.worker_heartbeat_timeout * 1000)
    broker.declare_queue(settings.queue)
    return broker
