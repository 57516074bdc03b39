"""Worker middleware against a misbehaving stand-in vLLM, with real Redis, Ray and NATS:
backoff honouring Retry-After, no retry for 400, time limits that cancel the Ray task,
cancellation mid-flight, the circuit breaker, and the distributed concurrency limit."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Set

import pytest
import redis
from redis.asyncio import Redis

from core import dramatiq_internals
from core.contract import AgentJob
from core.settings import Settings
from core.store import DeliberationStore
from harness.standin_behaviour import MARKER
from harness.standin_llm import run_in_thread
from tests.nats_events import Recorder
from tests.waiting import until, until_async
from tests.workers import WorkerGroup, worker_settings

pytestmark = pytest.mark.worker_env


class Standin:
    def __init__(self) -> None:
        self.server = run_in_thread(model="standin-model")
        self.url = self.server.url

    def control(self, **behaviour: Any) -> None:
        body = json.dumps(behaviour).encode()
        urllib.request.urlopen(urllib.request.Request(
            f"{self.url}/control", data=body, headers={"Content-Type": "application/json"}))

    def stats(self) -> Dict[str, int]:
        return json.loads(urllib.request.urlopen(f"{self.url}/stats").read())


@pytest.fixture
def standin() -> Iterator[Standin]:
    server = Standin()
    yield server
    server.server.stop()


def make_settings(redis_url: str, nats_url: str, ray_address: str, **extra: str) -> Settings:
    backoff = {"RAY_EXECUTOR_BACKOFF_MIN": "0.1", "RAY_EXECUTOR_BACKOFF_MAX": "5"}
    return worker_settings(redis_url, nats_url, ray_address, **dict(backoff, **extra))


@pytest.fixture
def start_workers(tmp_path: Path) -> Iterator[Any]:
    started: List[WorkerGroup] = []

    def start(settings: Settings) -> WorkerGroup:
        workers = WorkerGroup.with_settings(settings, tmp_path / f"workers-{len(started)}.log",
                                            sys.executable)
        started.append(workers)
        return workers

    yield start
    for workers in started:
        workers.stop()


def agent_jobs(deliberation_id: str, n: int, url: str, *, timeout: int = 30,
               retries: int = 5) -> List[AgentJob]:
    return [AgentJob(
        deliberation_id=deliberation_id, task_id=f"task-{deliberation_id}", agent_id=f"a{i}",
        agent_index=i, num_agents=n, role="DEV", model="standin-model", prompt_template="",
        task_description="Say something", task_role="DEV", vllm_url=url,
        timeout_seconds=timeout, max_retries=retries) for i in range(n)]


def run(settings: Settings, coroutine_factory: Any) -> Any:
    async def main() -> Any:
        client = Redis.from_url(settings.redis_url, decode_responses=True)
        try:
            return await coroutine_factory(DeliberationStore(client, settings))
        finally:
            await client.close()
    return asyncio.run(main())


async def submit(store: DeliberationStore, jobs: List[AgentJob], **options: Any) -> str:
    deliberation_id = jobs[0].deliberation_id
    await store.submit(deliberation_id, {"id": deliberation_id, "task_id": "t"}, jobs, options)
    return deliberation_id


def queued_or_running(settings: Settings) -> int:
    """Messages of ``settings``' queue and delay queue not yet acked."""
    client = redis.Redis.from_url(settings.redis_url)
    try:
        return sum(client.hlen(dramatiq_internals.messages_key(queue)) for queue in
                   (settings.queue, dramatiq_internals.delay_queue(settings.queue)))
    finally:
        client.close()


async def wait_final(store: DeliberationStore, deliberation_id: str, timeout: float = 120
                     ) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        record, agents = await store.get(deliberation_id)  # type: ignore[misc]
        if record["status"] in ("completed", "failed", "cancelled"):
            return record, agents
        assert time.monotonic() < deadline, (record, agents)
        await asyncio.sleep(0.2)


