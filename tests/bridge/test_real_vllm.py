"""Deliberations on a real vLLM server: the bridge (this Python, no Ray), a worker group
(Python 3.9, Ray), the ``vllm_agent`` job on the Ray cluster and vLLM serving the tiny model of
``tests/tiny_model.py``; results read on NATS and from vLLM's own metrics."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from typing import Any, Dict, List

import pytest

from bridge.client import DeliberationFailed, RayExecutorClient
from core.settings import Settings
from harness.servers import Server
from tests.bridge.conftest import CLI
from tests.nats_events import Recorder
from tests.tiny_model import CONTEXT, SERVED_NAME
from tests.vllm_metrics import aborted_requests, counted, metrics
from tests.waiting import until

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_deliberations_on_real_vllm(start_bridge: Any, start_worker: Any, vllm_server: Server,
                                    recorder: Recorder) -> None:
    bridge = start_bridge(VLLM_URL=vllm_server.url, VLLM_MODEL=SERVED_NAME)
    start_worker(bridge)
    before = metrics(vllm_server)

    async def scenario() -> Any:
        async with RayExecutorClient(bridge.address) as client:
            answered = await client.execute_deliberation(
                task_id=f"real-{time.time_ns()}", task_description="Plan the migration",
                role="DEV", agents=[("dev-1", "DEV"), ("qa-1", "QA")],
                constraints={"timeout_seconds": 120, "max_retries": 2,
                             "metadata": {"max_tokens": "16"}})
            final = await client.wait(answered.deliberation_id, timeout=240)
            assert final.status == "completed" and final.completed_agents == 2
            # vLLM's 404: the agent fails at its first attempt, its retries left unused.
            refused = await client.execute_deliberation(
                task_id=f"real-404-{time.time_ns()}", task_description="Plan the migration",
                role="DEV", agents=[("dev-1", "DEV")], vllm_model="no-such-model",
                constraints={"timeout_seconds": 120, "max_retries": 3})
            with pytest.raises(DeliberationFailed) as info:
                await client.wait(refused.deliberation_id, timeout=240)
            failed = info.value.status
            assert [(a.status, a.attempts) for a in failed.agents] == [("failed", 1)]
            return answered.deliberation_id, refused.deliberation_id

    answered, refused = asyncio.run(scenario())
    settings = Settings.from_env(bridge.env)
    completed = [json.loads(m.data) for m in recorder.final(answered, 4, settings)
                 if m.subject == "agent.response.completed"]
    # The tiny model never ends an answer itself: each ran to max_tokens, as vLLM counted.
    assert sorted((e["agent_id"], e["proposal"]["tokens"], e["model"]) for e in completed) == [
        ("dev-1", 16, SERVED_NAME), ("qa-1", 16, SERVED_NAME)]
    after = counted(vllm_server, before, "length", 2)
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == 32
    failures = [json.loads(m.data) for m in recorder.final(refused, 3, settings)
                if m.subject == "agent.response.failed"]
    assert [(e["error_type"], e["retryable"], e["attempts"]) for e in failures] == [
        ("bad_request", False, 1)]
    assert "does not exist" in failures[0]["error"]


def test_concurrency_limit_holds_at_vllm(start_bridge: Any, start_worker: Any,
                                         vllm_server: Server) -> None:
    """RAY_EXECUTOR_VLLM_CONCURRENCY=2 as vLLM itself sees it: its own count of running
    requests, sampled while six agents' answers of 600 tokens each run."""
    bridge = start_bridge(VLLM_URL=vllm_server.url, VLLM_MODEL=SERVED_NAME,
                          RAY_EXECUTOR_VLLM_CONCURRENCY="2")
    start_worker(bridge)
    running: List[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            running.append(metrics(vllm_server)["vllm:num_requests_running"])
            time.sleep(0.05)

    async def scenario() -> Any:
        async with RayExecutorClient(bridge.address) as client:
            answered = await client.execute_deliberation(
                task_id=f"real-limit-{time.time_ns()}", task_description="Plan the migration",
                role="DEV", agents=[(f"a{i}", "DEV") for i in range(6)],
                constraints={"timeout_seconds": 300, "max_retries": 0,
                             "metadata": {"max_tokens": "600"}})
            return await client.wait(answered.deliberation_id, timeout=300)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        final = asyncio.run(scenario())
    finally:
        done.set()
        sampler.join(30)
    assert final.status == "completed" and final.completed_agents == 6
    assert max(running) == 2, sorted(set(running))


def test_a_streamed_answer_then_a_cancel_mid_stream(start_bridge: Any, start_worker: Any,
                                                     vllm_server: Server,
                                                     recorder: Recorder) -> None:
    """A real vLLM answer as it is written: ``agent.response.progress`` on NATS and
    ``agent_progress`` in Watch, in order, before the completed event, the pieces adding up
    to the final proposal; ``ray-executor watch`` prints them. Then a deliberation cancelled
    while its answer streams: vLLM aborts the request."""
    bridge = start_bridge(VLLM_URL=vllm_server.url, VLLM_MODEL=SERVED_NAME,
                          RAY_EXECUTOR_PROGRESS_INTERVAL_MS="100")
    start_worker(bridge)
    long_answer = CONTEXT - 300  # 30 s or more of this CPU: only the cancel ends it

    async def scenario() -> Any:
        async with RayExecutorClient(bridge.address) as client:
            streamed = await client.execute_deliberation(
                task_id=f"real-stream-{time.time_ns()}", task_description="Plan the migration",
                role="DEV", agents=[("dev-1", "DEV")],
                constraints={"timeout_seconds": 120, "max_retries": 0,
                             "metadata": {"max_tokens": "400"}})
            watched = [e async for e in client.watch(streamed.deliberation_id)]
            final = await client.status(streamed.deliberation_id)
            before = metrics(vllm_server)
            cancelled = await client.execute_deliberation(
                task_id=f"real-cancel-{time.time_ns()}", task_description="Plan the migration",
                role="DEV", agents=[("dev-1", "DEV")],
                constraints={"timeout_seconds": 600, "max_retries": 0,
                             "metadata": {"max_tokens": str(long_answer)}})
            async for event in client.watch(cancelled.deliberation_id):
                if event.event == "agent_progress":  # vLLM is writing: cancel now
                    await client.cancel(cancelled.deliberation_id, "enough")
                    break
            return streamed.deliberation_id, watched, final, before

    did, watched, final, before = asyncio.run(scenario())
    assert final.status == "completed", final
    answer = final.results[0].proposal
    events = [e.event for e in watched]
    progress = [json.loads(e.data_json) for e in watched if e.event == "agent_progress"]
    assert len(progress) >= 2, events  # 400 tokens take longer than 100 ms here
    assert events.index("agent_completed") > events.index("agent_progress") + len(progress) - 1
    assert [p["sequence"] for p in progress] == list(range(len(progress)))
    assert [p["offset"] for p in progress] == \
        [sum(len(p["text"]) for p in progress[:i]) for i in range(len(progress))]
    assert "".join(p["text"] for p in progress) == answer

    # The same pieces on NATS, in order, each under its own deterministic id.
    def on_nats() -> List[Any]:
        found = [m for m in recorder.of(did, progress=True)
                 if m.subject == "agent.response.progress"]
        return found if len(found) >= len(progress) else []

    published = until(on_nats, "every partial output on NATS")
    bodies = [json.loads(m.data) for m in published]
    assert [(b["sequence"], b["text"]) for b in bodies] == \
        [(p["sequence"], p["text"]) for p in progress]
    assert [m.headers["Nats-Msg-Id"] for m in published] == \
        [f"{did}:dev-1:progress:{p['sequence']}" for p in progress]
    completed = [json.loads(m.data) for m in recorder.of(did)
                 if m.subject == "agent.response.completed"]
    assert [c["proposal"]["content"] for c in completed] == [answer]

    shown = subprocess.run([CLI, "watch", did], env=bridge.env, capture_output=True, text=True,
                           timeout=120)
    assert shown.returncode == 0, shown.stderr
    lines = [line for line in shown.stdout.splitlines() if " agent_progress dev-1: " in line]
    assert [line.split(": ", 1)[1] for line in lines] == \
        [p["text"].replace("\n", " ") for p in progress]

    # Cancelled mid-stream: vLLM ends the request (aborted: none running, no finished one,
    # fewer tokens than asked), long before the answer's 30 s.
    def settled() -> Dict[str, float]:
        now = metrics(vllm_server)
        return now if now["vllm:num_requests_running"] == 0 else {}

    after = until(settled, "vLLM running no request", timeout=120, interval=0.5)
    generated = after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    assert 0 < generated < long_answer, generated
    assert len(aborted_requests(vllm_server, long_answer)) == 1
