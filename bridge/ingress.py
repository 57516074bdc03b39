"""Accepting a deliberation: the one code path behind both ingresses (gRPC and NATS).

Validate, then record and enqueue atomically (``DeliberationStore.submit``), then hand the
``submitted`` event to the outbox without making the caller wait for NATS.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from bridge import validation
from bridge.metrics import ingress_latency, ingress_requests
from core import contract
from core.errors import StateUnavailable
from core.outbox import Outbox
from core.routes import Routes
from core.routes import load as load_routes
from core.settings import Settings
from core.store import DeliberationStore, Submission, new_deliberation_id
from ray_executor.v1 import ray_executor_pb2 as pb

logger = logging.getLogger("ray_executor.ingress")


class Ingress:
    """Turns requests into deliberations.

    Parameters:
      store: deliberation state.
      settings: limits and defaults for validation.
      outbox: publishes the ``submitted`` event (may be None: the outbox loop of any process
        will publish it after its lease).
      routes: where requests go (``core.routes``, loaded once at the bridge's start);
        default: ``routes.load(settings)``.
    """

    def __init__(self, store: DeliberationStore, settings: Settings,
                 outbox: Optional[Outbox] = None, routes: Optional[Routes] = None) -> None:
        self.store = store
        self.settings = settings
        self.outbox = outbox
        self.routes = routes if routes is not None else load_routes(settings)
        self._background: Set[asyncio.Task] = set()

    async def submit(self, request: pb.ExecuteDeliberationRequest,
                     trace: Optional[Mapping[str, str]] = None,
                     source: str = "grpc") -> Tuple[str, bool]:
        """Returns ``(deliberation_id, created)``; ``trace`` is the W3C trace context to carry
        (``core.tracing``); ``source`` labels the metrics.

        Raises ``validation.InvalidRequest`` (nothing written) or ``state.StateUnavailable``
        (nothing written: the script is atomic).
        """
        outcome = (await self.submit_all([(request, trace or {})], source))[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome  # type: ignore[no-any-return]

    async def submit_all(self, requests: Sequence[Tuple[pb.ExecuteDeliberationRequest,
                                                         Mapping[str, str]]],
                         source: str) -> List[Any]:
        """``submit`` for each ``(request, trace)``, recorded in one Redis pipeline: each
        outcome is what ``submit`` returns or the exception it would raise. The trace context
        goes into the record (for the events) and the jobs' message options (for the
        workers)."""
        started = time.perf_counter()
        outcomes: List[Any] = [None] * len(requests)
        planned: List[Tuple[int, validation.Plan, Mapping[str, str]]] = []
        submissions: List[Submission] = []
        for index, (request, trace) in enumerate(requests):
            try:
                plan = validation.plan(request, self.settings, new_deliberation_id(),
                                       self.routes)
            except validation.InvalidRequest as exc:
                outcomes[index] = exc
                continue
            record = {**plan.record, **trace}
            planned.append((index, plan, trace))
            submissions.append((plan.idempotency_key, record, plan.jobs, dict(trace)))
        stored = await self.store.submit_all(submissions) if submissions else []
        for (index, plan, trace), result in zip(planned, stored):
            if isinstance(result, Exception):
                outcomes[index] = result
                continue
            deliberation_id, created, record = result
            if created:
                if logger.isEnabledFor(logging.DEBUG):
                    logger.debug("deliberation %s submitted for task %s with %d agents",
                                 deliberation_id, plan.record["task_id"], len(plan.jobs),
                                 extra={"deliberation_id": deliberation_id,
                                        "task_id": plan.record["task_id"],
                                        **trace})
                self._publish_submitted(deliberation_id, record, plan, trace)
            outcomes[index] = (deliberation_id, created)
        self._count(outcomes, source, time.perf_counter() - started)
        return outcomes

    @staticmethod
    def _count(outcomes: List[Any], source: str, seconds: float) -> None:
        counts: Dict[str, int] = {}
        for outcome in outcomes:
            if isinstance(outcome, validation.InvalidRequest):
                label = "invalid"
            elif isinstance(outcome, StateUnavailable):
                label = "unavailable"
            elif isinstance(outcome, Exception):
                continue  # a bug: the caller reports it
            else:
                label = "submitted" if outcome[1] else "duplicate"
                ingress_latency(source).observe(seconds)
            counts[label] = counts.get(label, 0) + 1
        for label, count in counts.items():
            ingress_requests(source, label).inc(count)

    async def cancel(self, deliberation_id: str, reason: str = "") -> Tuple[bool, str]:
        """``(cancelled_now, status)``; see ``DeliberationStore.cancel``."""
        changed, status = await self.store.cancel(deliberation_id, reason)
        if changed:
            self._publish_later(contract.event_id(deliberation_id, contract.CANCELLED))
        return changed, status

    def _publish_submitted(self, deliberation_id: str, stored: Dict[str, Any],
                           plan: validation.Plan, trace: Mapping[str, str]) -> None:
        """Publish ``submitted`` rendered from what is in hand (saves reading the state back);
        the outbox entry the submit wrote stays the recovery path."""
        if self.outbox is None:
            return
        agents = [{"agent_id": job.agent_id, "role": job.role} for job in plan.jobs]
        event_id = contract.event_id(deliberation_id, "submitted")
        subject = self.outbox.subjects.deliberation("submitted")
        self.outbox.send(event_id, subject, self.outbox.body(
            subject, contract.deliberation_submitted(stored, agents), event_id, stored),
            dict(trace))
        self.outbox.send_stream_start(stored)

    def _publish_later(self, event_id: str) -> None:
        if self.outbox is not None:
            self._track(self.outbox.publish([event_id]))

    def _track(self, publish: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(publish)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Wait for background publishes (on shutdown)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self.outbox is not None:
            await self.outbox.drain()
