"""Publishing lifecycle events to NATS JetStream from the Redis outbox.

Every state change that must reach NATS writes an outbox entry in the same Lua script that
makes the change (``core.store``), so an event can be late but never lost: when NATS is
down, or the process dies between recording and publishing, the entry waits. The process that
wrote an entry publishes it at once; any process's ``run`` loop takes over entries whose lease
(``OUTBOX_LEASE_MS``) has passed. Payloads are rendered from the stored state and published
with a deterministic ``Nats-Msg-Id``, so a second publish of the same event inside the
stream's duplicate window is dropped by JetStream.

Publishes made in the same turn of the event loop go out as one batch: each message is written
with its own ack inbox (``publish_async``), the batch waits once for all acks, and one Redis
call forgets the entries that were acked. A request-and-wait per event cost a timer, a task and
two Redis commands each, the largest share of the ingress's own CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from typing import Any, Awaitable, Callable, Dict, Iterable, List, Mapping, Optional, Set, Tuple

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from core import contract, envelope, tracing
from core.contract import Subjects
from core.errors import StateUnavailable
from core.logs import redact
from core.settings import Settings
from core.store import OUTBOX_LEASE_MS, DeliberationStore, Finished

logger = logging.getLogger("ray_executor.outbox")

DUPLICATE_WINDOW_SECONDS = 600.0  # longer than any outage an entry may wait out in a lease
STREAM_START = "vllm_stream_start"  # its outbox entry is written by core/lua/submit.lua
ACK_TIMEOUT_SECONDS = 5.0  # past this an unacked publish counts as failed; its entry stays

_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[1] + ARGV[2], id) end
return ids
"""


async def ensure_streams(js: JetStreamContext, subjects: Subjects) -> None:
    """Create the project's streams when missing (the table in docs/architecture.md), with
    upstream's kind of limits (``Subjects.limits``): file storage, the oldest discarded."""
    for name, stream_subjects in subjects.streams.items():
        try:
            await js.stream_info(name)
        except NotFoundError:
            max_age, max_msgs = subjects.limits[name]
            # JetStream refuses a duplicate window longer than the stream's max age
            window = min(DUPLICATE_WINDOW_SECONDS, max_age) if max_age else \
                DUPLICATE_WINDOW_SECONDS
            await js.add_stream(StreamConfig(
                name=name, subjects=stream_subjects, duplicate_window=window,
                retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
                discard=DiscardPolicy.OLD, max_age=max_age or None, max_msgs=max_msgs or -1,
            ))
            logger.info("created stream %s for %s (max age %ss, max %s messages)", name,
                        stream_subjects, max_age or "∞", max_msgs or "∞")


