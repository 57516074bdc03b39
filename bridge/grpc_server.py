"""The gRPC ingress: ``ray_executor.v1.RayExecutorService`` on ``grpc.aio``.

Serves the contract the Orchestrator already calls (docs/architecture.md), plus
``CancelDeliberation`` and ``WatchDeliberation``, upstream's newest generation
``fleet.ray_executor.v1`` through ``bridge.fleet_api``, standard health checking and reflection.
Optional TLS (mTLS with a client CA) and bearer-token auth come from settings.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, List, Optional

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from bridge.fleet_api import FLEET_SERVICE, FleetServicer
from bridge.health import Watch, assess
from bridge.ingress import Ingress
from bridge.validation import InvalidRequest
from core import contract, tracing
from core.errors import StateUnavailable
from core.settings import Settings
from fleet.ray_executor.v1 import ray_executor_pb2_grpc as fleet_rpc
from ray_executor.v1 import operations_pb2 as ops
from ray_executor.v1 import operations_pb2_grpc as ops_rpc
from ray_executor.v1 import ray_executor_pb2 as pb
from ray_executor.v1 import ray_executor_pb2_grpc as rpc

logger = logging.getLogger("ray_executor.grpc")

SERVICE = pb.DESCRIPTOR.services_by_name["RayExecutorService"].full_name
EXECUTE = f"{SERVICE}/ExecuteDeliberation"
OPERATIONS_SERVICE = ops.DESCRIPTOR.services_by_name["OperationsService"].full_name


def timestamp(ms: Any) -> Optional[Timestamp]:
    """A protobuf Timestamp of epoch ``ms``, or None (field unset) for 0 or nothing."""
    if not ms:
        return None
    stamp = Timestamp()
    stamp.FromMilliseconds(int(ms))
    return stamp


def _result(agent: Dict[str, Any]) -> pb.DeliberationResult:
    result = agent.get("result") or {}
    metadata = {"role": agent.get("role", ""), "model": result.get("model", ""),
                "tokens": str(result.get("tokens", 0)),
                "duration_ms": str(agent.get("duration_ms", 0))}
    # Where it ran (cluster.agents): with routes to several clusters, which one ran the job.
    for key in ("ray_version", "python_version"):
        if result.get(key):
            metadata[key] = str(result[key])
    return pb.DeliberationResult(
        agent_id=agent["agent_id"], proposal=result.get("content", ""),
        reasoning=result.get("reasoning", ""), score=float(result.get("score") or 0.0),
        metadata=metadata,
    )


def best_result(agents: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The best completed agent: highest score, then earliest completion."""
    completed = [a for a in agents if a.get("status") == contract.COMPLETED]
    if not completed:
        return None
    return min(completed, key=lambda a: (-float((a.get("result") or {}).get("score") or 0.0),
                                         int(a.get("end_ms") or 0)))


def _best_with_counts(best: Dict[str, Any], agents: List[Dict[str, Any]],
                      completed: List[Dict[str, Any]], failed: List[Dict[str, Any]]
                      ) -> pb.DeliberationResult:
    """The best result, its metadata carrying the whole deliberation's counts as strings:
    where upstream's clients, which know only ``result``, read them."""
    result = _result(best)
    scores = [float((a.get("result") or {}).get("score") or 0.0) for a in completed]
    result.metadata.update(total_agents=str(len(agents)), completed_agents=str(len(completed)),
                           failed_agents=str(len(failed)),
                           average_score=str(sum(scores) / len(scores)))
    return result


