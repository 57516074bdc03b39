"""Faults on the worker side with real processes: the Ray head restarts mid-run, NATS
restarts mid-run, workers are killed (and restarted under their name). Nothing is lost and no
event is published twice."""

from __future__ import annotations

import asyncio
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from redis.asyncio import Redis

from actors.connection import RayConnection
from core.settings import Settings
from core.store import DeliberationStore
from harness import servers
from tests.conftest import worker_python
from tests.nats_events import Recorder, stored
from tests.waiting import until, until_async
from tests.worker.test_job_kinds import jobs
from tests.workers import TEST_KINDS, WorkerGroup, worker_settings

pytestmark = [pytest.mark.worker_env, pytest.mark.slow]
# Each test's pytest-timeout is past the sum of its own deadlines (noted at each), so a hang
# fails on one of them, naming what was missing, rather than in pytest-timeout's stack dump.


def fault_settings(redis_url: str, nats_url: str, ray_address: str) -> Settings:
    return worker_settings(redis_url, nats_url, ray_address,
                           RAY_EXECUTOR_JOB_MODULES=TEST_KINDS,
                           RAY_EXECUTOR_BACKOFF_MIN="0.5", RAY_EXECUTOR_BACKOFF_MAX="5")


async def submit_many(store: DeliberationStore, count: int, agents: int,
                      **metadata: str) -> List[str]:
    ids = []
    for _ in range(count):
        did = f"delib-{uuid.uuid4().hex}"
        await store.submit(did, {"id": did, "task_id": did},
                           [j for j in jobs(did, agents, **metadata)])
        ids.append(did)
    return ids


async def until_final(store: DeliberationStore, ids: List[str], timeout: float
                      ) -> Dict[str, Tuple[Dict, List[Dict]]]:
    deadline = time.monotonic() + timeout
    final: Dict[str, Tuple[Dict, List[Dict]]] = {}
    while len(final) < len(ids):
        for did in ids:
            if did in final:
                continue
            found = await store.get(did)
            assert found is not None
            if found[0]["status"] in ("completed", "failed"):
                final[did] = found
        assert time.monotonic() < deadline, f"{len(final)}/{len(ids)} finished"
        await asyncio.sleep(0.3)
    return final


@pytest.mark.timeout(720)  # head 120 + running 90 + restart 120 + final 240 + events 60
def test_the_ray_head_restarts_mid_run(redis_url: str, nats_url: str, tmp_path: Path,
                                       recorder: Recorder) -> None:
    head = servers.ray_head(tmp_path, str(Path(worker_python()).parent / "ray")).start(120)
    settings = fault_settings(redis_url, nats_url, head.url)
    workers = WorkerGroup.with_settings(settings, tmp_path / "workers.log")

    async def scenario() -> Tuple[Dict, float]:
        redis = Redis.from_url(redis_url, decode_responses=True)
        store = DeliberationStore(redis, settings)
        ids = await submit_many(store, 10, 2, sleep="4")
        deadline = time.monotonic() + 90
        while True:  # jobs are running on Ray
            running = [a for did in ids for a in (await store.get(did))[1]  # type: ignore[index]
                       if a["status"] == "running"]
            if len(running) >= 10:
                break
            assert time.monotonic() < deadline, f"{len(running)} of 10 jobs running on Ray"
            await asyncio.sleep(0.2)
        head.restart(120)
        restarted = time.monotonic()
        final = await until_final(store, ids, timeout=240)
        await redis.close()
        return final, time.monotonic() - restarted

    try:
        final, recovery = asyncio.run(scenario())
    finally:
        workers.stop()
        head.stop()
    statuses = [record["status"] for record, _ in final.values()]
    attempts = [a["attempts"] for _, agents in final.values() for a in agents]
    print(f"Ray head restart: {len(final)} deliberations, {sum(attempts)} attempts for "
          f"{len(attempts)} jobs, all done {recovery:.1f}s after the restart")
    errors = {(a.get("error_type"), a.get("error", "")[:300]) for _, agents in final.values()
              for a in agents if a["status"] != "completed"}
    assert statuses == ["completed"] * 10, errors
    assert max(attempts) >= 2  # the jobs that were running ran again
    for did in final:  # the jobs that ran twice published their outcome once
        events = recorder.final(did, 4, settings)
        subjects = sorted(m.subject for m in events)
        assert subjects == ["agent.response.completed"] * 2 + [
            "orchestration.deliberation.completed", "orchestration.deliberation.submitted"], \
            subjects
        msg_ids = [m.headers["Nats-Msg-Id"] for m in events]
        assert len(msg_ids) == len(set(msg_ids)), msg_ids


