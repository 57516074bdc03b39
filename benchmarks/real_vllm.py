"""8. Real vLLM: a streamed one-agent deliberation against the same chat completion sent
straight to the same vLLM server (the tiny model of ``tests/tiny_model.py``), at the same
concurrency.

Direct (``benchmarks/vllm_direct.py``, in the worker environment, which has aiohttp): one
client posts the very body our vLLM job sends (``cluster.prompts`` of the job the bridge
makes of the request), streamed; time to first token = send → first SSE chunk with content.
Ours: the request over gRPC to a bridge and a worker group on the Ray head; time to first
token = submit → the deliberation's first ``agent.response.progress`` on NATS (or its result,
when the answer came whole in the runner's first batch and so without partial output),
answer time = submit → its ``agent.response.completed``.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import time
import urllib.request
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc
import nats

from benchmarks.harness import ROOT, SESSIONS, CpuMeter, Stack, percentile
from benchmarks.report import row
from benchmarks.vllm_direct import TIMEOUT, closed_loop
from bridge.validation import plan
from cluster.prompts import build_messages, sampling
from core import routes
from core.settings import Settings
from harness import servers
from ray_executor.v1 import ray_executor_pb2 as pb
from ray_executor.v1 import ray_executor_pb2_grpc as rpc
from tests.tiny_model import CONTEXT, SERVED_NAME, build_with

NAME = "vllm"
TITLE = "8. Real vLLM"
CONCURRENCY = 4  # requests in flight, both sides
MAX_TOKENS = 64  # every answer runs to it: the tiny model never samples </s> (tests/tiny_model)
PROCESSES, THREADS = 1, 32  # one worker process: the answers, not the jobs, are the load
TASK = "Design a rate limiter for the GPU queue"


def vllm_python() -> str:
    """The vLLM environment's interpreter: ``RAY_EXECUTOR_VLLM_PYTHON``, else the repository's
    ``.venv-vllm`` (``make .venv-vllm`` builds it, about 6 GB)."""
    python = os.environ.get("RAY_EXECUTOR_VLLM_PYTHON") or str(ROOT / ".venv-vllm/bin/python")
    if not os.path.exists(python):
        raise RuntimeError(f"no vLLM environment at {python}: build it with `make .venv-vllm` "
                           "or name its python in RAY_EXECUTOR_VLLM_PYTHON")
    return python


def request() -> pb.ExecuteDeliberationRequest:
    """One agent (DEV) on the tiny model, answers cut at ``MAX_TOKENS`` (metadata)."""
    return pb.ExecuteDeliberationRequest(
        task_id=f"vllm-bench-{uuid.uuid4().hex}", task_description=TASK, role="DEV",
        constraints=pb.TaskConstraints(timeout_seconds=int(TIMEOUT), max_retries=1,
                                       metadata={"max_tokens": str(MAX_TOKENS)}),
        agents=[pb.Agent(id="agent-0", role="DEV")], vllm_model=SERVED_NAME)


def chat_body(settings: Settings) -> dict[str, Any]:
    """The streamed chat completion our vLLM job sends for ``request()``: the job made by the
    bridge's own validation, its messages and sampling from ``cluster.prompts``."""
    job = plan(request(), settings, "direct", routes.load(settings)).jobs[0]
    return {"model": job.model, "messages": build_messages(job), **sampling(job),
            "stream": True, "stream_options": {"include_usage": True}}


def direct(stack: Stack, url: str, body_file: Path, count: int, warmup: int
           ) -> dict[str, Any]:
    """One direct round (``benchmarks.vllm_direct`` in the worker environment).

    Parameters:
      stack: the run's servers and processes.
      url: vLLM's base URL.
      body_file: the chat completion to post (JSON).
      count: measured requests; warmup: requests before them, not measured.
    """
    measured = stack.worker_script(
        "benchmarks.vllm_direct", "--url", url, "--body", str(body_file), "--count",
        str(count), "--concurrency", str(CONCURRENCY), "--warmup", str(warmup))
    return summary(measured["ttft"], measured["total"], measured["wall"], count) | {
        "tokens_min": min(measured["tokens"]), "tokens_max": max(measured["tokens"])}


def _epoch_ms(iso: str) -> float:
    return datetime.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000


# --- ours ---------------------------------------------------------------------------------