class Outbox:
    """Publishes outbox entries.

    Parameters:
      store: the deliberation state (where entries and payloads come from).
      js: a JetStream context, or None while NATS is not connected.
      subjects: subject names from settings.
    """

    def __init__(self, store: DeliberationStore, js: Optional[JetStreamContext],
                 subjects: Subjects) -> None:
        self.store = store
        self.js = js
        self.subjects = subjects
        self.envelope = store.settings.event_format == "envelope"
        self._claim = store.redis.register_script(_CLAIM)
        # (event id, subject, payload, headers, outcome) waiting for this turn's batch
        self._queued: List[Tuple[str, str, Dict[str, Any], Dict[str, str], asyncio.Future]] = []
        self._batches: Set[asyncio.Future] = set()

    async def publish(self, event_ids: Iterable[str]) -> int:
        """Publish the given entries now; returns how many were sent."""
        sent = await asyncio.gather(*(self._publish_one(event_id) for event_id in event_ids))
        return sum(sent)

    async def publish_finished(self, agent_id: str, finished: Finished) -> None:
        """Publish what ``DeliberationStore.finish`` recorded for ``agent_id``, rendered from
        the state it returned: the agent's outcome and, if it ended the deliberation, the
        final event (both entries stay the recovery path until published)."""
        record = finished.record
        if record is None:
            return
        agent = next(a for a in finished.agents if a["agent_id"] == agent_id)
        events = [(agent["status"], agent_id, contract.round_of(agent))]
        if finished.what == "final":
            events.append((finished.final, "", contract.round_of(record)))
        await asyncio.gather(*(
            self.send(contract.event_id(record["id"], event, who, round),
                      *self._rendered(event, record, finished.agents, who))
            for event, who, round in events))

    async def flush_due(self, limit: int = 200) -> int:
        """Claim entries whose lease passed and publish them."""
        keys = self.store.keys
        ids = await self.store.batcher.guard(self._claim(
            keys=[keys.outbox_due], args=[contract.now_ms(), OUTBOX_LEASE_MS, limit]))
        return await self.publish(ids)

    async def run(self, stop: asyncio.Event, interval: float = 1.0) -> None:
        """Flush due entries until ``stop`` is set."""
        while not stop.is_set():
            try:
                while await self.flush_due() > 0:
                    pass
            except StateUnavailable as exc:
                logger.warning("outbox flush skipped: %s", exc)
            except Exception:
                logger.exception("outbox flush failed")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    async def _publish_one(self, event_id: str) -> bool:
        if self.js is None:
            return False
        keys = self.store.keys
        raw = await self.store.batcher.guard(self.store.redis.hget(keys.outbox, event_id))
        if raw is None:
            return False
        entry = json.loads(raw)
        rendered = await self._render(entry)
        if rendered is None:  # the state expired: nothing left to say
            await self._forget(event_id)
            return False
        return await self.send(event_id, *rendered)

    def send(self, event_id: str, subject: str, payload: Dict[str, Any],
             headers: Dict[str, str]) -> asyncio.Future:
        """Publish an entry whose payload the caller rendered from the state: it joins this
        turn's batch. Returns the future of its outcome, True once JetStream acked it and the
        entry is forgotten, False when NATS is away or did not ack (awaiting it is optional)."""
        outcome = asyncio.get_running_loop().create_future()
        if self.js is None:
            outcome.set_result(False)
            return outcome
        if not self._queued:
            asyncio.get_running_loop().call_soon(self._send_queued)
        self._queued.append((event_id, subject, payload, headers, outcome))
        return outcome

    async def drain(self) -> None:
        """Wait for the batches in flight (on shutdown)."""
        while self._batches:
            await asyncio.gather(*self._batches, return_exceptions=True)

    def _send_queued(self) -> None:
        batch, self._queued = self._queued, []
        task = asyncio.ensure_future(self._send_batch(batch))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _send_batch(self, batch: List[Tuple[str, str, Dict[str, Any], Dict[str, str],
                                                  asyncio.Future]]) -> None:
        js = self.js
        assert js is not None  # send() queues only once NATS is attached, which lasts
        acks: List[asyncio.Future] = []
        for event_id, subject, payload, headers, _ in batch:
            headers["Nats-Msg-Id"] = event_id
            try:
                acks.append(await js.publish_async(subject, json.dumps(payload).encode(),
                                                   headers=headers))
            except Exception as exc:  # kept as this entry's outcome
                failed = asyncio.get_running_loop().create_future()
                failed.set_exception(exc)
                acks.append(failed)
        pending: Set[asyncio.Future] = set()
        if acks:
            _, pending = await asyncio.wait(acks, timeout=ACK_TIMEOUT_SECONDS)
        for ack in pending:  # frees its place among the connection's pending publishes
            ack.cancel()
        acked = [ack.done() and not ack.cancelled() and ack.exception() is None for ack in acks]
        sent = [entry[0] for entry, ok in zip(batch, acked) if ok]
        if sent:
            try:
                await self._forget(*sent)
            except StateUnavailable as exc:  # published: a later flush publishes a duplicate
                logger.warning("could not clear %d published outbox entries: %s", len(sent), exc)
        failures = [(entry, ack) for entry, ack, ok in zip(batch, acks, acked) if not ok]
        if failures:  # NATS down or slow: the entries stay for a later try
            (event_id, subject, payload, headers, _), ack = failures[0]
            error = "no ack" if ack.cancelled() else ack.exception()
            logger.warning("%d of %d publishes failed, first %s to %s: %s", len(failures),
                           len(batch), event_id, subject, error, extra=_context(payload, headers))
        for (event_id, subject, payload, headers, outcome), ack, ok in zip(batch, acks, acked):
            if ok and logger.isEnabledFor(logging.DEBUG):
                result = ack.result()
                logger.debug("published %s to %s (seq %s%s)", event_id, subject, result.seq,
                             ", duplicate" if result.duplicate else "",
                             extra=_context(payload, headers))
            if not outcome.done():
                outcome.set_result(ok)

    async def _render(self, entry: Dict[str, Any]) -> Optional[tuple]:
        found = await self.store.get(entry["deliberation_id"])
        if found is None:
            return None
        record, agents = found
        agent_id = entry["agent_id"] if entry["kind"] == "agent" else ""
        if agent_id and not any(a["agent_id"] == agent_id for a in agents):
            return None
        if entry["event"] == STREAM_START:
            return self._stream_start(record)
        return self._rendered(entry["event"], record, agents, agent_id)

    def send_stream_start(self, record: Mapping[str, Any]) -> asyncio.Future:
        """Publish ``vllm.streaming.<deliberation_id>`` for an accepted deliberation; its own
        outbox entry, written with the ``submitted`` one, stays the recovery path."""
        return self.send(contract.event_id(record["id"], STREAM_START),
                         *self._stream_start(record))

    def _stream_start(self, record: Mapping[str, Any]) -> tuple:
        event_id = contract.event_id(record["id"], STREAM_START)
        return (self.subjects.stream_start(record["id"]), self.body(
            f"{self.subjects.streaming}.{STREAM_START}", contract.stream_start(record),
            event_id, record), _headers(record))

    def _rendered(self, event: str, record: Dict[str, str], agents: List[Dict[str, Any]],
                  agent_id: str = "") -> tuple:
        """Subject, body and headers of a deliberation's ``event`` (of one of its agents
        when ``agent_id`` is given), from its state."""
        if agent_id:
            agent = next(a for a in agents if a["agent_id"] == agent_id)
            body = self.body(
                self.subjects.agent(event), contract.agent_result_event(record, agent),
                contract.event_id(record["id"], event, agent_id, contract.round_of(agent)),
                record)
            return self.subjects.agent_result(event, record), body, _headers(record)
        payload = (contract.deliberation_submitted(record, agents) if event == "submitted"
                   else contract.deliberation_event(record, agents))
        subject = self.subjects.deliberation(event)
        event_id = contract.event_id(record["id"], event, round=contract.round_of(record))
        return subject, self.body(subject, payload, event_id, record), _headers(record)

    def body(self, event_type: str, payload: Dict[str, Any], event_id: str,
             record: Mapping[str, Any]) -> Dict[str, Any]:
        """What is published for ``payload``: itself, or its EventEnvelope when
        ``RAY_EXECUTOR_EVENT_FORMAT`` is ``envelope`` (``core.envelope``)."""
        if self.envelope:
            return envelope.wrap(event_type, payload, event_id, record)
        return payload

    async def _forget(self, *event_ids: str) -> None:
        keys = self.store.keys
        await self.store.batcher.batched(("HDEL", keys.outbox, *event_ids),
                                 ("ZREM", keys.outbox_due, *event_ids))


