"""1. gRPC ingress: ExecuteDeliberation (validate, record, enqueue) against a bare echo server."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from benchmarks.harness import CpuMeter, Stack
from benchmarks.report import row
from harness import servers

NAME = "grpc"
TITLE = "1. gRPC ingress"
CONCURRENCY = 64
ROUNDS = 2


def load(target: str, seconds: float) -> dict[str, Any]:
    """The load generator in its own process (``benchmarks.grpc_load``)."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.grpc_load", "--target", target,
                           "--concurrency", str(CONCURRENCY), "--seconds", str(seconds),
                           "--warmup", "1"], capture_output=True, text=True,
                          timeout=seconds + 120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def run(stack: Stack, quick: bool, **_: Any) -> dict[str, Any]:
    seconds = 3.0 if quick else 8.0
    echo_port = servers.free_port()
    echo = stack.start("echo", [sys.executable, "-m", "benchmarks.echo_server", "--port",
                                str(echo_port)], stack.env())
    servers.wait_for_port(echo_port, 30, echo.process)
    bridge = stack.bridge(stack.env())
    rounds: dict[str, list[dict[str, Any]]] = {"ours": [], "base": []}
    cpu: dict[str, Any] = {}
    for i in range(ROUNDS):  # alternated: the machine's other load hits both alike
        for name, target in (("ours", bridge.address), ("base", f"127.0.0.1:{echo_port}")):
            with CpuMeter() as meter:
                rounds[name].append(load(target, seconds))
            cpu[f"{'bridge' if name == 'ours' else 'echo server'}, round {i + 1}"] = \
                meter.summary()
    ours, base = (max(rounds[name], key=lambda r: r["rps"]) for name in ("ours", "base"))
    bridge.proc.stop()
    echo.stop()
    bare = "grpc.aio echo server"
    return {
        "what": f"ExecuteDeliberation with one agent, {CONCURRENCY} concurrent callers for "
                f"{seconds:g} s (after 1 s warm-up; {ROUNDS} alternated rounds) from a separate "
                "client process "
                "(`benchmarks/grpc_load.py`), against the bridge (validation, one atomic Lua "
                "script recording the deliberation and enqueueing its Dramatiq message, the "
                "`submitted` event handed to the outbox) and against a bare `grpc.aio` server "
                "of the same service answering at once (`benchmarks/echo_server.py`). No "
                "workers run, so the queue only grows.",
        "rows": [
            row("throughput", "requests/s", ours["rps"], base["rps"], bare, at_least=0.6),
            row("latency p50", "ms", ours["p50_ms"], base["p50_ms"], bare),
            row("latency p99", "ms", ours["p99_ms"], base["p99_ms"], bare),
        ],
        "notes": [f"{ROUNDS} alternated rounds of each; the table shows each side's best "
                  "round. Rates per round: ours "
                  + ", ".join(str(r["rps"]) for r in rounds["ours"]) + "; echo "
                  + ", ".join(str(r["rps"]) for r in rounds["base"]) + "."],
        "details": {"rounds": rounds},
        "cpu": cpu,
    }
