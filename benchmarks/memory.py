"""5. Memory: resident memory of a worker process (idle and busy) and of the bridge (idle and
under gRPC load), read from /proc/<pid>/status (VmRSS)."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from benchmarks import grpc_ingress, grpc_load
from benchmarks.harness import (
    Completions,
    RssSampler,
    Stack,
    rss_mb,
    worker_processes,
)
from benchmarks.report import row
from harness import servers

NAME = "memory"
TITLE = "5. Memory"
THREADS = 256
BUSY_JOBS = 512


async def worker_phase(stack: Stack, address: str, url: str, workers_pid: int,
                       bridge_pid: int) -> dict[str, Any]:
    results = await Completions().start(stack.nats.url)
    try:
        submitted: dict[str, float] = {}

        def note(did: str, at: float) -> None:
            submitted[did] = at

        await grpc_load.run(address, 4, count=4, vllm_url=url, on_submitted=note)
        await results.wait(list(submitted), 180)
        await asyncio.sleep(3)  # settle
        pid = worker_processes(workers_pid)[0]
        idle = {"worker": rss_mb(pid), "bridge": rss_mb(bridge_pid)}
        submitted.clear()
        with RssSampler({"worker": [pid], "bridge": [bridge_pid]}) as busy:
            await grpc_load.run(address, 64, count=BUSY_JOBS, vllm_url=url, on_submitted=note)
            await results.wait(list(submitted), 300)
        return {"idle": idle, "busy": dict(busy.peak)}
    finally:
        await results.close()


def run(stack: Stack, quick: bool, **_: Any) -> dict[str, Any]:
    standin = stack.standin(1.0)
    env = stack.env(VLLM_URL=standin.url, VLLM_MODEL="standin-model")
    bridge = stack.bridge(env)
    workers = stack.workers(env, processes=1, threads=THREADS, concurrency=THREADS)
    try:
        worker = asyncio.run(worker_phase(stack, bridge.address, standin.url, workers.pid,
                                          bridge.proc.pid))
    finally:
        workers.stop()
    # The bridge under gRPC load (no workers: the queue only grows).
    with RssSampler({"bridge": [bridge.proc.pid]}) as loaded:
        result = grpc_ingress.load(bridge.address, 3.0 if quick else 6.0)
    bridge.proc.stop()
    # Bare references: a Ray client process holding the same runner, and an echo gRPC server.
    direct = stack.worker_script("benchmarks.ray_direct", "--url", standin.url, "idle", "0")
    echo_port = servers.free_port()
    echo = stack.start("echo", [sys.executable, "-m", "benchmarks.echo_server", "--port",
                                str(echo_port)], stack.env())
    servers.wait_for_port(echo_port, 30, echo.process)
    time.sleep(1)
    echo_idle = rss_mb(echo.pid)
    with RssSampler({"echo": [echo.pid]}) as echo_loaded:
        grpc_ingress.load(f"127.0.0.1:{echo_port}", 3.0)
    echo.stop()
    standin.proc.stop()
    bridge_busy = max(loaded.peak.get("bridge", 0), worker["busy"].get("bridge", 0))
    ray_name = "bare Ray client + runner (py3.9)"
    return {
        "what": f"One worker process ({THREADS} threads, limit {THREADS}) after a warm-up "
                "(Ray client connected, runner created), idle for 3 s, then its peak while "
                f"{BUSY_JOBS} one-agent jobs of 1 s run ({THREADS} in flight). The bridge: "
                "idle at the same moment, then its peak during that load and during 64 "
                f"concurrent gRPC callers ({result['rps']} requests/s). RSS is VmRSS of the "
                "Dramatiq worker process itself (not the Dramatiq parent, nor Ray's "
                "cluster-side processes). Baselines: a bare Python 3.9 process that connected "
                "the Ray client and made an actor with the same function and options; a bare "
                "grpc.aio echo server, idle and under the same load.",
        "rows": [
            row("worker idle", "MB", worker["idle"]["worker"], direct["rss_mb"], ray_name,
                at_most=300, absolute=True),
            row("worker busy (peak)", "MB", worker["busy"].get("worker"), direct["rss_mb"],
                ray_name, at_most=300, absolute=True),
            row("bridge idle", "MB", worker["idle"]["bridge"], echo_idle, "grpc.aio echo server",
                at_most=150, absolute=True),
            row("bridge busy (peak)", "MB", bridge_busy, echo_loaded.peak.get("echo"),
                "grpc.aio echo server, loaded", at_most=150, absolute=True),
        ],
        "details": {"worker": worker, "bridge_loaded_peak": loaded.peak,
                    "direct_rss_mb": direct["rss_mb"], "echo_idle": echo_idle,
                    "echo_loaded": echo_loaded.peak},
    }
