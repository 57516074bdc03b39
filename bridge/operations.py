"""``OperationsService``: what an operator does by hand, on the bridge's gRPC port.

Deliberations are listed from the listing index (``bridge.listing``). The NATS ingress's dead
letters live in the commands stream, on ``Subjects.dead_letter``, as the JSON
``bridge.nats_ingress`` writes. Listing walks that subject with JetStream's
next-by-subject message get (no consumer is created); a replay publishes the request again as
it was published (its subject, its payload, its headers without the ``Nats-*`` ones) with
``Nats-Msg-Id: replay:<dead letter sequence>`` and ``Ray-Executor-Replay-Of``, so the ingress
handles it as any request: validated again, and dead-lettered again if still refused. Who
replayed, when and why is kept in Redis (``Keys.replays``) for the state TTL; a second replay
of the same dead letter answers with the first. A retry of a deliberation's failed agents is
``core.retry``'s; its actions are kept in the deliberation's record.
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Any, Dict, List, Optional, Tuple

import grpc
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from bridge.grpc_server import timestamp
from bridge.listing import BadCursor, Filters, list_deliberations
from bridge.route_views import route_views
from core import contract, retry
from core.contract import Subjects
from core.errors import StateUnavailable
from core.keys import Keys
from core.logs import redact
from core.routes import Routes
from core.settings import Settings
from core.store import DeliberationStore
from ray_executor.v1 import operations_pb2 as ops
from ray_executor.v1 import operations_pb2_grpc as ops_rpc

logger = logging.getLogger("ray_executor.operations")

REPLAY_OF_HEADER = "Ray-Executor-Replay-Of"
DEFAULT_PAGE = 50
STATUSES = (contract.QUEUED, contract.RUNNING, *contract.FINAL_STATUSES)
MAX_PAGE = 500


class OperationsServicer(ops_rpc.OperationsServiceServicer):
    """Deliberations listed and retried; the dead letters of the NATS ingress, read and
    replayed.

    Parameters:
      store: the deliberation state (its Redis keeps who replayed what).
      settings: the commands stream's name.
      subjects: subject names from settings.
      jetstream: returns the JetStream context, or None while NATS is not connected.
      routes: the bridge's routes (``GetRoutes``, and the route of records naming none).
    """

    def __init__(self, store: DeliberationStore, settings: Settings, subjects: Subjects,
                 jetstream: Any, routes: Routes) -> None:
        self.store = store
        self.settings = settings
        self.routes = routes
        # Records older than routes name none: they count as the route serving their queue.
        self.unrouted = next((r.name for r in routes if r.queue == settings.queue), "")
        self.stream = settings.nats_commands_stream
        self.subjects = subjects
        self.replays = Keys(settings.key_prefix).replays
        self.ttl = settings.state_ttl_seconds
        self._jetstream = jetstream

    async def ListDeliberations(self, request: ops.ListDeliberationsRequest,
                                context: grpc.aio.ServicerContext
                                ) -> ops.ListDeliberationsResponse:
        if request.status and request.status not in STATUSES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"status: one of {', '.join(STATUSES)}, got {request.status!r}")
        if request.page_size > MAX_PAGE:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"page_size: at most {MAX_PAGE}, got {request.page_size}")
        filters = Filters(
            status=request.status, task_id=request.task_id, story_id=request.story_id,
            model=request.model, route=request.route, unrouted=self.unrouted,
            created_after_ms=request.created_after.ToMilliseconds(),
            created_before_ms=request.created_before.ToMilliseconds())
        try:
            found, cursor = await list_deliberations(
                self.store, filters, request.page_size or DEFAULT_PAGE, request.page_token)
        except BadCursor as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"page_token: {exc}")
        except StateUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return ops.ListDeliberationsResponse(next_page_token=cursor, deliberations=[
            ops.DeliberationSummary(
                deliberation_id=summary["id"], task_id=summary["task_id"] or "",
                story_id=summary["story_id"] or "", status=summary["status"] or "",
                model=summary["model"] or "", created=timestamp(summary["created_ms"]),
                finished=timestamp(summary["finished_ms"]),
                total_agents=int(summary["num_agents"] or 0),
                completed_agents=int(summary["completed"] or 0),
                failed_agents=int(summary["failed"] or 0), route=summary["route"] or self.unrouted)
            for summary in found])

    async def GetRoutes(self, request: ops.GetRoutesRequest,
                        context: grpc.aio.ServicerContext) -> ops.GetRoutesResponse:
        try:
            views = await route_views(self.store, self.settings, self.routes, self.unrouted)
        except StateUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return ops.GetRoutesResponse(routes=[
            ops.RouteState(
                name=view.state.route, queue=view.state.queue, ready=view.state.ready,
                delayed=view.state.delayed, dead=view.state.dead, workers=view.state.workers,
                running=view.running, endpoints=[ops.EndpointState(
                    url=redact(e.url), concurrency=e.concurrency, in_use=e.in_use,
                    circuit=e.circuit, open_for_seconds=e.open_for_seconds,
                    failures=e.failures) for e in view.endpoints])
            for view in views])

    async def ListDeadLetters(self, request: ops.ListDeadLettersRequest,
                              context: grpc.aio.ServicerContext) -> ops.ListDeadLettersResponse:
        if request.limit > MAX_PAGE:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"limit: at most {MAX_PAGE}, got {request.limit}")
        js = await self._js(context)
        limit, sequence = request.limit or DEFAULT_PAGE, request.after_sequence
        raws = []
        while len(raws) <= limit:  # one past the page says whether there is a next page
            raw = await self._next(js, sequence + 1, context)
            if raw is None:
                break
            sequence = raw.seq
            raws.append(raw)
        page = raws[:limit]
        replays = await self._replays([raw.seq for raw in page], context)
        return ops.ListDeadLettersResponse(
            dead_letters=[self._letter(raw, recorded, with_payload=False)
                          for raw, recorded in zip(page, replays)],
            next_after_sequence=page[-1].seq if len(raws) > limit else 0)

    async def GetDeadLetter(self, request: ops.GetDeadLetterRequest,
                            context: grpc.aio.ServicerContext) -> ops.DeadLetter:
        return await self._full_letter(request.sequence, context)

    async def ReplayDeadLetter(self, request: ops.ReplayDeadLetterRequest,
                               context: grpc.aio.ServicerContext) -> ops.ReplayDeadLetterResponse:
        for name in ("by", "reason"):
            if not getattr(request, name).strip():
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"{name}: is required (replays are recorded: who and why)")
        letter = await self._full_letter(request.sequence, context)
        if letter.HasField("replayed"):
            return ops.ReplayDeadLetterResponse(
                replayed=False, action=letter.replayed,
                message=f"already replayed by {letter.replayed.by} at {letter.replayed.time}")
        if letter.truncated:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"sequence: dead letter {request.sequence} kept only the first "
                f"{len(letter.payload)} characters of a {letter.payload_bytes}-byte payload; "
                "it cannot be replayed (publish the request again from its source)")
        payload = (base64.b64decode(letter.payload) if letter.payload_encoding == "base64"
                   else letter.payload.encode())
        headers = dict(letter.headers)
        headers.update({"Nats-Msg-Id": f"replay:{request.sequence}",
                        REPLAY_OF_HEADER: str(request.sequence)})
        ack = await (await self._js(context)).publish(letter.subject, payload, headers=headers,
                                                      timeout=5)
        action = ops.OperatorAction(by=request.by, reason=request.reason, time=contract.iso(),
                                    sequence=ack.seq)
        first, recorded = await self._record(request.sequence, action, context)
        logger.info("dead letter %d replayed as %d by %s: %s", request.sequence, ack.seq,
                    request.by, request.reason)
        return ops.ReplayDeadLetterResponse(
            replayed=first, action=recorded,
            message=(f"replayed as sequence {recorded.sequence}" if first else
                     f"already replayed by {recorded.by} at {recorded.time}"))

    async def RetryDeliberation(self, request: ops.RetryDeliberationRequest,
                                context: grpc.aio.ServicerContext
                                ) -> ops.RetryDeliberationResponse:
        for name in ("deliberation_id", "by", "reason"):
            if not getattr(request, name).strip():
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"{name}: is required (retries are recorded: who and why)")
        try:
            retried, action = await retry.retry_failed(
                self.store, request.deliberation_id, by=request.by, reason=request.reason)
        except retry.NotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"deliberation_id: {exc}")
        except retry.Refused as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except StateUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        recorded = ops.OperatorAction(by=action["by"], reason=action["reason"],
                                      time=contract.iso(action["time_ms"]),
                                      round=action["round"], agent_ids=action["agents"])
        agents = ", ".join(action["agents"])
        if retried:
            logger.info("deliberation %s retried as round %d (%s) by %s: %s",
                        request.deliberation_id, action["round"], agents, request.by,
                        request.reason)
        return ops.RetryDeliberationResponse(
            retried=retried, action=recorded,
            message=(f"round {action['round']} queued: {agents}" if retried else
                     f"round {action['round']} by {recorded.by} at {recorded.time} is running"))

    # --- helpers ---

    async def _js(self, context: grpc.aio.ServicerContext) -> JetStreamContext:
        js = self._jetstream()
        if js is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "NATS is not connected")
        return js

    async def _next(self, js: JetStreamContext, sequence: int,
                    context: grpc.aio.ServicerContext) -> Optional[Any]:
        """The first dead letter at ``sequence`` or after it, or None."""
        try:
            return await js.get_msg(self.stream, seq=sequence, subject=self.subjects.dead_letter,
                                    next=True)
        except NotFoundError:
            return None
        except Exception as exc:  # any NATS failure: the caller gets UNAVAILABLE
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"NATS: {exc!r}")

    async def _get(self, sequence: int, context: grpc.aio.ServicerContext) -> Any:
        raw = await self._next(await self._js(context), sequence, context) if sequence else None
        if raw is None or raw.seq != sequence:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"sequence: no dead letter {sequence} in stream {self.stream}")
        return raw

    async def _full_letter(self, sequence: int,
                           context: grpc.aio.ServicerContext) -> ops.DeadLetter:
        raw = await self._get(sequence, context)
        (recorded,) = await self._replays([raw.seq], context)
        return self._letter(raw, recorded, with_payload=True)

    async def _replays(self, sequences: List[int],
                       context: grpc.aio.ServicerContext) -> List[Optional[bytes]]:
        """The recorded replay of each dead letter (None where none), in one round trip."""
        if not sequences:
            return []
        try:
            recorded: List[Optional[bytes]] = await self.store.batcher.guard(
                self.store.redis.hmget(self.replays, [str(seq) for seq in sequences]))
        except StateUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return recorded

    @staticmethod
    def _letter(raw: Any, recorded: Optional[bytes], *, with_payload: bool) -> ops.DeadLetter:
        entry: Dict[str, Any] = json.loads(raw.data)
        letter = ops.DeadLetter(
            sequence=raw.seq, time=entry.get("timestamp", ""), reason=entry.get("reason", ""),
            field=entry.get("field", ""), subject=entry.get("subject", ""),
            request_sequence=entry.get("stream_sequence", 0),
            delivered=entry.get("delivered", 0), truncated=entry.get("truncated", False),
            payload_bytes=entry.get("payload_bytes", 0),
            payload_encoding=entry.get("payload_encoding", "utf-8"),
            payload=entry.get("payload", "") if with_payload else "",
            headers={k: str(v) for k, v in (entry.get("headers") or {}).items()
                     if not k.lower().startswith("nats-")})
        if recorded:
            letter.replayed.CopyFrom(ops.OperatorAction(**json.loads(recorded)))
        return letter

    async def _record(self, sequence: int, action: ops.OperatorAction,
                      context: grpc.aio.ServicerContext) -> Tuple[bool, ops.OperatorAction]:
        """Keep ``action`` unless a concurrent replay was recorded first; returns (ours?, the
        action kept)."""
        fields = {"by": action.by, "reason": action.reason, "time": action.time,
                  "sequence": action.sequence}
        try:
            async with self.store.redis.pipeline(transaction=True) as pipe:
                pipe.hsetnx(self.replays, str(sequence), json.dumps(fields))
                pipe.hget(self.replays, str(sequence))
                pipe.expire(self.replays, self.ttl)
                first, kept, _ = await self.store.batcher.guard(pipe.execute())
        except StateUnavailable as exc:
            # Published (JetStream drops a second publish of it), but not recorded: say so.
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"replayed as sequence {action.sequence}, not recorded: {exc}")
        return bool(first), ops.OperatorAction(**json.loads(kept))
