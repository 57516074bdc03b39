"""Our ``agent.response.*`` events read from the real stream by each of upstream's consumers
(``../shared/design/UPSTREAM.md`` §4, emulated in ``tests.upstream_consumers``): the exact
requests upstream's clients send go through a real bridge, a stock Dramatiq worker takes the
jobs and the store records each agent's outcome as a worker does; the bridge's outbox
publishes them. With ``RAY_EXECUTOR_EVENT_FORMAT=envelope`` every enveloped consumer gets what
it needs, routed by ``metadata.task_type``; with ``json`` the orchestrator's raw-JSON
collector does."""

from __future__ import annotations

from typing import Any, Callable, Dict

import pytest
from dramatiq.brokers.redis import RedisBroker
from nats.js.api import DiscardPolicy, StorageType

from core.contract import COMPLETED, FAILED
from core.settings import Settings, SettingsError
from ray_executor.v1 import ray_executor_pb2 as pb
from tests import upstream_consumers as consumers
from tests.bridge.conftest import BridgeProcess, Responses, run_stock_worker
from tests.bridge.test_fleet_api import (
    PLAN,
    STORY,
    backlog_review,
    finish_agents,
    fleet_stub,
    task_derivation,
)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def orchestrator_request(task_id: str) -> pb.ExecuteDeliberationRequest:
    """The orchestrator's request (ray_executor_mapper @8dca7942): no metadata."""
    return pb.ExecuteDeliberationRequest(
        task_id=task_id, task_description="Implement the rate limiter", role="DEV",
        constraints=pb.TaskConstraints(story_id=STORY, plan_id=PLAN, timeout_seconds=300,
                                       max_retries=3),
        agents=[pb.Agent(id="orch-dev-1", role="DEV"), pb.Agent(id="orch-dev-2", role="DEV")],
        vllm_url="http://127.0.0.1:9/", vllm_model="Qwen/Qwen3-0.6B")


def run_agents(bridge: BridgeProcess, redis_url: str, count: int,
               outcomes: Dict[str, Dict[str, Any]]) -> None:
    """The queued jobs taken by a stock worker and their ``outcomes`` recorded."""
    jobs = run_stock_worker(RedisBroker(url=redis_url), bridge.queue, count)
    finish_agents(bridge, jobs, outcomes)


def done(content: str) -> Dict[str, Any]:
    return {"status": COMPLETED, "result": {"content": content, "model": "Qwen/Qwen3-0.6B",
                                            "temperature": 0.7, "tokens": 12}}


def failed(error: str) -> Dict[str, Any]:
    return {"status": FAILED, "error": error, "error_type": "unavailable", "retryable": True}


