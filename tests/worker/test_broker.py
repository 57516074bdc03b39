"""The workers' broker settings: how far ahead a process reserves jobs, how long an idle
consumer may pause between polls, how soon a full prefetch is refilled, and how an idle
consumer wakes when a submit announces its queue (real valkey)."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import dramatiq

from actors.__main__ import queue_prefetch
from actors.broker import WorkerBroker
from core.connections import connect
from core.contract import AgentJob
from core.settings import Settings
from core.store import DeliberationStore, new_deliberation_id


def test_prefetch_is_the_process_share_of_the_vllm_limit() -> None:
    assert queue_prefetch(Settings(vllm_concurrency=64, worker_processes=2)) == 32
    assert queue_prefetch(Settings(vllm_concurrency=6, worker_processes=4)) == 2  # ceiling
    assert queue_prefetch(Settings(vllm_concurrency=10_000, worker_processes=1,
                                   worker_threads=8)) == 16  # at most 2 x threads
    assert queue_prefetch(Settings(vllm_concurrency=64, worker_prefetch=5)) == 5  # explicit


def test_an_idle_consumer_polls_at_most_every_poll_ms(redis_url: str) -> None:
    broker = WorkerBroker(url=redis_url, poll_ms=100, middleware=[])
    queue = f"q{uuid.uuid4().hex[:8]}"
    broker.declare_queue(queue)
    try:
        consumer = broker.consume(queue, prefetch=1, timeout=1000)  # Dramatiq's default
        assert consumer.timeout == 100
        pauses = []
        for _ in range(12):  # the backoff grows with every empty fetch
            started = time.monotonic()
            assert next(consumer) is None
            pauses.append(time.monotonic() - started)
        assert max(pauses) < 0.2, pauses
    finally:
        broker.close()


def test_a_full_prefetch_is_refilled_as_soon_as_a_job_is_acked(redis_url: str) -> None:
    broker = WorkerBroker(url=redis_url, poll_ms=1000, middleware=[])
    queue = f"q{uuid.uuid4().hex[:8]}"
    broker.declare_queue(queue)
    for _ in range(3):
        broker.enqueue(dramatiq.Message(queue_name=queue, actor_name="a", args=(), kwargs={},
                                        options={}))
    try:
        consumer = broker.consume(queue, prefetch=1, timeout=1000)
        first = next(consumer)
        assert first is not None
        consumer.misses = 20  # long idle: Dramatiq's own backoff would now pause 0.5-1 s
        threading.Timer(0.05, consumer.ack, args=(first,)).start()
        started = time.monotonic()
        while True:  # full: each call waits for room (or the 1 s poll), then fetches
            second = next(consumer)
            if second is not None:
                break
        waited = time.monotonic() - started
        assert second.message_id != first.message_id
        assert waited < 0.3, f"refilled {waited:.2f}s after the ack, not at once"
    finally:
        broker.close()


def test_an_idle_consumer_wakes_when_a_submit_announces_its_queue(redis_url: str) -> None:
    broker = WorkerBroker(url=redis_url, poll_ms=2000, middleware=[])
    queue = f"q{uuid.uuid4().hex[:8]}"
    broker.declare_queue(queue)
    settings = Settings(redis_url=redis_url, queue=queue, key_prefix=f"t{queue}")
    try:
        consumer = broker.consume(queue, prefetch=1, timeout=2000)
        consumer.misses = 20  # long idle: without a wake-up it sleeps up to 2 s per poll
        assert next(consumer) is None
        started = time.monotonic()
        threading.Timer(0.3, submit_one, args=(settings,)).start()
        while True:
            message = next(consumer)
            if message is not None:
                break
        waited = time.monotonic() - started - 0.3
        assert message.kwargs["agent_id"] == "agent-0"
        assert waited < 0.25, f"picked up {waited:.2f}s after the submit, not at once"
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
