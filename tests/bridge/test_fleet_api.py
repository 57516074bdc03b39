"""``fleet.ray_executor.v1.RayExecutorService`` (upstream's newest generation) against a real
bridge process and real Redis, called through stubs generated from the fleet proto: the exact
requests upstream's clients send (../shared/design/UPSTREAM.md §2), backlog review's task_id
rule, the renumbered response, a multi-agent status, health and reflection."""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Dict, List

import grpc
import pytest
import redis
from dramatiq.brokers.redis import RedisBroker
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from core.connections import connect
from core.contract import COMPLETED, FAILED, AgentJob
from core.settings import Settings
from core.store import DeliberationStore
from fleet.ray_executor.v1 import ray_executor_pb2 as fleet
from fleet.ray_executor.v1 import ray_executor_pb2_grpc as fleet_rpc
from ray_executor.v1 import ray_executor_pb2 as pb
from tests.bridge.conftest import BridgeProcess, run_stock_worker

FLEET = "fleet.ray_executor.v1.RayExecutorService"
VLLM_URL = "http://vllm-server-service.swe-ai-fleet.svc.cluster.local:8000"
MODEL = "Qwen/Qwen3-0.6B"
CEREMONY, STORY, PLAN = "BRC-7f3a", "ST-0042", "PL-0042"


def unknown_fields(*messages: Message) -> List[Any]:
    """Fields the fleet types do not define, as a ray_executor.v1 answer would carry them."""
    return [field for message in messages for field in UnknownFieldSet(message)]


def fleet_stub(bridge: BridgeProcess) -> fleet_rpc.RayExecutorServiceStub:
    return fleet_rpc.RayExecutorServiceStub(grpc.insecure_channel(bridge.address))


# Each upstream client's request as UPSTREAM.md §2 records it (client file @commit there).
def task_derivation() -> fleet.ExecuteDeliberationRequest:
    """task_derivation's ray_executor_request_mapper @84e4baa7."""
    return fleet.ExecuteDeliberationRequest(
        task_id=f"derive-{PLAN}", task_description="Derive the tasks of plan PL-0042",
        role="DEVELOPER",
        constraints=fleet.TaskConstraints(
            story_id=STORY, plan_id=PLAN, timeout_seconds=120, max_retries=2,
            metadata={"story_id": STORY, "task_type": "TASK_DERIVATION"}),
        agents=[fleet.Agent(id="task-deriver-001", role="DEVELOPER", model=MODEL,
                            prompt_template="")],
        vllm_url=VLLM_URL, vllm_model=MODEL)


def planning_task_derivation() -> fleet.ExecuteDeliberationRequest:
    """planning call 1: an empty story_id and no metadata (upstream's newest server refused it)."""
    request = task_derivation()
    request.task_id = "derive-PL-0043"
    request.constraints.CopyFrom(fleet.TaskConstraints(
        story_id="", plan_id="PL-0043", timeout_seconds=120, max_retries=2))
    return request


def backlog_review(role: str = "ARCHITECT", agents: int = 3
                   ) -> fleet.ExecuteBacklogReviewDeliberationRequest:
    """planning call 2 (mapper @84e4baa7): num_agents agents, task_id in metadata."""
    task_id = f"ceremony-{CEREMONY}:story-{STORY}:role-{role}"
    return fleet.ExecuteBacklogReviewDeliberationRequest(
        task_id=task_id, task_description=f"Review story {STORY} as {role}", role=role,
        constraints=fleet.BacklogReviewTaskConstraints(
            story_id=STORY, timeout_seconds=300, max_retries=3,
            metadata={"task_id": task_id, "task_type": "BACKLOG_REVIEW_ROLE"}),
        agents=[fleet.Agent(id=f"agent-{role.lower()}-{i:03d}", role=role, model=MODEL)
                for i in range(1, agents + 1)],
        vllm_url=VLLM_URL, vllm_model=MODEL)


