"""The workers' broker settings: how far ahead a process reserves jobs, and how long an idle
consumer may pause between polls (real valkey)."""

from __future__ import annotations

import time
import uuid

from actors.__main__ import queue_prefetch
from actors.broker import WorkerBroker
from bridge.settings import Settings


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