class Arrivals:
    """Arrival times on NATS (core subscriptions) of each deliberation's first partial output
    (``agent.response.progress``) and of its result (``completed|failed``)."""

    def __init__(self) -> None:
        self.first_progress: dict[str, float] = {}
        self.pieces: dict[str, int] = {}
        self.ended: dict[str, float] = {}
        self.failed: set[str] = set()
        # Wall-clock ms: the worker's stamps in the events, and when they arrived here.
        self.stamps: dict[str, dict[str, float]] = {}
        self._waiting: dict[str, asyncio.Future[None]] = {}
        self._nc: Any = None

    async def start(self, url: str) -> Arrivals:
        self._nc = await nats.connect(url)
        for subject in ("agent.response.progress", "agent.response.completed",
                        "agent.response.failed"):
            await self._nc.subscribe(subject, cb=self._on_message, pending_msgs_limit=-1,
                                     pending_bytes_limit=-1)
        await self._nc.flush()
        return self

    async def _on_message(self, msg: Any) -> None:
        now, wall_ms = time.perf_counter(), time.time() * 1000
        body = json.loads(msg.data)
        did = body.get("deliberation_id")
        if not did:
            return
        stamps = self.stamps.setdefault(did, {})
        if msg.subject.endswith("progress"):
            if did not in self.first_progress:
                self.first_progress[did] = now
                stamps.update(piece_ms=_epoch_ms(body["timestamp"]), piece_seen_ms=wall_ms)
            self.pieces[did] = self.pieces.get(did, 0) + 1
            return
        if did in self.ended:
            return
        self.ended[did] = now
        # the attempt's start on the worker: its end (the event's timestamp) less its duration
        stamps["start_ms"] = _epoch_ms(body["timestamp"]) - body.get("duration_ms", 0)
        if msg.subject.endswith("failed"):
            self.failed.add(did)
        waiter = self._waiting.pop(did, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, did: str, timeout: float) -> None:
        if did in self.ended:
            return
        waiter = self._waiting.setdefault(did, asyncio.get_running_loop().create_future())
        await asyncio.wait_for(waiter, timeout)

    async def close(self) -> None:
        if self._nc is not None:
            await self._nc.close()


async def ours(address: str, nats_url: str, count: int, warmup: int) -> dict[str, Any]:
    """One round through us: ``request()`` over gRPC, ``CONCURRENCY`` deliberations in flight.

    Parameters:
      address: the bridge's gRPC ``host:port``.
      nats_url: where the events are published.
      count: measured deliberations; warmup: deliberations before them, not measured.
    """
    arrivals = await Arrivals().start(nats_url)
    submitted: dict[str, float] = {}
    submitted_ms: dict[str, float] = {}
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = rpc.RayExecutorServiceStub(channel)
            await channel.channel_ready()

            async def one() -> None:
                started, wall_ms = time.perf_counter(), time.time() * 1000
                reply = await stub.ExecuteDeliberation(request(), timeout=30)
                if reply.status != "submitted":
                    raise RuntimeError(f"not submitted: {reply.message}")
                submitted[reply.deliberation_id] = started
                submitted_ms[reply.deliberation_id] = wall_ms
                await arrivals.wait(reply.deliberation_id, TIMEOUT)

            await closed_loop(warmup, CONCURRENCY, one)
            submitted.clear()
            wall = await closed_loop(count, CONCURRENCY, one)
    finally:
        await arrivals.close()
    # The first text a reader sees: the first partial output, or the result itself when the
    # answer came whole within the runner's first batch (no partial output is sent then).
    seen = {did: min(arrivals.first_progress.get(did, ended), ended)
            for did, ended in arrivals.ended.items()}
    ttft = [seen[did] - at for did, at in submitted.items()]
    total = [arrivals.ended[did] - at for did, at in submitted.items()]
    pieces = [arrivals.pieces.get(did, 0) for did in submitted]
    return summary(ttft, total, wall, count) | legs(arrivals.stamps, submitted_ms) | {
        "failed": len(arrivals.failed & submitted.keys()),
        "with_progress": sum(1 for did in submitted if did in arrivals.first_progress),
        "progress_events_p50": percentile(pieces, 50)}


def legs(stamps: dict[str, dict[str, float]], submitted_ms: dict[str, float]
         ) -> dict[str, float | None]:
    """Medians (ms, wall clock) of the legs of the time to first token: submit → the
    attempt's start on the worker (gRPC, valkey, Dramatiq, the worker's pick-up), → the first
    piece on the worker (Ray, vLLM's TTFT, the runner's collect), → its event here (NATS)."""
    found: dict[str, list[float]] = {"pickup": [], "to_first_piece": [], "piece_to_here": []}
    for did, at in submitted_ms.items():
        mark = stamps.get(did, {})
        if "start_ms" in mark:
            found["pickup"].append(mark["start_ms"] - at)
            if "piece_ms" in mark:
                found["to_first_piece"].append(mark["piece_ms"] - mark["start_ms"])
                found["piece_to_here"].append(mark["piece_seen_ms"] - mark["piece_ms"])
    return {f"{name}_p50_ms": round(percentile(values, 50), 1) if values else None
            for name, values in found.items()}


