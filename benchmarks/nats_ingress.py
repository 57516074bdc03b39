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

from benchmarks.harness import Bridge, CpuMeter, Stack, agent_job, tag
from benchmarks.report import row
from core.dramatiq_internals import messages_key
from harness import servers

NAME = "nats"
TITLE = "2. NATS ingress"
WARMUP = 50
PUBLISH_CHUNK = 500
ROUNDS = 3  # alternated; a single-thread send's rate alone moved 1,757-3,350/s back to back


def payload() -> bytes:
    """The JSON form of a one-agent ExecuteDeliberationRequest."""
    return json.dumps({
        "task_id": f"bench-{uuid.uuid4().hex}", "task_description": "Design a rate limiter",
        "role": "DEV", "constraints": {"story_id": "S-1", "timeout_seconds": 120,
                                       "max_retries": 2},
        "agents": [{"id": "agent-0", "role": "DEV"}], "vllm_url": "http://127.0.0.1:9/",
        "vllm_model": "standin-model"}).encode()


def enqueued(client: redis.Redis, queue: str) -> int:
    return int(client.hlen(messages_key(queue)))


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


def replicas(stack: Stack, count: int) -> tuple[dict[str, str], list[Bridge]]:
    """``count`` bridges sharing one durable consumer, queue and key prefix. The stream is
    purged first: a new durable delivers everything still in the stream."""
    async def purge() -> None:
        nc = await nats.connect(stack.nats.url)
        try:
            await nc.jetstream().purge_stream("AGENT_COMMANDS")
        except nats.js.errors.NotFoundError:  # no bridge has created the streams yet
            pass
        finally:
            await nc.close()

    asyncio.run(purge())
    env = stack.env(RAY_EXECUTOR_NATS_INGRESS="true", RAY_EXECUTOR_NATS_CONSUMER=f"bench-{tag()}")
    return env, [stack.bridge(dict(env, RAY_EXECUTOR_GRPC_PORT=str(servers.free_port()),
                                   RAY_EXECUTOR_METRICS_PORT=str(servers.free_port())))
                 for _ in range(count)]


def run(stack: Stack, quick: bool, **_: Any) -> dict[str, Any]:
    count = 1000 if quick else 4000
    rounds = 1 if quick else ROUNDS
    phases = {"one": ("NATS ingress, 1 bridge", 1), "two": ("NATS ingress, 2 bridges", 2),
              "base": ("Dramatiq send", 0)}
    measured: dict[str, list[dict[str, Any]]] = {name: [] for name in phases}
    cpu: dict[str, Any] = {}
    for i in range(rounds):  # alternated: the machine's other load hits every side alike
        for name, (title, count_of_bridges) in phases.items():
            if count_of_bridges:
                env, bridges = replicas(stack, count_of_bridges)
                with CpuMeter() as meter:  # the bridges end outside it, so it counts them
                    measured[name].append(asyncio.run(ours(
                        stack.nats.url, stack.redis.url, env["RAY_EXECUTOR_QUEUE"], count)))
                for bridge in bridges:
                    bridge.proc.stop()
            else:
                with CpuMeter() as meter:
                    measured[name].append(bare(stack.redis.url, count))
            cpu[f"{title}, round {i + 1}"] = meter.summary()
    one, two, base = (max(measured[name], key=lambda r: r["rate"]) for name in phases)
    return {
        "what": f"{count} one-agent requests published with JetStream (`js.publish`, "
                f"{PUBLISH_CHUNK} awaited at a time) to `agent.cmd.deliberate`; the clock runs "
                "from the first publish until the last Dramatiq message is in the queue (HLEN "
                "of the queue's `.msgs` hash, polled every 5 ms), after a warm-up of "
                f"{WARMUP}. Through one bridge, and through two bridge replicas sharing the "
                "durable consumer (the target applies to one). Baseline: the same number of "
                "`actor.send(**kwargs)` of the same job kwargs, RedisBroker with Dramatiq's "
                f"default middleware, one thread, same Redis. {rounds} alternated round"
                f"{'s' if rounds > 1 else ''} of each; the table shows each side's best.",
        "rows": [row("publish → enqueued", "requests/s", one["rate"], base["rate"],
                     "Dramatiq send", at_least=0.8),
                 row("publish → enqueued, 2 bridge replicas", "requests/s", two["rate"],
                     base["rate"], "Dramatiq send")],
        "notes": ["Rates per round: one bridge " + _rates(measured["one"]) + "; two bridges "
                  + _rates(measured["two"]) + "; Dramatiq send " + _rates(measured["base"])
                  + ".",
                  f"Publishing alone took {one['publish_seconds']} s of the {one['seconds']} s "
                  f"in the best one-bridge round."],
        "details": measured,
        "cpu": cpu,
    }


def _rates(results: list[dict[str, Any]]) -> str:
    return ", ".join(f"{r['rate']:,.0f}" for r in results)
