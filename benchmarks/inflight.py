"""4. In-flight concurrency: N jobs of 1 s, limit N, one worker process, against the same N
calls awaited together through one Ray client connection, and against the ideal 1 s."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from benchmarks.harness import (
    Completions,
    CpuMeter,
    RssSampler,
    Stack,
    Standin,
    Store,
    worker_processes,
)
from benchmarks.report import row

NAME = "inflight"
TITLE = "4. In-flight concurrency"
LATENCY = 1.0


async def measure(stack: Stack, env: dict[str, str], standin: Standin, n: int,
                  workers_pid: int) -> dict[str, Any]:
    results = await Completions().start(stack.nats.url)
    store = Store(env)
    try:
        warm = await store.submit(2, standin.url, {})  # creates the process's runner
        await results.wait(warm, 180)
        standin.reset()
        submitted: dict[str, float] = {}
        with CpuMeter() as cpu, RssSampler({"worker": worker_processes(workers_pid)}) as rss:
            started = time.perf_counter()
            ids = await store.submit(n, standin.url, submitted, concurrency=256)
            enqueued = time.perf_counter() - started
            await results.wait(ids, 300)
        elapsed = max(results.done[did] for did in ids) - started
        return {"n": n, "elapsed_s": round(elapsed, 3), "enqueue_s": round(enqueued, 3),
                "failed": len(results.failed & set(ids)),
                "standin_peak_in_flight": standin.stats()["peak_in_flight"],
                "worker_peak_rss_mb": round(rss.peak.get("worker", 0), 1), "cpu": cpu.summary()}
    finally:
        await results.close()
        await store.close()


def run(stack: Stack, quick: bool, **_: Any) -> dict[str, Any]:
    sizes = [64, 256] if quick else [64, 256, 1024]
    standin = stack.standin(LATENCY)
    with CpuMeter() as cpu_direct:
        direct = stack.worker_script("benchmarks.ray_direct", "--url", standin.url, "inflight",
                                     *map(str, sizes))
    ours: dict[int, dict[str, Any]] = {}
    for n in sizes:
        env = stack.env()
        workers = stack.workers(env, processes=1, threads=n, concurrency=n)
        try:
            ours[n] = asyncio.run(measure(stack, env, standin, n, workers.pid))
        finally:
            workers.stop()
    standin.proc.stop()
    rows = []
    for n in sizes:
        mine, base = ours[n]["elapsed_s"], direct["elapsed_s"][str(n)]
        rows.append(row(f"N={n}: elapsed", "s", mine, base, "direct Ray client (asyncio)",
                        at_most=1.25 if n == 256 else None))
        rows.append(row(f"N={n}: elapsed vs ideal", "s", mine, LATENCY, "ideal (1 s)"))
    notes = [f"Direct Ray client, N={n}: {direct['elapsed_s'][str(n)]} s "
             f"({direct['elapsed_s'][str(n)] / LATENCY:.2f}x the ideal)." for n in sizes]
    notes += [f"Ours, N={n}: {r['elapsed_s']} s, of which enqueueing the {n} jobs took "
              f"{r['enqueue_s']} s; stand-in peak in flight {r['standin_peak_in_flight']}; "
              f"worker peak RSS {r['worker_peak_rss_mb']} MB; failed {r['failed']}."
              for n, r in ours.items()]
    notes.append("The `vllm_agent` runner (and the direct baseline's actor, given the same "
                 "Ray options) is declared with `max_concurrency=10000` (`actors/jobs.py`, "
                 "`job_kind`), so every N here can be in flight at once. Ours hands the "
                 "runner the jobs of a moment in one call and collects outcomes with one "
                 "long poll (`actors/runners.py`); the baseline makes one call per job.")
    return {
        "what": "N single-agent deliberations written straight to the state and queue "
                "(`DeliberationStore.submit`, 256 at a time) for one worker process with N "
                "threads and `RAY_EXECUTOR_VLLM_CONCURRENCY=N`; stand-in LLM latency "
                f"{LATENCY:g} s. The clock runs from the first submit to the last "
                "`agent.response.completed` on NATS; the worker had finished a warm-up job "
                "first (Ray connected, runner created). Baseline: the same N calls to an async "
                "Ray actor with the kind's function and Ray options, one call per job, "
                "awaited with `asyncio.gather` through one Ray client connection "
                "(`benchmarks/ray_direct.py inflight`).",
        "rows": rows,
        "notes": notes,
        "details": {"ours": {str(n): r for n, r in ours.items()}, "direct": direct},
        "cpu": {**{f"ours N={n}": r.pop("cpu") for n, r in ours.items()},
                "direct Ray client (all N)": cpu_direct.summary()},
    }
