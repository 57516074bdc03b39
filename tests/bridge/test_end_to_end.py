"""Across versions: the bridge on this (newest) Python without Ray, workers on Python 3.9 with
Ray 2.49.2, a Ray head from the worker environment, real Redis and NATS, the stand-in LLM."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.error
import urllib.request
from typing import Any, Optional, Tuple

import pytest

from bridge.client import RayExecutorClient
from core.settings import Settings
from ray_executor.v1 import ray_executor_pb2 as pb
from tests.nats_events import Recorder
from tests.waiting import until

AGENT_FIELDS = {"task_id", "deliberation_id", "agent_id", "role", "proposal", "status",
                "duration_ms", "timestamp", "model", "num_agents"}
PROPOSAL_FIELDS = {"content", "author_id", "author_role", "model", "temperature", "tokens"}


@pytest.mark.slow  # about a minute on 2 cores
def test_three_agents_across_python_versions(start_bridge: Any, start_worker: Any,
                                             standin: Any, recorder: Recorder) -> None:
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
        assert watched[0] == ("submitted", "") and watched[-1] == ("completed", "")
        for agent_id in ("dev-1", "qa-1", "arch-1"):
            mine = [event for event, who in watched  # partial output aside (timing)
                    if who == agent_id and event != "agent_progress"]
            assert mine == ["agent_started", "agent_completed"], (agent_id, watched)
        # Counted where they are published: a second publish of any event would show here.
        events = recorder.final(submitted.deliberation_id, 5, Settings.from_env(bridge.env))
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


def test_status_is_degraded_without_a_live_worker_and_healthy_with_one(
        start_bridge: Any, start_worker: Any) -> None:
    """GetStatus and /healthz name what is missing: no worker on the queue, then one starts
    (healthy), then it stops (degraded again at once: a stopping worker leaves the list, long
    before the heartbeat timeout of 120 s here)."""
    bridge = start_bridge(RAY_EXECUTOR_WORKER_HEARTBEAT_TIMEOUT="120")
    stub = bridge.stub()
    healthz = f"http://127.0.0.1:{bridge.env['RAY_EXECUTOR_METRICS_PORT']}/healthz"

    def verdict(want: str, message: str = "") -> Optional[Tuple[str, int]]:
        """GetStatus's message and /healthz's status code, once GetStatus says ``want`` (and
        only ``message`` when given: NATS may still be connecting at first) and /healthz says
        the same (it is renewed every 5 s)."""
        status = stub.GetStatus(pb.GetStatusRequest())
        try:
            with urllib.request.urlopen(healthz, timeout=10) as answer:
                code, body = answer.status, answer.read().decode()
        except urllib.error.HTTPError as refused:
            code, body = refused.code, refused.read().decode()
        same = "ok\n" if status.status == "healthy" else f"degraded: {status.message}\n"
        if status.status != want or body != same or message not in ("", status.message):
            return None
        return status.message, code

    alone = f"no live worker on queue '{bridge.queue}' (none beat in the last 120 s): jobs wait"
    assert until(lambda: verdict("degraded", alone), "degraded without a worker") == (alone, 503)
    worker = start_worker(bridge)
    assert until(lambda: verdict("healthy"), "healthy with a worker", timeout=180) == ("", 200)
    worker.process.send_signal(signal.SIGTERM)  # to Dramatiq's master, as Kubernetes does
    assert worker.process.wait(60) == 0
    message, code = until(lambda: verdict("degraded"), "degraded once it stopped")
    assert "no live worker" in message and code == 503
