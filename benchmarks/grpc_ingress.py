"""1. gRPC ingress: ExecuteDeliberation (validate, record, enqueue) against a bare echo server."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from benchmarks.harness import CpuMeter, Stack, cpu_seconds
from benchmarks.report import row
from harness import servers

NAME = "grpc"
TITLE = "1. gRPC ingress"
CONCURRENCY = 64
ROUNDS = 3


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
    servers_under_test = (("ours", "bridge", bridge.address, bridge.proc.pid),
                          ("base", "echo server", f"127.0.0.1:{echo_port}", echo.pid))
    for i in range(ROUNDS):  # alternated: the machine's other load hits both alike
        for name, label, target, pid in servers_under_test:
            used = cpu_seconds(pid)
            with CpuMeter() as meter:
                result = load(target, seconds)
            # The server's CPU (every thread) per call answered, warm-up included.
            result["cpu_ms_per_request"] = round(
                1000 * (cpu_seconds(pid) - used) / max(1, result["answered"]), 3)
            rounds[name].append(result)
            cpu[f"{label}, round {i + 1}"] = meter.summary()
    ratios = [round(o["rps"] / b["rps"], 3) for o, b in zip(rounds["ours"], rounds["base"])]
    ours, base = (max(rounds[name], key=lambda r: r["rps"]) for name in ("ours", "base"))
    cpu_ms = {name: min(r["cpu_ms_per_request"] for r in rounds[name]) for name in rounds}
    bridge.proc.stop()
    echo.stop()
    bare = "grpc.aio echo server"
    return {
        "what": f"ExecuteDeliberation with one agent, {CONCURRENCY} concurrent callers for "
                f"{seconds:g} s (after 1 s warm-up; {ROUNDS} alternated rounds) from a separate "
                "client process "
                "(`benchmarks/grpc_load.py`), against the bridge (validation, one Lua script call "
                "recording the deliberations that arrive together and enqueueing their Dramatiq "
                "messages, each atomically, the "
                "`submitted` event handed to the outbox) and against a bare `grpc.aio` server "
                "of the same service answering at once (`benchmarks/echo_server.py`). No "
                "workers run, so the queue only grows.",
        "rows": [
            row("throughput", "requests/s", ours["rps"], base["rps"], bare, at_least=0.6),
            row("throughput ratio, worst round", "", min(ratios), at_least=0.6, absolute=True),
            row("server CPU per request", "ms", cpu_ms["ours"], cpu_ms["base"], bare),
            row("latency p50", "ms", ours["p50_ms"], base["p50_ms"], bare),
            row("latency p99", "ms", ours["p99_ms"], base["p99_ms"], bare),
        ],
        "notes": [f"{ROUNDS} alternated rounds of each; the table shows each side's best "
                  "round (CPU: each side's lowest). Per round, ours / echo: "
                  + "; ".join(f"{o['rps']} / {b['rps']} requests/s = {ratio}, CPU "
                              f"{o['cpu_ms_per_request']} / {b['cpu_ms_per_request']} ms"
                              for o, b, ratio in zip(rounds["ours"], rounds["base"], ratios))
                  + "."],
        "details": {"rounds": rounds},
        "cpu": cpu,
    }