class RayExecutorServicer(rpc.RayExecutorServiceServicer):
    """Parameters: ingress (submission path), settings, watch (the bridge's NATS connection,
    for ``GetStatus``)."""

    def __init__(self, ingress: Ingress, settings: Settings, watch: Watch) -> None:
        self.ingress = ingress
        self.store = ingress.store
        self.settings = settings
        self.watch = watch
        self.started = time.monotonic()

    async def ExecuteDeliberation(self, request: pb.ExecuteDeliberationRequest,
                                  context: grpc.aio.ServicerContext
                                  ) -> pb.ExecuteDeliberationResponse:
        return await self.execute(request, context, EXECUTE)

    async def execute(self, request: pb.ExecuteDeliberationRequest,
                      context: grpc.aio.ServicerContext, method: str
                      ) -> pb.ExecuteDeliberationResponse:
        """Submit ``request``; ``method`` (``service/Rpc``) is the gRPC method called, of
        either generation (bridge.fleet_api), and names the span."""
        metadata = dict(context.invocation_metadata() or ())
        if not tracing.recording():  # spans are no-ops: pass the caller's trace on, no span
            return await self._execute(request, context, tracing.carrier(metadata), None)
        service, _, rpc_name = method.rpartition("/")
        span, carried = tracing.start(
            method, SpanKind.SERVER, metadata,
            {"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc_name,
             "ray_executor.task_id": request.task_id})
        with trace.use_span(span, end_on_exit=True, record_exception=False,
                            set_status_on_exception=False):
            return await self._execute(request, context, carried, span)

    async def _execute(self, request: pb.ExecuteDeliberationRequest,
                       context: grpc.aio.ServicerContext, carried: Dict[str, str],
                       span: Optional[trace.Span]) -> pb.ExecuteDeliberationResponse:
        try:
            deliberation_id, created = await self.ingress.submit(request, carried)
        except (InvalidRequest, StateUnavailable) as exc:
            if span is not None:
                span.set_status(Status(StatusCode.ERROR, str(exc)))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT if isinstance(
                exc, InvalidRequest) else grpc.StatusCode.UNAVAILABLE, str(exc))
        if span is not None:
            span.set_attribute("ray_executor.deliberation_id", deliberation_id)
        message = (f"deliberation submitted with {len(request.agents)} agents" if created
                   else "already submitted: same task_id or idempotency key")
        return pb.ExecuteDeliberationResponse(deliberation_id=deliberation_id,
                                              status="submitted", message=message)

    async def GetDeliberationStatus(self, request: pb.GetDeliberationStatusRequest,
                                    context: grpc.aio.ServicerContext
                                    ) -> pb.GetDeliberationStatusResponse:
        found = await self._get(request.deliberation_id, context)
        if found is None:
            return pb.GetDeliberationStatusResponse(
                status=contract.NOT_FOUND, deliberation_id=request.deliberation_id,
                error_message=f"deliberation {request.deliberation_id!r} not found")
        record, agents = found
        completed = [a for a in agents if a.get("status") == contract.COMPLETED]
        failed = [a for a in agents if a.get("status") == contract.FAILED]
        best = best_result(agents)
        errors = "; ".join(f"{a['agent_id']}: {a.get('error', '')}" for a in failed)
        if record.get("status") == contract.CANCELLED:
            errors = f"cancelled: {record.get('cancel_reason') or 'no reason given'}"
        created, finished = int(record.get("created_ms") or 0), int(record.get("finished_ms") or 0)
        return pb.GetDeliberationStatusResponse(
            status=record.get("status", contract.NOT_FOUND),
            result=_best_with_counts(best, agents, completed, failed) if best else None,
            error_message=errors,
            results=[_result(a) for a in sorted(completed, key=lambda a: a.get("end_ms", 0))],
            total_agents=len(agents), completed_agents=len(completed), failed_agents=len(failed),
            deliberation_id=record["id"], task_id=record.get("task_id", ""),
            agents=[pb.AgentState(
                agent_id=a["agent_id"], role=a.get("role", ""), status=a.get("status", ""),
                attempts=int(a.get("attempts") or 0), error=a.get("error", ""),
                error_type=a.get("error_type", ""), start_time=timestamp(a.get("start_ms")),
                end_time=timestamp(a.get("end_ms"))) for a in agents],
            duration_ms=max(0, finished - created) if finished else 0,
        )

    async def GetStatus(self, request: pb.GetStatusRequest,
                        context: grpc.aio.ServicerContext) -> pb.GetStatusResponse:
        uptime = int(time.monotonic() - self.started)
        verdict, counts = await assess(self.store, self.settings, self.watch.nats,
                                       self.watch.routes)
        response = pb.GetStatusResponse(status=verdict.status, uptime_seconds=uptime,
                                        message=verdict.message)
        if counts is None:
            return response
        if self.settings.routes_file:  # each route's queue and workers, after the reasons
            response.message = "; ".join(
                [*verdict.reasons, *(state.summary() for state in counts["routes"])])
        if request.include_stats:
            finished = counts.get("completed", 0) + counts.get("failed", 0)
            response.stats.CopyFrom(pb.RayExecutorStats(
                total_deliberations=counts.get("total", 0), active_deliberations=counts["active"],
                completed_deliberations=counts.get("completed", 0),
                failed_deliberations=counts.get("failed", 0),
                cancelled_deliberations=counts.get("cancelled", 0),
                average_execution_time_ms=counts.get("duration_ms", 0) / finished if finished
                else 0.0,
                queued_messages=counts["ready"], delayed_messages=counts["delayed"],
                dead_letter_messages=counts["dead"],
            ))
        return response

    async def GetActiveJobs(self, request: pb.GetActiveJobsRequest,
                            context: grpc.aio.ServicerContext) -> pb.GetActiveJobsResponse:
        try:
            jobs = await self.store.active_jobs()
        except StateUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        now = contract.now_ms()
        return pb.GetActiveJobsResponse(jobs=[
            pb.JobInfo(
                job_id=f"{record['id']}:{agent['agent_id']}",
                name=f"{agent.get('role', '').lower() or 'agent'}-{agent['agent_id']}",
                status=agent["status"], submission_id=record["id"], role=agent.get("role", ""),
                task_id=record.get("task_id", ""), start_time=timestamp(agent.get("start_ms")),
                runtime=f"{(now - int(agent.get('start_ms') or now)) / 1000:.3f}s",
                deliberation_id=record["id"], agent_id=agent["agent_id"],
            ) for record, agent in jobs
        ])

    async def CancelDeliberation(self, request: pb.CancelDeliberationRequest,
                                 context: grpc.aio.ServicerContext
                                 ) -> pb.CancelDeliberationResponse:
        if not request.deliberation_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "deliberation_id: is required")
        try:
            changed, status = await self.ingress.cancel(request.deliberation_id, request.reason)
        except StateUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        if status == contract.NOT_FOUND:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"deliberation_id: {request.deliberation_id!r} not found")
        message = "cancelled" if changed else f"already {status}"
        return pb.CancelDeliberationResponse(deliberation_id=request.deliberation_id,
                                             status=status, message=message)

    async def WatchDeliberation(self, request: pb.WatchDeliberationRequest,
                                context: grpc.aio.ServicerContext) -> Any:
        if await self._get(request.deliberation_id, context) is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"deliberation_id: {request.deliberation_id!r} not found")
        try:
            async for event in self.store.events(request.deliberation_id):
                yield pb.DeliberationEvent(
                    deliberation_id=request.deliberation_id, event=event["event"],
                    agent_id=event.get("agent_id", ""), status=event.get("status", ""),
                    time=timestamp(event.get("time_ms")), data_json=json.dumps(event))
        except StateUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    async def _get(self, deliberation_id: str, context: grpc.aio.ServicerContext) -> Any:
        if not deliberation_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "deliberation_id: is required")
        try:
            return await self.store.get(deliberation_id)
        except StateUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))


