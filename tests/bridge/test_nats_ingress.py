"""The NATS ingress against real bridge processes, a real nats-server (JetStream) and Redis.

Each test gets its own commands stream and subject prefix (``t<tag>.cmd.>``), so the bridge's
durable consumer starts with the production deliver policy (``all``) on a stream holding only
that test's messages, and nothing published here reaches the default ``agent.cmd.deliberate``
consumer of other tests' bridges.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import re
import time
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, List, Optional, Tuple

import nats
import pytest
import redis
from google.protobuf import json_format
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from bridge import nats_ingress
from bridge.ingress import Ingress
from bridge.nats_ingress import NatsIngress
from core.connections import connect
from core.contract import Subjects
from core.errors import StateUnavailable
from core.outbox import ensure_streams
from core.settings import Settings
from core.store import DeliberationStore
from harness import servers
from ray_executor.v1 import ray_executor_pb2 as pb
from tests.bridge.conftest import BridgeProcess, Channel, request
from tests.bridge.test_grpc_api import queued

Publish = Tuple[bytes, Dict[str, str]]


def as_json(req: pb.ExecuteDeliberationRequest, camel: bool = False) -> bytes:
    return json_format.MessageToJson(req, preserving_proto_field_name=not camel).encode()


def burst(count: int, agents: int) -> Tuple[List[pb.ExecuteDeliberationRequest],
                                             List[Publish]]:
    """``count`` valid requests and their JSON, ready for ``publish_all``."""
    reqs = [request(agents=agents) for _ in range(count)]
    return reqs, [(as_json(r), {}) for r in reqs]


def with_nats(nats_url: str, body: Callable[[NATS, JetStreamContext], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        nc = await nats.connect(nats_url)
        try:
            return await body(nc, nc.jetstream())
        finally:
            await nc.close()

    return asyncio.run(main())


async def wait_for(check: Callable[[], Any], timeout: float, what: str) -> None:
    """Poll ``check`` (returning a bool, or an awaitable of one) until true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if await result if inspect.isawaitable(result) else result:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


async def consumer_ready(js: JetStreamContext, chan: Channel, waiting: int = 1) -> None:
    """The bridge(s) bound the durable and are pulling."""
    async def check() -> bool:
        try:
            info = await js.consumer_info(chan.stream, chan.consumer)
        except Exception:
            return False
        return (info.num_waiting or 0) >= waiting

    await wait_for(check, 20, f"{waiting} puller(s) on {chan.consumer}")


async def settled(js: JetStreamContext, chan: Channel, timeout: float = 60) -> Any:
    """Every message of the stream was delivered and acked (or terminated)."""
    async def check() -> bool:
        info = await js.consumer_info(chan.stream, chan.consumer)
        return info.num_pending == 0 and info.num_ack_pending == 0

    await wait_for(check, timeout, "the consumer to settle")
    return await js.consumer_info(chan.stream, chan.consumer)


async def publish_all(js: JetStreamContext, subject: str, items: List[Publish]) -> List[Any]:
    acks: List[Any] = []
    for start in range(0, len(items), 200):
        acks += await asyncio.gather(*[js.publish(subject, data, headers=headers or None)
                                       for data, headers in items[start:start + 200]])
    return acks


async def publish_until_enqueued(js: JetStreamContext, chan: Channel, items: List[Publish],
                                 redis_url: str, bridge: BridgeProcess) -> None:
    """Publish ``items`` once the bridge pulls; return as soon as the first are enqueued (the
    moment the outage tests break something)."""
    await consumer_ready(js, chan)
    await publish_all(js, chan.subjects.deliberate, items)
    await wait_for(lambda: queue_length(redis_url, bridge) > 0, 20, "the first enqueues")


