"""Property-based bad input (hypothesis) against a real bridge: random strings, huge fields,
wrong types, unicode, nulls. Every request gets a proper answer, the bridge never crashes, and
nothing invalid is enqueued: the queue holds exactly the agents of the accepted requests."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Callable, Dict, List

import grpc
import nats
from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.request_json import parse_request
from bridge.validation import InvalidRequest
from core.settings import Settings
from ray_executor.v1 import ray_executor_pb2 as pb
from tests.bridge.conftest import BridgeProcess
from tests.bridge.test_grpc_api import queued
from tests.bridge.test_nats_ingress import Channel, channel, consumer_ready  # noqa: F401

FIELDS = ("request", "task_id", "task_description", "role", "agents", "vllm_url", "vllm_model",
          "constraints")
# Over the 64 KiB field limit, in bytes of ASCII and of two-byte characters.
huge = st.sampled_from(["x" * 70_000, "é" * 40_000])
text = st.one_of(st.text(max_size=40), st.text(alphabet="\x00\n\t é漢🙂", max_size=10),
                 st.just(""), st.just(" "), huge)
agents = st.lists(st.builds(pb.Agent, id=text, role=st.sampled_from(["", "DEV", "qa", "?!"]),
                            model=text, prompt_template=text), max_size=20)
constraints = st.builds(
    pb.TaskConstraints, story_id=text, plan_id=text,
    timeout_seconds=st.integers(-2**31, 2**31 - 1), max_retries=st.integers(-2**31, 2**31 - 1),
    metadata=st.dictionaries(st.text(max_size=300), text, max_size=70))
requests = st.builds(pb.ExecuteDeliberationRequest, task_id=text, task_description=text,
                     role=st.sampled_from(["", "DEV", "ARCHITECT", "x y"]),
                     constraints=constraints, agents=agents,
                     vllm_url=st.sampled_from(["", "http://h:1", "ftp://x", "not a url"]),
                     vllm_model=text)
FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


def test_grpc_answers_every_request_properly(bridge: BridgeProcess, redis_url: str) -> None:
    stub = bridge.stub()
    accepted: Dict[str, int] = {}

    @FUZZ
    @given(requests)
    def check(req: pb.ExecuteDeliberationRequest) -> None:
        try:
            reply = stub.ExecuteDeliberation(req, timeout=10)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc
            assert exc.details().split("[")[0].split(".")[0].split(":")[0] in FIELDS, \
                exc.details()
            return
        assert reply.status == "submitted" and reply.deliberation_id
        accepted[reply.deliberation_id] = len(req.agents)

    check()
    assert bridge.process.poll() is None, "the bridge survived"
    ids = [m["kwargs"]["deliberation_id"] for m in queued(redis_url, bridge)]
    assert sorted(set(ids)) == sorted(accepted)
    assert len(ids) == sum(accepted.values())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["task_id", "taskId", "agents", "role", "constraints", "id", "x"]),
        inner, max_size=5), max_leaves=12)
payloads = st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=60),
    requests.map(lambda r: json.dumps({"task_id": r.task_id, "task_description":
                                       r.task_description, "agents": [
                                           {"id": a.id, "role": a.role} for a in r.agents]})
                 .encode()))


def test_nats_answers_every_payload_on_reply_to(start_bridge: Callable[..., BridgeProcess],
                                                channel: Channel, nats_url: str,  # noqa: F811
                                                redis_url: str) -> None:
    bridge = start_bridge(**channel.env)
    answers: List[Dict[str, Any]] = []

    @settings(max_examples=3, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(payloads, min_size=40, max_size=40))
    def check(batch: List[bytes]) -> None:
        async def scenario() -> None:
            nc = await nats.connect(nats_url)
            js = nc.jetstream()
            await consumer_ready(js, channel)
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox + ".*")
            for i, data in enumerate(batch):
                await js.publish(channel.subjects.deliberate, data,
                                 headers={"Reply-To": f"{inbox}.{i}"})
            got = {}
            while len(got) < len(batch):
                msg = await sub.next_msg(timeout=30)
                got[msg.subject] = json.loads(msg.data)
            answers.extend(got.values())
            await nc.close()

        asyncio.run(scenario())

    check()
    assert bridge.process.poll() is None
    for answer in answers:
        assert answer["status"] in ("submitted", "failed"), answer
        if answer["status"] == "failed":
            assert answer["message"], answer
    submitted = {a["deliberation_id"] for a in answers if a["status"] == "submitted"}
    assert {m["kwargs"]["deliberation_id"] for m in queued(redis_url, bridge)} == submitted


def shaped(value: Any) -> Any:
    """``value``, or a JSON value of any other type in its place."""
    return st.one_of(value, json_values)


small_text = st.text(alphabet="aé\ud800 \x00", max_size=4)
documents = st.fixed_dictionaries({}, optional={
    "task_id": shaped(small_text), "taskDescription": shaped(small_text),
    "constraints": shaped(st.fixed_dictionaries({}, optional={
        "timeout_seconds": shaped(st.integers(-2**33, 2**33)), "max_retries": shaped(
            st.floats(-5, 5)), "metadata": shaped(st.dictionaries(small_text, small_text)),
        "story_id": shaped(small_text)})),
    "agents": shaped(st.lists(shaped(st.fixed_dictionaries({}, optional={
        "id": shaped(small_text), "promptTemplate": shaped(small_text)})), max_size=3)),
})


def test_nats_json_is_read_exactly_as_protobuf_json_reads_it() -> None:
    """The NATS ingress builds plainly typed requests with the message constructor, a fast
    path: it must accept and refuse exactly what ``json_format.ParseDict`` does."""
    limit = Settings().max_request_bytes

    @settings(max_examples=400, deadline=None, derandomize=True)
    @given(documents)
    def check(document: Dict[str, Any]) -> None:
        try:
            expected: Any = json_format.ParseDict(document, pb.ExecuteDeliberationRequest())
        except (json_format.Error, ValueError, TypeError):
            expected = "refused"
        try:
            parsed: Any = parse_request(json.dumps(document).encode("utf-8", "surrogatepass"),
                                        limit)
        except InvalidRequest:
            parsed = "refused"
        assert parsed == expected

    check()
