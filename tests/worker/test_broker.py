"""The workers' broker settings: how far ahead a process reserves jobs, how long an idle
consumer may pause between polls, and that an ack refills a full prefetch and a submit wakes an
idle consumer, rather than their next poll (real valkey)."""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any, List, Optional

import dramatiq

from actors.__main__ import queue_prefetch
from actors.broker import WorkerBroker
from core import routes
from core.connections import connect
from core.contract import AgentJob
from core.keys import WAKE_CHANNEL
from core.settings import Settings
from core.store import DeliberationStore, new_deliberation_id
from tests.waiting import until


def prefetch(**values: Any) -> int:
    settings = Settings(**values)
    return queue_prefetch(settings, routes.implicit(settings))


def test_prefetch_is_the_process_share_of_the_vllm_limit() -> None:
    assert prefetch(vllm_concurrency=64, worker_processes=2) == 32
    assert prefetch(vllm_concurrency=6, worker_processes=4) == 2  # ceiling
    assert prefetch(vllm_concurrency=10_000, worker_processes=1,
                    worker_threads=8) == 16  # at most 2 x threads
    assert prefetch(vllm_concurrency=64, worker_prefetch=5) == 5  # explicit


def test_prefetch_of_a_pool_is_the_process_share_of_its_endpoints() -> None:
    pool = routes.Route(name="p", queue="q", ray_address="ray://r:1", endpoints=(
        routes.Endpoint("http://a/v1", 3), routes.Endpoint("http://b/v1", 6)), default=True)
    # 9 slots in the pool, not RAY_EXECUTOR_VLLM_CONCURRENCY's 64.
    assert queue_prefetch(Settings(vllm_concurrency=64, worker_processes=2), pool) == 5


class WatchedEvent(threading.Event):
    """A consumer's ``threading.Event`` that records each wait: how long it was allowed to
    last, and whether a ``set`` ended it (a wake-up) rather than the timeout (a poll)."""

    def __init__(self) -> None:
        super().__init__()
        self.timeouts: List[Optional[float]] = []
        self.woken: List[bool] = []
        self.entered = threading.Event()

    def wait(self, timeout: Optional[float] = None) -> bool:
        self.timeouts.append(timeout)
        self.entered.set()
        woken = super().wait(timeout)
        self.woken.append(woken)
        return woken


def test_an_idle_consumer_polls_at_most_every_poll_ms(redis_url: str) -> None:
    broker = WorkerBroker(url=redis_url, poll_ms=100, middleware=[])
    queue = f"q{uuid.uuid4().hex[:8]}"
    broker.declare_queue(queue)
    try:
        consumer = broker.consume(queue, prefetch=1, timeout=1000)  # Dramatiq's default
        assert consumer.timeout == 100
        consumer._woken = pause = WatchedEvent()  # what its idle pause waits on
        for _ in range(12):  # the backoff grows with every empty fetch
            assert next(consumer) is None
        assert len(pause.timeouts) == 12 and max(pause.timeouts) <= 0.1, pause.timeouts
    finally:
        broker.close()


# A poll far longer than any wake-up takes: a wait that a wake-up ended says so (``woken``).
LONG_POLL_MS = 60_000


def test_a_full_prefetch_is_refilled_as_soon_as_a_job_is_acked(redis_url: str) -> None:
    broker = WorkerBroker(url=redis_url, poll_ms=LONG_POLL_MS, middleware=[])
    queue = f"q{uuid.uuid4().hex[:8]}"
    broker.declare_queue(queue)
    for _ in range(3):
        broker.enqueue(dramatiq.Message(queue_name=queue, actor_name="a", args=(), kwargs={},
                                        options={}))
    try:
        consumer = broker.consume(queue, prefetch=1, timeout=LONG_POLL_MS)
        first = next(consumer)
        assert first is not None
        consumer._room = room = WatchedEvent()  # what a full prefetch waits on
        ack = threading.Thread(target=lambda: room.entered.wait(60) and consumer.ack(first))
        ack.start()
        assert next(consumer) is None  # full: waits for room, then returns to move delays
        second = next(consumer)
        ack.join()
        assert room.woken == [True], "the wait for room ended by the ack, not by its timeout"
        assert second is not None and second.message_id != first.message_id
    finally:
        broker.close()


def test_an_idle_consumer_wakes_when_a_submit_announces_its_queue(redis_url: str) -> None:
    broker = WorkerBroker(url=redis_url, poll_ms=LONG_POLL_MS, middleware=[])
    queue = f"q{uuid.uuid4().hex[:8]}"
    broker.declare_queue(queue)
    settings = Settings(redis_url=redis_url, queue=queue, key_prefix=f"t{queue}")
    try:
        subscribers = broker.client.pubsub_numsub(WAKE_CHANNEL)[0][1]
        consumer = broker.consume(queue, prefetch=1, timeout=LONG_POLL_MS)
        until(lambda: broker.client.pubsub_numsub(WAKE_CHANNEL)[0][1] > subscribers,
              "the broker's wake-up subscription")
        consumer.misses = 20  # long idle: the pause is now most of the 60 s poll
        consumer._woken = pause = WatchedEvent()
        submit = threading.Thread(
            target=lambda: pause.entered.wait(60) and submit_one(settings))
        submit.start()
        assert next(consumer) is None  # nothing yet: sleeps until the submit wakes it
        message = next(consumer)
        submit.join()
        assert pause.woken == [True], "the idle pause ended by the wake-up, not by its timeout"
        assert message is not None and message.kwargs["agent_id"] == "agent-0"
    finally:
        broker.close()


def submit_one(settings: Settings) -> None:
    async def main() -> None:
        client = connect(settings.redis_url)
        try:
            did = new_deliberation_id()
            record = {"id": did, "task_id": f"task-{did}", "role": "DEV", "story_id": "",
                      "plan_id": "", "vllm_url": "http://127.0.0.1:9/", "model": "m"}
            job = AgentJob(deliberation_id=did, task_id=record["task_id"], agent_id="agent-0",
                           agent_index=0, num_agents=1, role="DEV", model="m",
                           prompt_template="", task_description="d", task_role="DEV",
                           vllm_url="http://127.0.0.1:9/", timeout_seconds=30, max_retries=1)
            await DeliberationStore(client, settings).submit(f"task:{did}", record, [job])
        finally:
            await client.close()

    asyncio.run(main())