@pytest.mark.timeout(480)  # two rounds final 120 each + NATS restart 30 + stored events 60 + boot
def test_nats_restarts_mid_run(redis_url: str, ray_address: str, tmp_path: Path) -> None:
    nats_server = servers.nats(tmp_path).start()
    settings = fault_settings(redis_url, nats_server.url, ray_address)
    workers = WorkerGroup.with_settings(settings, tmp_path / "workers.log")

    async def scenario() -> Tuple[List[str], float]:
        redis = Redis.from_url(redis_url, decode_responses=True)
        store = DeliberationStore(redis, settings)
        first = await submit_many(store, 5, 2)
        await until_final(store, first, timeout=120)
        nats_server.stop()  # results produced now must wait for NATS
        down_ids = await submit_many(store, 5, 2)
        await until_final(store, down_ids, timeout=120)
        nats_server.start()
        back = time.monotonic()
        ids = first + down_ids
        while await redis.zcard(store.keys.outbox_due) > 0:
            assert time.monotonic() - back < 60, "outbox not flushed after NATS came back"
            await asyncio.sleep(0.2)
        await redis.close()
        return ids, time.monotonic() - back

    try:
        ids, flushed = asyncio.run(scenario())
    finally:
        workers.stop()
    try:
        for did in ids:
            events = asyncio.run(stored(nats_server.url, did))
            names = sorted(m.headers["Nats-Msg-Id"].split(":")[-1] for m in events)
            assert names == ["completed", "completed", "completed", "submitted"], names
            assert len({m.headers["Nats-Msg-Id"] for m in events}) == len(events)
    finally:
        nats_server.stop()
    print(f"NATS restart: outbox flushed {flushed:.1f}s after NATS came back")


@pytest.mark.timeout(600)  # slots held 120 + all final 240 + events 60 + two restarts
def test_200_jobs_survive_workers_killed_at_random_moments(
        redis_url: str, nats_url: str, ray_address: str, tmp_path: Path,
        recorder: Recorder) -> None:
    import random

    settings = fault_settings(redis_url, nats_url, ray_address).replace(
        worker_heartbeat_timeout=10, worker_processes=2, worker_threads=64)

    async def scenario() -> Tuple[List[str], float]:
        redis = Redis.from_url(redis_url, decode_responses=True)
        store = DeliberationStore(redis, settings)
        ids = await submit_many(store, 100, 2, sleep="1.5")
        rng = random.Random(7)
        workers = WorkerGroup.with_settings(settings, tmp_path / "workers-0.log")
        try:
            held: List[str] = []
            for kill in range(2):
                # Jobs are running (they hold limiter slots), then a random moment later...
                held = await until_async(
                    lambda: redis.keys(f"{settings.key_prefix}:limit:*:slots"),
                    "jobs holding limiter slots", timeout=120)
                await asyncio.sleep(rng.uniform(0, 3))
                workers.kill()
                workers = WorkerGroup.with_settings(settings,
                                                    tmp_path / f"workers-{kill + 1}.log")
            killed = time.monotonic()
            final = await until_final(store, ids, timeout=240)
            done = time.monotonic() - killed
            assert {record["status"] for record, _ in final.values()} == {"completed"}
            # The slot keys seen while jobs ran: a renamed key cannot make this pass.
            leaked = sum([await redis.zcard(key) for key in held])
            assert leaked == 0, f"{leaked} rate-limit slots still held"
        finally:
            workers.stop()
            await redis.close()
        return ids, done

    ids, done = asyncio.run(scenario())
    ids_seen: List[str] = []
    for did in ids:
        events = recorder.final(did, 4, settings)
        msg_ids = [m.headers["Nats-Msg-Id"] for m in events]
        assert len(msg_ids) == len(set(msg_ids)) == 4, msg_ids  # 2 agents, submitted, final
        assert sorted(m.subject for m in events) == [
            "agent.response.completed", "agent.response.completed",
            "orchestration.deliberation.completed", "orchestration.deliberation.submitted"]
        bodies = [m.data for m in events]
        assert len(bodies) == len(set(bodies))  # and by content
        ids_seen += msg_ids
    print(f"SIGKILL x2: 200 jobs, all completed {done:.1f}s after the last restart; "
          f"{len(ids_seen)} events, each once")