async def dead_letters(js: JetStreamContext, chan: Channel, expect: int,
                       timeout: float = 10) -> List[Any]:
    """The dead-letter subject's stored messages, read from the stream's start."""
    sub = await js.pull_subscribe(chan.subjects.dead_letter, stream=chan.stream)
    found: List[Any] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(found) <= expect:
        try:
            found += await sub.fetch(50, timeout=0.5 if len(found) >= expect else 2)
        except asyncio.TimeoutError:  # nats.errors.TimeoutError is one too
            if len(found) >= expect:
                break
    await sub.unsubscribe()
    return found


def queue_length(redis_url: str, bridge: BridgeProcess) -> int:
    return int(redis.Redis.from_url(redis_url).llen(f"dramatiq:{bridge.queue}"))


def stop_counts(bridge: BridgeProcess) -> Dict[str, int]:
    """The counters the ingress logs when it stops."""
    line = re.findall(r"nats ingress stopped: (.*)", bridge.log.read_text())
    assert line, f"no stop summary in {bridge.log}"
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line[-1])}


def test_valid_requests_become_deliberations_and_get_answers(
        start_bridge: Callable[..., BridgeProcess], channel: Channel, redis_url: str,
        nats_url: str) -> None:
    bridge = start_bridge(**channel.env)
    first, second = request(agents=3), request(agents=2)
    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    bad = request(agents=[pb.Agent(id="a", role="DEV"), pb.Agent(id="a", role="QA")])

    async def body(nc: NATS, js: JetStreamContext) -> Dict[str, Dict[str, Any]]:
        replies: Dict[str, Dict[str, Any]] = {}
        inbox = f"_INBOX.{channel.tag}"
        sub = await nc.subscribe(f"{inbox}.*")
        await consumer_ready(js, channel)
        subject = channel.subjects.deliberate
        await js.publish(subject, as_json(first), headers={
            "Reply-To": f"{inbox}.first", "traceparent": trace})
        once = await js.publish(subject, as_json(second, camel=True), headers={
            "Reply-To": f"{inbox}.second", "Nats-Msg-Id": f"m-{channel.tag}"})
        twice = await js.publish(subject, as_json(second, camel=True), headers={
            "Reply-To": f"{inbox}.second-dup", "Nats-Msg-Id": f"m-{channel.tag}"})
        assert not once.duplicate and twice.duplicate  # the stream dropped the copy
        await js.publish(subject, as_json(first), headers={"Reply-To": f"{inbox}.again"})
        await js.publish(subject, as_json(bad), headers={"Reply-To": f"{inbox}.bad"})
        deadline = time.monotonic() + 20
        while len(replies) < 4 and time.monotonic() < deadline:
            reply = await sub.next_msg(timeout=deadline - time.monotonic())
            replies[reply.subject.rsplit(".", 1)[1]] = json.loads(reply.data)
        await settled(js, channel)
        return replies

    replies = with_nats(nats_url, body)
    assert set(replies) == {"first", "second", "again", "bad"}
    assert replies["first"]["status"] == "submitted"
    assert replies["again"]["deliberation_id"] == replies["first"]["deliberation_id"]
    assert replies["again"]["message"].startswith("already submitted")
    assert replies["second"]["status"] == "submitted"
    assert replies["bad"]["status"] == "failed" and "deliberation_id" not in replies["bad"]
    assert replies["bad"]["message"].startswith("agents[1].id: duplicate agent id")

    messages = queued(redis_url, bridge)
    assert len(messages) == 5
    by_id: Dict[str, List[Dict[str, Any]]] = {}
    for message in messages:
        by_id.setdefault(message["kwargs"]["deliberation_id"], []).append(message)
    first_id, second_id = replies["first"]["deliberation_id"], replies["second"]["deliberation_id"]
    assert {k: len(v) for k, v in by_id.items()} == {first_id: 3, second_id: 2}
    assert all(m["options"]["traceparent"] == trace for m in by_id[first_id])
    stub = bridge.stub()
    for deliberation_id, req in ((first_id, first), (second_id, second)):
        status = stub.GetDeliberationStatus(
            pb.GetDeliberationStatusRequest(deliberation_id=deliberation_id))
        assert status.status == "queued" and status.task_id == req.task_id
        assert status.total_agents == len(req.agents)