def _context(payload: Dict[str, Any], headers: Dict[str, str]) -> Dict[str, str]:
    """Log fields of an event."""
    payload = payload.get("payload", payload)  # an envelope's
    log = {"deliberation_id": payload.get("deliberation_id") or "",
           "task_id": payload.get("task_id") or ""}
    if payload.get("agent_id"):
        log["agent_id"] = payload["agent_id"]
    if headers.get("traceparent"):
        log["traceparent"] = headers["traceparent"]
    return log


def _headers(record: Dict[str, str]) -> Dict[str, str]:
    """NATS headers of a deliberation's events: its W3C trace context."""
    return tracing.carrier(record)


async def connect_nats(settings: Settings, name: str) -> NATS:
    """A NATS connection that keeps reconnecting for as long as the process lives."""
    tls = ssl.create_default_context(cafile=settings.nats_tls_ca) if settings.nats_tls_ca \
        else None
    return await nats.connect(
        servers=[s.strip() for s in settings.nats_url.split(",") if s.strip()],
        name=name, max_reconnect_attempts=-1, reconnect_time_wait=1, connect_timeout=5,
        tls=tls,
    )


async def _unless_stopped(connecting: Awaitable[NATS], stop: asyncio.Event) -> Optional[NATS]:
    """``connecting``'s connection, or None once ``stop`` is set first: nats-py retries a
    refused first connect for as long as reconnects are allowed (forever here), which would
    hold a stopping process until it is killed."""
    attempt = asyncio.ensure_future(connecting)
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({attempt, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if attempt.done():
        return attempt.result()
    attempt.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await attempt
    return None


async def attach_nats(settings: Settings, outbox: Outbox, name: str, stop: asyncio.Event,
                      on_connected: Optional[Callable[[NATS], Awaitable[None]]] = None
                      ) -> Optional[NATS]:
    """Connect to NATS, retrying until connected or stopped; then give the outbox its stream
    context. The bridge serves gRPC meanwhile: events wait in the outbox."""
    if not settings.nats_url:
        logger.warning("NATS_URL is empty: events stay in the Redis outbox")
        return None
    delay = 0.5
    while not stop.is_set():
        try:
            nc = await _unless_stopped(connect_nats(settings, name), stop)
            if nc is None:
                return None
            js = nc.jetstream()
            if settings.nats_create_streams:
                await ensure_streams(js, outbox.subjects)
            outbox.js = js
            logger.info("connected to NATS at %s", redact(
                nc.connected_url.geturl() if nc.connected_url else settings.nats_url))
            if on_connected is not None:
                await on_connected(nc)
            return nc
        except Exception as exc:
            logger.warning("NATS not reachable (%s); retrying in %.1fs", exc, delay)
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except asyncio.TimeoutError:
                delay = min(delay * 2, 10.0)
    return None