def task_extraction(extra: Dict[str, str], plan_id: str = "") -> fleet.ExecuteDeliberationRequest:
    """planning call 3, backlog_review_processor (``extra`` story_id) and
    planning_ceremony_processor (plan_id "" set explicitly)."""
    return fleet.ExecuteDeliberationRequest(
        task_id=f"ceremony-{CEREMONY}:story-{STORY}:task-extraction",
        task_description="Extract the tasks agreed in the review",
        role="TASK_EXTRACTOR",
        constraints=fleet.TaskConstraints(
            story_id=STORY, plan_id=plan_id, timeout_seconds=300, max_retries=3,
            metadata={"ceremony_id": CEREMONY, "task_type": "TASK_EXTRACTION", **extra}),
        agents=[fleet.Agent(id="agent-task-extractor-001", role="TASK_EXTRACTOR", model=MODEL)],
        vllm_url=VLLM_URL, vllm_model=MODEL)


def ceremony_backlog_review() -> fleet.ExecuteBacklogReviewDeliberationRequest:
    """planning_ceremony_processor @c4037f96: agents agent-{role}-{i:03d}, the caller's
    constraints as string metadata."""
    request = backlog_review("QA")
    del request.agents[:]
    request.agents.extend(fleet.Agent(id=f"agent-QA-{i:03d}", role="QA", model=MODEL)
                          for i in range(1, 4))
    request.constraints.metadata.clear()
    request.constraints.metadata.update({"ceremony_id": CEREMONY, "num_agents": "3"})
    return request


def orchestrator() -> fleet.ExecuteDeliberationRequest:
    """orchestrator's ray_executor_mapper @8dca7942: no metadata, story and plan from dicts."""
    return fleet.ExecuteDeliberationRequest(
        task_id="task-001", task_description="Implement the login endpoint", role="DEV",
        constraints=fleet.TaskConstraints(story_id=STORY, plan_id="", timeout_seconds=300,
                                          max_retries=3),
        agents=[fleet.Agent(id=f"agent-dev-{i:03d}", role="DEV", model=MODEL,
                            prompt_template="") for i in range(1, 4)],
        vllm_url=VLLM_URL, vllm_model=MODEL)


UPSTREAM_REQUESTS: Dict[str, Callable[[], Any]] = {
    "task_derivation": task_derivation,
    "planning_task_derivation": planning_task_derivation,
    "planning_backlog_review": backlog_review,
    "planning_task_extraction": lambda: task_extraction({}),
    "backlog_review_processor_task_extraction": lambda: task_extraction({"story_id": STORY}),
    "planning_ceremony_processor_backlog_review": ceremony_backlog_review,
    "planning_ceremony_processor_task_extraction": lambda: task_extraction({}, plan_id=""),
    "orchestrator": orchestrator,
}


def execute(stub: fleet_rpc.RayExecutorServiceStub, request: Any
            ) -> fleet.ExecuteDeliberationResponse:
    if isinstance(request, fleet.ExecuteBacklogReviewDeliberationRequest):
        return stub.ExecuteBacklogReviewDeliberation(request, timeout=10)
    return stub.ExecuteDeliberation(request, timeout=10)


@pytest.mark.parametrize("client", sorted(UPSTREAM_REQUESTS))
def test_each_upstream_client_request_is_accepted_and_enqueued(
        client: str, bridge: BridgeProcess, redis_url: str) -> None:
    sent = UPSTREAM_REQUESTS[client]()
    reply = execute(fleet_stub(bridge), sent)
    assert reply.status == "submitted" and reply.deliberation_id.startswith("delib-")
    assert reply.task_id == sent.task_id  # the renumbered response echoes it first
    jobs = run_stock_worker(RedisBroker(url=redis_url), bridge.queue, len(sent.agents))
    assert sorted(j["agent_id"] for j in jobs) == sorted(a.id for a in sent.agents)
    for job in jobs:
        assert job["deliberation_id"] == reply.deliberation_id
        assert job["task_id"] == sent.task_id and job["model"] == MODEL
        assert job["vllm_url"] == VLLM_URL
        assert job["story_id"] == sent.constraints.story_id
        assert job["timeout_seconds"] == sent.constraints.timeout_seconds
        assert job["max_retries"] == sent.constraints.max_retries
        expected = dict(sent.constraints.metadata)
        if isinstance(sent, fleet.ExecuteBacklogReviewDeliberationRequest):
            expected.setdefault("story_id", sent.constraints.story_id)
        else:
            assert job["plan_id"] == sent.constraints.plan_id
        assert job["metadata"] == expected


