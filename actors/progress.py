"""An attempt's partial output, published as it comes: ``agent.response.progress`` on NATS
and ``agent_progress`` on the deliberation's event stream (``WatchDeliberation``).

The runner on the cluster batches a streamed answer's pieces (``RAY_EXECUTOR_PROGRESS_*``);
each batch becomes one event carrying its ``text``, its ``offset`` in the answer and its
``sequence`` number. Events go out one at a time, in order; text that arrives while one is
being published joins the next. ``Nats-Msg-Id`` is ``<deliberation>:<agent>:progress:<seq>``,
the same for every attempt, so JetStream drops what a retried attempt says again within its
duplicate window. Partial output is best effort: it is not kept in the outbox, and one that
cannot be published is dropped (the final result, in ``agent.response.completed``, is).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Dict, List, Optional

from core import contract
from core.contract import AgentJob
from core.outbox import Outbox
from core.store import DeliberationStore, lifecycle_event

logger = logging.getLogger("ray_executor.progress")
EVENT = "progress"
CLOSE_TIMEOUT = 10.0  # seconds the attempt's end waits for its last partial output to go out


class ProgressPublisher:
    """Publishes one attempt's partial output; called with each text as it comes.

    Parameters:
      store: the deliberation state (the event stream Watch reads).
      outbox: this process's publisher (its NATS connection and event format).
      job: the attempt's job.
      attempt: the attempt's number (1 for the first).
    """

    def __init__(self, store: DeliberationStore, outbox: Outbox, job: AgentJob,
                 attempt: int) -> None:
        self.store = store
        self.outbox = outbox
        self.job = job
        self.attempt = attempt
        self.pending: List[str] = []
        self.sequence = 0
        self.offset = 0  # characters of the answer published so far
        self.sending: Optional[asyncio.Task] = None
        # What the event's body needs of the deliberation's record (its envelope, its trace).
        self.record = {"id": job.deliberation_id, "task_id": job.task_id,
                       "metadata": dict(job.metadata),
                       **{key: job.metadata[key] for key in ("traceparent", "tracestate")
                          if job.metadata.get(key)}}
        self.log = {"deliberation_id": job.deliberation_id, "task_id": job.task_id,
                    "agent_id": job.agent_id,
                    **{k: v for k, v in self.record.items() if k == "traceparent"}}

    def __call__(self, text: str) -> None:
        if not text:
            return
        self.pending.append(text)
        if self.sending is None or self.sending.done():
            self.sending = asyncio.ensure_future(self._send_pending())

    async def close(self) -> None:
        """Wait (a bounded time) until what came has been published."""
        if self.sending is not None and not self.sending.done():
            try:
                await asyncio.wait_for(asyncio.shield(self.sending), CLOSE_TIMEOUT)
            except asyncio.TimeoutError:
                logger.warning("partial output of %s not published within %.0fs",
                               self.job.agent_id, CLOSE_TIMEOUT, extra=self.log)

    async def _send_pending(self) -> None:
        while self.pending:
            text = "".join(self.pending)
            self.pending = []
            payload = self.payload(text)
            self.sequence += 1
            self.offset += len(text)
            try:
                await self._send(payload)
            except Exception as exc:  # best effort: the final result carries the answer
                logger.warning("partial output %d of %s not published: %s",
                               payload["sequence"], self.job.agent_id, exc, extra=self.log)

    def payload(self, text: str) -> Dict[str, Any]:
        job = self.job
        return {"deliberation_id": job.deliberation_id, "task_id": job.task_id,
                "agent_id": job.agent_id, "role": job.role, "attempt": self.attempt,
                "sequence": self.sequence, "offset": self.offset, "text": text,
                "story_id": job.story_id, "plan_id": job.plan_id,
                "timestamp": contract.iso()}

    async def _send(self, payload: Dict[str, Any]) -> None:
        job = self.job
        event_id = f"{contract.event_id(job.deliberation_id, EVENT, job.agent_id)}:" \
                   f"{payload['sequence']}"
        subject = self.outbox.subjects.agent(EVENT)
        published = self.outbox.send(
            event_id, subject, self.outbox.body(subject, payload, event_id, self.record),
            {key: self.record[key] for key in ("traceparent", "tracestate")
             if key in self.record})
        watched = self.store.progress(job.deliberation_id, lifecycle_event(
            "agent_progress", agent_id=job.agent_id, status=contract.RUNNING,
            **{key: payload[key] for key in ("attempt", "sequence", "offset", "text")}))
        sent, _ = await asyncio.gather(published, watched)
        if not sent:
            logger.debug("partial output %d of %s: NATS did not take it", payload["sequence"],
                         job.agent_id, extra=self.log)