def test_bad_input_is_dead_lettered_with_reason_and_headers(
        start_bridge: Callable[..., BridgeProcess], channel: Channel, redis_url: str,
        nats_url: str) -> None:
    bridge = start_bridge(RAY_EXECUTOR_MAX_REQUEST_BYTES="4096", **channel.env)
    good = [request(agents=2) for _ in range(3)]
    valid = json.loads(as_json(good[0]))
    cases: Dict[str, Tuple[bytes, str, str]] = {  # payload, field, reason fragment
        "malformed": (b'{"task_id": "x", ', "payload", "not valid JSON"),
        "wrong-type": (json.dumps({**valid, "task_id": 5}).encode(), "task_id",
                       "expected string"),
        "missing-task": (json.dumps({k: v for k, v in valid.items() if k != "task_id"})
                         .encode(), "task_id", "is required"),
        "duplicate-agents": (as_json(request(agents=[pb.Agent(id="a", role="DEV"),
                                                     pb.Agent(id="a", role="QA")])),
                             "agents[1].id", "duplicate agent id"),
        "oversize": (as_json(request(task_description="x" * 5000)), "request",
                     "more than 4096"),
        "not-utf8": (b'{"task_id": "\xff\xfe"}', "payload", "not UTF-8"),
        "unknown-field": (json.dumps({**valid, "colour": "red"}).encode(), "colour",
                          "no field named"),
        "not-an-object": (b"[1, 2]", "payload", "JSON object"),
    }
    items: List[Publish] = [(as_json(good[0]), {"X-Case": "good-0"})]
    for kind, (data, _, _) in cases.items():
        items.append((data, {"X-Case": kind, "traceparent": f"trace-{kind}"}))
        if kind == "duplicate-agents":
            items.append((as_json(good[1], camel=True), {"X-Case": "good-1"}))
    items.append((as_json(good[2]), {"X-Case": "good-2"}))

    async def body(nc: NATS, js: JetStreamContext) -> List[Any]:
        await consumer_ready(js, channel)
        for data, headers in items:  # in order: bad ones between good ones
            await js.publish(channel.subjects.deliberate, data, headers=headers)
        await settled(js, channel)
        return await dead_letters(js, channel, len(cases))

    letters = with_nats(nats_url, body)
    assert channel.subjects.dead_letter == f"t{channel.tag}.cmd.dlq.deliberate"
    assert Subjects(Settings()).dead_letter == "agent.cmd.dlq.deliberate"
    seen = {}
    for letter in letters:
        entry = json.loads(letter.data)
        kind = entry["headers"]["X-Case"]
        data, field, fragment = cases[kind]
        assert entry["field"] == field, (kind, entry)
        assert fragment in entry["reason"], (kind, entry["reason"])
        assert entry["headers"]["traceparent"] == f"trace-{kind}"
        assert entry["subject"] == channel.subjects.deliberate
        stored = (base64.b64decode(entry["payload"]) if entry["payload_encoding"] == "base64"
                  else entry["payload"].encode())
        assert stored == data and not entry["truncated"]
        assert letter.headers["X-Case"] == kind
        assert letter.headers["Ray-Executor-Reason"] == " ".join(entry["reason"].split())
        assert letter.headers["Nats-Msg-Id"] == f"dlq:{entry['stream_sequence']}"
        seen[kind] = entry
    assert sorted(seen) == sorted(cases) and len(letters) == len(cases)
    assert seen["not-utf8"]["payload_encoding"] == "base64"
    messages = queued(redis_url, bridge)
    assert sorted({m["kwargs"]["task_id"] for m in messages}) == sorted(g.task_id for g in good)
    assert len(messages) == 6
    assert bridge.stop() == 0
    counts = stop_counts(bridge)  # terminated messages were handled once, never redelivered
    assert counts == dict(accepted=3, duplicate=0, dead_lettered=len(cases), retried=0)


