"""6. Scaling: jobs/s with 1, 2 and 4 worker processes against the zero-latency stand-in."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from benchmarks.harness import CORES, Completions, CpuMeter, Stack, Standin, Store
from benchmarks.report import row

NAME = "scaling"
TITLE = "6. Scaling"
THREADS = 256  # RAY_EXECUTOR_WORKER_THREADS' default
LIMIT = 4 * THREADS  # the concurrency limit never binds: this measures the plumbing


async def measure(stack: Stack, env: dict[str, str], standin: Standin, processes: int,
                  count: int) -> dict[str, Any]:
    results = await Completions().start(stack.nats.url)
    store = Store(env)
    try:
        warm = await store.submit(16 * processes, standin.url, {})  # runners in each process
        await results.wait(warm, 180)
        submitted: dict[str, float] = {}
        with CpuMeter() as cpu:
            started = time.perf_counter()
            ids = await store.submit(count, standin.url, submitted)
            await results.wait(ids, 600)
        elapsed = max(results.done[did] for did in ids) - started
        return {"processes": processes, "count": count, "seconds": round(elapsed, 3),
                "jobs_per_s": round(count / elapsed, 1),
                "failed": len(results.failed & set(ids)), "cpu": cpu.summary()}
    finally:
        await results.close()
        await store.close()


def run(stack: Stack, quick: bool, **_: Any) -> dict[str, Any]:
    count = 300 if quick else 800
    standin = stack.standin(0.0)
    direct = stack.worker_script("benchmarks.ray_direct", "--url", standin.url, "--batch", "64",
                                 "throughput", str(count))
    ours: dict[int, dict[str, Any]] = {}
    for processes in (1, 2, 4):
        env = stack.env()
        workers = stack.workers(env, processes=processes, threads=THREADS, concurrency=LIMIT)
        try:
            ours[processes] = asyncio.run(measure(stack, env, standin, processes, count))
        finally:
            workers.stop()
    standin.proc.stop()
    rows = [row(f"{p} worker process{'es' if p > 1 else ''}", "jobs/s", r["jobs_per_s"],
                direct["jobs_per_s"], "direct Ray client (one connection)")
            for p, r in ours.items()]
    notes = [f"{p} process(es): machine {r['cpu']['machine_busy_pct']}% busy; "
             + ", ".join(f"{k} {v:g}%" for k, v in r["cpu"]["by_process_pct"].items())
             for p, r in ours.items()]
    return {
        "what": f"{count} single-agent deliberations written straight to the state and queue "
                "(`DeliberationStore.submit`) for a worker group of 1, 2 or 4 processes "
                f"({THREADS} threads each, `RAY_EXECUTOR_VLLM_CONCURRENCY={LIMIT}` so the "
                "limiter never refuses a job; see benchmark 3 for the default limit), stand-in "
                "LLM with zero latency, after a warm-up that creates each process's runner; "
                "first submit → last NATS result. Reference: the direct Ray client rate of "
                "benchmark 3's baseline, measured again here. The machine has "
                f"{CORES} cores: see the CPU shares below for where the machine, not the "
                "design, is the limit.",
        "rows": rows,
        "notes": notes,
        "details": {"ours": {str(p): r for p, r in ours.items()}, "direct": direct},
        "cpu": {f"{p} process(es)": r.pop("cpu") for p, r in ours.items()},
    }
