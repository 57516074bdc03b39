"""3. End to end, trivial job: gRPC submit → worker → Ray job (zero-latency stand-in) → NATS
result, against the same Ray job called directly through one Ray client connection."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from benchmarks import grpc_load
from benchmarks.harness import (
    Completions,
    CpuMeter,
    RssSampler,
    Stack,
    percentile,
    worker_processes,
)
from benchmarks.report import row
from bridge.client import RayExecutorClient

NAME = "e2e"
TITLE = "3. End to end"
PROCESSES = 2
THREADS = 256  # RAY_EXECUTOR_WORKER_THREADS' default
CONCURRENCY = 64  # gRPC callers, and the direct baseline's batch size
WARMUP = 40
VARIANTS = {"default limit 64": None, "limit 512 (never binds)": PROCESSES * THREADS}


async def measure(stack: Stack, address: str, url: str, count: int, samples: int,
                  workers_pid: int) -> dict[str, Any]:
    results = await Completions().start(stack.nats.url)
    try:
        submitted: dict[str, float] = {}

        def note(did: str, at: float) -> None:
            submitted[did] = at

        await grpc_load.run(address, 16, count=WARMUP, vllm_url=url, on_submitted=note)
        await results.wait(list(submitted), 180)

        latencies = []  # one at a time: what our path adds to a job
        async with RayExecutorClient(address) as client:
            for _ in range(samples):
                started = time.perf_counter()
                reply = await client.execute_deliberation(
                    task_id=f"lat-{time.time_ns()}", task_description="Say something",
                    role="DEV", agents=[("agent-0", "DEV")], vllm_url=url,
                    vllm_model="standin-model", constraints={"timeout_seconds": 120})
                await results.wait([reply.deliberation_id], 60)
                latencies.append(results.done[reply.deliberation_id] - started)

        submitted.clear()
        pids = worker_processes(workers_pid)
        with CpuMeter() as cpu, RssSampler({"worker": pids}) as rss:
            await grpc_load.run(address, CONCURRENCY, count=count, vllm_url=url,
                                on_submitted=note)
            await results.wait(list(submitted), 600)
        first = min(submitted.values())
        last = max(results.done[did] for did in submitted)
        loaded = [results.done[did] - submitted[did] for did in submitted]
        return {
            "count": len(submitted), "failed": len(results.failed & submitted.keys()),
            "seconds": round(last - first, 3), "jobs_per_s": round(len(submitted) /
                                                                   (last - first), 1),
            "sequential_p50_ms": round(percentile(latencies, 50) * 1000, 2),
            "sequential_p99_ms": round(percentile(latencies, 99) * 1000, 2),
            "sequential_p90_ms": round(percentile(latencies, 90) * 1000, 2),
            "sequential_max_ms": round(max(latencies) * 1000, 2),
            "loaded_p50_ms": round(percentile(loaded, 50) * 1000, 1),
            "loaded_p99_ms": round(percentile(loaded, 99) * 1000, 1),
            "worker_peak_rss_mb": round(rss.peak.get("worker", 0), 1),
            "cpu": cpu.summary(),
        }
    finally:
        await results.close()


def run(stack: Stack, quick: bool, jobs: int = 0, **_: Any) -> dict[str, Any]:
    count = jobs or (300 if quick else 1000)
    samples = 30 if quick else 100
    standin = stack.standin(0.0)
    with CpuMeter() as cpu_direct:
        direct = stack.worker_script("benchmarks.ray_direct", "--url", standin.url, "--batch",
                                     str(CONCURRENCY), "throughput", str(count))
    direct_latency = stack.worker_script("benchmarks.ray_direct", "--url", standin.url,
                                         "latency", str(samples))
    ours: dict[str, dict[str, Any]] = {}
    for variant, limit in VARIANTS.items():
        env = stack.env(VLLM_URL=standin.url, VLLM_MODEL="standin-model")
        bridge = stack.bridge(env)
        workers = stack.workers(env, PROCESSES, THREADS, concurrency=limit)
        try:
            ours[variant] = asyncio.run(measure(stack, bridge.address, standin.url, count,
                                                samples, workers.pid))
        finally:
            workers.stop()
            bridge.proc.stop()
    standin.proc.stop()
    direct_name = "direct Ray client"
    rows = [row(f"throughput, {variant}", "jobs/s", r["jobs_per_s"], direct["jobs_per_s"],
                direct_name, at_least=0.5) for variant, r in ours.items()]
    for variant, r in ours.items():
        added_p50 = r["sequential_p50_ms"] - direct_latency["p50_ms"]
        added_p99 = r["sequential_p99_ms"] - direct_latency["p99_ms"]
        rows += [
            row(f"one job alone p50, {variant}", "ms", r["sequential_p50_ms"],
                direct_latency["p50_ms"], direct_name),
            row(f"one job alone p99, {variant}", "ms", r["sequential_p99_ms"],
                direct_latency["p99_ms"], direct_name),
            row(f"added latency p50, {variant}", "ms", added_p50, None, "", at_most=25,
                absolute=True),
            row(f"added latency p99, {variant}", "ms", added_p99, None, ""),
        ]
    notes = []
    for variant, r in ours.items():
        notes.append(
            f"{variant}: {r['count']} jobs in {r['seconds']} s, failed {r['failed']}; under "
            f"that load submit → result latency p50 {r['loaded_p50_ms']} ms, p99 "
            f"{r['loaded_p99_ms']} ms (mostly queueing); one job alone p90 "
            f"{r['sequential_p90_ms']} ms, max {r['sequential_max_ms']} ms; worker peak RSS "
            f"{r['worker_peak_rss_mb']} MB.")
    return {
        "what": f"{count} one-agent deliberations submitted over gRPC by {CONCURRENCY} "
                f"concurrent callers to a bridge with {PROCESSES} worker processes "
                f"({THREADS} threads each, the default), stand-in LLM with zero latency; the "
                "clock runs from the first submit to the last `agent.response.completed` "
                "received on NATS. Run twice: with every other setting at its default "
                "(`RAY_EXECUTOR_VLLM_CONCURRENCY=64`), and with a concurrency limit the "
                f"{PROCESSES}x{THREADS} threads cannot exceed, so the limiter never refuses a "
                "job. Baseline: the same job (the `vllm_agent` kind's function in an async "
                "Ray actor with the kind's Ray options, one call per job) called through one "
                "Ray client "
                f"connection in batches of {CONCURRENCY} (`benchmarks/ray_direct.py`). Added "
                f"latency: {samples} deliberations one at a time (submit → NATS result) minus "
                "the same number of single direct calls (`ray.get`).",
        "rows": rows,
        "notes": notes,
        "details": {"ours": ours, "direct": direct, "direct_latency": direct_latency},
        "cpu": {**{f"ours, {v} (load phase)": r.pop("cpu") for v, r in ours.items()},
                "direct Ray client": cpu_direct.summary()},
    }