async def three_slow_agents(store: DeliberationStore, standin: Standin, in_flight: int,
                            **options: Any) -> str:
    """Submit a deliberation of three agents whose calls take a minute; return its id once
    ``in_flight`` of them are calling the stand-in."""
    standin.control(latency=60)
    did = await submit(store, agent_jobs(f"d-{uuid.uuid4().hex}", 3, standin.url,
                                         timeout=120), **options)
    deadline = time.monotonic() + 60
    while standin.stats()["in_flight"] < in_flight:
        assert time.monotonic() < deadline, standin.stats()
        await asyncio.sleep(0.2)
    return did


@pytest.fixture
def base(redis_url: str, nats_url: str, ray_address: str) -> Any:
    return lambda **extra: make_settings(redis_url, nats_url, ray_address, **extra)


@pytest.fixture(scope="module")
def shared(redis_url: str, nats_url: str, ray_address: str,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """One worker group for the tests that need no settings of their own (each test talks to
    its own stand-in, so their endpoints, limits and circuits are apart)."""
    settings = make_settings(redis_url, nats_url, ray_address)
    workers = WorkerGroup.with_settings(
        settings, tmp_path_factory.mktemp("shared") / "workers.log", sys.executable)
    yield settings
    workers.stop()


@pytest.mark.slow  # about a minute on 2 cores
def test_429_storm_backs_off_honours_retry_after_and_completes(
        shared: Settings, standin: Standin) -> None:
    settings = shared
    standin.control(status=429, fail_count=6, retry_after=1)

    async def scenario(store: DeliberationStore) -> Any:
        did = await submit(store, agent_jobs(f"d-{uuid.uuid4().hex}", 3, standin.url))
        final = await wait_final(store, did)
        return final, [e async for e in store.events(did) if e["event"] == "agent_started"]

    (record, agents), starts = run(settings, scenario)
    assert record["status"] == "completed", agents
    assert sum(a["attempts"] for a in agents) == 3 + 6
    assert standin.stats()["errors"] == 6
    assert len(starts) == 3 + 6
    gaps = []  # between an agent's consecutive attempts: its call, then the delay
    for agent in agents:
        times = [e["time_ms"] for e in starts if e["agent_id"] == agent["agent_id"]]
        gaps += [later - earlier for earlier, later in zip(times, times[1:])]
    assert len(gaps) == 6 and min(gaps) >= 1000, gaps  # every retry waited Retry-After (1 s)


def test_503_then_recovery_and_400_is_not_retried(
        shared: Settings, standin: Standin) -> None:
    settings = shared
    standin.control(status=503, fail_count=2)

    async def recovering(store: DeliberationStore) -> Any:
        return await wait_final(store, await submit(
            store, agent_jobs(f"d-{uuid.uuid4().hex}", 2, standin.url)))

    record, agents = run(settings, recovering)
    assert record["status"] == "completed"
    assert sum(a["attempts"] for a in agents) == 4

    standin.control(status=400, fail_count=-1)
    before = standin.stats()["requests"]
    record, agents = run(settings, recovering)
    assert record["status"] == "failed"
    for agent in agents:
        assert (agent["error_type"], agent["retryable"], agent["attempts"]) == (
            "bad_request", False, 1)
    assert standin.stats()["requests"] - before == 2  # one call each, no retry


def test_a_reset_connection_is_retried_and_a_garbage_answer_fails_once(
        shared: Settings, standin: Standin) -> None:
    settings = shared

    async def two_agents(store: DeliberationStore) -> Any:
        return await wait_final(store, await submit(
            store, agent_jobs(f"d-{uuid.uuid4().hex}", 2, standin.url)))

    standin.control(reset=True, fail_count=2)
    record, agents = run(settings, two_agents)
    assert record["status"] == "completed", agents
    assert sum(a["attempts"] for a in agents) == 4  # both resets retried

    standin.control(garbage=True, fail_count=-1)
    record, agents = run(settings, two_agents)
    assert record["status"] == "failed"
    for agent in agents:  # a 200 that is not JSON: retrying would get the same
        assert (agent["error_type"], agent["retryable"], agent["attempts"]) == (
            "invalid_response", False, 1)


def test_a_streamed_answer_is_measured_and_a_stream_cut_mid_way_is_retried(
        shared: Settings, standin: Standin) -> None:
    """Through the worker and Ray: the answer comes streamed; a connection closed after the
    first piece is retried like a reset; time to first token and tokens per second land in
    the worker's /metrics under the job's endpoint and the model that answered."""
    settings = shared
    standin.control(piece_chars=6, piece_delay=0.01, break_after=1, fail_count=1)

    async def scenario(store: DeliberationStore) -> Any:
        return await wait_final(store, await submit(
            store, agent_jobs(f"d-{uuid.uuid4().hex}", 2, standin.url)))

    record, agents = run(settings, scenario)
    assert record["status"] == "completed", agents
    assert sum(a["attempts"] for a in agents) == 3  # the cut stream retried once
    assert standin.stats()["errors"] == 1 and standin.stats()["completed"] == 2
    for agent in agents:
        result = agent["result"]
        assert result["content"].startswith(MARKER), result
        assert result["tokens"] == result["usage"]["completion_tokens"] > 2
        assert result["ttft_ms"] > 10 and result["tokens_per_second"] > 0  # a piece per 10 ms

    labels = f'{{endpoint="{standin.url}",model="standin-model"}}'

    def counts() -> Dict[str, float]:
        text = urllib.request.urlopen(
            f"http://127.0.0.1:{settings.worker_metrics_port}/metrics", timeout=5).read().decode()
        found = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                 if line.endswith(" 2.0") and labels in line}
        return found if len(found) == 2 else {}

    assert set(until(counts, "both histograms counting the two calls", timeout=30)) == {
        f"ray_executor_vllm_time_to_first_token_seconds_count{labels}",
        f"ray_executor_vllm_tokens_per_second_count{labels}"}