def test_redis_outage_during_a_burst_loses_and_duplicates_nothing(
        start_bridge: Callable[..., BridgeProcess], channel: Channel, nats_url: str,
        tmp_path: Path) -> None:
    folder = tmp_path / "valkey-outage"
    folder.mkdir()
    valkey = servers.valkey(folder, appendonly=True).start()
    try:
        bridge = start_bridge(REDIS_URL=valkey.url, **channel.env)
        reqs, items = burst(200, agents=2)

        async def body(nc: NATS, js: JetStreamContext) -> Any:
            await publish_until_enqueued(js, channel, items[:100], valkey.url, bridge)
            valkey.stop()  # mid-burst
            await publish_all(js, channel.subjects.deliberate, items[100:])
            await asyncio.sleep(1.5)
            valkey.start()
            await settled(js, channel, timeout=90)
            return await dead_letters(js, channel, 0, timeout=1)

        letters = with_nats(nats_url, body)
        assert letters == []
        messages = queued(valkey.url, bridge)
        assert len(messages) == 2 * len(reqs)
        assert len({m["kwargs"]["deliberation_id"] for m in messages}) == len(reqs)
        assert {m["kwargs"]["task_id"] for m in messages} == {r.task_id for r in reqs}
        client = redis.Redis.from_url(valkey.url)
        assert len(client.keys(f"{bridge.prefix}:idem:*")) == len(reqs)
        assert bridge.stop() == 0
        counts = stop_counts(bridge)
        assert counts["retried"] > 0  # the outage was felt: naks, then redeliveries
        # A script that ran while its reply was lost reads as a duplicate on redelivery.
        assert counts["accepted"] <= len(reqs) <= counts["accepted"] + counts["duplicate"]
        assert counts["dead_lettered"] == 0
    finally:
        valkey.stop()


@pytest.mark.slow  # in-hand requests wait out ack_wait (30 s) before their redelivery
def test_a_nats_restart_mid_burst_loses_and_duplicates_nothing(
        start_bridge: Callable[..., BridgeProcess], channel: Channel, redis_url: str,
        tmp_path: Path) -> None:
    """nats-server restarts (its JetStream store kept) while the bridge consumes: the bridge
    reconnects and takes up its durable consumer where it was. Requests in hand at the restart
    lose their acks; JetStream redelivers them and they are answered as duplicates."""
    folder = tmp_path / "nats-restart"
    folder.mkdir()
    server = servers.nats(folder).start()
    try:
        bridge = start_bridge(NATS_URL=server.url, **channel.env)
        reqs, items = burst(1200, agents=1)

        async def before(nc: NATS, js: JetStreamContext) -> None:
            await publish_until_enqueued(js, channel, items[:1000], redis_url, bridge)

        with_nats(server.url, before)
        server.stop()  # mid-burst: some requests enqueued, some in hand, some not fetched
        server.start()

        async def after(nc: NATS, js: JetStreamContext) -> Any:
            await publish_all(js, channel.subjects.deliberate, items[1000:])
            await settled(js, channel, timeout=90)  # in-hand acks lost: redelivered
            return await dead_letters(js, channel, 0, timeout=1)

        assert with_nats(server.url, after) == []
        messages = queued(redis_url, bridge)
        assert len(messages) == len(reqs)
        assert len({m["kwargs"]["deliberation_id"] for m in messages}) == len(reqs)
        assert {m["kwargs"]["task_id"] for m in messages} == {r.task_id for r in reqs}
        assert bridge.stop() == 0
        counts = stop_counts(bridge)
        assert counts["accepted"] == len(reqs) and counts["dead_lettered"] == 0
        print(f"NATS restart mid-burst: {counts}")
    finally:
        server.stop()


