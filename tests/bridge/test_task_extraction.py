"""A task-extraction deliberation end to end (bridge, Python 3.9 worker, Ray, the stand-in
LLM, real NATS): planning's request (``metadata.task_type=TASK_EXTRACTION``) makes the agent ask
vLLM for JSON-schema structured output at temperature 0, and upstream's
``TaskExtractionResultConsumer`` reads the canonical event from
``agent.response.completed.task-extraction``; an answer that does not match the schema fails
the agent at once as ``invalid_response`` (not retried) on ``agent.response.failed``."""

from __future__ import annotations

import json
from typing import Any, Callable

import pytest

from fleet.ray_executor.v1 import ray_executor_pb2 as fleet
from harness.standin_llm import StandinThread
from tests import upstream_consumers as consumers
from tests.bridge.conftest import BridgeProcess, Responses
from tests.bridge.test_fleet_api import CEREMONY, MODEL, STORY, fleet_stub


def extraction(task_id: str, vllm_url: str) -> fleet.ExecuteDeliberationRequest:
    """planning call 3 (mapper @84e4baa7), as UPSTREAM.md §2 records it."""
    return fleet.ExecuteDeliberationRequest(
        task_id=task_id, task_description="Extract the tasks agreed in the review",
        role="TASK_EXTRACTOR",
        constraints=fleet.TaskConstraints(
            story_id=STORY, timeout_seconds=300, max_retries=3,
            metadata={"ceremony_id": CEREMONY, "task_type": "TASK_EXTRACTION"}),
        agents=[fleet.Agent(id="agent-task-extractor-001", role="TASK_EXTRACTOR", model=MODEL)],
        vllm_url=vllm_url, vllm_model=MODEL)


@pytest.mark.slow  # about a minute on 2 cores (a worker process and its Ray runner)
def test_a_task_extraction_publishes_the_canonical_event_and_a_bad_answer_fails_cleanly(
        start_bridge: Callable[..., BridgeProcess], start_worker: Callable[..., Any],
        standin: StandinThread, responses: Responses, nats_url: str) -> None:
    bridge = start_bridge(RAY_EXECUTOR_EVENT_FORMAT="envelope", **responses.env)
    start_worker(bridge)
    prefix, stub = responses.prefix, fleet_stub(bridge)
    good_id = f"ceremony-{CEREMONY}:story-{STORY}:task-extraction"
    stub.ExecuteDeliberation(extraction(good_id, standin.url))
    read = consumers.read_all(nats_url, responses.stream, {
        "backlog-review-processor-task-extraction-v2": (f"{prefix}.completed.task-extraction", 1),
    }, timeout=120)
    (event,) = read["backlog-review-processor-task-extraction-v2"]
    extracted = consumers.task_extraction_result(event)
    assert (extracted["task_id"], extracted["story_id"], extracted["ceremony_id"]) == \
        (good_id, STORY, CEREMONY)
    # The stand-in answers a placeholder that fits the schema it was sent: one task.
    assert extracted["tasks"] == [{"title": "stand-in", "description": "stand-in",
                                   "estimated_hours": 0.5, "deliberation_indices": []}], \
        (event, standin.sampling())
    payload = event["payload"]
    assert set(payload) >= {"task_id", "story_id", "ceremony_id", "tasks", "model",
                            "timestamp", "duration_ms", "validated_at"}
    (asked,) = standin.sampling()
    assert asked["temperature"] == 0.0
    assert asked["response_format"]["type"] == "json_schema"
    assert asked["response_format"]["json_schema"]["schema"]["required"] == ["tasks"]

    standin.control(content=json.dumps({"tasks": [{"title": "", "description": "x",
                                                   "estimated_hours": 1,
                                                   "deliberation_indices": [0]}]}))
    bad_id = f"ceremony-{CEREMONY}:story-{STORY}:task-extraction-2"
    stub.ExecuteDeliberation(extraction(bad_id, standin.url))
    read = consumers.read_all(nats_url, responses.stream, {
        "orch-agent-response-failed-v3": (f"{prefix}.failed", 1),
        "orch-agent-response-completed-v3": (f"{prefix}.completed", 0),
    }, timeout=120)
    (failure,) = read["orch-agent-response-failed-v3"]
    failed = failure["payload"]
    assert (failed["task_id"], failed["error_type"], failed["retryable"], failed["attempts"]) \
        == (bad_id, "invalid_response", False, 1)
    assert "tasks[0].title" in failed["error"]
    assert failed["metadata"] == {"task_id": bad_id}
    assert standin.stats()["requests"] == 2, "the bad answer was not asked for again"
