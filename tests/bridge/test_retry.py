"""Retrying the failed agents of a finished deliberation (``OperationsService.RetryDeliberation``
and ``ray-executor retry``), end to end: the real bridge, a real worker group on Ray, the
stand-in LLM told to fail and then to recover, every NATS publish counted.
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from typing import Any, Dict, List

import grpc
import pytest

from core.settings import Settings
from harness.standin_llm import StandinThread
from ray_executor.v1 import operations_pb2 as ops
from ray_executor.v1 import operations_pb2_grpc as ops_rpc
from ray_executor.v1 import ray_executor_pb2 as pb
from tests.bridge.conftest import CLI, BridgeProcess
from tests.bridge.test_operations_e2e import agents_request, final_status
from tests.nats_events import Recorder
from tests.waiting import until

AGENTS = ("agent-0", "agent-1")


def operations(bridge: BridgeProcess) -> ops_rpc.OperationsServiceStub:
    return ops_rpc.OperationsServiceStub(grpc.insecure_channel(bridge.address))


def refused(bridge: BridgeProcess, **request: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        operations(bridge).RetryDeliberation(ops.RetryDeliberationRequest(**request))
    return caught.value


def cli(bridge: BridgeProcess, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args, "--target", bridge.address], env=bridge.env,
                          capture_output=True, text=True, timeout=60)


def published(events: List[Any]) -> Dict[str, Dict[str, Any]]:
    """Payload by ``Nats-Msg-Id``, once each was seen published exactly once."""
    ids = Counter(m.headers["Nats-Msg-Id"] for m in events)
    assert set(ids.values()) == {1}, ids
    return {m.headers["Nats-Msg-Id"]: json.loads(m.data) for m in events}


@pytest.mark.slow
def test_failed_agents_retried_as_a_new_round(
        start_bridge: Any, start_worker: Any, standin: StandinThread,
        recorder: Recorder) -> None:
    bridge = start_bridge()
    start_worker(bridge)
    stub = bridge.stub()
    standin.control(status=400)  # not retryable: each agent fails at its first call
    did = stub.ExecuteDeliberation(agents_request(standin, len(AGENTS))).deliberation_id
    assert final_status(bridge, did).status == "failed"
    settings = Settings.from_env(bridge.env)
    first = published(recorder.final(did, 4, settings))
    assert set(first) == {f"{did}:submitted", f"{did}:failed",
                          *(f"{did}:{agent}:failed" for agent in AGENTS)}
    assert all("round" not in payload for payload in first.values())
    assert stub.GetStatus(pb.GetStatusRequest(include_stats=True)).stats.dead_letter_messages \
        == len(AGENTS)  # PermanentJobError: Dramatiq dead-lettered both messages

    standin.control(status=200, latency=3)  # recovered; slow enough to call again meanwhile
    calls = standin.stats()["requests"]
    retried = cli(bridge, "retry", did, "--reason", "vLLM fixed", "--by", "alice")
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.strip() == f"{did}: round 2 queued: {', '.join(AGENTS)}"

    again = operations(bridge).RetryDeliberation(ops.RetryDeliberationRequest(
        deliberation_id=did, by="alice", reason="vLLM fixed"))
    assert not again.retried
    assert (again.action.by, again.action.reason, again.action.round,
            list(again.action.agent_ids)) == ("alice", "vLLM fixed", 2, list(AGENTS))
    assert again.action.time.endswith("Z")

    status = final_status(bridge, did)
    assert status.status == "completed"
    assert [(a.status, a.attempts) for a in status.agents] == [("completed", 2)] * len(AGENTS)
    assert standin.stats()["requests"] - calls == len(AGENTS)  # the second call queued nothing

    events = published(recorder.final(did, 7, settings))
    second = {key: payload for key, payload in events.items() if key not in first}
    assert set(second) == {f"{did}:completed:r2",
                           *(f"{did}:{agent}:completed:r2" for agent in AGENTS)}
    assert {key: events[key] for key in first} == first  # round 1 as it was published
    assert all(payload["round"] == 2 for payload in second.values())
    final = second[f"{did}:completed:r2"]
    assert (final["status"], final["completed_count"], final["failed_count"]) == (
        "completed", 2, 0)

    watched = list(stub.WatchDeliberation(pb.WatchDeliberationRequest(deliberation_id=did)))
    names = [e.event for e in watched]
    assert names.index("failed") < names.index("retried") < names.index("completed")
    assert names[-1] == "completed"
    retry_event = json.loads(watched[names.index("retried")].data_json)
    assert (retry_event["by"], retry_event["reason"], retry_event["round"]) == (
        "alice", "vLLM fixed", 2)

    stats = stub.GetStatus(pb.GetStatusRequest(include_stats=True)).stats
    assert (stats.completed_deliberations, stats.failed_deliberations,
            stats.active_deliberations, stats.dead_letter_messages) == (1, 0, 0, 0)

    error = refused(bridge, deliberation_id=did, by="alice", reason="again")
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no failed agent" in error.details()


@pytest.mark.slow
def test_retry_refusals_are_named(start_bridge: Any, standin: StandinThread) -> None:
    bridge = start_bridge()  # no worker: what is submitted stays queued
    stub = bridge.stub()
    for missing in ("deliberation_id", "by", "reason"):
        fields = {"deliberation_id": "delib-x", "by": "alice", "reason": "why"}
        fields[missing] = " "
        error = refused(bridge, **fields)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details().startswith(f"{missing}: is required")
    error = refused(bridge, deliberation_id="delib-unknown", by="alice", reason="why")
    assert error.code() == grpc.StatusCode.NOT_FOUND

    did = stub.ExecuteDeliberation(agents_request(standin, 1)).deliberation_id
    error = refused(bridge, deliberation_id=did, by="alice", reason="why")
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "is queued: only a finished one can be retried" in error.details()

    stub.CancelDeliberation(pb.CancelDeliberationRequest(deliberation_id=did, reason="test"))
    until(lambda: stub.GetDeliberationStatus(pb.GetDeliberationStatusRequest(
        deliberation_id=did)).status == "cancelled", "the cancel", 10)
    shown = cli(bridge, "retry", did, "--reason", "why", "--by", "alice")
    assert shown.returncode == 1
    assert shown.stderr.strip() == (
        f"ray-executor: FAILED_PRECONDITION: deliberation {did} was cancelled")


@pytest.mark.slow
def test_a_completed_deliberation_retries_only_its_failed_agent(
        start_bridge: Any, start_worker: Any, standin: StandinThread,
        recorder: Recorder) -> None:
    bridge = start_bridge()
    start_worker(bridge)
    stub = bridge.stub()
    standin.control(status=400, fail_count=1)  # one agent fails, the other completes
    did = stub.ExecuteDeliberation(agents_request(standin, len(AGENTS))).deliberation_id
    before = final_status(bridge, did)
    assert (before.status, before.completed_agents, before.failed_agents) == ("completed", 1, 1)
    [failed] = [a.agent_id for a in before.agents if a.status == "failed"]
    [kept] = before.results
    settings = Settings.from_env(bridge.env)
    first = published(recorder.final(did, 4, settings))

    reply = operations(bridge).RetryDeliberation(ops.RetryDeliberationRequest(
        deliberation_id=did, by="bob", reason="bad prompt fixed"))
    assert reply.retried and list(reply.action.agent_ids) == [failed]
    after = final_status(bridge, did)
    assert (after.status, after.completed_agents, after.failed_agents) == ("completed", 2, 0)
    assert kept in after.results  # the agent that had completed keeps its result

    events = published(recorder.final(did, 6, settings))
    assert set(events) - set(first) == {f"{did}:completed:r2", f"{did}:{failed}:completed:r2"}
    stats = stub.GetStatus(pb.GetStatusRequest(include_stats=True)).stats
    assert (stats.total_deliberations, stats.completed_deliberations,
            stats.failed_deliberations) == (1, 1, 0)  # the final status counted once
