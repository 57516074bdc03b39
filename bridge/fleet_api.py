"""``fleet.ray_executor.v1.RayExecutorService``: upstream's newest generation of the contract,
adapted onto the ``ray_executor.v1`` servicer (``bridge.grpc_server``), the one implementation.

The two generations define the shared messages with the same field numbers, so a message's
bytes convert it (``_as``); ours carry more fields, which the fleet answers drop. Three things
differ and are adapted here: the renumbered ``ExecuteDeliberationResponse`` (the request's
task_id echoed first), ``ExecuteBacklogReviewDeliberation`` (constraints without plan_id, a
task_id format its results' consumer parses), ``GetStatus``, whose stats upstream always
returns, and ``GetDeliberationStatus``'s words: upstream's clients know only
``submitted|running|completed|failed|not_found``, so ``queued`` is answered ``running`` (upstream
said running until every agent had ended) and ``cancelled`` is ``failed``, its message saying so.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.message import Message

from bridge.validation import InvalidRequest, check_backlog_review_task_id
from core.contract import CANCELLED, FAILED, QUEUED, RUNNING
from fleet.ray_executor.v1 import ray_executor_pb2 as fleet
from fleet.ray_executor.v1 import ray_executor_pb2_grpc as fleet_rpc
from ray_executor.v1 import ray_executor_pb2 as pb

FLEET_SERVICE = fleet.DESCRIPTOR.services_by_name["RayExecutorService"].full_name
_EXECUTE = f"{FLEET_SERVICE}/ExecuteDeliberation"
_EXECUTE_BACKLOG_REVIEW = f"{FLEET_SERVICE}/ExecuteBacklogReviewDeliberation"

Converted = TypeVar("Converted", bound=Message)


class Implementation(Protocol):
    """What the adapter calls on ``bridge.grpc_server.RayExecutorServicer`` (a protocol, so
    that module, which registers this one, is not imported back)."""

    async def execute(self, request: pb.ExecuteDeliberationRequest, context: Any,
                      method: str) -> pb.ExecuteDeliberationResponse: ...

    async def GetDeliberationStatus(self, request: pb.GetDeliberationStatusRequest,
                                    context: Any) -> pb.GetDeliberationStatusResponse: ...

    async def GetStatus(self, request: pb.GetStatusRequest,
                        context: Any) -> pb.GetStatusResponse: ...

    async def GetActiveJobs(self, request: pb.GetActiveJobsRequest,
                            context: Any) -> pb.GetActiveJobsResponse: ...


def _as(message: Message, target: type[Converted]) -> Converted:
    """``message`` as the other generation's ``target`` type: the fields both define, by
    number; fields only the source defines are dropped."""
    converted = target.FromString(message.SerializeToString())
    converted.DiscardUnknownFields()
    return converted


def backlog_review_request(request: fleet.ExecuteBacklogReviewDeliberationRequest
                           ) -> pb.ExecuteDeliberationRequest:
    """The ``ray_executor.v1`` request a backlog review runs as; ``InvalidRequest`` for a
    task_id not in the format upstream's backlog review consumer parses."""
    check_backlog_review_task_id(request.task_id)
    review = request.constraints
    metadata = dict(review.metadata)
    if review.story_id and "story_id" not in metadata:
        # Upstream's result consumers read the story from the metadata the events carry.
        metadata["story_id"] = review.story_id
    without_constraints = fleet.ExecuteBacklogReviewDeliberationRequest()
    without_constraints.CopyFrom(request)
    without_constraints.ClearField("constraints")  # renumbered: not convertible by bytes
    converted = _as(without_constraints, pb.ExecuteDeliberationRequest)
    # 0 timeout or retries stays 0, which validation turns into the configured default.
    converted.constraints.CopyFrom(pb.TaskConstraints(
        story_id=review.story_id, timeout_seconds=review.timeout_seconds,
        max_retries=review.max_retries, metadata=metadata))
    return converted


def _submitted(task_id: str, reply: pb.ExecuteDeliberationResponse
               ) -> fleet.ExecuteDeliberationResponse:
    return fleet.ExecuteDeliberationResponse(
        task_id=task_id, deliberation_id=reply.deliberation_id, status=reply.status,
        message=reply.message)


class FleetServicer(fleet_rpc.RayExecutorServiceServicer):
    """Each fleet RPC converted onto ``implementation``, which validates, answers and refuses
    (INVALID_ARGUMENT naming the field, UNAVAILABLE while Redis is) as for ray_executor.v1."""

    def __init__(self, implementation: Implementation) -> None:
        self.implementation = implementation

    async def ExecuteDeliberation(self, request: fleet.ExecuteDeliberationRequest,
                                  context: grpc.aio.ServicerContext
                                  ) -> fleet.ExecuteDeliberationResponse:
        reply = await self.implementation.execute(
            _as(request, pb.ExecuteDeliberationRequest), context, _EXECUTE)
        return _submitted(request.task_id, reply)

    async def ExecuteBacklogReviewDeliberation(
            self, request: fleet.ExecuteBacklogReviewDeliberationRequest,
            context: grpc.aio.ServicerContext) -> fleet.ExecuteDeliberationResponse:
        try:
            converted = backlog_review_request(request)
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        reply = await self.implementation.execute(converted, context, _EXECUTE_BACKLOG_REVIEW)
        return _submitted(request.task_id, reply)

    async def GetDeliberationStatus(self, request: fleet.GetDeliberationStatusRequest,
                                    context: grpc.aio.ServicerContext
                                    ) -> fleet.GetDeliberationStatusResponse:
        status = _as(await self.implementation.GetDeliberationStatus(
            _as(request, pb.GetDeliberationStatusRequest), context),
            fleet.GetDeliberationStatusResponse)
        if status.status == QUEUED:
            status.status = RUNNING
        elif status.status == CANCELLED:  # its error_message reads "cancelled: <reason>"
            status.status = FAILED
        return status

    async def GetStatus(self, request: fleet.GetStatusRequest,
                        context: grpc.aio.ServicerContext) -> fleet.GetStatusResponse:
        # Upstream answers the stats whatever include_stats says, and its clients rely on it.
        status = await self.implementation.GetStatus(pb.GetStatusRequest(include_stats=True),
                                                     context)
        return _as(status, fleet.GetStatusResponse)

    async def GetActiveJobs(self, request: fleet.GetActiveJobsRequest,
                            context: grpc.aio.ServicerContext) -> fleet.GetActiveJobsResponse:
        jobs = await self.implementation.GetActiveJobs(pb.GetActiveJobsRequest(), context)
        return _as(jobs, fleet.GetActiveJobsResponse)
