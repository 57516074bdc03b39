"""The service's health as the bridge sees it, for ``GetStatus`` and ``/healthz``.

Degraded, with every reason, when:

- Redis is unreachable (nothing can be submitted or read);
- NATS is configured but not connected (events wait in the outbox);
- no worker process of the queue has beaten within ``RAY_EXECUTOR_WORKER_HEARTBEAT_TIMEOUT``
  (jobs wait in the queue; the workers list themselves, ``core.keys.Keys.workers``);
- more than ``DEGRADED_BACKLOG`` messages wait in the queue;
- a vLLM endpoint's circuit is open (``actors.circuit``: its jobs wait for the cooldown).

The bridge still takes requests while degraded: they wait in Redis for what is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from typing import Any, Dict, Optional, Tuple

import redis.exceptions

from core.errors import StateUnavailable
from core.logs import redact
from core.settings import Settings
from core.store import DeliberationStore

DEGRADED_BACKLOG = 10_000  # ready messages beyond which the service reports "degraded"


@dataclasses.dataclass(frozen=True)
class Health:
    """A verdict: ``reasons`` is empty when healthy."""

    reasons: Tuple[str, ...] = ()

    @property
    def status(self) -> str:
        return "degraded" if self.reasons else "healthy"

    @property
    def message(self) -> str:
        return "; ".join(self.reasons)


async def assess(store: DeliberationStore, settings: Settings, nats: Any
                 ) -> Tuple[Health, Optional[Dict[str, Any]]]:
    """The service's health and, when Redis answered, the counts of ``store.stats()``.

    Parameters:
      store: the deliberation state.
      settings: the queue, the heartbeat timeout and whether NATS is configured.
      nats: the bridge's NATS connection, or None while it has none.
    """
    reasons = []
    if settings.nats_url and not (nats is not None and nats.is_connected):
        reasons.append("NATS not connected: events wait in the outbox")
    try:
        counts = await store.stats()
        workers = await live_workers(store, settings)
        circuits = await store.redis.hgetall(store.keys.circuit_index)
    except (StateUnavailable, redis.exceptions.RedisError) as exc:
        return Health((f"Redis unreachable: {exc}", *reasons)), None
    if not workers:
        reasons.append(f"no live worker on queue {settings.queue!r} (none beat in the last "
                       f"{settings.worker_heartbeat_timeout} s): jobs wait")
    if counts["ready"] >= DEGRADED_BACKLOG:
        reasons.append(f"{counts['ready']} messages waiting")
    now_ms = time.time() * 1000
    for endpoint, opened_until in sorted(circuits.items()):
        if float(opened_until) > now_ms:
            reasons.append(f"vLLM endpoint {redact(endpoint)}: circuit open for "
                           f"{(float(opened_until) - now_ms) / 1000:.0f} s more, its jobs wait")
    return Health(tuple(reasons)), counts


async def live_workers(store: DeliberationStore, settings: Settings) -> int:
    """Worker processes of the queue whose last heartbeat is within the timeout."""
    now_ms = int(time.time() * 1000)
    return int(await store.redis.zcount(store.keys.workers(settings.queue),
                                        now_ms - settings.worker_heartbeat_timeout * 1000,
                                        "+inf"))


class Watch:
    """The latest verdict, renewed every ``interval`` seconds by ``run`` on the bridge's
    loop, for ``/healthz`` (served from another thread)."""

    def __init__(self, store: DeliberationStore, settings: Settings, interval: float = 5.0
                 ) -> None:
        self.store = store
        self.settings = settings
        self.interval = interval
        self.nats: Any = None  # the bridge's NATS connection, once it has one
        self.latest = Health(("starting",))

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.latest, _ = await assess(self.store, self.settings, self.nats)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)
