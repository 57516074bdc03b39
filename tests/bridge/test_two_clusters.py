"""Two Ray clusters of different Python and Ray versions on this machine at once (issue 19):
the default head (``.venv-cluster``, Python 3.9) and the newer one (``.venv-cluster-next``,
Python 3.13), each served by workers built for it, one bridge routing between them; and a
worker pointed at the other cluster's head refusing to start."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Dict

import grpc
import pytest
import redis

from bridge.client import RayExecutorClient
from core.keys import Keys
from harness import servers
from tests.clusters import DEFAULT, NEXT, ClusterVersion
from tests.waiting import until
from tests.workers import WorkerGroup


@pytest.fixture(scope="module")
def heads(ray_address: str, ray_head_next: servers.Server) -> Dict[ClusterVersion, str]:
    """Each cluster version's head: both run at once."""
    return {DEFAULT: ray_address, NEXT: ray_head_next.url}


@pytest.mark.slow  # two worker groups, one per cluster: about a minute on 2 cores
def test_one_bridge_routes_jobs_to_both_clusters(start_bridge: Any, start_worker: Any,
                                                 standin: Any,
                                                 heads: Dict[ClusterVersion, str],
                                                 tmp_path: Path) -> None:
    """Route ``next`` (its queue, the newer head, workers built for that head) takes requests
    whose metadata says ``cluster=next``; route ``old`` (the default head) those asking for
    ``old-model``. No default: a request neither names is refused at the ingress. Each
    deliberation completes, and each agent's result names the Python and Ray it ran on: its
    route's cluster's."""
    tag = uuid.uuid4().hex[:8]
    queues = {DEFAULT: f"old_{tag}", NEXT: f"next_{tag}"}
    endpoints = {"endpoints": [{"url": standin.url, "concurrency": 8}]}
    routes = {"routes": [
        {"name": "next", "queue": queues[NEXT], "ray_address": heads[NEXT],
         "match": {"metadata": {"cluster": "next"}}, "vllm": endpoints},
        {"name": "old", "queue": queues[DEFAULT], "ray_address": heads[DEFAULT],
         "match": {"models": ["old-model"]}, "vllm": endpoints}]}
    routes_file = tmp_path / "routes.json"
    routes_file.write_text(json.dumps(routes))
    bridge = start_bridge(RAY_EXECUTOR_ROUTES_FILE=str(routes_file), VLLM_URL=standin.url,
                          VLLM_MODEL="standin-model")
    # One group at a time: each head's client server gives every session a server of its own on
    # a port of one range (23000-24000) that every head on this machine picks from. Two
    # sessions starting at once on the two heads may pick the same port, and then one head's
    # client server forwards to the other head's (seen: the 3.13 worker refused as a client of
    # the 3.9 head it was not pointed at). A port held by a live session is skipped.
    for version, route in ((DEFAULT, "old"), (NEXT, "next")):
        # RAY_ADDRESS and the queue of the other cluster: only the route can send the group
        # to its own.
        other = NEXT if version is DEFAULT else DEFAULT
        group = start_worker(bridge, [version.worker_python(), "-m", "actors"],
                             RAY_ADDRESS=heads[other], RAY_EXECUTOR_QUEUE=queues[other],
                             RAY_EXECUTOR_ROUTE=route)
        until(lambda group=group: ray_connected(group), f"the {version} workers on Ray", 120)

    async def scenario() -> Dict[ClusterVersion, str]:
        asked = {}
        async with RayExecutorClient(bridge.address) as client:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.execute_deliberation(
                    task_id=f"two-clusters-none-{tag}", role="DEV", task_description="x",
                    vllm_model="standin-model", agents=[("dev-1", "DEV")])
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "no route takes model 'standin-model'" in str(refused.value.details())
            # By metadata to the newer cluster; by model to the default one.
            for version, model, metadata in ((NEXT, "standin-model", {"cluster": "next"}),
                                             (DEFAULT, "old-model", {})):
                submitted = await client.execute_deliberation(
                    task_id=f"two-clusters-{version.extra}-{tag}", role="DEV",
                    task_description="Plan the migration", vllm_model=model,
                    agents=[("dev-1", "DEV"), ("qa-1", "QA")],
                    constraints={"timeout_seconds": 60, "max_retries": 2,
                                 "metadata": metadata})
                asked[version] = submitted.deliberation_id
            for version, deliberation_id in asked.items():
                final = await client.wait(deliberation_id, timeout=180)
                assert (final.status, final.completed_agents) == ("completed", 2), \
                    (str(version), final)
                # GetDeliberationStatus says where each agent ran.
                assert {(r.metadata["python_version"].rsplit(".", 1)[0],
                         r.metadata["ray_version"]) for r in final.results} == \
                    {(version.minor, version.ray)}, (str(version), final.results)
        return asked

    asked = asyncio.run(scenario())
    state = redis.Redis.from_url(bridge.env["REDIS_URL"], decode_responses=True)
    for version, deliberation_id in asked.items():
        agents = [json.loads(a) for a in state.hvals(Keys(bridge.prefix).agents(deliberation_id))]
        ran_on = {(a["result"]["python_version"].rsplit(".", 1)[0], a["result"]["ray_version"])
                  for a in agents}
        assert ran_on == {(version.minor, version.ray)}, (str(version), ran_on)
    state.close()


def ray_connected(group: WorkerGroup) -> bool:
    """Whether the group's process says (its metrics) that it holds its Ray connection."""
    port = group.env["RAY_EXECUTOR_WORKER_METRICS_PORT"]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            return "ray_executor_ray_connected 1.0" in answer.read().decode()
    except OSError:  # not serving yet, or gone
        assert group.process.poll() is None, \
            f"worker group exited ({group.process.returncode}): {group.log.read_text()[-2000:]}"
        return False


@pytest.mark.parametrize(("worker", "head"), [(DEFAULT, NEXT), (NEXT, DEFAULT)], ids=str)
def test_a_worker_refuses_the_other_clusters_head(worker: ClusterVersion, head: ClusterVersion,
                                                  heads: Dict[ClusterVersion, str]) -> None:
    """The worker command built for one cluster, pointed at the other's head, refuses to start
    (exit 3) naming both sides' Python and Ray and what to change. The older Ray's client gets
    no version check from the newer cluster (its session fails to start first), so the
    cluster's Python comes from that failure and its Ray release goes unnamed."""
    env = dict(os.environ, RAY_ADDRESS=heads[head], REDIS_URL="redis://127.0.0.1:9/0",
               RAY_EXECUTOR_WORKER_METRICS_PORT=str(servers.free_port()))
    for _ in range(3):  # the head may fail to start a client server (a port another head
        # on this machine still holds: Ray picks them from one machine-wide range)
        run = subprocess.run([worker.worker_python(), "-m", "actors"], capture_output=True,
                             text=True, timeout=120, env=env)
        if "Starting Ray client server failed" not in run.stderr:
            break
    assert run.returncode == 3, run.stderr[-2000:]
    [message] = [line for line in run.stderr.splitlines()
                 if line.startswith("ray-executor worker: ")]
    cluster_ray = f"Ray {head.ray}" if head is DEFAULT else "a Ray release this worker's"
    assert f"runs {cluster_ray}" in message and f"on Python {head.minor}" in message, message
    assert f"this worker runs Ray {worker.ray} on Python {worker.minor}." in message, message
    assert f"run the worker on Python {head.minor} with " in message, message
    assert "RAY_ADDRESS" in message and "Traceback" not in run.stderr, run.stderr[-2000:]
