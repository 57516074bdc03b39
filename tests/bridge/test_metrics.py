"""The bridge's /metrics: queue depth (the HPA's metric) and counters move with the work."""

from __future__ import annotations

import contextlib
import json
import re
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, List, Tuple

import dramatiq
import grpc
import pytest
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.brokers.stub import StubBroker

from actors.backoff import RetryJob
from actors.circuit import CircuitBreaker
from actors.limits import ConcurrencyLimiter
from core.logs import redact
from core.settings import Settings
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
        until(lambda: plain.llen(f"dramatiq:{bridge.queue}.DQ") == 0, "the worker taking them",
              timeout=20)
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


class RedisCalls:
    """What ``ConcurrencyLimiter`` and ``CircuitBreaker`` ask of the worker's runtime: their
    Redis calls, here on a plain client (the runtime itself needs a booted worker process and
    Ray)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def eval(self, source: str, keys: List[str], args: List[Any]) -> Any:
        return self.client.eval(source, len(keys), *keys, *args)

    def redis(self, *commands: Tuple[Any, ...]) -> List[Any]:
        return [self.client.execute_command(*command) for command in commands]

    def redis_soon(self, *commands: Tuple[Any, ...], failed: str = "") -> None:
        self.redis(*commands)


class Breakers:
    """The workers' limiter and circuit breaker (``actors.limits``, ``actors.circuit``) driven
    through their middleware hooks as a worker's jobs would, each URL a fixed endpoint, on the
    bridge's key prefix; three failures open a circuit."""

    def __init__(self, bridge: BridgeProcess, redis_url: str) -> None:
        settings = Settings(redis_url=redis_url, key_prefix=bridge.prefix, circuit_failures=3)
        calls = RedisCalls(redis.Redis.from_url(redis_url, decode_responses=True))
        self.limiter = ConcurrencyLimiter(settings, calls)  # type: ignore[arg-type]
        self.breaker = CircuitBreaker(settings, calls, self.limiter.chosen)  # type: ignore
        self.broker = StubBroker(middleware=[])
        dramatiq.actor(lambda **job: None, actor_name="vllm_agent", broker=self.broker)

    def job(self, url: str, cooldown: float) -> dramatiq.Message:
        return dramatiq.Message(queue_name="default", actor_name="vllm_agent", args=(),
                                kwargs={"vllm_url": url, "model": "m"},
                                options={"circuit_cooldown": cooldown})

    def attempt(self, message: dramatiq.Message, exception: Any = None) -> None:
        self.limiter.before_process_message(self.broker, message)  # takes the endpoint
        self.breaker.after_process_message(self.broker, message, exception=exception)
        self.limiter.after_process_message(self.broker, message, exception=exception)

    def fail(self, url: str, times: int, cooldown: float = 600) -> None:
        for _ in range(times):
            self.attempt(self.job(url, cooldown), RetryJob("HTTP 503", delay=100,
                                                           error_type="unavailable"))


def test_circuit_state_per_endpoint(bridge: BridgeProcess, redis_url: str) -> None:
    """What the workers' circuit breaker records (``actors.circuit``, driven through the
    limiter's and its own middleware hooks as a worker's jobs would), as a gauge per endpoint;
    credentials in an endpoint's URL never reach a label."""
    breakers = Breakers(bridge, redis_url)
    fail, attempt, job = breakers.fail, breakers.attempt, breakers.job
    failing, wobbly, cooling = ("http://user:s3cret@vllm-a:8000/v1", "http://vllm-b:8000/v1",
                                "http://vllm-c:8000/v1")
    fail(failing, 3)  # open for the next ten minutes
    fail(wobbly, 1)  # a failure recorded, still closed
    fail(cooling, 3, cooldown=3)  # open for 3 s; its record lasts ten times that
    text = scrape(bridge)
    assert sample(text, "ray_executor_circuit_open", endpoint=redact(failing)) == 1
    assert sample(text, "ray_executor_circuit_open", endpoint=wobbly) == 0
    assert text.count("ray_executor_circuit_open{") == 3 and "s3cret" not in text
    # GetStatus names each open circuit (credentials redacted), until its cooldown is over.
    message = bridge.stub().GetStatus(pb.GetStatusRequest()).message
    assert f"vLLM endpoint {redact(failing)}: circuit open for " in message, message
    assert f"vLLM endpoint {cooling}: circuit open" in message, message
    assert wobbly not in message and "s3cret" not in message, message
    until(lambda: sample(scrape(bridge), "ray_executor_circuit_open",
                         endpoint=cooling) == 0, "the 3 s cooldown over on the gauge")
    message = bridge.stub().GetStatus(pb.GetStatusRequest()).message
    assert cooling not in message and f"{redact(failing)}: circuit open" in message, message
    # Its cooldown over, a probe's success closes it: the endpoint leaves the gauge.
    attempt(job(cooling, 3))  # half-open: this one goes through as the probe
    text = scrape(bridge)
    assert f'endpoint="{cooling}"' not in text
    assert text.count("ray_executor_circuit_open{") == 2, text


def test_a_route_whose_endpoints_all_have_open_circuits_is_named(
        start_bridge: Callable[..., BridgeProcess], redis_url: str, tmp_path: Path) -> None:
    """GetStatus says so for a route once every endpoint of its pool has an open circuit;
    one endpoint open of two leaves the route able to serve."""
    first, second, other = ("http://vllm-a:8000/v1", "http://vllm-b:8000/v1",
                            "http://vllm-c:8000/v1")
    path = tmp_path / "routes.json"
    path.write_text(json.dumps({"routes": [
        {"name": "pool", "queue": f"pool-{tmp_path.name}", "match": {"models": ["m"]},
         "vllm": {"endpoints": [{"url": first}, {"url": second}]}},
        {"name": "rest", "queue": f"rest-{tmp_path.name}", "match": {"default": True},
         "vllm": {"endpoints": [{"url": other}]}}]}))
    bridge = start_bridge(RAY_EXECUTOR_ROUTES_FILE=str(path))
    breakers = Breakers(bridge, redis_url)

    def message() -> str:
        return bridge.stub().GetStatus(pb.GetStatusRequest()).message

    breakers.fail(first, 3)
    assert f"vLLM endpoint {first}: circuit open" in message()
    assert "every vLLM endpoint" not in message(), message()
    breakers.fail(second, 3)
    assert "route 'pool': every vLLM endpoint's circuit is open" in message(), message()
    assert "route 'rest': every" not in message(), message()