def test_every_enveloped_consumer_reads_what_it_needs(
        start_bridge: Callable[..., BridgeProcess], responses: Responses, redis_url: str,
        nats_url: str) -> None:
    bridge = start_bridge(RAY_EXECUTOR_EVENT_FORMAT="envelope", **responses.env)
    stub = fleet_stub(bridge)
    review = stub.ExecuteBacklogReviewDeliberation(
        backlog_review("ARCHITECT", 3), metadata=(("traceparent", TRACEPARENT),))
    derivation_request = task_derivation()
    derivation_request.constraints.metadata["correlation_id"] = "ceremony-instance-7"
    derivation = stub.ExecuteDeliberation(derivation_request)
    orchestrator = bridge.stub().ExecuteDeliberation(orchestrator_request("orch-task-1"))
    run_agents(bridge, redis_url, 6, {
        "agent-architect-001": done("Split the story in two"),
        "agent-architect-002": done("Keep the API small"),
        "agent-architect-003": failed("vLLM 503"),
        "task-deriver-001": done("1. Write the limiter\n2. Test it"),
        "orch-dev-1": done("Token bucket"),
        "orch-dev-2": failed("vLLM 503"),
    })
    prefix = responses.prefix
    read = consumers.read_all(nats_url, responses.stream, {
        "backlog-review-processor-backlog-review-role-v2":
            (f"{prefix}.completed.backlog-review.role", 2),
        "task-derivation-result-consumer": (f"{prefix}.completed", 2),
        "planning-task-derivation-result-consumer": (f"{prefix}.completed", 2),
        "planning-ceremony-processor-agent-response-completed-v1": (f"{prefix}.completed", 2),
        "orch-agent-response-completed-v3": (f"{prefix}.completed", 2),
        "orch-agent-response-failed-v3": (f"{prefix}.failed", 2),
    })

    reviews = [consumers.backlog_review_result(body) for body in
               read["backlog-review-processor-backlog-review-role-v2"]]
    assert sorted(r["agent_id"] for r in reviews) == ["agent-architect-001",
                                                      "agent-architect-002"]
    for review_read in reviews:
        assert (review_read["story_id"], review_read["role"], review_read["status"]) == \
            (STORY, "ARCHITECT", "completed")
        assert review_read["constraints"] == {"story_id": STORY, "plan_id": "",
                                              "timeout_seconds": 300, "max_retries": 3}
        assert review_read["metadata"]["task_type"] == "BACKLOG_REVIEW_ROLE"
        assert review_read["metadata"]["num_agents"] == 3 == review_read["num_agents"]
        assert review_read["metadata"]["story_id"] == STORY
    assert sorted(r["feedback"] for r in reviews) == ["Keep the API small",
                                                      "Split the story in two"]

    derived = [consumers.task_derivation_result(body)
               for body in read["task-derivation-result-consumer"]]
    planning = [consumers.planning_task_derivation_result(body)
                for body in read["planning-task-derivation-result-consumer"]]
    wanted = {"plan_id": PLAN, "story_id": STORY, "role": "DEVELOPER",
              "text": "1. Write the limiter\n2. Test it"}
    assert sorted(derived, key=len) == [{}, wanted], "only TASK_DERIVATION is theirs"
    assert sorted(planning, key=len) == [{}, wanted]

    ceremony = {r["task_id"]: r["correlation_id"] for r in map(
        consumers.ceremony_agent_completed,
        read["planning-ceremony-processor-agent-response-completed-v1"])}
    assert ceremony == {derivation_request.task_id: "ceremony-instance-7",
                        "orch-task-1": orchestrator.deliberation_id}

    completed = [consumers.orchestrator_agent_response(body)
                 for body in read["orch-agent-response-completed-v3"]]
    assert sorted(c["agent_id"] for c in completed) == ["orch-dev-1", "task-deriver-001"]
    assert all(c["story_id"] == STORY and c["duration_ms"] == 5 for c in completed)
    failures = read["orch-agent-response-failed-v3"]
    assert sorted(consumers.orchestrator_agent_response(body)["agent_id"]
                  for body in failures) == ["agent-architect-003", "orch-dev-2"]
    for body in failures:
        payload = body["payload"]
        assert (payload["error"], payload["error_type"], payload["success"]) == \
            ("vLLM 503", "unavailable", False)
        assert payload["metadata"]["task_id"] == payload["task_id"]
    review_failure = next(b for b in failures if b["payload"]["agent_id"].startswith("agent-"))
    assert consumers.backlog_review_result(review_failure)["status"] == "failed"

    # One correlation id per deliberation, carried from its request; one key per event.
    everything = read["backlog-review-processor-backlog-review-role-v2"] + \
        read["task-derivation-result-consumer"] + failures
    by_deliberation: Dict[str, set] = {}
    for body in everything:
        by_deliberation.setdefault(body["metadata"]["deliberation_id"], set()).add(
            body["correlation_id"])
    assert by_deliberation == {review.deliberation_id: {TRACE_ID},
                               derivation.deliberation_id: {"ceremony-instance-7"},
                               orchestrator.deliberation_id: {orchestrator.deliberation_id}}
    keys = [body["idempotency_key"] for body in everything]
    assert len(set(keys)) == len(keys) == 6
    assert {body["producer"] for body in everything} == {"ray-executor"}
    assert {body["event_type"] for body in everything} == {f"{prefix}.completed",
                                                            f"{prefix}.failed"}

    # One vllm_stream_start per accepted deliberation, on a stream that captures them.
    starts = consumers.read_all(nats_url, responses.streaming_stream, {
        "monitoring": (f"{responses.streaming_prefix}.>", 3)})["monitoring"]
    for start in starts:
        consumers.parse_required_envelope(start)
        assert start["event_type"] == f"{responses.streaming_prefix}.vllm_stream_start"
        assert (start["payload"]["type"], start["payload"]["status"]) == \
            ("vllm_stream_start", "streaming")
    assert {s["payload"]["deliberation_id"] for s in starts} == set(by_deliberation)
    # The streams the service made have upstream's limits.
    config = consumers.stream_config(nats_url, responses.stream)
    assert (config.max_age, config.max_msgs, config.discard, config.storage) == \
        (3600, 10000, DiscardPolicy.OLD, StorageType.FILE)


def test_the_raw_json_collector_reads_plain_events(
        start_bridge: Callable[..., BridgeProcess], responses: Responses, redis_url: str,
        nats_url: str) -> None:
    """The orchestrator's DeliberationResultCollector parses raw JSON (the default format):
    it completes the deliberation when num_agents responses arrived."""
    bridge = start_bridge(**responses.env)
    bridge.stub().ExecuteDeliberation(orchestrator_request("orch-task-2"))
    run_agents(bridge, redis_url, 2, {"orch-dev-1": done("Token bucket"),
                                      "orch-dev-2": failed("vLLM 503")})
    read = consumers.read_all(nats_url, responses.stream, {
        "deliberation-collector-completed-v3": (f"{responses.prefix}.completed", 1),
        "deliberation-collector-failed-v3": (f"{responses.prefix}.failed", 1),
    })
    (completed,) = map(consumers.deliberation_collector,
                       read["deliberation-collector-completed-v3"])
    (failure,) = map(consumers.deliberation_collector, read["deliberation-collector-failed-v3"])
    assert completed["task_id"] == failure["task_id"] == "orch-task-2"
    assert completed["num_agents"] == 2 and completed["proposal"]["content"] == "Token bucket"
    assert failure["error"] == "vLLM 503"
    assert "event_type" not in read["deliberation-collector-completed-v3"][0]


def test_a_bad_event_format_is_refused_naming_the_setting() -> None:
    with pytest.raises(SettingsError, match="RAY_EXECUTOR_EVENT_FORMAT: expected 'json' or "
                                            "'envelope', got 'xml'"):
        Settings.from_env({"RAY_EXECUTOR_EVENT_FORMAT": "xml"})