class TokenAuth(grpc.aio.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` on every call but health checks."""

    def __init__(self, token: str) -> None:
        self.expected = f"Bearer {token}".encode()

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        if details.method.startswith("/grpc.health.v1.Health/"):
            return await continuation(details)
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        if isinstance(given, str):
            given = given.encode()
        if hmac.compare_digest(given, self.expected):
            return await continuation(details)
        return self._deny


def build_server(ingress: Ingress, settings: Settings, watch: Watch,
                 operations: ops_rpc.OperationsServiceServicer) -> tuple:
    """A configured (not yet started) server, its health servicer and the bound port."""
    interceptors = [TokenAuth(settings.grpc_token)] if settings.grpc_token else []
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[("grpc.max_receive_message_length", settings.max_request_bytes * 4 + 65536)],
    )
    servicer = RayExecutorServicer(ingress, settings, watch)
    rpc.add_RayExecutorServiceServicer_to_server(servicer, server)
    # Upstream's newest generation, on the same port and the same servicer.
    fleet_rpc.add_RayExecutorServiceServicer_to_server(FleetServicer(servicer), server)
    ops_rpc.add_OperationsServiceServicer_to_server(operations, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE, FLEET_SERVICE, OPERATIONS_SERVICE,
         health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME], server)
    address = f"{settings.grpc_host}:{settings.grpc_port}"
    if settings.grpc_tls_cert:
        client_ca = (Path(settings.grpc_tls_client_ca).read_bytes()
                     if settings.grpc_tls_client_ca else None)
        credentials = grpc.ssl_server_credentials(
            [(Path(settings.grpc_tls_key).read_bytes(), Path(settings.grpc_tls_cert).read_bytes())],
            root_certificates=client_ca, require_client_auth=client_ca is not None)
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    return server, health_servicer, port


async def mark_serving(health_servicer: Any, serving: bool) -> None:
    status = (health_pb2.HealthCheckResponse.SERVING if serving
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    for name in ("", SERVICE, FLEET_SERVICE):
        await health_servicer.set(name, status)
