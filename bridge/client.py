"""An async, typed client of ``RayExecutorService`` (no Ray needed), for the Orchestrator.

    async with RayExecutorClient("ray-executor:50056", token="...") as client:
        submitted = await client.execute_deliberation(
            task_id="T-1", task_description="...", agents=[("a1", "DEV"), ("a2", "QA")])
        final = await client.wait(submitted.deliberation_id, timeout=600)
        print(final.result.proposal)

``wait`` is like Celery's ``AsyncResult.get``: it returns the final status when the
deliberation completed, raises ``DeliberationFailed`` when it failed or was cancelled, and
``DeliberationTimeout`` when it did not end in time.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, AsyncIterator, Iterable, Mapping, Optional, Sequence, Tuple, Union

import grpc

from core import contract
from ray_executor.v1 import operations_pb2 as ops
from ray_executor.v1 import operations_pb2_grpc as ops_rpc
from ray_executor.v1 import ray_executor_pb2 as pb
from ray_executor.v1 import ray_executor_pb2_grpc as rpc

AgentSpec = Union[pb.Agent, Tuple[str, str], Mapping[str, str]]


class DeliberationFailed(RuntimeError):
    """The deliberation ended ``failed`` or ``cancelled``; ``status`` holds the details."""

    def __init__(self, status: pb.GetDeliberationStatusResponse) -> None:
        self.status = status
        super().__init__(f"deliberation {status.deliberation_id} {status.status}: "
                         f"{status.error_message}")


class DeliberationTimeout(TimeoutError):
    """The deliberation did not end within the time given to ``wait``."""


def _agent(spec: AgentSpec) -> pb.Agent:
    if isinstance(spec, pb.Agent):
        return spec
    if isinstance(spec, tuple):
        return pb.Agent(id=spec[0], role=spec[1])
    return pb.Agent(**dict(spec))


class RayExecutorClient:
    """Parameters:
      target: ``host:port`` of the bridge.
      token: bearer token, when the bridge requires one.
      tls_ca: PEM path of the CA that signed the bridge's certificate (enables TLS).
      tls_cert, tls_key: PEM paths of a client certificate, for mTLS.
      timeout: default deadline of unary calls, in seconds.
    """

    def __init__(self, target: str = "127.0.0.1:50056", *, token: str = "",
                 tls_ca: str = "", tls_cert: str = "", tls_key: str = "",
                 timeout: float = 30.0) -> None:
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        if tls_ca:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=Path(tls_ca).read_bytes(),
                private_key=Path(tls_key).read_bytes() if tls_key else None,
                certificate_chain=Path(tls_cert).read_bytes() if tls_cert else None)
            self._channel = grpc.aio.secure_channel(target, credentials)
        else:
            self._channel = grpc.aio.insecure_channel(target)
        self._stub = rpc.RayExecutorServiceStub(self._channel)
        self._operations = ops_rpc.OperationsServiceStub(self._channel)

    async def __aenter__(self) -> RayExecutorClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def execute_deliberation(
        self, *, task_id: str, task_description: str, agents: Iterable[AgentSpec],
        role: str = "", constraints: Optional[Mapping[str, Any]] = None,
        vllm_url: str = "", vllm_model: str = "", traceparent: str = "",
    ) -> pb.ExecuteDeliberationResponse:
        request = pb.ExecuteDeliberationRequest(
            task_id=task_id, task_description=task_description, role=role,
            constraints=pb.TaskConstraints(**dict(constraints or {})),
            agents=[_agent(a) for a in agents], vllm_url=vllm_url, vllm_model=vllm_model)
        metadata = self._metadata + ((("traceparent", traceparent),) if traceparent else ())
        return await self._stub.ExecuteDeliberation(request, timeout=self.timeout,
                                                    metadata=metadata)

    async def status(self, deliberation_id: str) -> pb.GetDeliberationStatusResponse:
        return await self._stub.GetDeliberationStatus(
            pb.GetDeliberationStatusRequest(deliberation_id=deliberation_id),
            timeout=self.timeout, metadata=self._metadata)

    async def cancel(self, deliberation_id: str, reason: str = ""
                     ) -> pb.CancelDeliberationResponse:
        return await self._stub.CancelDeliberation(
            pb.CancelDeliberationRequest(deliberation_id=deliberation_id, reason=reason),
            timeout=self.timeout, metadata=self._metadata)

    async def watch(self, deliberation_id: str) -> AsyncIterator[pb.DeliberationEvent]:
        """Every lifecycle event from the first; ends when the deliberation ends."""
        call = self._stub.WatchDeliberation(
            pb.WatchDeliberationRequest(deliberation_id=deliberation_id),
            metadata=self._metadata)
        async for event in call:
            yield event

    async def wait(self, deliberation_id: str, timeout: Optional[float] = None
                   ) -> pb.GetDeliberationStatusResponse:
        """The final status of a completed deliberation (see the module docstring)."""

        async def until_final() -> None:
            async for _ in self.watch(deliberation_id):
                pass

        try:
            await asyncio.wait_for(until_final(), timeout)
        except asyncio.TimeoutError:
            raise DeliberationTimeout(
                f"deliberation {deliberation_id} still running after {timeout}s") from None
        final = await self.status(deliberation_id)
        if final.status != contract.COMPLETED:
            raise DeliberationFailed(final)
        return final

    async def service_status(self, include_stats: bool = True) -> pb.GetStatusResponse:
        return await self._stub.GetStatus(pb.GetStatusRequest(include_stats=include_stats),
                                          timeout=self.timeout, metadata=self._metadata)

    async def active_jobs(self) -> Sequence[pb.JobInfo]:
        reply = await self._stub.GetActiveJobs(pb.GetActiveJobsRequest(), timeout=self.timeout,
                                               metadata=self._metadata)
        return list(reply.jobs)

    # --- OperationsService: listing, retries, and the NATS ingress's dead letters ---

    async def deliberations(self, *, page_size: int = 0, page_token: str = "",
                            **filters: str) -> ops.ListDeliberationsResponse:
        """One page, newest first; ``filters``: status, task_id, story_id, model, route."""
        return await self._operations.ListDeliberations(
            ops.ListDeliberationsRequest(page_size=page_size, page_token=page_token, **filters),
            timeout=self.timeout, metadata=self._metadata)

    async def routes(self) -> ops.GetRoutesResponse:
        """Each route: its queue, workers, jobs running, endpoints and their circuits."""
        return await self._operations.GetRoutes(ops.GetRoutesRequest(), timeout=self.timeout,
                                                metadata=self._metadata)

    async def dead_letters(self, after_sequence: int = 0, limit: int = 0
                           ) -> ops.ListDeadLettersResponse:
        return await self._operations.ListDeadLetters(
            ops.ListDeadLettersRequest(after_sequence=after_sequence, limit=limit),
            timeout=self.timeout, metadata=self._metadata)

    async def dead_letter(self, sequence: int) -> ops.DeadLetter:
        return await self._operations.GetDeadLetter(ops.GetDeadLetterRequest(sequence=sequence),
                                                    timeout=self.timeout,
                                                    metadata=self._metadata)

    async def replay_dead_letter(self, sequence: int, *, by: str, reason: str
                                 ) -> ops.ReplayDeadLetterResponse:
        return await self._operations.ReplayDeadLetter(
            ops.ReplayDeadLetterRequest(sequence=sequence, by=by, reason=reason),
            timeout=self.timeout, metadata=self._metadata)

    async def retry(self, deliberation_id: str, *, by: str, reason: str
                    ) -> ops.RetryDeliberationResponse:
        return await self._operations.RetryDeliberation(
            ops.RetryDeliberationRequest(deliberation_id=deliberation_id, by=by, reason=reason),
            timeout=self.timeout, metadata=self._metadata)