def mean_ms(values: list[float]) -> float | None:
    return round(sum(values) / len(values) * 1000, 1) if values else None


def summary(ttft: list[float], total: list[float], wall: float, count: int) -> dict[str, Any]:
    """Percentiles and means (ms) of times to first token and answer times (seconds), and the
    rate of ``count`` answers in ``wall`` seconds."""
    def ms(values: Iterable[float], q: float) -> float | None:
        value = percentile(list(values), q)
        return None if value != value else round(value * 1000, 1)  # NaN: none measured

    return {"count": count, "seconds": round(wall, 2), "per_s": round(count / wall, 3),
            "ttft_p50_ms": ms(ttft, 50), "ttft_p95_ms": ms(ttft, 95),
            "ttft_mean_ms": mean_ms(ttft), "answer_mean_ms": mean_ms(total),
            "answer_p50_ms": ms(total, 50), "answer_p95_ms": ms(total, 95)}


SEEN_ON_RAY = {"ttft": "ray_executor_vllm_time_to_first_token_seconds",
               "call": "ray_executor_vllm_seconds"}  # the worker's histograms of vLLM calls


def seen_on_ray(port: int) -> dict[str, tuple[float, float]]:
    """(sum of seconds, count) so far of each ``SEEN_ON_RAY`` histogram, every label: vLLM's
    time to first token and whole call as our Ray jobs measured them; (0, 0) when none."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    found = {key: [0.0, 0.0] for key in SEEN_ON_RAY}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        for key, metric in SEEN_ON_RAY.items():
            for index, suffix in enumerate(("_sum", "_count")):
                if name == metric + suffix:
                    found[key][index] += float(line.rsplit(" ", 1)[-1])
    return {key: (total, count) for key, (total, count) in found.items()}


def means_between(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
                  ) -> dict[str, float | None]:
    """Mean in ms of each histogram's observations between two ``seen_on_ray`` readings."""
    means: dict[str, float | None] = {}
    for key in SEEN_ON_RAY:
        count = after[key][1] - before[key][1]
        means[f"ray_{key}_mean_ms"] = round((after[key][0] - before[key][0]) / count * 1000,
                                            1) if count else None
    return means


# --- the benchmark ------------------------------------------------------------------------


def start_vllm(stack: Stack) -> servers.Server:
    python = vllm_python()
    model = build_with(python, stack.workdir / "tiny-model")
    (stack.workdir / "vllm").mkdir(exist_ok=True)
    server = servers.vllm(stack.workdir / "vllm", python, str(model), SERVED_NAME,
                          max_model_len=CONTEXT)
    server.start(timeout=600)
    if server.process is not None:
        SESSIONS.add(server.process.pid)  # its CPU is ours in the CPU tables
    return server


def run(stack: Stack, quick: bool, **_: Any) -> dict[str, Any]:
    count = 8 if quick else 20
    rounds = 2 if quick else 4
    warmup = 2 * CONCURRENCY
    vllm = start_vllm(stack)
    try:
        version = servers.vllm_version(vllm.url)
        env = stack.env(VLLM_URL=vllm.url, VLLM_MODEL=SERVED_NAME)
        body_file = stack.workdir / "vllm-chat-body.json"
        body_file.write_text(json.dumps(chat_body(Settings.from_env(env))))
        bridge = stack.bridge(env)
        metrics_port = servers.free_port()
        workers = stack.workers(env, PROCESSES, THREADS, metrics_port=metrics_port)
        direct_runs: list[dict[str, Any]] = []
        our_runs: list[dict[str, Any]] = []
        cpu: dict[str, Any] = {}
        try:
            # The workers' start (Ray client, the runner actor) and vLLM's first requests
            # happen here, not within a measured round.
            asyncio.run(ours(bridge.address, stack.nats.url, CONCURRENCY, warmup))
            for index in range(rounds):  # alternated and paired: the machine's load drifts
                with CpuMeter() as meter:
                    direct_runs.append(direct(stack, vllm.url, body_file, count, warmup))
                cpu[f"direct, round {index + 1}"] = meter.summary()
                before = seen_on_ray(metrics_port)
                with CpuMeter() as meter:
                    our_runs.append(asyncio.run(ours(bridge.address, stack.nats.url, count,
                                                     CONCURRENCY)))
                cpu[f"ours, round {index + 1}"] = meter.summary()
                our_runs[-1].update(means_between(before, seen_on_ray(metrics_port)))
        finally:
            workers.stop()
            bridge.proc.stop()
    finally:
        vllm.stop(timeout=30)
    return result(direct_runs, our_runs, cpu, version, count)


