"""Operators' views per route from a real bridge and Redis: deliberations listed by route
(``ListDeliberations.route``, ``ray-executor list --route``) and each route's queue, workers,
endpoints and circuits (``GetRoutes``, ``ray-executor routes``)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import types
from pathlib import Path
from typing import Callable, Dict, List

import redis

from actors.runtime import WorkerRuntime
from bridge.client import RayExecutorClient
from core.connections import connect
from core.contract import AgentJob
from core.keys import Keys
from core.logs import redact
from core.settings import Settings
from core.store import DeliberationStore
from ray_executor.v1 import operations_pb2 as ops
from tests.bridge.conftest import CLI, BridgeProcess, request
from tests.bridge.test_listing import submit_many
from tests.bridge.test_metrics import Breakers

FIRST, SECOND, OTHER = ("http://user:s3cret@vllm-a:8000/v1", "http://vllm-b:8000/v1",
                        "http://vllm-c:8000/v1")


def two_routes(start_bridge: Callable[..., BridgeProcess], tmp_path: Path) -> BridgeProcess:
    """A bridge with routes ``pool`` (model m-pool; endpoints FIRST of 2 slots and SECOND of
    3) and ``rest`` (the default, on RAY_EXECUTOR_QUEUE: the route of records naming none)."""
    queue = f"rest-{tmp_path.name}"[:40]
    path = tmp_path / "routes.json"
    path.write_text(json.dumps({"routes": [
        {"name": "pool", "queue": f"pool-{tmp_path.name}"[:40], "match": {"models": ["m-pool"]},
         "vllm": {"endpoints": [{"url": FIRST, "concurrency": 2},
                                {"url": SECOND, "concurrency": 3}]}},
        {"name": "rest", "queue": queue, "match": {"default": True},
         "vllm": {"endpoints": [{"url": OTHER}]}}]}))
    return start_bridge(RAY_EXECUTOR_ROUTES_FILE=str(path), RAY_EXECUTOR_QUEUE=queue)


def submit(bridge: BridgeProcess, model: str, count: int) -> List[str]:
    stub = bridge.stub()
    return [stub.ExecuteDeliberation(request(agents=1, vllm_model=model, vllm_url=""))
            .deliberation_id for _ in range(count)]


def listed(bridge: BridgeProcess, **filters: str) -> List[ops.DeliberationSummary]:
    async def main() -> List[ops.DeliberationSummary]:
        async with RayExecutorClient(bridge.address) as client:
            return list((await client.deliberations(page_size=500, **filters)).deliberations)

    return asyncio.run(main())


def beat(bridge: BridgeProcess, client: redis.Redis, queue: str) -> None:
    """One worker process's heartbeat on ``queue``, as ``WorkerRuntime`` announces it."""
    runtime = types.SimpleNamespace(keys=Keys(bridge.prefix), settings=Settings(
        key_prefix=bridge.prefix, queue=queue, worker_heartbeat_timeout=600))
    broker = types.SimpleNamespace(broker_id="worker-1", client=client)
    WorkerRuntime._announce(runtime, broker, int(time.time() * 1000))  # type: ignore[arg-type]


def start_one(bridge: BridgeProcess, client: redis.Redis, queue: str) -> None:
    """One job of ``queue`` begun with the store's own start script, as a worker begins it
    (its agent running, until it finishes)."""
    kwargs = json.loads(next(iter(client.hvals(f"dramatiq:{queue}.msgs"))))["kwargs"]

    async def start() -> None:
        connection = connect(bridge.env["REDIS_URL"])
        try:
            store = DeliberationStore(connection, Settings.from_env(bridge.env))
            assert (await store.start(AgentJob.from_kwargs(kwargs), 0))[0] == "run"
        finally:
            await connection.close()

    asyncio.run(start())


