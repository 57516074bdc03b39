"""``{node_ip}`` placement (``actors.runners``): a route naming ``vllm.node_resource`` has its
runners ask Ray for that resource, so they run only on nodes that advertise it, and a job
whose runner no node can take fails, within its time limit, with an error naming the
resource. Real workers, Redis, NATS and Ray heads; the stand-in LLM listens on the address
Ray reports as the node's IP (on loopback too, Ray replaces 127.0.0.1 by this machine's
outward address), so ``http://{node_ip}:PORT/v1`` reaches it from the runner."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from actors.runners import NODE_RESOURCE_SHARE
from core.settings import Settings
from core.store import DeliberationStore
from harness import servers
from harness.standin_llm import StandinThread, run_in_thread
from tests.conftest import cluster_python
from tests.waiting import until, until_async
from tests.worker.test_middleware import make_settings, run, submit, wait_final
from tests.worker.test_pools import pool_jobs
from tests.workers import WorkerGroup

pytestmark = pytest.mark.worker_env

RESOURCE = "vllm"


def node_ip() -> str:
    """The address a Ray node on this machine reports (``ray.util.get_node_ip_address``)."""
    from ray.util import get_node_ip_address

    return str(get_node_ip_address())


@pytest.fixture(scope="module")
def standin() -> Iterator[StandinThread]:
    with run_in_thread(host=node_ip(), model="standin-model") as server:
        yield server


@pytest.fixture(autouse=True)
def _fresh(standin: StandinThread) -> None:
    standin.reset()


def node_ip_url(standin: StandinThread) -> str:
    return f"http://{{node_ip}}:{standin.port}/v1"


def placed_settings(tmp_path: Path, redis_url: str, nats_url: str, ray_address: str,
                    url: str) -> Settings:
    """A worker of one route whose pool is ``url`` and whose runners need ``RESOURCE``."""
    probe = make_settings(redis_url, nats_url, ray_address)
    route = {"name": "gpu", "queue": probe.queue, "match": {"default": True},
             "vllm": {"endpoints": [{"url": url, "concurrency": 4}],
                      "node_resource": RESOURCE}}
    path = tmp_path / "routes.json"
    path.write_text(json.dumps({"routes": [route]}))
    return make_settings(redis_url, nats_url, ray_address, RAY_EXECUTOR_QUEUE=probe.queue,
                         RAY_EXECUTOR_ROUTES_FILE=str(path))


def held_resource(address: str) -> float:
    """How much of ``RESOURCE`` the head's actors hold now, read through a Ray client."""
    import ray

    with ray.init(address, namespace="placement-test"):
        # Both views are Ray's periodic reports: either may lack the resource a moment.
        total = ray.cluster_resources().get(RESOURCE, 0.0)
        return float(total - ray.available_resources().get(RESOURCE, total))


def test_a_node_ip_route_runs_its_runner_on_the_node_with_the_resource(
        redis_url: str, nats_url: str, standin: StandinThread, tmp_path: Path) -> None:
    ray_binary = str(Path(cluster_python()).parent / "ray")
    (tmp_path / "ray").mkdir()
    head = servers.ray_head(tmp_path / "ray", ray_binary, resources={RESOURCE: 1})
    head.start(timeout=120)
    settings = placed_settings(tmp_path, redis_url, nats_url, head.url, node_ip_url(standin))
    standin.control(hold=True)
    workers = WorkerGroup.with_settings(settings, tmp_path / "workers.log", sys.executable)

    async def scenario(store: DeliberationStore) -> Any:
        did = await submit(store, pool_jobs(1, "gpu", node_ip_url(standin)))
        await until_async(lambda: standin.stats()["in_flight"] == 1,
                          "the job's call held by the stand-in", 120)
        # Ray's view of available resources lags a little behind the placement.
        until(lambda: round(held_resource(head.url), 6) == NODE_RESOURCE_SHARE,
              "the runner holding its share of the resource")
        standin.control(hold=False)
        return await wait_final(store, did)

    try:
        record, agents = run(settings, scenario)
    finally:
        standin.control(hold=False)
        workers.stop()
        head.stop()
    assert record["status"] == "completed", agents
    assert standin.stats()["completed"] == 1
    assert "without vllm.node_resource" not in workers.log.read_text()


def test_a_job_whose_runner_no_node_can_take_fails_naming_the_resource(
        redis_url: str, nats_url: str, ray_address: str, standin: StandinThread,
        tmp_path: Path) -> None:
    """The session's head advertises no ``vllm``: the job ends within its time limit."""
    settings = placed_settings(tmp_path, redis_url, nats_url, ray_address, node_ip_url(standin))
    workers = WorkerGroup.with_settings(settings, tmp_path / "workers.log", sys.executable)
    limit = 8

    async def scenario(store: DeliberationStore) -> Any:
        did = await submit(store, pool_jobs(1, "gpu", node_ip_url(standin), timeout=limit,
                                            retries=0))
        return await wait_final(store, did, timeout=180)

    try:
        record, agents = run(settings, scenario)
    finally:
        workers.stop()
    (agent,) = agents
    assert record["status"] == "failed", agents
    assert agent["error_type"] == "unavailable", agent
    assert f"no Ray node advertises resource '{RESOURCE}'" in agent["error"], agent
    # The placement wait was the job's time limit, not the runners' longest (READY_TIMEOUT).
    assert f"(waited {limit} s)" in agent["error"], agent
    assert standin.stats()["requests"] == 0
    log = workers.log.read_text()
    assert f"not created at boot: no Ray node advertises resource '{RESOURCE}'" in log


def test_a_node_ip_route_without_a_node_resource_is_warned_about_at_start(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from actors.__main__ import serving

    def route(name: str, url: str, **vllm: str) -> Any:
        return {"name": name, "queue": f"q-{name}", "match": {"models": [name]},
                "vllm": {"endpoints": [{"url": url}], **vllm}}

    path = tmp_path / "routes.json"
    path.write_text(json.dumps({"routes": [
        route("bare", "http://{node_ip}:8000/v1"),
        route("placed", "http://{node_ip}:8000/v1", node_resource=RESOURCE),
        route("fixed", "http://vllm:8000/v1")]}))
    for name in ("bare", "placed", "fixed"):
        settings = Settings.from_env({"RAY_EXECUTOR_ROUTES_FILE": str(path),
                                      "RAY_EXECUTOR_ROUTE": name})
        with caplog.at_level("WARNING", logger="ray_executor.worker"):
            assert serving(settings).queue == f"q-{name}"
    warned = [r.getMessage() for r in caplog.records if "node_resource" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("route bare calls vLLM at {node_ip}"), warned
