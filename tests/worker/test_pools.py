"""vLLM endpoint pools (``actors.endpoints``, ``actors.limits``) with real workers, Redis, Ray
and NATS, stand-in LLMs as the endpoints: the least-loaded endpoint is chosen, an endpoint
whose circuit opened gets no more work, and each endpoint's own limit holds across worker
processes (read from the stand-ins' own in-flight peaks)."""

from __future__ import annotations

import dataclasses
import json
import sys
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest
import redis

from core import dramatiq_internals
from core.contract import AgentJob
from core.settings import Settings
from core.store import DeliberationStore
from harness.standin_llm import StandinThread, run_in_thread
from tests.waiting import until_async
from tests.worker.test_middleware import agent_jobs, make_settings, run, submit, wait_final
from tests.workers import WorkerGroup

pytestmark = pytest.mark.worker_env


@pytest.fixture(scope="module")
def standins() -> Iterator[List[StandinThread]]:
    servers = [run_in_thread(model="standin-model") for _ in range(4)]
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture(autouse=True)
def _fresh(standins: List[StandinThread]) -> None:
    for server in standins:
        server.reset()


def routes_file(path: Path, queue: str, pools: Dict[str, List[Tuple[str, int]]]) -> str:
    """A routes file of one route per pool (the first the default, on ``queue``)."""
    routes = [{"name": name, "queue": queue if number == 0 else f"{queue}-{name}",
               "match": {"default": True} if number == 0 else {"models": [name]},
               "vllm": {"endpoints": [{"url": url, "concurrency": concurrency}
                                      for url, concurrency in endpoints]}}
              for number, (name, endpoints) in enumerate(pools.items())]
    path.write_text(json.dumps({"routes": routes}))
    return str(path)


def pool_jobs(n: int, route: str, first_url: str, **extra: Any) -> List[AgentJob]:
    """``n`` agents of one deliberation as the ingress enqueues them for ``route``: its
    first endpoint's URL, its name."""
    return [dataclasses.replace(job, route=route)
            for job in agent_jobs(f"d-{uuid.uuid4().hex}", n, first_url, **extra)]