@pytest.mark.timeout(480)  # running 120 + started again 120 + final 120 + events 60
def test_a_restarted_worker_group_takes_back_its_jobs_at_once(
        redis_url: str, nats_url: str, ray_address: str, tmp_path: Path,
        recorder: Recorder) -> None:
    """SIGKILL of a named group (RAY_EXECUTOR_WORKER_ID) while its jobs run, then its restart
    under the same name: the jobs run again at once. The heartbeat timeout (600 s) is past
    every deadline here, so only the restart's requeue can bring them back."""
    settings = fault_settings(redis_url, nats_url, ray_address).replace(
        worker_id=f"crash-{uuid.uuid4().hex[:6]}", worker_heartbeat_timeout=600,
        worker_processes=2, worker_threads=8)

    async def agents(store: DeliberationStore, ids: List[str]) -> List[Dict]:
        return [a for did in ids for a in (await store.get(did))[1]]  # type: ignore[index]

    async def scenario() -> Tuple[List[str], float]:
        redis = Redis.from_url(redis_url, decode_responses=True)
        store = DeliberationStore(redis, settings)
        ids = await submit_many(store, 3, 2, sleep="8")  # 6 jobs; one process can run all
        workers = WorkerGroup.with_settings(settings, tmp_path / "workers-0.log")
        try:
            async def running() -> bool:
                return sum(a["status"] == "running" for a in await agents(store, ids)) == 6
            await until_async(running, "6 jobs running", timeout=120)
            workers.kill()
            workers = WorkerGroup.with_settings(settings, tmp_path / "workers-1.log")
            restarted = time.monotonic()

            async def started_again() -> bool:
                return all(int(a["attempts"]) == 2 for a in await agents(store, ids))
            await until_async(started_again, "every job started again", timeout=120)
            rerun = time.monotonic() - restarted
            final = await until_final(store, ids, timeout=120)
            assert {record["status"] for record, _ in final.values()} == {"completed"}
            assert [int(a["attempts"]) for a in await agents(store, ids)] == [2] * 6
        finally:
            workers.stop()
            await redis.close()
        return ids, rerun

    ids, rerun = asyncio.run(scenario())
    for did in ids:
        msg_ids = [m.headers["Nats-Msg-Id"] for m in recorder.final(did, 4, settings)]
        assert len(msg_ids) == len(set(msg_ids)) == 4, msg_ids
    print(f"SIGKILL and restart under the same name: 6 jobs running again {rerun:.1f}s after "
          "the restart")


