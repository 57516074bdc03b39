"""Deliberations on a real vLLM server: the bridge (this Python, no Ray), a worker group
(Python 3.9, Ray), the ``vllm_agent`` job on the Ray cluster and vLLM serving the tiny model of
``tests/tiny_model.py``; results read on NATS and from vLLM's own metrics."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any, List

import pytest

from bridge.client import DeliberationFailed, RayExecutorClient
from core.settings import Settings
from harness.servers import Server
from tests.nats_events import Recorder
from tests.tiny_model import SERVED_NAME
from tests.vllm_metrics import counted, metrics

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
