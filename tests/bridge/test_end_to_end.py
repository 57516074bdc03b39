"""Across versions: the bridge on this (newest) Python without Ray, workers on Python 3.9 with
Ray 2.49.2, a Ray head from the worker environment, real Redis and NATS, the stand-in LLM."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator, List

import nats
import pytest

from bridge.client import RayExecutorClient
from harness.servers import free_port
from harness.standin_llm import run_in_thread
from tests.bridge.conftest import BridgeProcess
from tests.workers import WorkerGroup

AGENT_FIELDS = {"task_id", "deliberation_id", "agent_id", "role", "proposal", "status",
                "duration_ms", "timestamp", "model", "num_agents"}
PROPOSAL_FIELDS = {"content", "author_id", "author_role", "model", "temperature", "tokens"}


@pytest.fixture
def standin() -> Iterator[Any]:
    server = run_in_thread(latency=0.2, model="standin-model")
    yield server
    server.stop()


@pytest.fixture
def start_worker(ray_address: str, tmp_path: Path) -> Iterator[Callable[..., WorkerGroup]]:
    started: List[WorkerGroup] = []

    def start(bridge: BridgeProcess, **overrides: str) -> WorkerGroup:
        env = dict(bridge.env, RAY_ADDRESS=ray_address, RAY_EXECUTOR_WORKER_PROCESSES="1",
                   RAY_EXECUTOR_WORKER_THREADS="8",
                   RAY_EXECUTOR_METRICS_PORT=str(free_port()), **overrides)
        env.pop("VIRTUAL_ENV", None)
        worker = WorkerGroup(env, tmp_path / f"worker-{len(started)}.log")
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop(kill_on_timeout=True)


async def collect(nats_url: str, deliberation_id: str, count: int, timeout: float
                  ) -> List[Any]:
    """Messages of one deliberation from both result streams, read from their start."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    found: List[Any] = []
    deadline = time.monotonic() + timeout
    try:
        subs = [await js.subscribe(subject, ordered_consumer=True)
                for subject in ("agent.response.>", "orchestration.deliberation.>")]
        while len(found) < count and time.monotonic() < deadline:
            for sub in subs:
                try:
                    msg = await sub.next_msg(timeout=0.2)
                except nats.errors.TimeoutError:
                    continue
                if json.loads(msg.data).get("deliberation_id") == deliberation_id:
                    found.append(msg)
        await asyncio.sleep(1.0)  # anything published twice would show up now
        for sub in subs:
            while True:
                try:
                    msg = await sub.next_msg(timeout=0.2)
                except nats.errors.TimeoutError:
                    break
                if json.loads(msg.data).get("deliberation_id") == deliberation_id:
                    found.append(msg)
    finally:
        await nc.close()
    return found


def test_three_agents_across_python_versions(start_bridge: Any, start_worker: Any,
                                             standin: Any, nats_url: str) -> None:
    bridge = start_bridge(VLLM_URL=standin.url, VLLM_MODEL="standin-model")
    start_worker(bridge)

    async def scenario() -> None:
        async with RayExecutorClient(bridge.address) as client:
            submitted = await client.execute_deliberation(
                task_id=f"e2e-{time.time_ns()}", task_description="Plan the migration",
                role="DEV", agents=[("dev-1", "DEV"), ("qa-1", "QA"), ("arch-1", "ARCHITECT")],
                constraints={"timeout_seconds": 60, "max_retries": 2,
                             "metadata": {"rubric": "small steps"}})
            final = await client.wait(submitted.deliberation_id, timeout=180)
            assert final.status == "completed"
            assert final.completed_agents == 3 and len(final.results) == 3
            assert "stand-in" in final.result.proposal
            watched = [(e.event, e.agent_id) async for e in client.watch(
                submitted.deliberation_id)]  # the whole story, from the first event
            events = await collect(nats_url, submitted.deliberation_id, 5, 60)
        assert watched[0] == ("submitted", "") and watched[-1] == ("completed", "")
        for agent_id in ("dev-1", "qa-1", "arch-1"):
            mine = [event for event, who in watched if who == agent_id]
            assert mine == ["agent_started", "agent_completed"], (agent_id, watched)
        subjects = sorted(m.subject for m in events)
        assert subjects == ["agent.response.completed"] * 3 + [
            "orchestration.deliberation.completed", "orchestration.deliberation.submitted"]
        ids = [m.headers["Nats-Msg-Id"] for m in events]
        assert len(set(ids)) == len(ids)
        for msg in events:
            body = json.loads(msg.data)
            if msg.subject == "agent.response.completed":
                assert set(body) >= AGENT_FIELDS, set(body)
                assert set(body["proposal"]) >= PROPOSAL_FIELDS
                assert body["num_agents"] == 3 and body["model"] == "standin-model"
                assert body["timestamp"].endswith("Z")
            if msg.subject == "orchestration.deliberation.completed":
                assert body["status"] == "completed" and body["completed_count"] == 3
                assert len(body["results"]) == 3
                assert body["task_id"] == final.task_id and body["num_agents"] == 3
                assert body["failed_agents"] == [] and body["failed_count"] == 0
                assert body["duration_ms"] > 0 and body["timestamp"].endswith("Z")

    asyncio.run(scenario())
