"""What users and operators do, end to end: the real bridge, workers on Python 3.9 with Ray,
the tests' Ray head, real Redis and NATS, the stand-in LLM.

Operators cancel a running deliberation and list the jobs in flight; services submit over NATS
and read ``agent.response.*``; Redis restarts under running jobs; several worker processes share
one request-rate limit; the commands the containers and people run (``ray-executor worker``,
``submit``, ``watch``, ``status``, ``settings``) work against the running stack.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any, Dict, List

import pytest
import redis
from google.protobuf import json_format
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from core.settings import Settings
from harness import servers
from harness.standin_llm import StandinThread
from ray_executor.v1 import ray_executor_pb2 as pb
from tests.bridge.conftest import CLI, BridgeProcess, Channel, request
from tests.bridge.test_nats_ingress import as_json, consumer_ready, with_nats
from tests.conftest import worker_python
from tests.nats_events import Recorder
from tests.waiting import until

MODEL = "standin-model"


def agents_request(standin: StandinThread, agents: int, **fields: Any
                   ) -> pb.ExecuteDeliberationRequest:
    """``agents`` agents calling the stand-in, each allowed five minutes."""
    return request(agents=agents, vllm_url=standin.url, vllm_model=MODEL,
                   constraints=pb.TaskConstraints(timeout_seconds=300, max_retries=2), **fields)


def subjects_of(events: List[Any]) -> List[str]:
    return sorted(m.subject for m in events)


def final_status(bridge: BridgeProcess, deliberation_id: str, timeout: float = 180
                 ) -> pb.GetDeliberationStatusResponse:
    stub = bridge.stub()

    def ended() -> Any:
        status = stub.GetDeliberationStatus(
            pb.GetDeliberationStatusRequest(deliberation_id=deliberation_id))
        return status if status.status in ("completed", "failed", "cancelled") else None

    return until(ended, f"deliberation {deliberation_id} to end", timeout)


@pytest.mark.slow
def test_cancel_and_active_jobs_while_a_worker_runs_them(
        start_bridge: Any, start_worker: Any, standin: StandinThread,
        recorder: Recorder) -> None:
    standin.control(latency=600)  # the calls hang until cancelled
    bridge = start_bridge()
    start_worker(bridge)
    stub = bridge.stub()
    did = stub.ExecuteDeliberation(agents_request(standin, 3)).deliberation_id
    until(lambda: standin.stats()["in_flight"] == 3, "the three agents calling vLLM", 180)

    jobs = [j for j in stub.GetActiveJobs(pb.GetActiveJobsRequest()).jobs
            if j.deliberation_id == did]
    assert sorted(j.agent_id for j in jobs) == ["agent-0", "agent-1", "agent-2"]
    assert {j.status for j in jobs} == {"running"}
    assert all(j.start_time.seconds > 0 and j.job_id == f"{did}:{j.agent_id}" for j in jobs)

    cancel = pb.CancelDeliberationRequest(deliberation_id=did, reason="operator: wrong story")
    first, again = stub.CancelDeliberation(cancel), stub.CancelDeliberation(cancel)
    assert (first.status, first.message) == ("cancelled", "cancelled")
    assert (again.status, again.message) == ("cancelled", "already cancelled")
    # The running Ray tasks are cancelled: the stand-in sees its three requests go away.
    until(lambda: standin.stats()["cancelled"] == 3, "the three vLLM calls closed", 60)
    assert final_status(bridge, did).status == "cancelled"
    assert not [j for j in stub.GetActiveJobs(pb.GetActiveJobsRequest()).jobs
                if j.deliberation_id == did]
    events = recorder.final(did, 2, Settings.from_env(bridge.env))
    assert subjects_of(events) == ["orchestration.deliberation.cancelled",
                                   "orchestration.deliberation.submitted"]
    body = json.loads(events[-1].data)
    assert body["status"] == "cancelled" and body["reason"] == "operator: wrong story"
    assert standin.stats()["requests"] == 3  # nothing was called again after the cancel


@pytest.mark.slow
def test_a_deliberation_submitted_over_nats_ends_in_agent_responses(
        start_bridge: Any, start_worker: Any, standin: StandinThread, channel: Channel,
        nats_url: str, recorder: Recorder) -> None:
    bridge = start_bridge(**channel.env)
    start_worker(bridge)
    req = agents_request(standin, 2)

    async def submit(nc: NATS, js: JetStreamContext) -> Dict[str, Any]:
        inbox = nc.new_inbox()
        replies = await nc.subscribe(inbox)
        await consumer_ready(js, channel)
        await js.publish(channel.subjects.deliberate, as_json(req, camel=True),
                         headers={"Reply-To": inbox})
        return json.loads((await replies.next_msg(timeout=60)).data)

    reply = with_nats(nats_url, submit)
    assert reply["status"] == "submitted", reply
    did = reply["deliberation_id"]
    events = recorder.final(did, 4, Settings.from_env(bridge.env), timeout=180)
    assert subjects_of(events) == ["agent.response.completed"] * 2 + [
        "orchestration.deliberation.completed", "orchestration.deliberation.submitted"]
    answers = [json.loads(m.data) for m in events if m.subject == "agent.response.completed"]
    assert sorted(a["agent_id"] for a in answers) == ["agent-0", "agent-1"]
    assert all(a["task_id"] == req.task_id and a["status"] == "completed" and
               "stand-in" in a["proposal"]["content"] for a in answers), answers
    assert standin.stats()["requests"] == 2


@pytest.mark.slow
def test_redis_restarts_while_workers_hold_running_jobs(
        start_bridge: Any, start_worker: Any, standin: StandinThread, recorder: Recorder,
        tmp_path: Path) -> None:
    """With AOF on, a Redis restart under four running jobs loses none and runs none twice:
    each agent calls vLLM once, completes once, and each event is published once."""
    folder = tmp_path / "valkey"
    folder.mkdir()
    valkey = servers.valkey(folder, appendonly=True).start()
    try:
        standin.control(latency=8)
        bridge = start_bridge(REDIS_URL=valkey.url)
        start_worker(bridge)
        did = bridge.stub().ExecuteDeliberation(agents_request(standin, 4)).deliberation_id
        until(lambda: standin.stats()["in_flight"] == 4, "the four agents calling vLLM", 180)
        valkey.restart()
        final = final_status(bridge, did)
        assert final.status == "completed" and final.completed_agents == 4, final
        events = recorder.final(did, 6, Settings.from_env(bridge.env), timeout=120)
        assert subjects_of(events) == ["agent.response.completed"] * 4 + [
            "orchestration.deliberation.completed", "orchestration.deliberation.submitted"]
        assert standin.stats()["requests"] == 4  # no job ran twice
        client = redis.Redis.from_url(valkey.url)
        assert client.llen(f"dramatiq:{bridge.queue}") == 0
        # Dramatiq acks after the job has recorded its outcome, batched with its next fetch.
        until(lambda: client.hlen(f"dramatiq:{bridge.queue}.msgs") == 0, "every message acked")
        client.close()
    finally:
        valkey.stop()


@pytest.mark.slow
def test_two_worker_processes_share_one_request_rate_limit(
        start_bridge: Any, start_worker: Any, standin: StandinThread) -> None:
    """The rate windows are aligned to the clock (``t // window``): 6 calls at 2 per 3 s
    window, whichever of the two processes makes them, need three windows. A limit kept per
    process lets 4 into one window: the calls take one or two."""
    window_ms, limit = 3000, 2
    bridge = start_bridge()
    start_worker(bridge, RAY_EXECUTOR_WORKER_PROCESSES="2",
                 RAY_EXECUTOR_VLLM_RATE_LIMIT=str(limit),
                 RAY_EXECUTOR_VLLM_RATE_WINDOW=str(window_ms / 1000))
    stub = bridge.stub()
    did = stub.ExecuteDeliberation(agents_request(standin, 6)).deliberation_id
    final = final_status(bridge, did)
    assert final.status == "completed" and final.completed_agents == 6, final
    starts = sorted(json.loads(e.data_json)["time_ms"] for e in stub.WatchDeliberation(
        pb.WatchDeliberationRequest(deliberation_id=did)) if e.event == "agent_started")
    assert len(starts) == 6 and standin.stats()["requests"] == 6
    # A start is recorded a little after the limiter let it in, so it can look later than its
    # window but never earlier: three windows seen means at least three were used. (Counting
    # per window cannot be done from these times: refused jobs are put back to arrive just as
    # a window opens, and a start recorded then may belong to the window before.)
    assert len({t // window_ms for t in starts}) >= -(-len(starts) // limit), starts


@pytest.mark.slow
def test_the_commands_people_and_containers_run(
        start_bridge: Any, start_worker: Any, standin: StandinThread) -> None:
    """``ray-executor worker`` from the worker environment (the containers' command), then
    ``submit``, ``watch`` and ``status`` from the bridge environment against the running
    stack, and ``settings``; the worker stops on SIGTERM to its first process, as in a pod."""
    bridge = start_bridge(VLLM_URL=standin.url, VLLM_MODEL=MODEL)
    worker_cli = str(Path(worker_python()).parent / "ray-executor")
    worker = start_worker(bridge, command=[worker_cli, "worker"])

    def cli(*args: str, env: Dict[str, str] = bridge.env) -> subprocess.CompletedProcess:
        return subprocess.run([CLI, *args], env=env, capture_output=True, text=True,
                              timeout=240)

    def healthy() -> Any:
        status = cli("status")
        return status.returncode == 0 and json.loads(status.stdout)["status"] == "healthy"

    until(healthy, "`ray-executor status` to say healthy (a live worker)", 180)
    submitted = cli("submit", "Plan the release", "--roles", "DEV,QA", "--task-id", "cli-1")
    assert submitted.returncode == 0, submitted.stderr
    state, did = submitted.stdout.split()[:2]
    assert state == "submitted:"
    watched = cli("watch", did)
    assert watched.returncode == 0, watched.stdout + watched.stderr
    lines = watched.stdout.splitlines()
    assert lines[0].endswith(" submitted") and lines[-2] == "completed: 2/2 agents completed"
    assert sum(" agent_completed agent-" in line for line in lines) == 2, lines
    assert lines[-1].startswith("best (agent-") and "stand-in" in lines[-1]
    status = cli("status", did)
    assert status.returncode == 0
    record = json_format.Parse(status.stdout, pb.GetDeliberationStatusResponse())
    assert (record.status, record.task_id, record.completed_agents) == ("completed", "cli-1", 2)
    unknown = cli("status", "delib-nope")
    assert unknown.returncode == 1 and '"status": "not_found"' in unknown.stdout, unknown.stdout
    nobody = f"127.0.0.1:{servers.free_port()}"
    for command in (["status"], ["watch", did], ["submit", "Plan", "--roles", "DEV"]):
        refused = cli(*command, "--target", nobody)  # one line with the status, exit 1
        assert refused.returncode == 1, (command, refused.stdout)
        assert refused.stderr.startswith("ray-executor: UNAVAILABLE: "), refused.stderr
        assert "Traceback" not in refused.stderr, refused.stderr

    secret = dict(bridge.env, RAY_EXECUTOR_GRPC_TOKEN="s3cret-token")
    shown = cli("settings", env=secret)
    assert shown.returncode == 0 and "s3cret-token" not in shown.stdout
    assert "RAY_EXECUTOR_GRPC_TOKEN=***" in shown.stdout.splitlines()
    assert f"RAY_EXECUTOR_QUEUE={bridge.queue}" in shown.stdout.splitlines()
    refused = cli("settings", env=dict(bridge.env, RAY_EXECUTOR_GRPC_PORT="port"))
    assert refused.returncode == 2 and "RAY_EXECUTOR_GRPC_PORT" in refused.stderr

    worker.process.send_signal(signal.SIGTERM)  # what Kubernetes sends the container
    assert worker.process.wait(60) == 0
    assert "Worker has been shut down." in worker.log.read_text()


def test_the_worker_command_refuses_a_bad_setting_in_one_line() -> None:
    """What a container log shows for a typo: exit 2 and the setting named, no traceback."""
    worker_cli = str(Path(worker_python()).parent / "ray-executor")
    env = dict(os.environ, RAY_EXECUTOR_WORKER_PROCESSES="two")
    env.pop("VIRTUAL_ENV", None)
    done = subprocess.run([worker_cli, "worker"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "RAY_EXECUTOR_WORKER_PROCESSES" in done.stderr and "Traceback" not in done.stderr


def test_bridge_and_worker_metrics_ports_apart_and_a_taken_one_named(
        redis_url: str, ray_address: str) -> None:
    """By default a bridge and a worker group on one host serve /metrics on different ports;
    a port someone else holds stops either command with one line naming its setting."""
    assert Settings().metrics_port != Settings().worker_metrics_port
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = str(holder.getsockname()[1])
    env = dict(os.environ, REDIS_URL=redis_url, RAY_ADDRESS=ray_address,
               RAY_EXECUTOR_GRPC_HOST="127.0.0.1", RAY_EXECUTOR_GRPC_PORT="0",
               RAY_EXECUTOR_NATS_INGRESS="false", RAY_EXECUTOR_LOG_FORMAT="text",
               RAY_EXECUTOR_METRICS_PORT=taken, RAY_EXECUTOR_WORKER_METRICS_PORT=taken)
    env.pop("VIRTUAL_ENV", None)
    worker_cli = str(Path(worker_python()).parent / "ray-executor")
    try:
        for command, setting in (([CLI, "bridge"], "RAY_EXECUTOR_METRICS_PORT"),
                                 ([worker_cli, "worker"], "RAY_EXECUTOR_WORKER_METRICS_PORT")):
            done = subprocess.run(command, env=env, capture_output=True, text=True,
                                  timeout=120)
            assert done.returncode != 0, (command, done.stderr)
            assert f"{setting}={taken} cannot be bound on 127.0.0.1 (Address already in use)" \
                in done.stderr, done.stderr
            assert "Traceback" not in done.stderr, done.stderr
    finally:
        holder.close()
