"""gRPC load: ExecuteDeliberation (one agent) at a fixed concurrency for a fixed time.

The same code drives our bridge and the bare echo server; it runs in its own process
(``python -m benchmarks.grpc_load --target HOST:PORT``) and prints one JSON line:
``{requests, errors, seconds, rps, p50_ms, p99_ms, answered}`` (``answered``: every
call answered ``submitted``, the warm-up's included, for the server's CPU per call).
``run`` is also used in-process by the end-to-end benchmark, with a callback receiving each
deliberation id and its submit time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import Callable

import grpc

from benchmarks.harness import percentile
from ray_executor.v1 import ray_executor_pb2 as pb
from ray_executor.v1 import ray_executor_pb2_grpc as rpc


def request(vllm_url: str = "http://127.0.0.1:9/") -> pb.ExecuteDeliberationRequest:
    return pb.ExecuteDeliberationRequest(
        task_id=f"bench-{uuid.uuid4().hex}", task_description="Design a rate limiter for the "
        "GPU queue", role="DEV",
        constraints=pb.TaskConstraints(story_id="S-1", plan_id="P-1", timeout_seconds=120,
                                       max_retries=2),
        agents=[pb.Agent(id="agent-0", role="DEV")], vllm_url=vllm_url,
        vllm_model="standin-model")


async def run(target: str, concurrency: int, *, seconds: float = 0.0, count: int = 0,
              warmup: float = 0.0, vllm_url: str = "http://127.0.0.1:9/",
              on_submitted: Callable[[str, float], None] | None = None) -> dict[str, float]:
    """Drive ``concurrency`` callers for ``seconds`` (or until ``count`` calls were made)."""
    latencies: list[float] = []
    errors = answered = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = rpc.RayExecutorServiceStub(channel)
        await channel.channel_ready()
        issued = 0
        measuring = False
        deadline = 0.0

        async def caller() -> None:
            nonlocal issued, errors, answered
            while True:
                if count and issued >= count:
                    return
                if not count and time.perf_counter() >= deadline:
                    return
                issued += 1
                started = time.perf_counter()
                try:
                    reply = await stub.ExecuteDeliberation(request(vllm_url), timeout=30)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                if reply.status != "submitted":
                    errors += 1
                    continue
                answered += 1
                if measuring:
                    latencies.append(time.perf_counter() - started)
                if on_submitted is not None:
                    on_submitted(reply.deliberation_id, started)

        if warmup:
            deadline = time.perf_counter() + warmup
            await asyncio.gather(*(caller() for _ in range(concurrency)))
        measuring, issued, errors = True, 0, 0
        begun = time.perf_counter()
        deadline = begun + seconds
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.perf_counter() - begun
    return {"requests": len(latencies), "errors": errors, "seconds": round(elapsed, 3),
            "rps": round(len(latencies) / elapsed, 1),
            "p50_ms": round(percentile(latencies, 50) * 1000, 2),
            "p99_ms": round(percentile(latencies, 99) * 1000, 2), "answered": answered}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    args = parser.parse_args()
    result = asyncio.run(run(args.target, args.concurrency, seconds=args.seconds,
                             warmup=args.warmup))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