def test_backlog_review_zero_means_the_default_and_a_given_story_id_stays(
        bridge: BridgeProcess, redis_url: str) -> None:
    sent = backlog_review("DEVOPS", agents=1)
    sent.constraints.timeout_seconds = 0
    sent.constraints.max_retries = 0
    sent.constraints.metadata["story_id"] = "ST-from-metadata"
    fleet_stub(bridge).ExecuteBacklogReviewDeliberation(sent)
    (job,) = run_stock_worker(RedisBroker(url=redis_url), bridge.queue, 1)
    defaults = Settings.from_env(bridge.env)
    assert job["timeout_seconds"] == defaults.job_timeout_seconds
    assert job["max_retries"] == defaults.max_retries
    assert job["metadata"]["story_id"] == "ST-from-metadata"
    assert job["story_id"] == STORY


@pytest.mark.parametrize("task_id", [
    "", "   ", "derive-PL-1", f"ceremony-{CEREMONY}:story-{STORY}",
    f"ceremony-{CEREMONY}:story-{STORY}:task-extraction",
    f"story-{STORY}:ceremony-{CEREMONY}:role-QA", f"ceremony-:story-{STORY}:role-QA",
    f"ceremony-{CEREMONY}:story-{STORY}:role-QA:extra",
])
def test_a_backlog_review_task_id_out_of_format_is_refused_naming_the_field(
        task_id: str, bridge: BridgeProcess, redis_url: str) -> None:
    sent = backlog_review()
    sent.task_id = task_id
    with pytest.raises(grpc.RpcError) as caught:
        fleet_stub(bridge).ExecuteBacklogReviewDeliberation(sent)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details()
    assert details.startswith("task_id:"), details
    assert "ceremony-{id}:story-{id}:role-{ROLE}" in details, details
    assert redis.Redis.from_url(redis_url).keys(f"{bridge.prefix}:*") == []


def test_other_bad_input_is_refused_naming_the_field_as_on_the_other_service(
        bridge: BridgeProcess) -> None:
    stub = fleet_stub(bridge)
    no_agents = backlog_review()
    del no_agents.agents[:]
    duplicate = task_derivation()
    duplicate.agents.extend([duplicate.agents[0]])
    for call, sent, field in [
        (stub.ExecuteBacklogReviewDeliberation, no_agents, "agents:"),
        (stub.ExecuteDeliberation, duplicate, "agents[1].id:"),
        (stub.ExecuteDeliberation, fleet.ExecuteDeliberationRequest(), "task_id:"),
    ]:
        with pytest.raises(grpc.RpcError) as caught:
            call(sent)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details().startswith(field), caught.value.details()


def test_status_and_active_jobs_answer_upstreams_layout(bridge: BridgeProcess) -> None:
    stub = fleet_stub(bridge)
    reply = stub.ExecuteBacklogReviewDeliberation(backlog_review())
    status = stub.GetStatus(fleet.GetStatusRequest(), timeout=5)  # planning's health call
    assert status.status.lower() in ("healthy", "degraded"), status
    assert status.uptime_seconds >= 0
    # Upstream answers stats whatever include_stats says.
    assert status.stats.total_deliberations == 1 and status.stats.active_deliberations == 1
    jobs = stub.GetActiveJobs(fleet.GetActiveJobsRequest()).jobs
    assert {j.submission_id for j in jobs} == {reply.deliberation_id}
    assert {j.task_id for j in jobs} == {reply.task_id}
    assert sorted(j.job_id for j in jobs) == [
        f"{reply.deliberation_id}:agent-architect-00{i}" for i in (1, 2, 3)]
    assert not unknown_fields(status, status.stats, *jobs), "ray_executor.v1's fields leaked"
    missing = stub.GetDeliberationStatus(fleet.GetDeliberationStatusRequest(
        deliberation_id="delib-missing"))
    assert missing.status == "not_found" and "not found" in missing.error_message
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetDeliberationStatus(fleet.GetDeliberationStatusRequest())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("deliberation_id:")


