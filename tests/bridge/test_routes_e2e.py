"""Routes (core.routes) through the real bridge, Redis, NATS, one Ray head and Python 3.9 worker
groups: the ingress picks each request's route and queue, each route's workers serve only its
queue with its Ray address, a request no route takes is refused with the field, and status and
metrics are per route."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import grpc
import pytest
import redis

from ray_executor.v1 import ray_executor_pb2 as pb
from tests.bridge.conftest import CLI, BridgeProcess, Channel, request
from tests.bridge.test_metrics import sample, scrape
from tests.bridge.test_nats_ingress import as_json, consumer_ready, dead_letters, settled, with_nats
from tests.conftest import worker_python
from tests.waiting import until

UNREACHABLE = "ray://127.0.0.1:9"  # the workers' RAY_ADDRESS: only a route's own address works


def routes_file(path: Path, routes: List[Dict[str, Any]]) -> Dict[str, str]:
    """``routes`` written as the chart renders them; the bridge's and workers' setting."""
    path.write_text(json.dumps({"routes": routes}))
    return {"RAY_EXECUTOR_ROUTES_FILE": str(path)}


def two_routes(tmp_path: Path, ray_address: str, url_a: str, url_b: str,
               default: bool = True, url_b2: str = "") -> Dict[str, str]:
    """Route ``a`` takes model-a (and, with ``default``, what no route names), route ``b``
    what has ``task_type=TASK_B``; each its own queue, ``a`` one stand-in endpoint, ``b`` a
    pool of two (``url_b2``, else a second path of ``url_b``)."""
    tag = uuid.uuid4().hex[:8]
    match_a: Dict[str, Any] = {"models": ["model-a"], "default": default}
    return routes_file(tmp_path / f"routes-{tag}.json", [
        {"name": "a", "queue": f"qa{tag}", "ray_address": ray_address, "match": match_a,
         "vllm": {"endpoints": [{"url": url_a, "concurrency": 5}]}},
        {"name": "b", "queue": f"qb{tag}", "ray_address": ray_address,
         "match": {"metadata": {"task_type": "TASK_B"}},
         "vllm": {"endpoints": [{"url": url_b, "concurrency": 3},
                                {"url": url_b2 or url_b + "/second", "concurrency": 4}]}}])


def routed(model: str, **metadata: str) -> pb.ExecuteDeliberationRequest:
    """Two agents asking ``model`` with ``metadata``, no vLLM URL of their own."""
    return request(agents=2, vllm_url="", vllm_model=model, constraints=pb.TaskConstraints(
        timeout_seconds=60, max_retries=1, metadata=metadata))


def final(stub: Any, deliberation_id: str) -> Optional[pb.GetDeliberationStatusResponse]:
    status = stub.GetDeliberationStatus(pb.GetDeliberationStatusRequest(
        deliberation_id=deliberation_id))
    return status if status.status in ("completed", "failed", "cancelled") else None


def status_of(stub: Any) -> pb.GetStatusResponse:
    return stub.GetStatus(pb.GetStatusRequest(include_stats=True))


def test_each_route_runs_its_requests_on_its_own_workers(
        start_bridge: Callable[..., BridgeProcess], start_worker: Any, ray_address: str,
        tmp_path: Path, redis_url: str) -> None:
    """By model, by metadata and by default: route ``b``'s jobs wait in its queue (GetStatus
    degraded naming ``b``) while only ``a``'s worker runs, and run once ``b``'s starts; each
    stand-in endpoint gets exactly its route's calls. Workers get an unreachable RAY_ADDRESS:
    they reach Ray only through their route's address."""
    from harness.standin_llm import run_in_thread

    with run_in_thread(latency=0.05) as llm_a, run_in_thread(latency=0.05) as llm_b, \
            run_in_thread(latency=0.05) as llm_b2:
        routes = two_routes(tmp_path, ray_address, llm_a.url, llm_b.url, url_b2=llm_b2.url)
        bridge = start_bridge(VLLM_URL="http://127.0.0.1:9/v1", **routes)
        stub = bridge.stub()
        by_model = stub.ExecuteDeliberation(routed("model-a")).deliberation_id
        by_metadata = stub.ExecuteDeliberation(routed("model-x", task_type="TASK_B")
                                               ).deliberation_id
        by_default = stub.ExecuteDeliberation(routed("model-x", task_type="OTHER")
                                              ).deliberation_id
        queue_b = json.loads(Path(routes["RAY_EXECUTOR_ROUTES_FILE"]).read_text()
                             )["routes"][1]["queue"]
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        assert client.llen(f"dramatiq:{queue_b}") == 2
        record = client.hgetall(f"{bridge.prefix}:d:{by_metadata}")
        assert record["route"] == "b" and record["vllm_url"] == llm_b.url, record
        metrics = scrape(bridge)
        assert sample(metrics, "ray_executor_route_capacity", route="a") == 5
        assert sample(metrics, "ray_executor_route_capacity", route="b") == 7
        assert sample(metrics, "ray_executor_route_pending_jobs", route="b") == 2
        assert sample(metrics, "ray_executor_queue_depth", queue=queue_b, state="ready") == 2

        start_worker(bridge, RAY_ADDRESS=UNREACHABLE, RAY_EXECUTOR_ROUTE="a")
        for deliberation_id in (by_model, by_default):
            done = until(lambda: final(stub, deliberation_id),  # noqa: B023 (awaited here)
                         "route a's deliberations", timeout=180)
            assert (done.status, done.completed_agents) == ("completed", 2), done
        assert final(stub, by_metadata) is None  # a's worker never takes b's jobs
        assert client.llen(f"dramatiq:{queue_b}") == 2
        status = status_of(stub)
        assert status.status == "degraded" and f"on queue '{queue_b}' of route 'b'" in \
            status.message, status
        assert "route a (queue " in status.message and "route b (queue " in status.message

        start_worker(bridge, RAY_ADDRESS=UNREACHABLE, RAY_EXECUTOR_ROUTE="b")
        done = until(lambda: final(stub, by_metadata), "route b's deliberation", timeout=180)
        assert (done.status, done.completed_agents) == ("completed", 2), done
        healthy = until(lambda: (lambda s: s if s.status == "healthy" else None)(
            status_of(stub)), "healthy with a worker on each route", timeout=60)
        assert "route b (queue " in healthy.message and healthy.stats.queued_messages == 0
        # Route b's two jobs went to its pool's endpoints (the least loaded), none to a's.
        assert llm_a.stats()["requests"] == 4
        assert llm_b.stats()["requests"] + llm_b2.stats()["requests"] == 2