def test_two_replicas_split_a_burst_and_handle_each_request_once(
        start_bridge: Callable[..., BridgeProcess], channel: Channel, redis_url: str,
        nats_url: str) -> None:
    tag = uuid.uuid4().hex[:8]
    shared = dict(channel.env, RAY_EXECUTOR_QUEUE=f"q{tag}", RAY_EXECUTOR_KEY_PREFIX=f"t{tag}")
    replicas = [start_bridge(**shared), start_bridge(**shared)]
    reqs = [request(agents=1) for _ in range(1000)]

    async def body(nc: NATS, js: JetStreamContext) -> float:
        await consumer_ready(js, channel, waiting=2)
        started = time.monotonic()
        await publish_all(js, channel.subjects.deliberate, [(as_json(r), {}) for r in reqs])
        await settled(js, channel)
        return time.monotonic() - started

    elapsed = with_nats(nats_url, body)
    messages = queued(redis_url, replicas[0])
    assert len(messages) == len(reqs), f"{len(messages)} enqueued in {elapsed:.1f}s"
    assert len({m["kwargs"]["deliberation_id"] for m in messages}) == len(reqs)
    assert {m["kwargs"]["task_id"] for m in messages} == {r.task_id for r in reqs}
    assert [r.stop() for r in replicas] == [0, 0]
    counts = [stop_counts(r) for r in replicas]
    assert all(c["accepted"] > 0 for c in counts), counts  # both took a share
    assert sum(c["accepted"] for c in counts) == len(reqs)
    assert sum(c["duplicate"] + c["retried"] + c["dead_lettered"] for c in counts) == 0


def test_stop_drains_what_is_in_hand(start_bridge: Callable[..., BridgeProcess],
                                     channel: Channel, redis_url: str, nats_url: str) -> None:
    tag = uuid.uuid4().hex[:8]
    shared = dict(channel.env, RAY_EXECUTOR_QUEUE=f"q{tag}", RAY_EXECUTOR_KEY_PREFIX=f"t{tag}")
    first = start_bridge(**shared)
    reqs = [request(agents=1) for _ in range(400)]
    before, after = reqs[:200], reqs[200:]
    second: Optional[BridgeProcess] = None

    async def body(nc: NATS, js: JetStreamContext) -> None:
        nonlocal second
        await consumer_ready(js, channel)
        await publish_all(js, channel.subjects.deliberate, [(as_json(r), {}) for r in before])
        await wait_for(lambda: queue_length(redis_url, first) > 0, 20,
                       "the first enqueues")
        assert await asyncio.get_event_loop().run_in_executor(None, first.stop) == 0
        # Published once the first has stopped: only the second can take these (the first
        # may have drained the whole first half by then; it ingests fast).
        await publish_all(js, channel.subjects.deliberate, [(as_json(r), {}) for r in after])
        second = start_bridge(**shared)
        await settled(js, channel)

    with_nats(nats_url, body)
    assert second is not None and second.stop() == 0
    done_first, done_second = stop_counts(first), stop_counts(second)
    assert 0 < done_first["accepted"] <= len(before), done_first
    # What the first had in hand was enqueued and acked: nothing came back to the second.
    assert done_first["accepted"] + done_second["accepted"] == len(reqs)
    assert done_second["duplicate"] == 0
    assert len(queued(redis_url, first)) == len(reqs)