@pytest.fixture(scope="module")
def pooled(redis_url: str, nats_url: str, ray_address: str, standins: List[StandinThread],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """One worker process serving two routes' pools: ``least`` (stand-in 0 with 1 slot,
    stand-in 1 with 3) and ``failover`` (stand-ins 2 and 3, 2 slots each)."""
    folder = tmp_path_factory.mktemp("pools")
    probe = make_settings(redis_url, nats_url, ray_address)
    path = routes_file(folder / "routes.json", probe.queue, {
        "least": [(standins[0].url, 1), (standins[1].url, 3)],
        "failover": [(standins[2].url, 2), (standins[3].url, 2)]})
    settings = make_settings(redis_url, nats_url, ray_address, RAY_EXECUTOR_QUEUE=probe.queue,
                             RAY_EXECUTOR_ROUTES_FILE=path)
    workers = WorkerGroup.with_settings(settings, folder / "workers.log", sys.executable)
    yield settings
    workers.stop()


def in_flight(standins: List[StandinThread]) -> List[int]:
    return [server.stats()["in_flight"] for server in standins]


def test_a_job_takes_the_endpoint_with_the_most_free_slots(
        pooled: Settings, standins: List[StandinThread]) -> None:
    a, b = standins[:2]
    for server in (a, b):
        server.control(hold=True)

    async def scenario(store: DeliberationStore) -> Any:
        # B (3 free) beats A (1 free) for the first two; A is not touched.
        first = await submit(store, pool_jobs(2, "least", a.url))
        await until_async(lambda: in_flight([a, b]) == [0, 2], "two jobs held by B")
        # Then A and B have 1 free each (A, first in the pool, takes one), then only B.
        second = await submit(store, pool_jobs(2, "least", a.url))
        await until_async(lambda: in_flight([a, b]) == [1, 3], "A holding 1 and B 3")
        for server in (a, b):
            server.control(hold=False)
        return [await wait_final(store, did) for did in (first, second)]

    for record, agents in run(pooled, scenario):
        assert record["status"] == "completed", agents
        assert [agent["attempts"] for agent in agents] == [1, 1]
    assert (a.stats()["peak_in_flight"], b.stats()["peak_in_flight"]) == (1, 3)
    assert (a.stats()["completed"], b.stats()["completed"]) == (1, 3)


def test_an_open_circuit_moves_the_work_to_the_other_endpoints(
        pooled: Settings, standins: List[StandinThread]) -> None:
    failing, healthy = standins[2:]
    failing.control(status=503, fail_count=-1)
    threshold = 2
    options = {"circuit_failures": threshold, "circuit_cooldown": 300}
    client = redis.Redis.from_url(pooled.redis_url, decode_responses=True)
    circuit = f"{pooled.key_prefix}:circuit:{failing.url}"

    async def scenario(store: DeliberationStore) -> Any:
        # The pool's endpoints tie at first: the failing one (listed first) gets jobs until
        # its circuit opens; their retries and the rest go to the healthy one.
        first = await wait_final(store, await submit(
            store, pool_jobs(8, "failover", failing.url), **options))
        calls = failing.stats()["requests"]
        later = await wait_final(store, await submit(
            store, pool_jobs(6, "failover", failing.url), **options))
        return first, later, calls

    (record, agents), (later, later_agents), calls = run(pooled, scenario)
    assert record["status"] == "completed", agents
    assert float(client.hget(circuit, "opened_until") or 0) > 0, "the failing one's circuit"
    assert calls >= threshold and failing.stats()["errors"] == calls, failing.stats()
    # Each failed call cost its job one more attempt, and nothing else failed.
    assert sum(agent["attempts"] for agent in agents) == 8 + calls
    assert later["status"] == "completed", later_agents
    assert [agent["attempts"] for agent in later_agents] == [1] * 6
    assert failing.stats()["requests"] == calls, "no job of the open circuit's endpoint"
    assert healthy.stats()["completed"] == 8 + 6


@pytest.mark.slow  # about a minute on 2 cores
def test_each_endpoints_limit_holds_across_two_processes(
        redis_url: str, nats_url: str, ray_address: str, standins: List[StandinThread],
        tmp_path: Path) -> None:
    """Both stand-ins hold every request, so each endpoint's limit fills exactly whatever the
    machine's speed; the burst's other jobs are sent back, none past a limit."""
    a, b = standins[:2]
    limits = (2, 3)
    probe = make_settings(redis_url, nats_url, ray_address)
    path = routes_file(tmp_path / "routes.json", probe.queue,
                       {"burst": [(a.url, limits[0]), (b.url, limits[1])]})
    settings = make_settings(redis_url, nats_url, ray_address, RAY_EXECUTOR_QUEUE=probe.queue,
                             RAY_EXECUTOR_ROUTES_FILE=path, RAY_EXECUTOR_WORKER_PROCESSES="2",
                             RAY_EXECUTOR_WORKER_THREADS="8")
    for server in (a, b):
        server.control(hold=True)
    workers = WorkerGroup.with_settings(settings, tmp_path / "workers.log", sys.executable)
    delayed = dramatiq_internals.messages_key(dramatiq_internals.delay_queue(settings.queue))

    async def scenario(store: DeliberationStore) -> Any:
        await until_async(lambda: workers.log.read_text().count("Worker process is ready") >= 2,
                          "the two worker processes", 120)
        did = await submit(store, pool_jobs(16, "burst", a.url))
        await until_async(lambda: in_flight([a, b]) == list(limits),
                          "each endpoint's limit filled", 180)

        async def sent_back() -> bool:
            return int(await store.redis.hlen(delayed)) >= 4

        await until_async(sent_back, "jobs sent back by the limiter", 180)
        assert in_flight([a, b]) == list(limits)
        for server in (a, b):
            server.control(hold=False)
        return await wait_final(store, did, timeout=180)

    try:
        record, agents = run(settings, scenario)
    finally:
        for server in (a, b):
            server.control(hold=False)
        workers.stop()
    assert record["status"] == "completed", agents
    assert (a.stats()["peak_in_flight"], b.stats()["peak_in_flight"]) == limits
    assert a.stats()["completed"] + b.stats()["completed"] == 16
