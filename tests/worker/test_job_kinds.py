"""Workers on the cluster's Python run job kinds on a real Ray head, with real Redis and NATS.

Messages are enqueued the way the bridge does (``DeliberationStore.submit``) with a test-only
job kind (``tests.worker.kinds``), so these tests need neither the bridge nor an LLM."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest
from redis.asyncio import Redis

from core.contract import AgentJob
from core.settings import Settings
from core.store import DeliberationStore
from tests.nats_events import Recorder
from tests.waiting import until, until_async
from tests.workers import TEST_KINDS, WorkerGroup, worker_settings

pytestmark = pytest.mark.worker_env


@pytest.fixture
def settings(redis_url: str, nats_url: str, ray_address: str) -> Settings:
    return worker_settings(redis_url, nats_url, ray_address, RAY_EXECUTOR_WORKER_THREADS="8",
                           RAY_EXECUTOR_JOB_MODULES=TEST_KINDS)


@pytest.fixture
def worker(settings: Settings, tmp_path: Path) -> Iterator[WorkerGroup]:
    group = WorkerGroup.with_settings(settings, tmp_path / "worker.log", sys.executable)
    yield group
    group.stop()
    print(group.log.read_text()[-5000:])


def jobs(deliberation_id: str, n: int, **metadata: str) -> List[AgentJob]:
    return [AgentJob(
        deliberation_id=deliberation_id, task_id=f"task-{deliberation_id}", agent_id=f"a{i}",
        agent_index=i, num_agents=n, role="DEV", model="echo", prompt_template="",
        task_description="hello", task_role="DEV", vllm_url="", timeout_seconds=30,
        max_retries=2, metadata=dict(metadata), kind="echo_test") for i in range(n)]


async def ended(store: DeliberationStore, deliberation_id: str) -> Any:
    """The deliberation's ``(record, agents)`` once it has completed or failed, else None."""
    found = await store.get(deliberation_id)
    assert found is not None, f"{deliberation_id} not found"
    return found if found[0]["status"] in ("completed", "failed") else None


async def submit_and_wait(settings: Settings, batches: List[Tuple[int, Dict[str, str]]],
                          timeout: float = 120) -> List[Tuple[Dict, List[Dict]]]:
    redis = Redis.from_url(settings.redis_url, decode_responses=True)
    store = DeliberationStore(redis, settings)
    ids = []
    for n, metadata in batches:
        deliberation_id = f"delib-{uuid.uuid4().hex}"
        record = {"id": deliberation_id, "task_id": f"task-{deliberation_id}"}
        await store.submit(deliberation_id, record, jobs(deliberation_id, n, **metadata))
        ids.append(deliberation_id)
    results = []
    for deliberation_id in ids:
        results.append(await until_async(functools.partial(ended, store, deliberation_id),
                                         f"{deliberation_id} to end", timeout))
    await redis.close()
    return results


def test_a_job_kind_runs_on_ray_and_finishes_its_deliberation(settings: Settings,
                                                              worker: Any) -> None:
    [(record, agents)] = asyncio.run(submit_and_wait(settings, [(3, {"sleep": "0.2"})]))
    assert record["status"] == "completed" and record["completed"] == "3"
    assert [a["status"] for a in agents] == ["completed"] * 3
    assert all(a["result"]["content"] == "echo: hello" for a in agents)
    assert all(a["attempts"] == 1 for a in agents)
    # The job ran on a Ray worker process, not in the Dramatiq worker.
    assert {a["result"]["pid"] for a in agents}.isdisjoint({worker.pid, os.getpid()})
    # Every worker process's samples are served from one port (multiprocess mode).
    import urllib.request

    def scrape() -> str:
        try:
            return str(urllib.request.urlopen(
                f"http://127.0.0.1:{settings.worker_metrics_port}/metrics").read().decode())
        except OSError:
            return ""

    # Dramatiq starts its exposition process on its own.
    scraped = until(scrape, "/metrics on the worker's port", timeout=30)
    assert 'ray_executor_agent_jobs_total{kind="echo_test",outcome="completed"} 3.0' in scraped
    assert "dramatiq_messages_total" in scraped and "ray_executor_ray_connected" in scraped