def test_slow_enqueue_is_kept_in_progress_and_retries_are_bounded(
        channel: Channel, nats_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process, with a stand-in submission path: one enqueue slower than the ack wait, one
    that finds Redis down on every delivery."""
    for name, value in dict(ACK_WAIT=1.0, PROGRESS_EVERY=0.2, MAX_DELIVER=2,
                            NAK_DELAY=0.1).items():
        monkeypatch.setattr(nats_ingress, name, value)
    calls: List[str] = []

    class SlowOrDown:
        async def submit_all(self, requests: List[Tuple[pb.ExecuteDeliberationRequest, str]],
                             source: str) -> List[Any]:
            outcomes: List[Any] = []
            for req, _ in requests:
                calls.append(req.task_id)
                if req.task_id == "down":
                    outcomes.append(StateUnavailable("Redis unavailable: test"))
                else:
                    await asyncio.sleep(2.5)  # longer than the ack wait
                    outcomes.append(("delib-slow", True))
            return outcomes

    settings = Settings.from_env(dict(channel.env, NATS_URL=nats_url))

    async def body(nc: NATS, js: JetStreamContext) -> Tuple[Dict[str, int], List[Any]]:
        await ensure_streams(js, channel.subjects)
        consumer = NatsIngress(SlowOrDown(), settings, channel.subjects)  # type: ignore[arg-type]
        await consumer.start(nc)
        try:
            await consumer_ready(js, channel)
            for task_id in ("slow", "down"):
                await js.publish(channel.subjects.deliberate, as_json(request(task_id=task_id)))
            await settled(js, channel, timeout=20)
            return dict(consumer.counts), await dead_letters(js, channel, 1)
        finally:
            await consumer.stop()

    counts, letters = with_nats(nats_url, body)
    assert sorted(calls) == ["down", "down", "slow"]  # the slow one was never redelivered
    assert counts == dict(accepted=1, duplicate=0, dead_lettered=1, retried=1)
    entry = json.loads(letters[0].data)
    assert entry["reason"] == "gave up after 2 deliveries: Redis unavailable: test"
    assert entry["delivered"] == 2 and len(letters) == 1


def test_redis_down_past_max_deliver_dead_letters_and_loses_nothing_else(
        channel: Channel, nats_url: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The real submission path (``Ingress`` and its store) with valkey really stopped: the
    request is delivered ``MAX_DELIVER`` times, then dead-lettered with Redis's error; once
    valkey is back, the next request is accepted and queued."""
    for name, value in dict(MAX_DELIVER=3, NAK_DELAY=0.1).items():
        monkeypatch.setattr(nats_ingress, name, value)
    valkey = servers.valkey(tmp_path, appendonly=True).start()
    settings = Settings.from_env(dict(channel.env, NATS_URL=nats_url, REDIS_URL=valkey.url))
    lost, kept = request(agents=2), request(agents=3)

    async def body(nc: NATS, js: JetStreamContext) -> Tuple[Dict[str, int], List[Any]]:
        await ensure_streams(js, channel.subjects)
        ingress = Ingress(DeliberationStore(connect(valkey.url), settings), settings)
        consumer = NatsIngress(ingress, settings, channel.subjects)
        await consumer.start(nc)
        try:
            await consumer_ready(js, channel)
            valkey.stop()
            await js.publish(channel.subjects.deliberate, as_json(lost))
            letters = await dead_letters(js, channel, 1, timeout=60)
            valkey.start()
            await js.publish(channel.subjects.deliberate, as_json(kept))
            await settled(js, channel)
            return dict(consumer.counts), letters
        finally:
            await consumer.stop()

    try:
        counts, letters = with_nats(nats_url, body)
        client = redis.Redis.from_url(valkey.url)
        queued_task_ids = [json.loads(m)["kwargs"]["task_id"]
                           for m in client.hvals(f"dramatiq:{settings.queue}.msgs")]
        client.close()
    finally:
        valkey.stop()
    assert counts == dict(accepted=1, duplicate=0, dead_lettered=1, retried=2)
    assert len(letters) == 1
    entry = json.loads(letters[0].data)
    assert entry["reason"].startswith("gave up after 3 deliveries: Redis unavailable"), entry
    assert entry["delivered"] == 3 and json.loads(entry["payload"])["task_id"] == lost.task_id
    assert queued_task_ids == [kept.task_id] * 3
