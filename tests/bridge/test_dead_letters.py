"""Operators' commands against a running bridge: ``ray-executor dlq list|show|replay`` (the
NATS ingress's dead letters, through ``OperationsService``) and ``ray-executor cancel``; real
bridge processes, nats-server and Redis."""

from __future__ import annotations

import json
import subprocess
from typing import Any, Callable, Dict, List

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from ray_executor.v1 import ray_executor_pb2 as pb
from tests.bridge.conftest import CLI, BridgeProcess, Channel, request
from tests.bridge.test_grpc_api import queued
from tests.bridge.test_nats_ingress import as_json, consumer_ready, settled, with_nats
from tests.waiting import until


def cli(bridge: BridgeProcess, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], env=bridge.env, capture_output=True, text=True,
                          timeout=60)


def listed(bridge: BridgeProcess, *args: str) -> List[str]:
    done = cli(bridge, "dlq", "list", *args)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def publish(nats_url: str, channel: Channel, payloads: List[bytes]) -> None:
    async def body(nc: NATS, js: JetStreamContext) -> None:
        await consumer_ready(js, channel)
        for payload in payloads:
            await js.publish(channel.subjects.deliberate, payload, headers={"X-Source": "test"})
        await settled(js, channel)

    with_nats(nats_url, body)


def test_dead_letters_are_listed_shown_and_replayed_once_the_cause_is_fixed(
        start_bridge: Callable[..., BridgeProcess], channel: Channel, redis_url: str,
        nats_url: str) -> None:
    # Refused first: ARCHITECT is not an allowed role on this bridge.
    strict = start_bridge(RAY_EXECUTOR_ALLOWED_ROLES="DEV,QA", **channel.env)
    refused, good = request(agents=3), request(agents=2)
    publish(nats_url, channel, [as_json(refused), b'{"task_id": ', as_json(good)])
    lines = until(lambda: len(listed(strict)) == 2 and listed(strict), "two dead letters")
    role_seq, malformed_seq = (int(line.split()[0]) for line in lines)
    assert "agents[2].role:" in lines[0] and "payload: not valid JSON" in lines[1], lines
    first_page = listed(strict, "--limit", "1")
    assert first_page == [lines[0], f"more: --after {role_seq}"]
    assert listed(strict, "--after", str(role_seq)) == [lines[1]]

    shown = cli(strict, "dlq", "show", str(role_seq))
    letter: Dict[str, Any] = json.loads(shown.stdout)
    assert json.loads(letter["payload"])["task_id"] == refused.task_id
    assert letter["headers"] == {"X-Source": "test"} and letter["field"] == "agents[2].role"
    assert "replayed" not in letter
    missing = cli(strict, "dlq", "show", str(malformed_seq + 1000))
    assert missing.returncode == 1 and "NOT_FOUND: sequence: no dead letter" in missing.stderr
    unexplained = cli(strict, "dlq", "replay", str(role_seq))
    assert unexplained.returncode == 2 and "--reason" in unexplained.stderr

    # The fix: the same service (queue, state, stream) restarted with every role allowed.
    assert strict.stop() == 0
    fixed = start_bridge(RAY_EXECUTOR_QUEUE=strict.queue, RAY_EXECUTOR_KEY_PREFIX=strict.prefix,
                         **channel.env)
    replay = cli(fixed, "dlq", "replay", str(role_seq), "--reason", "ARCHITECT allowed",
                 "--by", "alice")
    assert replay.returncode == 0, replay.stderr
    assert replay.stdout.startswith(f"{role_seq}: replayed as sequence ")
    again = cli(fixed, "dlq", "replay", str(role_seq), "--reason", "twice", "--by", "bob")
    assert again.returncode == 0 and f"{role_seq}: already replayed by alice at " in again.stdout
    until(lambda: sorted(m["kwargs"]["task_id"] for m in queued(redis_url, fixed)) ==
          sorted([good.task_id] * 2 + [refused.task_id] * 3), "the replayed request queued")
    # Still refused when replayed: dead-lettered again, naming what it replays.
    cli(fixed, "dlq", "replay", str(malformed_seq), "--reason", "try again", "--by", "alice")
    lines = until(lambda: len(listed(fixed)) == 3 and listed(fixed), "a third dead letter")
    assert lines[0].endswith("[replayed as " + replay.stdout.split()[-1] + " by alice]")
    third = json.loads(cli(fixed, "dlq", "show", lines[2].split()[0]).stdout)
    assert third["headers"]["Ray-Executor-Replay-Of"] == str(malformed_seq)
    assert third["reason"].startswith("not valid JSON")


def test_cancel_command(start_bridge: Callable[..., BridgeProcess]) -> None:
    bridge = start_bridge()
    did = bridge.stub().ExecuteDeliberation(request(agents=2)).deliberation_id
    done = cli(bridge, "cancel", did, "--reason", "wrong story")
    assert (done.returncode, done.stdout) == (0, f"cancelled: {did}\n"), done.stderr
    status = bridge.stub().GetDeliberationStatus(
        pb.GetDeliberationStatusRequest(deliberation_id=did))
    assert status.status == "cancelled" and "wrong story" in status.error_message
    again = cli(bridge, "cancel", did)
    assert (again.returncode, again.stdout) == (0, f"already cancelled: {did}\n")
    unknown = cli(bridge, "cancel", "delib-nope")
    assert unknown.returncode == 1 and "NOT_FOUND: deliberation_id" in unknown.stderr


def test_dead_letter_calls_need_nats_name_bad_fields_and_the_bridge_still_stops(
        start_bridge: Callable[..., BridgeProcess]) -> None:
    bridge = start_bridge(NATS_URL="nats://127.0.0.1:9")  # nothing listens there
    refused = cli(bridge, "dlq", "list")
    assert refused.returncode == 1 and "UNAVAILABLE: NATS is not connected" in refused.stderr
    nobody = cli(bridge, "dlq", "replay", "1", "--reason", "x", "--by", " ")
    assert nobody.returncode == 1 and "INVALID_ARGUMENT: by: is required" in nobody.stderr
    too_many = cli(bridge, "dlq", "list", "--limit", "501")
    assert too_many.returncode == 1 and "limit: at most 500" in too_many.stderr
    # A bridge still trying its first NATS connection stops at once on SIGTERM.
    assert bridge.stop() == 0
