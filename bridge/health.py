"""The service's health as the bridge sees it, for ``GetStatus`` and ``/healthz``.

Degraded, with every reason, when:

- Redis is unreachable (nothing can be submitted or read);
- NATS is configured but not connected (events wait in the outbox);
- a route's queue has no worker process that beat within
  ``RAY_EXECUTOR_WORKER_HEARTBEAT_TIMEOUT`` (that route's jobs wait; the workers list
  themselves per queue, ``core.keys.Keys.workers``), each such route named;
- more than ``DEGRADED_BACKLOG`` messages wait in a route's queue;
- a vLLM endpoint's circuit is open (``actors.circuit``: its jobs wait for the cooldown),
  and, with a routes file, each route whose endpoints all have open circuits (the pool has
  nowhere to send its jobs).

The bridge still takes requests while degraded: they wait in Redis for what is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from typing import Any, Dict, List, Optional, Tuple

import redis.exceptions

from core.dramatiq_internals import queue_depths
from core.errors import StateUnavailable
from core.logs import redact
from core.routes import Routes
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


@dataclasses.dataclass(frozen=True)
class RouteState:
    """One route's queue: messages ready, delayed and dead-lettered, and live workers."""

    route: str
    queue: str
    ready: int
    delayed: int
    dead: int
    workers: int

    def summary(self) -> str:
        return (f"route {self.route} (queue {self.queue}): {self.workers} workers, "
                f"{self.ready} ready, {self.delayed} delayed, {self.dead} dead")


async def assess(store: DeliberationStore, settings: Settings, nats: Any,
                 routes: Routes) -> Tuple[Health, Optional[Dict[str, Any]]]:
    """The service's health and, when Redis answered, the counts of ``store.stats()``, the
    queue depths summed over the routes (``ready``, ``delayed``, ``dead``) and each route's
    ``RouteState`` (``routes``).

    Parameters:
      store: the deliberation state.
      settings: the heartbeat timeout, whether NATS and a routes file are configured.
      nats: the bridge's NATS connection, or None while it has none.
      routes: the routes whose queues and workers are looked at.
    """
    reasons = []
    if settings.nats_url and not (nats is not None and nats.is_connected):
        reasons.append("NATS not connected: events wait in the outbox")
    try:
        counts: Dict[str, Any] = await store.stats()
        states = await route_states(store, settings, routes)
        circuits = await store.redis.hgetall(store.keys.circuit_index)
    except (StateUnavailable, redis.exceptions.RedisError) as exc:
        return Health((f"Redis unreachable: {exc}", *reasons)), None
    # Without a routes file the one route is the service: its reasons read as they always did.
    named = settings.routes_file != ""
    for state in states:
        of_route = f" of route {state.route!r}" if named else ""
        if not state.workers:
            reasons.append(f"no live worker on queue {state.queue!r}{of_route} (none beat in "
                           f"the last {settings.worker_heartbeat_timeout} s): jobs wait")
        if state.ready >= DEGRADED_BACKLOG:
            reasons.append(f"{state.ready} messages waiting{of_route}")
    counts.update(ready=sum(s.ready for s in states), delayed=sum(s.delayed for s in states),
                  dead=sum(s.dead for s in states), routes=states)
    now_ms = time.time() * 1000
    opened = {endpoint: float(until) for endpoint, until in circuits.items()
              if float(until) > now_ms}
    for endpoint, opened_until in sorted(opened.items()):
        reasons.append(f"vLLM endpoint {redact(endpoint)}: circuit open for "
                       f"{(opened_until - now_ms) / 1000:.0f} s more, its jobs wait")
    for route in routes if named else ():
        if all(endpoint.url in opened for endpoint in route.endpoints):
            reasons.append(f"route {route.name!r}: every vLLM endpoint's circuit is open, its "
                           f"jobs wait")
    return Health(tuple(reasons)), counts


async def route_states(store: DeliberationStore, settings: Settings, routes: Routes
                       ) -> List[RouteState]:
    """Each route's queue depths and worker processes whose last heartbeat is within the
    timeout, in one pipeline."""
    floor = int(time.time() * 1000) - settings.worker_heartbeat_timeout * 1000

    def reads(pipe: Any) -> None:
        for route in routes:
            queue_depths(pipe, route.queue)
            pipe.zcount(store.keys.workers(route.queue), floor, "+inf")

    values = await store.batcher.pipelined(reads)
    return [RouteState(route.name, route.queue, *(int(v) for v in values[4 * i:4 * i + 4]))
            for i, route in enumerate(routes)]


class Watch:
    """The latest verdict, renewed every ``interval`` seconds by ``run`` on the bridge's
    loop, for ``/healthz`` (served from another thread)."""

    def __init__(self, store: DeliberationStore, settings: Settings, routes: Routes,
                 interval: float = 5.0) -> None:
        self.store = store
        self.settings = settings
        self.routes = routes
        self.interval = interval
        self.nats: Any = None  # the bridge's NATS connection, once it has one
        self.latest = Health(("starting",))

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.latest, _ = await assess(self.store, self.settings, self.nats, self.routes)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)