def test_a_request_no_route_takes_is_refused_naming_the_field(
        start_bridge: Callable[..., BridgeProcess], channel: Channel, ray_address: str,
        tmp_path: Path, redis_url: str, nats_url: str) -> None:
    """Without a default route: gRPC INVALID_ARGUMENT naming ``vllm_model`` (no route names
    the model) or ``constraints.metadata`` (the model's route wants other metadata); nothing
    is recorded or enqueued; the NATS ingress dead-letters the same with the reason."""
    routes = two_routes(tmp_path, ray_address, "http://127.0.0.1:9/a", "http://127.0.0.1:9/b",
                        default=False)
    data = json.loads(Path(routes["RAY_EXECUTOR_ROUTES_FILE"]).read_text())
    data["routes"][1]["match"]["models"] = ["model-b"]  # b: model-b with task_type=TASK_B
    Path(routes["RAY_EXECUTOR_ROUTES_FILE"]).write_text(json.dumps(data))
    bridge = start_bridge(**routes, **channel.env)
    stub = bridge.stub()
    refused = {"unknown-model": (routed("model-x", task_type="TASK_B"), "vllm_model",
                                 "no route takes model 'model-x' with metadata task_type=TASK_B"),
               "wrong-metadata": (routed("model-b", task_type="OTHER"), "constraints.metadata",
                                  "no route takes model 'model-b' with metadata task_type=OTHER")}
    for req, field, reason in refused.values():
        with pytest.raises(grpc.RpcError) as error:
            stub.ExecuteDeliberation(req)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.value.details() == f"{field}: {reason}"
    client = redis.Redis.from_url(redis_url)
    assert client.keys(f"{bridge.prefix}:*") == []
    assert [key for route in data["routes"] for key in client.keys(f"dramatiq:{route['queue']}*")
            ] == []
    stub.ExecuteDeliberation(routed("model-b", task_type="TASK_B"))  # b takes it
    assert client.llen(f"dramatiq:{data['routes'][1]['queue']}") == 2

    async def body(nc: Any, js: Any) -> List[Any]:
        await consumer_ready(js, channel)
        for kind, (req, _, _) in refused.items():
            await js.publish(channel.subjects.deliberate, as_json(req), headers={"X-Case": kind})
        await settled(js, channel)
        return await dead_letters(js, channel, len(refused))

    letters = with_nats(nats_url, body)
    assert len(letters) == len(refused)
    for letter in letters:
        entry = json.loads(letter.data)
        _, field, reason = refused[entry["headers"]["X-Case"]]
        assert (entry["field"], entry["reason"]) == (field, reason), entry
    assert client.llen(f"dramatiq:{data['routes'][1]['queue']}") == 2  # nothing more queued
    assert client.llen(f"dramatiq:{data['routes'][0]['queue']}") == 0