@pytest.mark.timeout(420)  # running 90 + drain 60 + final 120 + events 60
def test_sigterm_drains_running_jobs_and_requeues_the_rest(
        redis_url: str, nats_url: str, ray_address: str, tmp_path: Path,
        recorder: Recorder) -> None:
    """A worker stopped under load finishes what it runs; what it only held goes back."""
    settings = fault_settings(redis_url, nats_url, ray_address).replace(worker_threads=4)
    workers = WorkerGroup.with_settings(settings, tmp_path / "workers-0.log")

    async def scenario() -> Tuple[List[str], int]:
        redis = Redis.from_url(redis_url, decode_responses=True)
        store = DeliberationStore(redis, settings)
        ids = await submit_many(store, 6, 2, sleep="3")  # 12 jobs, 4 threads: 8 must wait
        deadline = time.monotonic() + 90
        while True:
            agents = [a for did in ids for a in (await store.get(did))[1]]  # type: ignore[index]
            if sum(a["status"] == "running" for a in agents) >= 4:
                break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        workers.process.send_signal(15)  # to Dramatiq's main process, as Kubernetes does to PID 1
        code = await asyncio.get_running_loop().run_in_executor(None, workers.process.wait, 60)
        agents = [a for did in ids for a in (await store.get(did))[1]]  # type: ignore[index]
        assert not [a for a in agents if a["status"] == "running"], "half-done jobs"
        finished = sum(a["status"] == "completed" for a in agents)
        assert finished >= 4, agents  # the running ones finished before the exit
        # the rest went back
        successor = WorkerGroup.with_settings(settings, tmp_path / "workers-1.log")
        try:
            await until_final(store, ids, timeout=120)
        finally:
            successor.stop()
            await redis.close()
        return ids, code

    ids, code = asyncio.run(scenario())
    assert code == 0
    for did in ids:
        msg_ids = [m.headers["Nats-Msg-Id"] for m in recorder.final(did, 4, settings)]
        assert len(msg_ids) == len(set(msg_ids)) == 4, msg_ids


def worker_gauges(settings: Settings) -> Dict[str, float]:
    """The worker group's readiness gauges from its /metrics ({} while nothing serves it)."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{settings.worker_metrics_port}/metrics",
                                      timeout=5).read().decode()
    except OSError:
        return {}
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line.startswith(("ray_executor_worker_ready ", "ray_executor_ray_connected "))}


def test_readiness_follows_the_broker_not_ray(nats_url: str, tmp_path: Path) -> None:
    """A Ray outage leaves the workers ready (restarting them would not bring Ray back, and
    unready pods block node drains); a broker that cannot reach Redis makes them unready."""
    (tmp_path / "valkey").mkdir()
    valkey = servers.valkey(tmp_path / "valkey").start()
    unreachable_ray = f"ray://127.0.0.1:{servers.free_port()}"
    settings = fault_settings(valkey.url, nats_url, unreachable_ray)
    workers = WorkerGroup.with_settings(settings, tmp_path / "workers.log")
    try:
        until(lambda: worker_gauges(settings) == {"ray_executor_worker_ready": 1.0,
                                                  "ray_executor_ray_connected": 0.0},
              "ready with Ray unreachable", timeout=120)
        valkey.stop()
        until(lambda: worker_gauges(settings).get("ray_executor_worker_ready") == 0.0,
              "unready while Redis is down", timeout=60)
        valkey.start()
        until(lambda: worker_gauges(settings).get("ray_executor_worker_ready") == 1.0,
              "ready again once Redis is back", timeout=60)
    finally:
        workers.stop()
        valkey.stop()


@pytest.mark.timeout(300)
def test_a_ray_head_that_exits_at_start_is_started_again(tmp_path: Path) -> None:
    """``servers.ray_head``: a head whose ``ray start`` exits before its client port opens
    (CI saw one exit 1 once) is started again with new ports, and then serves clients."""
    real = Path(worker_python()).parent / "ray"
    starts = tmp_path / "starts"
    flaky = tmp_path / "ray"  # exits 1 the first time, then is the real `ray`
    flaky.write_text(f'#!/bin/sh\necho "$@" >> {starts}\n'
                     f'[ "$(wc -l < {starts})" -ge 2 ] || {{ echo "no luck"; exit 1; }}\n'
                     f'exec {real} "$@"\n')
    flaky.chmod(0o755)
    head = servers.ray_head(tmp_path, str(flaky)).start(120)
    try:
        first, second = starts.read_text().splitlines()
        gcs_port = [arg for arg in first.split() if arg.startswith("--port=")]
        assert gcs_port and gcs_port[0] not in second.split()  # picked again
        connection = RayConnection(head.url, namespace="flaky-head")
        connection.ensure()  # raises when no client can connect
        try:
            assert connection.connected
        finally:
            connection.disconnect()
    finally:
        head.stop()
