"""Upstream's clients of both generations, unchanged, against one bridge port.

``tests/upstream/{old,new}/ray_executor.proto`` are upstream's two generations of the contract
as its clients compile them (``--proto_path=<dir> ray_executor.proto``, modules
``ray_executor_pb2``/``_pb2_grpc``). Each generation's client runs in its own process
(``tests/upstream/client.py``), as upstream's services do, against a real bridge and Redis.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import grpc
import pytest
from dramatiq.brokers.redis import RedisBroker
from grpc_tools import protoc

from fleet.ray_executor.v1 import ray_executor_pb2 as fleet
from tests.bridge.conftest import BridgeProcess, run_stock_worker

UPSTREAM = Path(__file__).resolve().parents[1] / "upstream"
STORY, CEREMONY = "ST-0042", "BRC-7f3a"


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """Each generation compiled the way upstream's generate-protos.sh scripts do."""
    out = {}
    include = Path(protoc.__file__).parent / "_proto"
    for generation in ("old", "new"):
        target = tmp_path_factory.mktemp(generation)
        status = protoc.main(["protoc", f"--proto_path={UPSTREAM / generation}", f"-I{include}",
                              f"--python_out={target}", f"--grpc_python_out={target}",
                              "ray_executor.proto"])
        assert status == 0, f"protoc failed on the {generation} generation"
        out[generation] = target
    return out


def run_client(generated: Path, bridge: BridgeProcess, steps: List[Dict[str, Any]]
               ) -> List[Dict[str, Any]]:
    done = subprocess.run([sys.executable, str(UPSTREAM / "client.py"), str(generated),
                           bridge.address], input=json.dumps(steps), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    results: List[Dict[str, Any]] = json.loads(done.stdout)
    return results


def deliberation(task_id: str, story_id: str = STORY, **metadata: str) -> Dict[str, Any]:
    constraints: Dict[str, Any] = {"story_id": story_id, "plan_id": "PL-0042",
                                   "timeout_seconds": 120, "max_retries": 2}
    if metadata:
        constraints["metadata"] = metadata
    return {"task_id": task_id, "task_description": "Implement the login endpoint",
            "role": "DEV", "constraints": constraints,
            "agents": [{"id": "agent-dev-001", "role": "DEV", "model": "Qwen/Qwen3-0.6B"}],
            "vllm_url": "http://vllm:8000", "vllm_model": "Qwen/Qwen3-0.6B"}


def test_old_and_new_clients_work_side_by_side_on_one_port(
        generated: Dict[str, Path], bridge: BridgeProcess, redis_url: str) -> None:
    old_sent = deliberation("task-old-001")
    old = run_client(generated["old"], bridge, [
        {"rpc": "ExecuteDeliberation", "request": old_sent},
        {"rpc": "GetStatus", "request": {"include_stats": True}},
        {"rpc": "GetActiveJobs", "request": {}},
    ])
    submitted, service, _ = old
    assert submitted["status"] == "submitted", submitted
    assert submitted["deliberation_id"].startswith("delib-"), submitted
    assert service["status"] == "healthy" or service["status"] == "degraded", service
    assert int(service["stats"]["total_deliberations"]) >= 1, service

    review_id = f"ceremony-{CEREMONY}:story-{STORY}:role-QA"
    new = run_client(generated["new"], bridge, [
        {"rpc": "ExecuteDeliberation",
         "request": deliberation("task-new-001", task_type="TASK_DERIVATION")},
        {"rpc": "ExecuteBacklogReviewDeliberation",
         "request": dict(deliberation(review_id), constraints={
             "story_id": STORY, "timeout_seconds": 0, "max_retries": 0,
             "metadata": {"task_id": review_id, "task_type": "BACKLOG_REVIEW_ROLE"}})},
        {"rpc": "ExecuteBacklogReviewDeliberation",
         "request": dict(deliberation("derive-PL-1"), constraints={"story_id": STORY})},
    ])
    derivation, review, refused = new
    assert (derivation["task_id"], derivation["status"]) == ("task-new-001", "submitted")
    assert (review["task_id"], review["status"]) == (review_id, "submitted")
    assert refused["error"] == "INVALID_ARGUMENT" and refused["details"].startswith("task_id:")

    # Each client looks up the ids it decoded, through its own generation: ray_executor.v1
    # says queued (ours), the fleet service running (upstream's word until agents end).
    ids = [submitted["deliberation_id"], derivation["deliberation_id"],
           review["deliberation_id"]]
    assert len(set(ids)) == 3 and all(i.startswith("delib-") for i in ids), ids
    for generation, mine, word in (("old", ids[:1], "queued"), ("new", ids[1:], "running")):
        found = run_client(generated[generation], bridge, [
            {"rpc": "GetDeliberationStatus", "request": {"deliberation_id": i}} for i in mine])
        assert [f["status"] for f in found] == [word] * len(mine), found

    jobs = run_stock_worker(RedisBroker(url=redis_url), bridge.queue, 3)
    assert sorted((j["deliberation_id"], j["task_id"]) for j in jobs) == sorted(
        zip(ids, ["task-old-001", "task-new-001", review_id]))
    review_job = next(j for j in jobs if j["task_id"] == review_id)
    assert review_job["metadata"] == {"task_id": review_id, "task_type": "BACKLOG_REVIEW_ROLE",
                                      "story_id": STORY}


def test_each_decoder_reads_its_own_response_layout(
        generated: Dict[str, Path], bridge: BridgeProcess) -> None:
    """The same request on both paths, answers taken as bytes: the old decoder reads the
    ray_executor.v1 answer and the new decoder the fleet one correctly; the old decoder on the
    fleet answer reads the task_id where it expects the deliberation id, as upstream warned."""
    channel = grpc.insecure_channel(bridge.address)
    answers = {}
    for path, task_id in (("/ray_executor.v1.RayExecutorService/ExecuteDeliberation", "t-old"),
                          ("/fleet.ray_executor.v1.RayExecutorService/ExecuteDeliberation",
                           "t-new")):
        sent = fleet.ExecuteDeliberationRequest(
            task_id=task_id, task_description="Plan", role="DEV",
            constraints=fleet.TaskConstraints(story_id=STORY, timeout_seconds=60),
            agents=[fleet.Agent(id="agent-1", role="DEV")])
        call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
        raw: bytes = call(sent.SerializeToString(), timeout=30)
        answers[task_id] = base64.b64encode(raw).decode()
    channel.close()

    def decode(generation: str, task_id: str) -> Dict[str, Any]:
        (decoded,) = run_client(generated[generation], bridge, [
            {"decode": "ExecuteDeliberationResponse", "base64": answers[task_id]}])
        return decoded

    old, new, crossed = decode("old", "t-old"), decode("new", "t-new"), decode("old", "t-new")
    assert old["deliberation_id"].startswith("delib-") and old["status"] == "submitted", old
    assert new["task_id"] == "t-new" and new["status"] == "submitted", new
    assert new["deliberation_id"].startswith("delib-"), new
    assert crossed["deliberation_id"] == "t-new" and crossed["status"] == new["deliberation_id"]
