"""Publishing lifecycle events to NATS JetStream from the Redis outbox.

Every state change that must reach NATS writes an outbox entry in the same Lua script that
makes the change (``bridge.state``), so an event can be late but never lost: when NATS is
down, or the process dies between recording and publishing, the entry waits. The process that
wrote an entry publishes it at once; any process's ``run`` loop takes over entries whose lease
(``OUTBOX_LEASE_MS``) has passed. Payloads are rendered from the stored state and published
with a deterministic ``Nats-Msg-Id``, so a second publish of the same event inside the
stream's duplicate window is dropped by JetStream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from typing import Any, Awaitable, Callable, Dict, Iterable, List, Optional

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import StreamConfig
from nats.js.errors import NotFoundError

from bridge import contract
from bridge.contract import Subjects
from bridge.logs import redact
from bridge.settings import Settings
from bridge.state import OUTBOX_LEASE_MS, DeliberationStore, Finished, StateUnavailable

logger = logging.getLogger("ray_executor.outbox")

DUPLICATE_WINDOW_SECONDS = 600.0  # longer than any outage an entry may wait out in a lease

_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[1] + ARGV[2], id) end
return ids
"""


async def ensure_streams(js: JetStreamContext, subjects: Subjects) -> None:
    """Create the project's streams when missing (ARCHITECTURE.md's table)."""
    for name, stream_subjects in subjects.streams.items():
        try:
            await js.stream_info(name)
        except NotFoundError:
            await js.add_stream(StreamConfig(
                name=name, subjects=stream_subjects, duplicate_window=DUPLICATE_WINDOW_SECONDS,
            ))
            logger.info("created stream %s for %s", name, stream_subjects)


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
        self._claim = store.redis.register_script(_CLAIM)

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
        status = next(a["status"] for a in finished.agents if a["agent_id"] == agent_id)
        events = [(status, agent_id)]
        if finished.what == "final":
            events.append((finished.final, ""))
        await asyncio.gather(*(
            self.publish_rendered(contract.event_id(record["id"], event, who),
                                  *self._rendered(event, record, finished.agents, who))
            for event, who in events))

    async def flush_due(self, limit: int = 200) -> int:
        """Claim entries whose lease passed and publish them."""
        keys = self.store.keys
        ids = await self.store.guard(self._claim(
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
        raw = await self.store.guard(self.store.redis.hget(keys.outbox, event_id))
        if raw is None:
            return False
        entry = json.loads(raw)
        rendered = await self._render(entry)
        if rendered is None:  # the state expired: nothing left to say
            await self._forget(event_id)
            return False
        return await self.publish_rendered(event_id, *rendered)

    async def publish_rendered(self, event_id: str, subject: str, payload: Dict[str, Any],
                               headers: Dict[str, str]) -> bool:
        """Publish an entry whose payload the caller rendered from the state it just wrote."""
        if self.js is None:
            return False
        log = {"deliberation_id": payload.get("deliberation_id") or "",
               "task_id": payload.get("task_id") or ""}
        if payload.get("agent_id"):
            log["agent_id"] = payload["agent_id"]
        if headers.get("traceparent"):
            log["traceparent"] = headers["traceparent"]
        headers["Nats-Msg-Id"] = event_id
        try:
            ack = await self.js.publish(subject, json.dumps(payload).encode(), headers=headers,
                                        timeout=5)
        except Exception as exc:  # NATS down or slow: the entry stays for a later try
            logger.warning("publish of %s to %s failed: %s", event_id, subject, exc, extra=log)
            return False
        await self._forget(event_id)
        logger.debug("published %s to %s (seq %s%s)", event_id, subject, ack.seq,
                     ", duplicate" if ack.duplicate else "", extra=log)
        return True

    async def _render(self, entry: Dict[str, Any]) -> Optional[tuple]:
        found = await self.store.get(entry["deliberation_id"])
        if found is None:
            return None
        record, agents = found
        agent_id = entry["agent_id"] if entry["kind"] == "agent" else ""
        if agent_id and not any(a["agent_id"] == agent_id for a in agents):
            return None
        return self._rendered(entry["event"], record, agents, agent_id)

    def _rendered(self, event: str, record: Dict[str, str], agents: List[Dict[str, Any]],
                  agent_id: str = "") -> tuple:
        """Subject, payload and headers of a deliberation's ``event`` (of one of its agents
        when ``agent_id`` is given), from its state."""
        if agent_id:
            agent = next(a for a in agents if a["agent_id"] == agent_id)
            return self.subjects.agent(event), contract.agent_event(record, agent), \
                _headers(record)
        payload = (contract.deliberation_submitted(record, agents) if event == "submitted"
                   else contract.deliberation_event(record, agents))
        return self.subjects.deliberation(event), payload, _headers(record)

    async def _forget(self, event_id: str) -> None:
        keys = self.store.keys
        await self.store.batched(("HDEL", keys.outbox, event_id),
                                 ("ZREM", keys.outbox_due, event_id))


def _headers(record: Dict[str, str]) -> Dict[str, str]:
    """NATS headers of a deliberation's events."""
    return {"traceparent": record["traceparent"]} if record.get("traceparent") else {}


async def connect_nats(settings: Settings, name: str) -> NATS:
    """A NATS connection that keeps reconnecting for as long as the process lives."""
    tls = ssl.create_default_context(cafile=settings.nats_tls_ca) if settings.nats_tls_ca \
        else None
    return await nats.connect(
        servers=[s.strip() for s in settings.nats_url.split(",") if s.strip()],
        name=name, max_reconnect_attempts=-1, reconnect_time_wait=1, connect_timeout=5,
        tls=tls,
    )


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
            nc = await connect_nats(settings, name)
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
