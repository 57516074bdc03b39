"""2. NATS ingress: publish → enqueued, against bare Dramatiq ``send`` on the same Redis."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import dramatiq
import nats
import redis
from dramatiq.brokers.redis import RedisBroker

from benchmarks.harness import CpuMeter, Stack, agent_job, tag
from benchmarks.report import row
from bridge.state import queue_key

NAME = "nats"
TITLE = "2. NATS ingress"
WARMUP = 50
PUBLISH_CHUNK = 500


def payload() -> bytes:
    """The JSON form of a one-agent ExecuteDeliberationRequest."""
    return json.dumps({
        "task_id": f"bench-{uuid.uuid4().hex}", "task_description": "Design a rate limiter",
        "role": "DEV", "constraints": {"story_id": "S-1", "timeout_seconds": 120,
                                       "max_retries": 2},
        "agents": [{"id": "agent-0", "role": "DEV"}], "vllm_url": "http://127.0.0.1:9/",
        "vllm_model": "standin-model"}).encode()


def enqueued(client: redis.Redis, queue: str) -> int:
    return int(client.hlen(queue_key(queue) + ".msgs"))


async def ours(nats_url: str, redis_url: str, queue: str, count: int) -> dict[str, Any]:
    client = redis.Redis.from_url(redis_url)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()

    async def publish(n: int) -> None:
        bodies = [payload() for _ in range(n)]
        for start in range(0, n, PUBLISH_CHUNK):
            await asyncio.gather(*(js.publish("agent.cmd.deliberate", body)
                                   for body in bodies[start:start + PUBLISH_CHUNK]))

    async def until(total: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while enqueued(client, queue) < total:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{enqueued(client, queue)} of {total} enqueued")
            await asyncio.sleep(0.005)

    try:
        deadline = time.monotonic() + 30
        while True:  # the bridge creates the streams once it is connected
            try:
                await js.stream_info("AGENT_COMMANDS")
                break
            except nats.js.errors.NotFoundError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        await publish(WARMUP)  # the consumer binds and warms up
        await until(WARMUP, 60)
        started = time.perf_counter()
        await publish(count)
        published = time.perf_counter() - started
        await until(WARMUP + count, 120)
        elapsed = time.perf_counter() - started
    finally:
        await nc.close()
        client.close()
    return {"count": count, "seconds": round(elapsed, 3), "rate": round(count / elapsed, 1),
            "publish_seconds": round(published, 3)}


def bare(redis_url: str, count: int) -> dict[str, Any]:
    """Dramatiq's own ``send`` (RedisBroker, default middleware, one actor), one thread."""
    queue = f"bare{tag()}"
    broker = RedisBroker(url=redis_url)
    actor = dramatiq.actor(lambda **kwargs: None, actor_name="vllm_agent", queue_name=queue,
                           broker=broker)
    kwargs = agent_job("delib-bare", "http://127.0.0.1:9/").to_kwargs()
    for _ in range(WARMUP):
        actor.send(**kwargs)
    started = time.perf_counter()
    for _ in range(count):
        actor.send(**kwargs)
    elapsed = time.perf_counter() - started
    client = redis.Redis.from_url(redis_url)
    assert enqueued(client, queue) == WARMUP + count
    client.close()
    broker.close()
    return {"count": count, "seconds": round(elapsed, 3), "rate": round(count / elapsed, 1)}


def run(stack: Stack, quick: bool, **_: Any) -> dict[str, Any]:
    count = 1000 if quick else 4000
    env = stack.env(RAY_EXECUTOR_NATS_INGRESS="true",
                    RAY_EXECUTOR_NATS_CONSUMER=f"bench-{tag()}")
    bridge = stack.bridge(env)
    with CpuMeter() as cpu_ours:
        mine = asyncio.run(ours(stack.nats.url, stack.redis.url, env["RAY_EXECUTOR_QUEUE"],
                                count))
    bridge.proc.stop()
    with CpuMeter() as cpu_base:
        base = bare(stack.redis.url, count)
    return {
        "what": f"{count} one-agent requests published with JetStream (`js.publish`, "
                f"{PUBLISH_CHUNK} awaited at a time) to `agent.cmd.deliberate`; the clock runs "
                "from the first publish until the last Dramatiq message is in the queue (HLEN "
                "of the queue's `.msgs` hash, polled every 5 ms), after a warm-up of "
                f"{WARMUP}. Baseline: the same number of `actor.send(**kwargs)` of the same "
                "job kwargs, RedisBroker with Dramatiq's default middleware, one thread, same "
                "Redis.",
        "rows": [row("publish → enqueued", "requests/s", mine["rate"], base["rate"],
                     "Dramatiq send", at_least=0.8)],
        "notes": [f"Publishing alone took {mine['publish_seconds']} s of the "
                  f"{mine['seconds']} s."],
        "details": {"ours": mine, "baseline": base},
        "cpu": {"NATS ingress": cpu_ours.summary(), "Dramatiq send": cpu_base.summary()},
    }
