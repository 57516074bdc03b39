"""Property-based bad input (hypothesis) against a real bridge: random strings, huge fields,
wrong types, unicode, nulls. Every request gets a proper answer, the bridge never crashes, and
nothing invalid is enqueued: the queue holds exactly the agents of the accepted requests.

Each test runs a fixed regression set (its ``@example``s: the inputs that once mattered) and
then a randomized run whose seed is printed; ``RAY_EXECUTOR_FUZZ_SEED=<seed>`` repeats it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from typing import Any, Callable, Dict, List

import grpc
import nats
import pytest
from google.protobuf import json_format
from hypothesis import example, given, seed, settings
from hypothesis import strategies as st

from bridge.request_json import parse_request
from bridge.validation import InvalidRequest
from core.settings import Settings
from ray_executor.v1 import ray_executor_pb2 as pb
from tests.bridge.conftest import BridgeProcess, Channel
from tests.bridge.test_grpc_api import queued
from tests.bridge.test_nats_ingress import consumer_ready

# The randomized runs' seed: printed by every test, given back here to repeat a run.
SEED = int(os.environ.get("RAY_EXECUTOR_FUZZ_SEED") or random.SystemRandom().randrange(2**32))


@pytest.fixture(autouse=True)
def _print_seed() -> None:
    print(f"hypothesis seed {SEED}; RAY_EXECUTOR_FUZZ_SEED={SEED} repeats this run")


FIELDS = ("request", "task_id", "task_description", "role", "agents", "vllm_url", "vllm_model",
          "constraints")
# Over the 64 KiB field limit, in bytes of ASCII and of two-byte characters.
HUGE_ASCII, HUGE_TWO_BYTE = "x" * 70_000, "é" * 40_000
huge = st.sampled_from([HUGE_ASCII, HUGE_TWO_BYTE])
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
# A real bridge answers each example: deadline=None, since one call's time is the machine's
# load, not the input's. No health check needs suppressing.
FUZZ = settings(max_examples=150, deadline=None)


def test_grpc_answers_every_request_properly(bridge: BridgeProcess, redis_url: str) -> None:
    stub = bridge.stub()
    accepted: Dict[str, int] = {}

    @FUZZ
    @seed(SEED)
    @given(requests)
    @example(pb.ExecuteDeliberationRequest())
    @example(pb.ExecuteDeliberationRequest(
        task_id="t", task_description="d", agents=[pb.Agent(id="a", role="DEV")]))
    @example(pb.ExecuteDeliberationRequest(task_id=HUGE_ASCII, task_description="d",
                                           agents=[pb.Agent(id="a")]))
    @example(pb.ExecuteDeliberationRequest(task_id="t", task_description=HUGE_TWO_BYTE,
                                           agents=[pb.Agent(id="a")]))
    @example(pb.ExecuteDeliberationRequest(task_id="\x00", task_description="\x00 🙂",
                                           agents=[pb.Agent(id="\x00", role="?!")]))
    @example(pb.ExecuteDeliberationRequest(task_id=" ", task_description="d",
                                           agents=[pb.Agent(id="a"), pb.Agent(id="a")]))
    @example(pb.ExecuteDeliberationRequest(
        task_id="t", task_description="d", agents=[pb.Agent(id=f"a{i}") for i in range(20)],
        constraints=pb.TaskConstraints(timeout_seconds=-1, max_retries=2**31 - 1)))
    @example(pb.ExecuteDeliberationRequest(
        task_id="t", task_description="d", agents=[pb.Agent(id="a")],
        constraints=pb.TaskConstraints(metadata={f"k{i}" + "k" * 300: "v" for i in range(70)})))
    @example(pb.ExecuteDeliberationRequest(task_id="t", task_description="d", role="x y",
                                           agents=[pb.Agent(id="a")], vllm_url="ftp://x"))
    @example(pb.ExecuteDeliberationRequest(task_id="t", task_description="d",
                                           agents=[pb.Agent(id="a")], vllm_url="not a url"))
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
# nats-server's default max_payload: a client refuses to publish more, so the bridge never sees it.
NATS_MAX_PAYLOAD = 1024 * 1024
payloads = st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=60),
    requests.map(lambda r: json.dumps({"task_id": r.task_id, "task_description":
                                       r.task_description, "agents": [
                                           {"id": a.id, "role": a.role} for a in r.agents]})
                 .encode()).filter(lambda data: len(data) <= NATS_MAX_PAYLOAD))


def test_nats_answers_every_payload_on_reply_to(start_bridge: Callable[..., BridgeProcess],
                                                channel: Channel, nats_url: str,
                                                redis_url: str) -> None:
    bridge = start_bridge(**channel.env)
    answers: List[Dict[str, Any]] = []

    @settings(FUZZ, max_examples=3)
    @seed(SEED)
    @given(st.lists(payloads, min_size=40, max_size=40))
    @example([b"", b"null", b"{}", b"[]", b"\xff\xfe", b'{"task_id": 5}', b'{"agents": "x"}',
              b'{"task_id": "t", "task_description": "d", "agents": [{"id": "a"}]}',
              b'{"taskId": "t", "taskDescription": "d", "agents": [{"id": "a", "role": "QA"}]}',
              b'{"task_id": "t", "task_description": "d", "agents": [{"id": "a"}, {"id": "a"}]}',
              json.dumps({"task_id": HUGE_ASCII, "task_description": "d",
                          "agents": [{"id": "a"}]}).encode()])
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

    @settings(max_examples=400, deadline=None)
    @seed(SEED)
    @given(documents)
    @example({})
    @example({"task_id": None})
    @example({"task_id": "\ud800"})  # a lone surrogate
    @example({"task_id": "a", "taskDescription": "é"})
    @example({"constraints": {"timeout_seconds": 2**33}})  # past int32
    @example({"constraints": {"max_retries": 2.0}})  # an integral float
    @example({"constraints": {"max_retries": 1.5}})
    @example({"constraints": {"metadata": {"a": 1}}})
    @example({"constraints": None})
    @example({"agents": "x"})
    @example({"agents": [None]})
    @example({"agents": [{"id": "a", "promptTemplate": ["x"]}]})
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