def run(command: List[str], env: Dict[str, str]) -> Tuple[int, str]:
    """Exit code and stderr of ``command``, in a session of its own: one that starts instead
    of refusing is killed with every process it forked."""
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True,
                               stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise AssertionError(f"{command} started instead of refusing") from None
    return process.returncode, stderr


def test_bridge_and_worker_refuse_to_start_with_one_line(tmp_path: Path, redis_url: str) -> None:
    """A bad routes file stops the bridge and the worker; an unknown route stops the worker
    (``--route`` and ``RAY_EXECUTOR_ROUTE``): one line naming the route and field, or the
    route and the known ones."""
    bad = routes_file(tmp_path / "bad.json", [
        {"name": "a", "queue": "qa", "match": {"default": True},
         "vllm": {"endpoints": [{"url": "http://x:8000/v1", "concurrency": 0}]}}])
    env = dict(os.environ, REDIS_URL=redis_url, RAY_ADDRESS=UNREACHABLE,
               RAY_EXECUTOR_GRPC_HOST="127.0.0.1", RAY_EXECUTOR_GRPC_PORT="0",
               RAY_EXECUTOR_METRICS_PORT="0", **bad)
    env.pop("VIRTUAL_ENV", None)
    why = f"{bad['RAY_EXECUTOR_ROUTES_FILE']}: route 'a': field " \
          "'vllm.endpoints[0].concurrency' must be an integer >= 1"
    for command, name in (([CLI, "bridge"], "bridge"), ([worker_python(), "-m", "actors"],
                                                        "worker")):
        code, stderr = run(command, env)
        assert code != 0 and stderr.strip().splitlines() == [f"ray-executor {name}: {why}"], \
            (name, stderr)
    good = routes_file(tmp_path / "good.json", [
        {"name": "a", "queue": "qa", "match": {"default": True},
         "vllm": {"endpoints": [{"url": "http://x:8000/v1"}]}}])
    unknown = "ray-executor worker: no route named 'nope' (routes: a)"
    for command, extra in (([CLI, "worker", "--worker-python", worker_python(), "--route",
                             "nope"], {}),
                           ([worker_python(), "-m", "actors"], {"RAY_EXECUTOR_ROUTE": "nope"})):
        code, stderr = run(command, {**env, **good, **extra})
        assert code == 2 and stderr.strip().splitlines() == [unknown], (command, stderr)
