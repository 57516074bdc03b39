"""Each route as an operator looks at it (``OperationsService.GetRoutes``, ``ray-executor
routes``, the browser's routes panel): its queue's depths and live workers
(``bridge.health.route_states``), its agent jobs running, and each vLLM endpoint of its pool
with its slots in use and its circuit.

The workers own the limiter's slots and the circuits (``actors.limits``, ``actors.circuit``);
this reads their Redis records the way the limiter's Lua does, without importing the workers:
a slot is a lease not yet expired; a circuit is open until ``opened_until`` (or while its
half-open probe is out), then half-open until a probe closes it.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from typing import Any, List, Tuple

from bridge.health import RouteState, route_states
from core import contract
from core.routes import Endpoint, Routes
from core.settings import Settings
from core.store import DeliberationStore

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


@dataclasses.dataclass(frozen=True)
class EndpointView:
    """One endpoint of a pool: its URL as configured (not redacted), its slots, its circuit."""

    url: str
    concurrency: int
    in_use: int
    circuit: str
    open_for_seconds: float
    failures: int


@dataclasses.dataclass(frozen=True)
class RouteView:
    state: RouteState
    running: int  # agent jobs running
    endpoints: Tuple[EndpointView, ...]


async def route_views(store: DeliberationStore, settings: Settings, routes: Routes,
                      unrouted: str) -> List[RouteView]:
    """Every route, in the routes' order; ``unrouted``: the route of records naming none.
    Raises ``StateUnavailable`` when Redis is unreachable."""
    states = await route_states(store, settings, routes)
    running = Counter(record.get("route") or unrouted
                      for record, agent in await store.active_jobs()
                      if agent.get("status") == contract.RUNNING)
    pools = [route.endpoints for route in routes]
    now_ms = int(time.time() * 1000)
    keys = store.keys

    def reads(pipe: Any) -> None:
        for endpoint in (e for pool in pools for e in pool):
            pipe.hmget(keys.circuit(endpoint.url), ("failures", "opened_until"))
            pipe.exists(keys.circuit_probe(endpoint.url))
            pipe.zcount(keys.limit_slots(endpoint.url), f"({now_ms}", "+inf")

    values = iter(await store.batcher.pipelined(reads))
    return [RouteView(state, running[state.route],
                      tuple(_endpoint(e, next(values), next(values), next(values), now_ms)
                            for e in pool))
            for state, pool in zip(states, pools)]


def _endpoint(endpoint: Endpoint, circuit: Any, probe_out: int, in_use: int,
              now_ms: int) -> EndpointView:
    failures, opened_until = (int(value or 0) for value in circuit)
    if not opened_until:
        state, left = CLOSED, 0.0
    elif now_ms < opened_until or probe_out:
        state, left = OPEN, max(0.0, (opened_until - now_ms) / 1000)
    else:
        state, left = HALF_OPEN, 0.0
    return EndpointView(endpoint.url, endpoint.concurrency, int(in_use), state, left, failures)
