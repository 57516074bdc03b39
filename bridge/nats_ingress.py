"""The NATS ingress: a durable JetStream pull consumer turning requests into deliberations.

Producers publish the proto3 JSON of ``ExecuteDeliberationRequest`` (original or camelCase
names; unknown fields are refused, so a typo is reported rather than dropped; see
``bridge.request_json``) on ``Subjects.deliberate``. Each fetched batch goes through
``Ingress.submit_all`` (the validation and idempotency of the gRPC path, one Redis pipeline)
and each message is acked only once its deliberation is enqueued.

- Consumer: durable ``settings.nats_consumer`` on ``settings.nats_commands_stream``, filtered
  to ``agent.cmd.deliberate``, explicit ack, ``ACK_WAIT`` (``in_progress`` keeps a slow
  enqueue alive), ``MAX_DELIVER``, ``RAY_EXECUTOR_NATS_MAX_ACK_PENDING`` shared by all
  replicas. Replicas bind the same durable, so JetStream hands each message to one of them.
- Deliver policy ``all``. The durable keeps its position across restarts, so this matters only
  when it is created: a stream the bridge created holds nothing older, and one created before
  holds requests addressed to this service, which must not be lost. Recreating the durable
  replays the stream; requests within the idempotency window (the state TTL) are answered with
  their existing deliberation. To start from "now", create the durable yourself with
  ``deliver_policy=new`` before the bridge starts: the bridge binds to an existing durable.
- Refused input (bad JSON, wrong types, unknown fields, ``InvalidRequest``, oversize): a copy
  goes to ``Subjects.dead_letter`` as JSON ``{reason, field, subject, stream, stream_sequence,
  delivered, timestamp, payload, payload_encoding ("utf-8" | "base64"), payload_bytes,
  truncated, headers}``, carrying the original headers (``Nats-*`` ones only in the body),
  ``Ray-Executor-Reason``/``-Field`` and ``Nats-Msg-Id: dlq:<stream sequence>``; then the
  message is terminated.
- Redis unavailable: ``nak`` with exponential delay, and fetching pauses as long; the last
  allowed delivery dead-letters instead, so nothing vanishes silently.
- ``Reply-To`` header: the JSON of ``ExecuteDeliberationResponse`` (original field names) is
  published there once the request is enqueued (``submitted``) or refused (``failed``).
- ``stop``: no more fetches; what is in hand is finished and acked.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
from typing import Any, Awaitable, Dict, List, Mapping, Optional, Set, Tuple

from google.protobuf import json_format
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from bridge.ingress import Ingress
from bridge.request_json import parse_request
from bridge.validation import InvalidRequest
from core import contract, tracing
from core.contract import Subjects
from core.errors import StateUnavailable
from core.settings import Settings
from ray_executor.v1 import ray_executor_pb2 as pb

logger = logging.getLogger("ray_executor.nats_ingress")

ACK_WAIT = 30.0  # seconds before JetStream redelivers an unacked message
PROGRESS_EVERY = 10.0  # in_progress() interval while an enqueue is slow
SUBMIT_TIMEOUT = 120.0  # an enqueue taking longer counts as "Redis unavailable"
MAX_DELIVER = 60  # deliveries of one message; the last failing one dead-letters
MIN_FETCH = 16  # fetch once this many slots are free
FETCH_BATCH = 128  # at most this many per fetch: the next wave is parsed while Redis runs one
BUSY_FETCH_TIMEOUT = 0.1  # batch fetch while messages keep coming
IDLE_FETCH_TIMEOUT = 1.0  # single-message long poll when idle (also bounds stop latency)
NAK_DELAY = 0.5  # first redelivery delay; doubles per delivery up to NAK_MAX_DELAY
NAK_MAX_DELAY = 30.0
DLQ_PREVIEW_CHARS = 4096  # payload kept when the full copy would not fit in a NATS message
REASON_HEADER = "Ray-Executor-Reason"
FIELD_HEADER = "Ray-Executor-Field"


class NatsIngress:
    """Consumes ``agent.cmd.deliberate`` into ``Ingress.submit``.

    Parameters:
      ingress: the submission path shared with gRPC.
      settings: consumer name, stream, size limit.
      subjects: subject names (``Subjects(settings)``).
    """

    def __init__(self, ingress: Ingress, settings: Settings, subjects: Subjects) -> None:
        self.ingress = ingress
        self.settings = settings
        self.subjects = subjects
        self.counts: Dict[str, int] = dict(accepted=0, duplicate=0, dead_lettered=0, retried=0)
        self._nc: Optional[NATS] = None
        self._js: Optional[JetStreamContext] = None
        self._stopping = False
        self._wake: Optional[asyncio.Event] = None  # created on the running loop (py3.9)
        self._runner: Optional[asyncio.Task[None]] = None
        self._tasks: Set[asyncio.Task[None]] = set()  # one per fetched batch
        self._in_hand = 0  # messages in those batches
        self._pause_until = 0.0
        self._enqueuing: Dict[int, Tuple[Msg, float]] = {}  # id(msg) -> (msg, loop time)

    async def start(self, nc: NATS) -> None:
        """Start consuming on ``nc`` (``attach_nats``'s ``on_connected``); returns at once."""
        if self._stopping or self._runner is not None:
            return
        self._nc, self._js = nc, nc.jetstream()
        self._wake = asyncio.Event()
        self._runner = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """Stop fetching, finish and ack what is in hand."""
        self._stopping = True
        if self._wake is not None:
            self._wake.set()
        if self._runner is not None:
            await asyncio.gather(self._runner, return_exceptions=True)
            logger.info("nats ingress stopped: accepted=%(accepted)d duplicate=%(duplicate)d "
                        "dead_lettered=%(dead_lettered)d retried=%(retried)d", self.counts)

    # --- the fetch loop ---

    async def _run(self) -> None:
        sub = None
        while sub is None and not self._stopping:
            try:
                sub = await self._subscribe()
            except Exception as exc:
                logger.warning("cannot bind consumer %s (%s); retrying",
                               self.settings.nats_consumer, exc)
                await self._sleep(2.0)
        loop = asyncio.get_event_loop()
        busy = False
        keep_alive = asyncio.ensure_future(self._keep_alive())
        try:
            while sub is not None and not self._stopping:
                room = self.settings.nats_max_in_flight - self._in_hand
                if room < MIN_FETCH:
                    await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
                    continue
                if self._pause_until > loop.time():
                    await self._sleep(min(self._pause_until - loop.time(), IDLE_FETCH_TIMEOUT))
                    continue
                try:
                    batch = min(room, FETCH_BATCH) if busy else 1
                    msgs = await sub.fetch(batch, BUSY_FETCH_TIMEOUT if busy else
                                           IDLE_FETCH_TIMEOUT)
                except asyncio.TimeoutError:
                    busy = False
                    continue
                except Exception as exc:  # disconnected: the client reconnects by itself
                    logger.warning("fetch failed: %s", exc)
                    await self._sleep(1.0)
                    continue
                busy = True
                self._in_hand += len(msgs)
                task = asyncio.ensure_future(self._handle(msgs))
                self._tasks.add(task)
                task.add_done_callback(functools.partial(self._handled, len(msgs)))
        finally:
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            keep_alive.cancel()
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def _subscribe(self) -> JetStreamContext.PullSubscription:
        assert self._js is not None
        config = ConsumerConfig(
            description="ray-executor NATS ingress", deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT, ack_wait=ACK_WAIT, max_deliver=MAX_DELIVER,
            max_ack_pending=self.settings.nats_max_ack_pending,
            filter_subject=self.subjects.deliberate)
        sub = await self._js.pull_subscribe(
            self.subjects.deliberate, durable=self.settings.nats_consumer,
            stream=self.settings.nats_commands_stream, config=config)
        bound = (await sub.consumer_info()).config
        if (bound.filter_subject or "") != self.subjects.deliberate:
            logger.warning("consumer %s filters %r, not %r", self.settings.nats_consumer,
                           bound.filter_subject, self.subjects.deliberate)
        logger.info("consuming %s from %s as %s (ack_wait=%ss max_deliver=%s max_ack_pending=%s)",
                    bound.filter_subject, self.settings.nats_commands_stream,
                    self.settings.nats_consumer, bound.ack_wait, bound.max_deliver,
                    bound.max_ack_pending)
        return sub

    async def _sleep(self, seconds: float) -> None:
        assert self._wake is not None
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    def _handled(self, count: int, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._in_hand -= count

    # --- a fetched batch, each message answered on its own ---

    async def _handle(self, msgs: List[Msg]) -> None:
        """Parse each message, submit the valid ones in one go (``Ingress.submit_all``: one
        Redis pipeline), then ack, refuse or retry each by its own outcome. Refusals and
        retries (a JetStream publish or a nak each) run side by side; acks do not wait."""
        parsed: List[Tuple[Msg, pb.ExecuteDeliberationRequest, Dict[str, str]]] = []
        others: List[Awaitable[None]] = []
        spans: List[trace.Span] = []
        for msg in msgs:
            span, carried = tracing.start(
                f"{msg.subject} process", SpanKind.CONSUMER, msg.headers,
                {"messaging.system": "nats", "messaging.destination.name": msg.subject})
            spans.append(span)
            try:
                parsed.append((msg, parse_request(msg.data or b"",
                                                  self.settings.max_request_bytes), carried))
            except InvalidRequest as exc:
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                others.append(self._settle(msg, None, exc))
        outcomes: List[Any] = []
        if parsed:
            try:
                outcomes = await self._submit([msg for msg, _, _ in parsed],
                                              [(request, carried)
                                               for _, request, carried in parsed])
            except Exception as exc:  # a bug: each message is retried, a bounded number of times
                logger.exception("submitting %d stream messages failed", len(parsed))
                outcomes = [exc] * len(parsed)
        for (msg, request, _), outcome in zip(parsed, outcomes):
            if isinstance(outcome, Exception):
                others.append(self._settle(msg, request, outcome))
            else:
                await self._settle(msg, request, outcome)
        if others:
            await asyncio.gather(*others)
        for span in spans:
            span.end()

    async def _settle(self, msg: Msg, request: Optional[pb.ExecuteDeliberationRequest],
                      outcome: Any) -> None:
        """Answer and ack an accepted message; dead-letter a refused one; nak the rest."""
        headers = msg.headers or {}
        reply_to = _header(headers, "Reply-To")
        traceparent = _header(headers, "traceparent")
        log = {"traceparent": traceparent} if traceparent else {}
        try:
            if isinstance(outcome, InvalidRequest):
                await self._refuse(msg, outcome.field, outcome.reason, reply_to)
            elif isinstance(outcome, StateUnavailable):
                await self._retry(msg, str(outcome), reply_to)
            elif isinstance(outcome, Exception):  # a bug, not the producer's fault
                await self._retry(msg, f"internal error: {type(outcome).__name__}: {outcome}",
                                  reply_to)
            else:
                await self._accepted(msg, request, outcome, reply_to, log)
        except Exception as exc:  # NATS gone mid-answer: JetStream redelivers after ack_wait
            logger.warning("stream message %s left unacked: %s", _seq(msg), exc, extra=log)

    async def _accepted(self, msg: Msg, request: Any, outcome: Tuple[str, bool], reply_to: str,
                        log: Dict[str, str]) -> None:
        deliberation_id, created = outcome
        self.counts["accepted" if created else "duplicate"] += 1
        if logger.isEnabledFor(logging.DEBUG):  # _seq parses the reply subject
            logger.debug("stream message %s -> %s (%s)", _seq(msg), deliberation_id,
                         "new" if created else "existing",
                         extra={**log, "deliberation_id": deliberation_id,
                                "task_id": request.task_id})
        message = ("deliberation submitted" if created
                   else "already submitted: same task_id or idempotency key")
        await self._answer(reply_to, pb.ExecuteDeliberationResponse(
            deliberation_id=deliberation_id, status="submitted", message=message))
        await msg.ack()

    async def _submit(self, msgs: List[Msg],
                      requests: List[Tuple[pb.ExecuteDeliberationRequest, Dict[str, str]]]
                      ) -> List[Any]:
        """``Ingress.submit_all`` within ``SUBMIT_TIMEOUT``; while it is slow, ``_keep_alive``
        tells JetStream we are still at it."""
        now = asyncio.get_running_loop().time()
        for msg in msgs:
            self._enqueuing[id(msg)] = (msg, now)
        try:
            return await asyncio.wait_for(self.ingress.submit_all(requests, source="nats"),
                                          SUBMIT_TIMEOUT)
        except asyncio.TimeoutError:
            return [StateUnavailable(f"enqueue took more than {SUBMIT_TIMEOUT:.0f}s")] * len(msgs)
        finally:
            for msg in msgs:
                del self._enqueuing[id(msg)]

    async def _keep_alive(self) -> None:
        """``in_progress`` for every message whose enqueue has taken ``PROGRESS_EVERY``: one
        timer for all of them rather than one per message."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(PROGRESS_EVERY / 2)
            slow = [msg for msg, since in list(self._enqueuing.values())
                    if loop.time() - since >= PROGRESS_EVERY]
            for msg in slow:
                with contextlib.suppress(Exception):
                    await msg.in_progress()

    async def _retry(self, msg: Msg, reason: str, reply_to: str) -> None:
        delivered = msg.metadata.num_delivered
        if delivered >= MAX_DELIVER:
            await self._refuse(msg, "", f"gave up after {delivered} deliveries: {reason}",
                               reply_to)
            return
        self.counts["retried"] += 1
        delay = _backoff(delivered)
        await msg.nak(delay=delay)
        self._pause_until = max(self._pause_until, asyncio.get_event_loop().time() + delay)
        logger.warning("stream message %s delivery %d not enqueued (%s); redelivery in %.1fs",
                       _seq(msg), delivered, reason, delay)

    async def _refuse(self, msg: Msg, field: str, reason: str, reply_to: str) -> None:
        try:
            await self._dead_letter(msg, field, reason)
        except Exception as exc:  # keep the message until its copy is stored
            logger.warning("dead-lettering stream message %s failed: %s", _seq(msg), exc)
            await msg.nak(delay=_backoff(msg.metadata.num_delivered))
            return
        self.counts["dead_lettered"] += 1
        text = f"{field}: {reason}" if field else reason
        logger.warning("stream message %s dead-lettered: %s", _seq(msg), text)
        await self._answer(reply_to, pb.ExecuteDeliberationResponse(status="failed",
                                                                    message=text))
        await msg.term()

    async def _dead_letter(self, msg: Msg, field: str, reason: str) -> None:
        assert self._js is not None and self._nc is not None
        data = msg.data or b""
        original = dict(msg.headers or {})
        meta = msg.metadata
        try:
            payload, encoding = data.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            payload, encoding = base64.b64encode(data).decode("ascii"), "base64"
        entry = {"reason": reason, "field": field, "subject": msg.subject,
                 "stream": meta.stream, "stream_sequence": meta.sequence.stream,
                 "delivered": meta.num_delivered, "timestamp": contract.iso(),
                 "payload": payload, "payload_encoding": encoding, "payload_bytes": len(data),
                 "truncated": False, "headers": original}
        body = json.dumps(entry).encode()
        if len(body) > self._nc.max_payload - 8192:  # keep room for the headers
            entry.update(payload=payload[:DLQ_PREVIEW_CHARS], truncated=True)
            body = json.dumps(entry).encode()
        headers = {k: v for k, v in original.items() if not k.lower().startswith("nats-")}
        headers.update({"Nats-Msg-Id": f"dlq:{meta.sequence.stream}",
                        REASON_HEADER: _one_line(reason, 1024)})
        if field:
            headers[FIELD_HEADER] = _one_line(field, 256)
        await self._js.publish(self.subjects.dead_letter, body, headers=headers, timeout=5)

    async def _answer(self, reply_to: str, response: pb.ExecuteDeliberationResponse) -> None:
        if not reply_to or self._nc is None:
            return
        tokens = reply_to.split(".")
        if (len(reply_to) > 512 or any(ch.isspace() for ch in reply_to) or "" in tokens
                or "*" in tokens or ">" in tokens
                or reply_to.startswith(self.subjects.commands + ".")):  # no feeding our stream
            logger.warning("ignoring Reply-To %r: not a plain reply subject", reply_to[:200])
            return
        body = json_format.MessageToJson(response, preserving_proto_field_name=True, indent=None)
        await self._nc.publish(reply_to, body.encode())


def _header(headers: Mapping[str, str], name: str) -> str:
    """A header's value, its name matched case-insensitively."""
    return next((str(v) for k, v in headers.items() if k.lower() == name.lower()), "")


def _backoff(delivered: int) -> float:
    """Redelivery delay after the ``delivered``-th failed delivery."""
    return float(min(NAK_DELAY * 2 ** (max(delivered, 1) - 1), NAK_MAX_DELAY))


def _one_line(text: str, limit: int) -> str:
    """``text`` fit for a header value: one line, at most ``limit`` characters."""
    return " ".join(text.split())[:limit]


def _seq(msg: Msg) -> str:
    with contextlib.suppress(Exception):
        return str(msg.metadata.sequence.stream)
    return "?"
