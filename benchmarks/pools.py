"""9. vLLM endpoint pools: jobs/s with 1, 2 and 4 stand-in endpoints of fixed capacity in a
route's pool, against the ideal (endpoints * capacity / latency); then one endpoint of four
answering 503 mid-run until its circuit opens."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from benchmarks.harness import Completions, CpuMeter, Stack, Standin, Store
from benchmarks.report import row

NAME = "pools"
TITLE = "9. vLLM endpoint pools"
CAPACITY = 4  # requests each stand-in serves at once, and its endpoint's concurrency
LATENCY = 0.5  # seconds of each answer
THREADS = 24  # one worker process's: more than the 16 slots of the largest pool
ROUTES = {1: "one", 2: "two", 4: "four"}  # pool size -> route whose pool it is
FAILURES = 3  # RAY_EXECUTOR_CIRCUIT_FAILURES of the run


def routes_file(stack: Stack, queue: str, standins: list[Standin]) -> str:
    """One route per pool size, each pool the first stand-ins; the first route the default."""
    routes = [{"name": name, "queue": queue if size == 1 else f"{queue}-{name}",
               "match": {"default": True} if size == 1 else {"models": [name]},
               "vllm": {"endpoints": [{"url": standin.url, "concurrency": CAPACITY}
                                      for standin in standins[:size]]}}
              for size, name in ROUTES.items()]
    path = stack.workdir / "pool-routes.json"
    path.write_text(json.dumps({"routes": routes}))
    return str(path)


def ideal(endpoints: int) -> float:
    return endpoints * CAPACITY / LATENCY


def fresh(standins: list[Standin]) -> None:
    for standin in standins:
        standin.reset()
        standin.control(capacity=CAPACITY)


async def throughput(store: Store, results: Completions, standins: list[Standin], size: int,
                     seconds: float) -> dict[str, Any]:
    """Jobs/s of a burst worth ``seconds`` at the pool's ideal rate, submit to last result."""
    fresh(standins)
    count = int(ideal(size) * seconds)
    started = time.perf_counter()
    ids = await store.submit(count, standins[0].url, {}, route=ROUTES[size])
    await results.wait(ids, 300)
    elapsed = max(results.done[did] for did in ids) - started
    stats = [standin.stats() for standin in standins[:size]]
    return {"endpoints": size, "count": count, "seconds": round(elapsed, 3),
            "jobs_per_s": round(count / elapsed, 2),
            "failed": len(results.failed & set(ids)),
            "completed_per_endpoint": [s["completed"] for s in stats],
            "peak_in_flight_per_endpoint": [s["peak_in_flight"] for s in stats]}


async def one_fails(store: Store, results: Completions, standins: list[Standin],
                    seconds: float) -> dict[str, Any]:
    """A burst over the pool of four; once a third of it is done, the last endpoint answers
    503 from then on. Jobs/s of the rest from that moment to the last result."""
    fresh(standins)
    count = int(ideal(4) * seconds)
    ids = await store.submit(count, standins[0].url, {}, route=ROUTES[4])
    while len(results.done.keys() & set(ids)) < count // 3:
        await asyncio.sleep(0.05)
    failing = standins[3]
    failing.control(status=503, fail_count=-1)
    switched = time.perf_counter()
    await results.wait(ids, 300)
    after = [results.done[did] for did in ids if results.done[did] > switched]
    elapsed = max(after) - switched
    calls = failing.stats()
    return {"count": count, "done_after_switch": len(after), "seconds": round(elapsed, 3),
            "jobs_per_s": round(len(after) / elapsed, 2),
            "failed": len(results.failed & set(ids)), "failing_errors": calls["errors"],
            "completed_per_endpoint": [standin.stats()["completed"] for standin in standins]}


async def measure(stack: Stack, env: dict[str, str], standins: list[Standin],
                  seconds: float) -> dict[str, Any]:
    results = await Completions().start(stack.nats.url)
    store = Store(env)
    try:
        warm = await store.submit(8, standins[0].url, {}, route=ROUTES[4])  # the runner
        await results.wait(warm, 180)
        with CpuMeter() as cpu:
            sizes = {size: await throughput(store, results, standins, size, seconds)
                     for size in ROUTES}
            failing = await one_fails(store, results, standins, 1.5 * seconds)
        return {"sizes": sizes, "one_fails": failing, "cpu": cpu.summary()}
    finally:
        await results.close()
        await store.close()


def run(stack: Stack, quick: bool, **_: Any) -> dict[str, Any]:
    seconds = 5.0 if quick else 8.0
    standins = [stack.standin(LATENCY) for _ in range(4)]
    env = stack.env(RAY_EXECUTOR_CIRCUIT_FAILURES=str(FAILURES),
                    RAY_EXECUTOR_CIRCUIT_COOLDOWN="300")  # no probe within the run
    env["RAY_EXECUTOR_ROUTES_FILE"] = routes_file(stack, env["RAY_EXECUTOR_QUEUE"], standins)
    workers = stack.workers(env, processes=1, threads=THREADS)
    try:
        measured = asyncio.run(measure(stack, env, standins, seconds))
    finally:
        workers.stop()
        for standin in standins:
            standin.proc.stop()
    sizes, failing = measured["sizes"], measured["one_fails"]
    rows = [row(f"{size} endpoint{'s' if size > 1 else ''} in the pool", "jobs/s",
                r["jobs_per_s"], ideal(size), "ideal (endpoints * capacity / latency)")
            for size, r in sizes.items()]
    rows.append(row("4 endpoints against 1", "jobs/s", sizes[4]["jobs_per_s"],
                    sizes[1]["jobs_per_s"], "1 endpoint (measured)", at_least=3.2))
    rows.append(row("one of 4 answering 503 mid-run: the rest, after it", "jobs/s",
                    failing["jobs_per_s"], ideal(3), "ideal of the other 3", at_least=0.8))
    rows.append(row("one of 4 answering 503 mid-run: failed jobs", "jobs", failing["failed"],
                    absolute=True, at_most=0))
    notes = [f"{size} endpoint(s): {r['count']} jobs in {r['seconds']} s; completed per "
             f"endpoint {r['completed_per_endpoint']}, stand-in peak in flight per endpoint "
             f"{r['peak_in_flight_per_endpoint']} (capacity {CAPACITY}); failed {r['failed']}."
             for size, r in sizes.items()]
    notes.append(f"One failing: {failing['count']} jobs over the pool of 4; "
                 f"{failing['done_after_switch']} finished after the 4th endpoint began "
                 f"answering 503, in {failing['seconds']} s; it answered "
                 f"{failing['failing_errors']} errors before its circuit opened (threshold "
                 f"{FAILURES}, each failed job retried elsewhere); completed per endpoint "
                 f"{failing['completed_per_endpoint']}; failed {failing['failed']}.")
    return {
        "what": f"Single-agent deliberations written straight to the state and queue for one "
                f"worker process ({THREADS} threads) whose routes file has three pools of "
                f"1, 2 and 4 stand-in endpoints; each stand-in serves {CAPACITY} requests at "
                f"once (`capacity`) with {LATENCY:g} s latency, and its endpoint's "
                f"concurrency is {CAPACITY}. Each burst is worth {seconds:g} s at its pool's "
                "ideal rate; first submit → last NATS result. Then a burst over the pool of "
                "4 during which the 4th endpoint starts answering 503 (once a third is done): "
                "jobs/s of the others from that moment to the last result.",
        "rows": rows,
        "notes": notes,
        "details": {"sizes": {str(size): r for size, r in sizes.items()},
                    "one_fails": failing},
        "cpu": {"all runs": measured["cpu"]},
    }