def test_retries_used_up_fail_the_agent_and_dead_letter_its_message(
        shared: Settings, standin: Standin) -> None:
    settings = shared
    standin.control(status=503, fail_count=-1)  # never recovers

    async def scenario(store: DeliberationStore) -> Any:
        return await wait_final(store, await submit(
            store, agent_jobs(f"d-{uuid.uuid4().hex}", 1, standin.url, retries=2)))

    record, [agent] = run(settings, scenario)
    assert record["status"] == "failed"
    assert (agent["status"], agent["error_type"], agent["retryable"], agent["attempts"]) == (
        "failed", "unavailable", True, 3)  # the first attempt and both retries
    assert standin.stats()["errors"] == 3
    plain = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    dead = [json.loads(m) for m in plain.hvals(f"dramatiq:{settings.queue}.XQ.msgs")]
    assert [m["options"]["retries"] for m in dead
            if m["kwargs"]["deliberation_id"] == record["id"]] == [2], "in Dramatiq's DLQ"


def test_a_hung_call_times_out_and_its_ray_task_is_cancelled(
        shared: Settings, standin: Standin) -> None:
    settings = shared
    standin.control(hang=True)

    async def scenario(store: DeliberationStore) -> Any:
        return await wait_final(store, await submit(
            store, agent_jobs(f"d-{uuid.uuid4().hex}", 2, standin.url, timeout=3)))

    record, agents = run(settings, scenario)
    assert record["status"] == "failed"
    assert {a["error_type"] for a in agents} == {"timeout"}
    deadline = time.monotonic() + 20
    while standin.stats()["cancelled"] < 2:  # the cluster closed the hung requests
        assert time.monotonic() < deadline, standin.stats()
        time.sleep(0.2)
    assert standin.stats()["in_flight"] == 0