def test_a_failing_job_is_recorded_once_and_not_retried(settings: Settings, worker: Any,
                                                        recorder: Recorder) -> None:
    [(record, agents)] = asyncio.run(submit_and_wait(settings, [(2, {"fail": "permanent"})]))
    assert record["status"] == "failed" and record["failed"] == "2"
    for agent in agents:
        assert agent["status"] == "failed" and agent["attempts"] == 1
        assert agent["error_type"] == "job_error" and "asked to fail" in agent["error"]
        assert agent["retryable"] is False
    # ... and on NATS: each agent's failure once, then the deliberation's. No bridge here:
    # "submitted" goes out with the outbox loop once its lease (5 s) has passed.
    events = recorder.final(record["id"], 4, settings)
    by_subject: Dict[str, List[Any]] = {}
    for msg in events:
        by_subject.setdefault(msg.subject, []).append(json.loads(msg.data))
    assert len(by_subject.pop("orchestration.deliberation.submitted")) == 1
    assert sorted((s, len(m)) for s, m in by_subject.items()) == [
        ("agent.response.failed", 2), ("orchestration.deliberation.failed", 1)]
    for body in by_subject["agent.response.failed"]:
        assert body["status"] == "failed" and body["error_type"] == "job_error"
        assert "asked to fail" in body["error"]
        assert body["retryable"] is False and body["attempts"] == 1
        assert body["deliberation_id"] == record["id"] and body["num_agents"] == 2
    [final] = by_subject["orchestration.deliberation.failed"]
    assert final["status"] == "failed" and final["failed_count"] == 2
    assert final["completed_count"] == 0 and len(final["failed_agents"]) == 2


@pytest.mark.slow  # about a minute on 2 cores
def test_a_worker_killed_mid_job_is_replaced_and_every_event_is_published_once(
        settings: Settings, tmp_path: Path, recorder: Recorder) -> None:
    settings = settings.replace(worker_heartbeat_timeout=10)

    def start(n: int) -> WorkerGroup:
        return WorkerGroup.with_settings(settings, tmp_path / f"worker-{n}.log", sys.executable)

    async def scenario() -> Tuple[Dict, List[Dict], str, float]:
        redis = Redis.from_url(settings.redis_url, decode_responses=True)
        store = DeliberationStore(redis, settings)
        deliberation_id = f"delib-{uuid.uuid4().hex}"
        await store.submit(deliberation_id, {"id": deliberation_id, "task_id": "kill"},
                           jobs(deliberation_id, 4, sleep="6"))
        first = start(1)

        async def all_running() -> bool:
            _, agents = await store.get(deliberation_id)  # type: ignore[misc]
            return all(a["status"] == "running" for a in agents)

        await until_async(all_running, "the four jobs running on Ray", timeout=90)
        first.kill()
        killed_at = time.monotonic()
        second = start(2)
        try:
            record, agents = await until_async(lambda: ended(store, deliberation_id),
                                               "the deliberation to end after the kill",
                                               timeout=120)
            recovered = time.monotonic() - killed_at
        finally:
            second.stop()
        await redis.close()
        return record, agents, deliberation_id, recovered

    record, agents, deliberation_id, recovered = asyncio.run(scenario())
    assert record["status"] == "completed", (tmp_path / "worker-2.log").read_text()[-3000:]
    assert all(a["attempts"] == 2 for a in agents), agents  # ran again after the kill
    # Counted as published, not as the stream kept them: a second publish would show.
    ids = sorted(m.headers["Nats-Msg-Id"] for m in recorder.final(deliberation_id, 6, settings))
    assert len(ids) == len(set(ids)) == 4 + 2, ids  # 4 agents + submitted + completed
    print(f"recovered {recovered:.1f}s after SIGKILL")