def test_listing_by_route(start_bridge: Callable[..., BridgeProcess], redis_url: str,
                          tmp_path: Path) -> None:
    bridge = two_routes(start_bridge, tmp_path)
    pooled, rest = submit(bridge, "m-pool", 3), submit(bridge, "test-model", 2)
    older = submit(bridge, "test-model", 1)[0]
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.hdel(Keys(bridge.prefix).deliberation(older), "route")  # as recorded before routes
    client.close()

    assert sorted(d.deliberation_id for d in listed(bridge, route="pool")) == sorted(pooled)
    assert {d.route for d in listed(bridge, route="pool")} == {"pool"}
    by_route = listed(bridge, route="rest")
    assert sorted(d.deliberation_id for d in by_route) == sorted([*rest, older])
    assert {d.route for d in by_route} == {"rest"}  # the old one's: its queue's route
    assert listed(bridge, route="rest", model="m-pool") == []
    assert listed(bridge, route="nowhere") == []
    assert len(submit_many(bridge, 2)) == 2  # the stock request: model test-model, route rest
    assert len(listed(bridge, route="rest")) == 5

    def cli(*args: str) -> List[str]:
        done = subprocess.run([CLI, "list", *args], env=bridge.env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()

    lines = cli("--route", "pool")
    assert sorted(line.split()[0] for line in lines) == sorted(pooled)
    assert all(line.endswith(" route=pool") for line in lines), lines
    assert [line.split()[0] for line in cli("--route", "rest", "--model", "test-model")
            if line.split()[0] in pooled] == []


def test_routes_show_queues_workers_slots_and_circuits(
        start_bridge: Callable[..., BridgeProcess], redis_url: str, tmp_path: Path) -> None:
    bridge = two_routes(start_bridge, tmp_path)
    submit(bridge, "m-pool", 3)
    submit(bridge, "test-model", 1)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    pool_queue = json.loads(Path(bridge.env["RAY_EXECUTOR_ROUTES_FILE"]).read_text()
                            )["routes"][0]["queue"]
    beat(bridge, client, pool_queue)
    start_one(bridge, client, pool_queue)
    breakers = Breakers(bridge, redis_url)
    breakers.fail(FIRST, 3)  # open for ten minutes
    breakers.fail(OTHER, 1)  # a failure recorded, still closed
    # A job holding a slot of SECOND (taken as a worker's limiter takes it, not yet released).
    breakers.limiter.before_process_message(breakers.broker, breakers.job(SECOND, 600))

    async def main() -> ops.GetRoutesResponse:
        async with RayExecutorClient(bridge.address) as grpc_client:
            return await grpc_client.routes()

    asked_ms = time.time() * 1000
    found: Dict[str, ops.RouteState] = {r.name: r for r in asyncio.run(main()).routes}
    answered_ms = time.time() * 1000
    pool, rest = found["pool"], found["rest"]
    assert (pool.queue, pool.ready, pool.workers, pool.running) == (pool_queue, 3, 1, 1)
    assert (rest.ready, rest.workers) == (1, 0)
    first, second = pool.endpoints
    assert (first.url, first.circuit, first.failures) == (redact(FIRST), "open", 3)
    # What is left of the cooldown the breaker recorded, as of the moment the bridge answered.
    opened_until = float(client.hget(Keys(bridge.prefix).circuit_index, FIRST))
    assert (opened_until - answered_ms) / 1000 <= first.open_for_seconds \
        <= (opened_until - asked_ms) / 1000
    assert (second.circuit, second.in_use, second.concurrency) == ("closed", 1, 3)
    assert (rest.endpoints[0].circuit, rest.endpoints[0].failures) == ("closed", 1)

    done = subprocess.run([CLI, "routes"], env=bridge.env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == (f"route pool (queue {pool_queue}): 1 workers, 3 ready, 0 delayed, "
                        "0 dead, 1 running"), lines
    assert lines[1].startswith(f"  {redact(FIRST)}: 0/2 slots, circuit open for "), lines
    assert lines[2] == f"  {SECOND}: 1/3 slots, circuit closed (0 failures)", lines
    assert lines[3].startswith("route rest ") and " 0 workers, 1 ready," in lines[3], lines
    assert "s3cret" not in done.stdout
    client.close()