def test_cancelling_a_deliberation_stops_its_running_ray_tasks(
        shared: Settings, standin: Standin) -> None:
    settings = shared

    async def scenario(store: DeliberationStore) -> Any:
        did = await three_slow_agents(store, standin, in_flight=3)
        assert await store.cancel(did, "test") == (True, "cancelled")
        return await wait_final(store, did)

    record, _ = run(settings, scenario)
    assert record["status"] == "cancelled"
    deadline = time.monotonic() + 20
    while standin.stats()["cancelled"] < 3:
        assert time.monotonic() < deadline, standin.stats()
        time.sleep(0.2)


def test_cancelling_skips_queued_jobs_and_publishes_cancelled_once(
        shared: Settings, standin: Standin, recorder: Recorder) -> None:
    settings = shared

    async def scenario(store: DeliberationStore) -> Any:
        # One slot for this deliberation's endpoint: one agent runs, two wait their turn.
        did = await three_slow_agents(store, standin, in_flight=1, concurrency_limit=1)
        assert await store.cancel(did, "no longer needed") == (True, "cancelled")
        return await wait_final(store, did)

    record, agents = run(settings, scenario)
    assert record["status"] == "cancelled"
    assert [a["status"] for a in agents] == ["cancelled"] * 3
    # Once all three messages are acked (the waiting two came back from the limiter and were
    # skipped), no job of the deliberation can call vLLM any more.
    until(lambda: queued_or_running(settings) == 0, "the three messages handled")
    stats = standin.stats()
    assert stats["requests"] == 1, stats  # the two queued jobs never called vLLM
    events = recorder.final(record["id"], 2, settings)  # submitted, after its 5 s lease
    cancelled = [m for m in events if m.subject == "orchestration.deliberation.cancelled"]
    assert len(cancelled) == 1, [m.subject for m in events]
    body = json.loads(cancelled[0].data)
    assert body["status"] == "cancelled" and body["reason"] == "no longer needed"


def sent_back_by_the_circuit(settings: Settings, deliberation_id: str) -> Set[str]:
    """Agents of the deliberation whose message waits in the delay queue longer than any retry
    backoff (``RAY_EXECUTOR_BACKOFF_MAX``): only an open circuit sends a job back that far."""
    client = redis.Redis.from_url(settings.redis_url)
    try:
        delayed = [json.loads(m) for m in client.hvals(dramatiq_internals.messages_key(
            dramatiq_internals.delay_queue(settings.queue)))]
    finally:
        client.close()
    now_ms = time.time() * 1000
    return {m["kwargs"]["agent_id"] for m in delayed
            if m["kwargs"]["deliberation_id"] == deliberation_id
            and m["options"]["eta"] - now_ms > settings.backoff_max * 1000}


def test_the_circuit_opens_on_failures_and_closes_on_recovery(
        shared: Settings, standin: Standin) -> None:
    settings = shared  # the threshold and cooldown come as per-message overrides
    standin.control(status=503, fail_count=-1)
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    circuit = f"{settings.key_prefix}:circuit:{standin.url}"
    # An open circuit sends a job back for half to all of the cooldown: 6 s or more, past the
    # longest retry backoff (5 s), so the delay queue tells its waits from retries.
    cooldown = 12

    async def scenario(store: DeliberationStore) -> Any:
        did = await submit(store, agent_jobs(f"d-{uuid.uuid4().hex}", 3, standin.url,
                                             retries=20), circuit_failures=3,
                           circuit_cooldown=cooldown)
        sent_back: Set[str] = set()  # each is seen that far back for a second at least

        def each_sent_back() -> bool:
            sent_back.update(sent_back_by_the_circuit(settings, did))
            return sent_back == {"a0", "a1", "a2"}

        await until_async(each_sent_back, "each of the three jobs sent back by the circuit")
        # No job can call until the cooldown ends (each was sent back, and so is every one
        # asking again meanwhile), and nothing but a call can move its end.
        cooldown_end = float(client.hget(circuit, "opened_until") or 0)
        standin.control(status=200, fail_count=0)  # the probe after the cooldown succeeds
        calls = standin.stats()["requests"]

        def cooldown_over() -> bool:
            now_calls = standin.stats()["requests"]  # read before the clock: a call it counts
            if time.time() * 1000 >= cooldown_end:  # came before the cooldown ended
                return True
            assert now_calls == calls, \
                f"{now_calls - calls} calls to vLLM while its circuit was open"
            return False

        await until_async(cooldown_over, "the cooldown to end")
        # After it, one probe goes through, succeeds and closes the circuit.
        return await wait_final(store, did, timeout=90)

    record, _ = run(settings, scenario)
    assert record["status"] == "completed"
    assert not client.exists(circuit), "a successful probe closes the circuit"