def _median(values: Iterable[float | None]) -> float | None:
    """Median of the values measured (``None``: not measured in that round)."""
    found = [value for value in values if value is not None]
    return round(percentile(found, 50), 1) if found else None


def _times(side: dict[str, Any]) -> str:
    return (f"TTFT p50 {side['ttft_p50_ms']} / p95 {side['ttft_p95_ms']} / mean "
            f"{side['ttft_mean_ms']} ms, answer p50 {side['answer_p50_ms']} / mean "
            f"{side['answer_mean_ms']} ms")


def result(direct_runs: list[dict[str, Any]], our_runs: list[dict[str, Any]],
           cpu: dict[str, Any], version: str, count: int) -> dict[str, Any]:
    """Rows: each figure is the median over rounds of that round's figure; added time to
    first token is the median of each round's difference (ours minus direct of that round)."""
    name = "direct aiohttp client"
    rounds = len(direct_runs)

    def both(key: str) -> tuple[float | None, float | None]:
        return _median(r[key] for r in our_runs), _median(r[key] for r in direct_runs)

    added = _median(None if o["ttft_p50_ms"] is None else o["ttft_p50_ms"] - d["ttft_p50_ms"]
                    for o, d in zip(our_runs, direct_runs))
    # Our path's own part, whatever vLLM did meanwhile: our TTFT minus vLLM's as our Ray job
    # measured it (means: the worker's histogram gives no percentiles of a round).
    our_part = _median(None if o["ray_ttft_mean_ms"] is None else
                       o["ttft_mean_ms"] - o["ray_ttft_mean_ms"] for o in our_runs)
    rows = [
        row("time to first token p50", "ms", *both("ttft_p50_ms"), name),
        row("time to first token added p50", "ms", added, None, "", at_most=25,
            absolute=True),
        row("time to first token, our part (mean, minus vLLM's seen on Ray)", "ms", our_part,
            None, ""),
        row("time to first token p95", "ms", *both("ttft_p95_ms"), name),
        row("answer time p50", "ms", *both("answer_p50_ms"), name),
        row("throughput", "answers/s", *both("per_s"), name),
    ]
    tokens = {r["tokens_min"] for r in direct_runs} | {r["tokens_max"] for r in direct_runs}
    notes = [f"vLLM {version}, model {SERVED_NAME} (tests/tiny_model.py); completion tokens "
             f"per direct answer (vLLM's usage): {min(tokens)} to {max(tokens)}."]
    for index, (dr, our) in enumerate(zip(direct_runs, our_runs)):
        notes.append(
            f"round {index + 1}: direct {dr['per_s']}/s, {_times(dr)}; ours {our['per_s']}/s, "
            f"{_times(our)}, vLLM as our Ray jobs measured it: TTFT mean "
            f"{our['ray_ttft_mean_ms']} ms, call mean {our['ray_call_mean_ms']} ms (the round's "
            f"warm-up included); legs of "
            f"our TTFT, p50: submit → worker's start {our['pickup_p50_ms']} ms, → first piece "
            f"on the worker {our['to_first_piece_p50_ms']} ms, → its event here "
            f"{our['piece_to_here_p50_ms']} ms; failed "
            f"{our['failed']}, {our['with_progress']} of {our['count']} with partial output "
            f"(p50 {our['progress_events_p50']} progress events each).")
    return {
        "what": f"{rounds} rounds of {count} streamed answers of at most {MAX_TOKENS} tokens "
                f"per side, {CONCURRENCY} in flight, the sides alternating; before them "
                "a warm-up (the worker's runner, vLLM's first requests), and "
                f"{CONCURRENCY} to {2 * CONCURRENCY} warm-up requests per side and round. "
                "Ours: one-agent deliberations over gRPC to a bridge and "
                f"{PROCESSES} worker process, TTFT = submit → first `agent.response.progress` "
                "on NATS (or the result, for an answer that came whole within the runner's "
                "first batch: it sends no partial output), answer = submit → "
                "`agent.response.completed`. Baseline: the same "
                "chat completion body (the bridge's job through `cluster.prompts`, "
                "`stream: true`) posted by one aiohttp client in its own process, TTFT = "
                "send → first SSE chunk with content. The notes give, per round, vLLM's TTFT "
                "and call time as our Ray jobs measured them (the worker's histograms) and "
                "the legs of our TTFT from the events' own time stamps. Each figure is the "
                "median over rounds; "
                "the added TTFT is the median of the rounds' differences. vLLM runs on the "
                "same 2 cores as Ray, the bridge and the workers (analysis.md).",
        "rows": rows,
        "notes": notes,
        "details": {"direct": direct_runs, "ours": our_runs, "vllm": version},
        "cpu": cpu,
    }
