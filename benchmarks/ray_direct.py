"""The bare Ray baseline: the same agent job, called directly through one Ray client connection.

Runs in the worker environment (Python 3.9 + Ray; keep it 3.9-compatible)::

    python -m benchmarks.ray_direct --url http://127.0.0.1:PORT latency 50
    python -m benchmarks.ray_direct --url ... throughput 1000 --batch 64
    python -m benchmarks.ray_direct --url ... inflight 64 256 1024
    python -m benchmarks.ray_direct --url ... idle 0       # only its memory

It creates one async Ray actor with the ``vllm_agent`` kind's function and Ray options, as a
worker's runner has, and calls it the plain way: one ``.remote()`` per job, its result fetched
per call (``ray.get`` of a batch, or awaited with asyncio). It prints one JSON line with the
measurements.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid
from typing import Any, Dict, List

import ray

from cluster import agents  # noqa: F401  (registers the vllm_agent kind)
from cluster.kinds import KINDS
from core.contract import VLLM_AGENT, AgentJob


class DirectRunner:
    """The bare actor: one call, one job (pickled by value, as this runs as ``__main__``)."""

    def __init__(self, function: Any) -> None:
        self.function = function

    async def run(self, job: AgentJob) -> Dict[str, Any]:
        return await self.function(job)  # type: ignore[no-any-return]

    def ready(self) -> bool:
        return True


def job(url: str) -> AgentJob:
    did = "direct-" + uuid.uuid4().hex
    return AgentJob(deliberation_id=did, task_id="task-" + did, agent_id="a0", agent_index=0,
                    num_agents=1, role="DEV", model="standin-model", prompt_template="",
                    task_description="Design a rate limiter for the GPU queue", task_role="DEV",
                    vllm_url=url, timeout_seconds=120, max_retries=2)


def pct(values: List[float], q: float) -> float:
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def rss_mb() -> float:
    """This process's resident memory (a bare Ray client holding one runner), in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True, help="the stand-in LLM")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("mode", choices=["idle", "latency", "throughput", "inflight"])
    parser.add_argument("counts", type=int, nargs="+")
    args = parser.parse_args()

    connect_started = time.perf_counter()
    for attempt in range(3):  # a loaded head sometimes fails to start a client server
        try:
            ray.init(os.environ["RAY_ADDRESS"], namespace="bench-direct",
                     logging_level="WARNING")
            break
        except ConnectionError:
            if attempt == 2:
                raise
            time.sleep(3)
    kind = KINDS[VLLM_AGENT]
    runner = ray.remote(DirectRunner).options(**kind.ray_options).remote(kind.function)
    ray.get(runner.ready.remote())
    ray.get([runner.run.remote(job(args.url)) for _ in range(8)])  # warm: HTTP pool, code
    out: Dict[str, Any] = {"connect_and_runner_s": round(time.perf_counter() - connect_started,
                                                         3)}

    if args.mode == "latency":
        latencies = []
        for _ in range(args.counts[0]):
            started = time.perf_counter()
            ray.get(runner.run.remote(job(args.url)))
            latencies.append(time.perf_counter() - started)
        out.update(count=len(latencies), p50_ms=round(pct(latencies, 50) * 1000, 2),
                   p99_ms=round(pct(latencies, 99) * 1000, 2))
    elif args.mode == "idle":
        time.sleep(3)  # like the worker: measured after it settled
    elif args.mode == "throughput":
        total = args.counts[0]
        started = time.perf_counter()
        done = 0
        while done < total:
            size = min(args.batch, total - done)
            ray.get([runner.run.remote(job(args.url)) for _ in range(size)])
            done += size
        elapsed = time.perf_counter() - started
        out.update(count=total, batch=args.batch, seconds=round(elapsed, 3),
                   jobs_per_s=round(total / elapsed, 1))
    else:
        async def together(n: int) -> float:
            jobs = [job(args.url) for _ in range(n)]
            started = time.perf_counter()
            await asyncio.gather(*(runner.run.remote(j) for j in jobs))
            return time.perf_counter() - started

        out["elapsed_s"] = {str(n): round(asyncio.run(together(n)), 3) for n in args.counts}
    out["rss_mb"] = rss_mb()
    ray.shutdown()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