def test_status_words_are_upstreams(bridge: BridgeProcess) -> None:
    """Upstream's clients know submitted|running|completed|failed|not_found: a queued
    deliberation is running to them, a cancelled one failed (saying so)."""
    stub = fleet_stub(bridge)
    reply = stub.ExecuteBacklogReviewDeliberation(backlog_review())
    request = fleet.GetDeliberationStatusRequest(deliberation_id=reply.deliberation_id)
    ours = pb.GetDeliberationStatusRequest(deliberation_id=reply.deliberation_id)
    assert bridge.stub().GetDeliberationStatus(ours).status == "queued"
    assert stub.GetDeliberationStatus(request).status == "running"
    bridge.stub().CancelDeliberation(pb.CancelDeliberationRequest(
        deliberation_id=reply.deliberation_id, reason="story withdrawn"))
    assert bridge.stub().GetDeliberationStatus(ours).status == "cancelled"
    cancelled = stub.GetDeliberationStatus(request)
    assert cancelled.status == "failed", cancelled
    assert cancelled.error_message.startswith("cancelled: story withdrawn"), cancelled


def finish_agents(bridge: BridgeProcess, jobs: List[Dict[str, Any]],
                  outcomes: Dict[str, Dict[str, Any]]) -> None:
    """Record each job's outcome with the store's own start and finish scripts, as a worker
    does after running the job on Ray."""

    async def record() -> None:
        client = connect(bridge.env["REDIS_URL"])
        try:
            store = DeliberationStore(client, Settings.from_env(bridge.env))
            for kwargs in jobs:
                job = AgentJob.from_kwargs(kwargs)
                assert (await store.start(job, 0))[0] == "run"
                await store.finish(job, {"attempts": 1, "duration_ms": 5,
                                         **outcomes[job.agent_id]})
        finally:
            await client.close()

    asyncio.run(record())


def test_a_multi_agent_status_has_the_best_result_and_the_counts_in_its_metadata(
        bridge: BridgeProcess, redis_url: str) -> None:
    stub = fleet_stub(bridge)
    reply = stub.ExecuteBacklogReviewDeliberation(backlog_review())
    jobs = run_stock_worker(RedisBroker(url=redis_url), bridge.queue, 3)
    finish_agents(bridge, jobs, {
        "agent-architect-001": {"status": COMPLETED, "result": {"content": "plan A",
                                                                "score": 0.25}},
        "agent-architect-002": {"status": COMPLETED, "result": {"content": "plan B",
                                                                "score": 0.75}},
        "agent-architect-003": {"status": FAILED, "error": "vLLM 503",
                                "error_type": "llm_unavailable"},
    })
    request = fleet.GetDeliberationStatusRequest(deliberation_id=reply.deliberation_id)
    status = stub.GetDeliberationStatus(request)
    old = bridge.stub().GetDeliberationStatus(pb.GetDeliberationStatusRequest(
        deliberation_id=reply.deliberation_id))
    assert not unknown_fields(status, status.result)
    for answer in (status, old):  # both generations, one implementation
        assert answer.status == old.status and answer.HasField("result")
        assert answer.result.agent_id == "agent-architect-002"
        assert answer.result.proposal == "plan B"
        counts = {k: answer.result.metadata[k] for k in
                  ("total_agents", "completed_agents", "failed_agents", "average_score")}
        assert counts == {"total_agents": "3", "completed_agents": "2", "failed_agents": "1",
                          "average_score": "0.5"}
        assert "agent-architect-003: vLLM 503" in answer.error_message


def test_health_and_reflection_list_both_generations(bridge: BridgeProcess) -> None:
    channel = grpc.insecure_channel(bridge.address)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "ray_executor.v1.RayExecutorService", FLEET):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = list(reflect.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=FLEET),
    ])))
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"ray_executor.v1.RayExecutorService", FLEET, "grpc.health.v1.Health"} <= names
    described = replies[1].file_descriptor_response.file_descriptor_proto
    assert described and all(isinstance(d, bytes) for d in described)
    assert b"ExecuteBacklogReviewDeliberation" in b"".join(described)