@pytest.mark.slow
def test_the_request_rate_limit_spreads_calls_over_windows(
        base: Any, standin: Standin, start_workers: Any) -> None:
    settings = base(RAY_EXECUTOR_VLLM_RATE_LIMIT="2", RAY_EXECUTOR_VLLM_RATE_WINDOW="1")
    start_workers(settings)

    async def scenario(store: DeliberationStore) -> Any:
        did = await submit(store, agent_jobs(f"d-{uuid.uuid4().hex}", 6, standin.url))
        final = await wait_final(store, did)
        return final, [e["time_ms"] async for e in store.events(did)
                       if e["event"] == "agent_started"]

    (record, agents), starts = run(settings, scenario)
    assert record["status"] == "completed", agents
    assert [a["attempts"] for a in agents] == [1] * 6  # a refusal uses no attempt or retry
    assert standin.stats()["requests"] == 6
    # 6 calls at 2 per 1 s window take three windows: the last starts a window after the
    # first window ended, at least.
    assert max(starts) - min(starts) >= 1000, sorted(starts)


@pytest.mark.slow  # about a minute on 2 cores
def test_the_concurrency_limit_holds_across_four_processes(
        base: Any, standin: Standin, start_workers: Any) -> None:
    """The stand-in holds every request, so the limit fills exactly whatever the machine's
    speed: six in flight, the other jobs sent back by the limiter, none past it; once
    released, every job completes."""
    limit = 6
    settings = base(RAY_EXECUTOR_VLLM_CONCURRENCY=str(limit),
                    RAY_EXECUTOR_WORKER_PROCESSES="4", RAY_EXECUTOR_WORKER_THREADS="8")
    standin.control(hold=True, latency=0.2)
    workers = start_workers(settings)
    delayed = dramatiq_internals.messages_key(dramatiq_internals.delay_queue(settings.queue))

    async def scenario(store: DeliberationStore) -> Any:
        deadline = time.monotonic() + 120
        while workers.log.read_text().count("Worker process is ready") < 4:
            assert time.monotonic() < deadline, "the four worker processes did not start"
            await asyncio.sleep(0.5)
        did = await submit(store, agent_jobs(f"d-{uuid.uuid4().hex}", 24, standin.url))
        await until_async(lambda: standin.stats()["in_flight"] == limit,
                          f"{limit} requests held by the stand-in", 180)
        # The others reach the limiter and are sent back to wait, never to the stand-in.
        async def sent_back() -> bool:
            return int(await store.redis.hlen(delayed)) >= limit

        await until_async(sent_back, f"{limit} jobs sent back by the limiter", 180)
        assert standin.stats()["requests"] == limit, standin.stats()
        standin.control(hold=False)
        return await wait_final(store, did, timeout=180)

    record, _ = run(settings, scenario)
    assert record["status"] == "completed"
    stats = standin.stats()
    assert stats["peak_in_flight"] == limit and stats["completed"] == 24, stats
