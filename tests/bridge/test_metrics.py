"""The bridge's /metrics: queue depth (the HPA's metric) and counters move with the work."""

from __future__ import annotations

import contextlib
import re
import threading
import time
import urllib.error
import urllib.request

import dramatiq
import grpc
import pytest
import redis
from dramatiq.brokers.redis import RedisBroker

from core.logs import redact
from ray_executor.v1 import ray_executor_pb2 as pb
from tests.bridge.conftest import BridgeProcess, request, run_stock_worker
from tests.waiting import until


def scrape(bridge: BridgeProcess) -> str:
    port = bridge.env["RAY_EXECUTOR_METRICS_PORT"]
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}\{{{re.escape(wanted)}\}} (\S+)$" if labels else \
        rf"^{re.escape(name)} (\S+)$"
    match = re.search(pattern, text, re.M)
    assert match, f"{name}{{{wanted}}} not in metrics"
    return float(match.group(1))


def test_queue_depth_and_counters_move(bridge: BridgeProcess, redis_url: str) -> None:
    depth = lambda text: sample(  # noqa: E731
        text, "ray_executor_queue_depth", queue=bridge.queue, state="ready")
    before = scrape(bridge)
    assert depth(before) == 0
    stub = bridge.stub()
    for _ in range(2):
        stub.ExecuteDeliberation(request(agents=3))
    with contextlib.suppress(grpc.RpcError):  # refused: counted as invalid
        stub.ExecuteDeliberation(request(task_id=" "))
    after = scrape(bridge)
    assert depth(after) == 6
    assert sample(after, "ray_executor_ingress_requests_total", ingress="grpc",
                  outcome="submitted") == 2
    assert sample(after, "ray_executor_ingress_requests_total", ingress="grpc",
                  outcome="invalid") == 1
    assert sample(after, "ray_executor_redis_up") == 1

    done = run_stock_worker(RedisBroker(url=redis_url, middleware=[]), bridge.queue, 6)
    assert len(done) == 6 and depth(scrape(bridge)) == 0
    # A stock worker is not one of ours (none on the queue's list): degraded, saying why.
    with pytest.raises(urllib.error.HTTPError) as healthz:
        urllib.request.urlopen(
            f"http://127.0.0.1:{bridge.env['RAY_EXECUTOR_METRICS_PORT']}/healthz")
    assert healthz.value.code == 503
    assert b"no live worker on queue" in healthz.value.read()


def test_delayed_depth_counts_what_a_worker_holds(bridge: BridgeProcess, redis_url: str) -> None:
    """Dramatiq workers fetch delayed messages into memory until their time: the gauge (and
    GetStatus) must still count them, not only what is left in Redis's list."""
    broker = RedisBroker(url=redis_url, middleware=[])
    actor = dramatiq.actor(lambda **job: None, actor_name="vllm_agent",
                           queue_name=bridge.queue, broker=broker)
    for _ in range(2):
        actor.send_with_options(kwargs={"n": 1}, delay=60_000)
    delayed = lambda: sample(  # noqa: E731
        scrape(bridge), "ray_executor_queue_depth", queue=bridge.queue, state="delayed")
    assert delayed() == 2
    plain = redis.Redis.from_url(redis_url)
    worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        deadline = time.monotonic() + 20
        while plain.llen(f"dramatiq:{bridge.queue}.DQ") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert plain.llen(f"dramatiq:{bridge.queue}.DQ") == 0, "the worker took them"
        assert delayed() == 2
        status = bridge.stub().GetStatus(pb.GetStatusRequest(include_stats=True))
        assert status.stats.delayed_messages == 2
    finally:
        worker.stop()
        broker.close()


def test_route_pending_jobs_count_ready_and_running_against_capacity(
        bridge: BridgeProcess, redis_url: str) -> None:
    """The autoscalers' metric: a job a worker is running is still pending work (a new pod
    could not take it, but it occupies the route), so it stays counted until acked."""
    pending = lambda: sample(  # noqa: E731
        scrape(bridge), "ray_executor_route_pending_jobs", route="default")
    assert pending() == 0
    assert sample(scrape(bridge), "ray_executor_route_capacity", route="default") == \
        int(bridge.env.get("RAY_EXECUTOR_VLLM_CONCURRENCY", "64"))
    bridge.stub().ExecuteDeliberation(request(agents=3))
    assert pending() == 3
    broker = RedisBroker(url=redis_url, middleware=[])
    started, release = threading.Event(), threading.Event()

    def hold(**job: object) -> None:
        started.set()
        release.wait(60)

    dramatiq.actor(hold, actor_name="vllm_agent", queue_name=bridge.queue, broker=broker)
    worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        assert started.wait(30), "the worker took a job"
        assert sample(scrape(bridge), "ray_executor_queue_depth", queue=bridge.queue,
                      state="ready") < 3, "one job left the ready list"
        assert pending() == 3, "running and prefetched jobs are still pending"
        release.set()
        until(lambda: pending() == 0, "every job acked")
    finally:
        release.set()
        worker.stop()
        broker.close()


def test_circuit_state_per_endpoint(bridge: BridgeProcess, redis_url: str) -> None:
    """What the workers' circuit breakers record (``actors.circuit``), as a gauge per endpoint;
    credentials in an endpoint's URL never reach a label."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    prefix = f"{bridge.prefix}:circuit:"
    now = int(time.time() * 1000)
    failing, wobbly = "http://user:s3cret@vllm-a:8000/v1|m", "http://vllm-b:8000/v1|m"
    client.hset(prefix + failing, mapping={"failures": 5, "opened_until": now + 60_000})
    client.hset(prefix + wobbly, mapping={"failures": 2})  # failures, still closed
    client.set(prefix + failing + ":probe", "message-id")  # a probe's lock, not an endpoint
    text = scrape(bridge)
    assert sample(text, "ray_executor_circuit_open", endpoint=redact(failing)) == 1
    assert sample(text, "ray_executor_circuit_open", endpoint=wobbly) == 0
    assert text.count("ray_executor_circuit_open{") == 2 and "s3cret" not in text
    client.hset(prefix + failing, "opened_until", now - 1)  # its cooldown is over
    assert sample(scrape(bridge), "ray_executor_circuit_open", endpoint=redact(failing)) == 0
