"""The gRPC contract against a real bridge process, real Redis and a real Dramatiq consumer."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any, Callable, Dict, List

import grpc
import pytest
import redis
from dramatiq.brokers.redis import RedisBroker
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from bridge.client import DeliberationFailed, DeliberationTimeout, RayExecutorClient
from bridge.grpc_server import best_result
from core.keys import Keys
from ray_executor.v1 import ray_executor_pb2 as pb
from ray_executor.v1 import ray_executor_pb2_grpc as rpc
from tests.bridge.conftest import BridgeProcess, request, run_stock_worker
from tests.waiting import until, until_async


def queued(redis_url: str, bridge: BridgeProcess) -> List[Dict[str, Any]]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    ids = client.lrange(f"dramatiq:{bridge.queue}", 0, -1)
    return [json.loads(client.hget(f"dramatiq:{bridge.queue}.msgs", i)) for i in ids]


def test_execute_records_and_enqueues_one_message_per_agent(bridge: BridgeProcess,
                                                            redis_url: str) -> None:
    stub = bridge.stub()
    req = request(agents=3)
    reply = stub.ExecuteDeliberation(req)
    assert reply.status == "submitted" and reply.deliberation_id.startswith("delib-")
    messages = queued(redis_url, bridge)
    assert [m["kwargs"]["agent_id"] for m in messages] == ["agent-0", "agent-1", "agent-2"]
    first = messages[0]
    assert first["actor_name"] == "vllm_agent" and first["queue_name"] == bridge.queue
    assert first["kwargs"]["vllm_url"] == "http://127.0.0.1:9/"  # the request's override
    assert first["kwargs"]["model"] == "test-model"
    assert first["kwargs"]["timeout_seconds"] == 60 and first["options"]["max_retries"] == 2
    assert first["kwargs"]["deliberation_id"] == reply.deliberation_id

    status = stub.GetDeliberationStatus(
        pb.GetDeliberationStatusRequest(deliberation_id=reply.deliberation_id))
    assert status.status == "queued" and status.total_agents == 3
    assert [a.status for a in status.agents] == ["queued"] * 3
    assert status.task_id == req.task_id

    jobs = stub.GetActiveJobs(pb.GetActiveJobsRequest()).jobs
    mine = [j for j in jobs if j.submission_id == reply.deliberation_id]
    assert {j.agent_id for j in mine} == {"agent-0", "agent-1", "agent-2"}
    assert all(j.status == "queued" and j.task_id == req.task_id for j in mine)


def test_a_real_dramatiq_worker_consumes_the_messages(bridge: BridgeProcess,
                                                      redis_url: str) -> None:
    """The message contract is Dramatiq's own: a stock worker decodes and runs it."""
    reply = bridge.stub().ExecuteDeliberation(request(agents=2))
    seen = run_stock_worker(RedisBroker(url=redis_url), bridge.queue, 2)
    assert {j["deliberation_id"] for j in seen} == {reply.deliberation_id}
    assert sorted(j["agent_id"] for j in seen) == ["agent-0", "agent-1"]


def test_same_task_or_idempotency_key_is_submitted_once(bridge: BridgeProcess,
                                                        redis_url: str) -> None:
    stub = bridge.stub()
    req = request(agents=2)
    first = stub.ExecuteDeliberation(req)
    again = stub.ExecuteDeliberation(req)
    assert again.deliberation_id == first.deliberation_id and again.status == "submitted"
    assert "already submitted" in again.message
    assert len(queued(redis_url, bridge)) == 2

    keyed = pb.TaskConstraints(metadata={"idempotency_key": "retry-7"})
    one = stub.ExecuteDeliberation(request(agents=1, constraints=keyed))
    two = stub.ExecuteDeliberation(request(agents=1, constraints=keyed))  # other task_id
    assert one.deliberation_id == two.deliberation_id
    assert len(queued(redis_url, bridge)) == 3


def test_past_the_idempotency_ttl_the_same_task_id_starts_a_new_deliberation(
        start_bridge: Callable[..., BridgeProcess], redis_url: str) -> None:
    """Upstream ran every call anew; a task_id reused after the window is new work."""
    bridge = start_bridge(RAY_EXECUTOR_IDEMPOTENCY_TTL_SECONDS="2")
    client = redis.Redis.from_url(redis_url)
    key = Keys(bridge.prefix).idempotency("task:ceremony-1:story-2:role-QA")
    req = request(task_id="ceremony-1:story-2:role-QA", agents=1)
    first = bridge.stub().ExecuteDeliberation(req)
    assert 0 < client.ttl(key) <= 2  # the window, not the state's 7 days
    until(lambda: not client.exists(key), "the idempotency key to expire", 30)
    second = bridge.stub().ExecuteDeliberation(req)
    assert second.deliberation_id != first.deliberation_id and second.status == "submitted"
    assert "already submitted" not in second.message
    old = bridge.stub().GetDeliberationStatus(
        pb.GetDeliberationStatusRequest(deliberation_id=first.deliberation_id))
    assert old.status == "queued"  # the first one's state stays
    assert len(queued(redis_url, bridge)) == 2


BAD_REQUESTS = {
    "task_id": request(task_id=" "),
    "task_description": request(task_description=""),
    "agents": request(agents=0),
    "agents[1].id": request(agents=[pb.Agent(id="a", role="DEV"), pb.Agent(id="a", role="QA")]),
    "agents[0].id": request(agents=[pb.Agent(id="has space", role="DEV")]),
    "agents[0].role": request(role="", agents=[pb.Agent(id="a")]),
    "constraints.timeout_seconds": request(constraints=pb.TaskConstraints(timeout_seconds=-1)),
    "constraints.max_retries": request(constraints=pb.TaskConstraints(max_retries=-3)),
    "vllm_url": request(vllm_url="ftp://nowhere"),
    "request": request(task_description="x" * 60_000, agents=[
        pb.Agent(id=f"a{i}", role="DEV", prompt_template="y" * 65_000) for i in range(16)]),
}


@pytest.mark.parametrize("field", sorted(BAD_REQUESTS))
def test_bad_input_is_refused_with_the_field_named(field: str, bridge: BridgeProcess,
                                                   redis_url: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        bridge.stub().ExecuteDeliberation(BAD_REQUESTS[field])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(f"{field}:"), caught.value.details()
    client = redis.Redis.from_url(redis_url)
    assert client.keys(f"{bridge.prefix}:*") == [] and queued(redis_url, bridge) == []


def test_oversized_fields_and_unknown_roles(start_bridge: Any, redis_url: str) -> None:
    bridge = start_bridge(RAY_EXECUTOR_ALLOWED_ROLES="DEV,QA", RAY_EXECUTOR_MAX_FIELD_BYTES="100")
    stub = bridge.stub()
    for bad, field in [
        (request(agents=[pb.Agent(id="a", role="WIZARD")]), "agents[0].role"),
        (request(task_description="é" * 51), "task_description"),
        (request(role="DEV", agents=[pb.Agent(id="a", prompt_template="p" * 101)]),
         "agents[0].prompt_template"),
    ]:
        with pytest.raises(grpc.RpcError) as caught:
            stub.ExecuteDeliberation(bad)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details().startswith(field), caught.value.details()
    assert queued(redis_url, bridge) == []
    ok = stub.ExecuteDeliberation(request(agents=[pb.Agent(id="a", role="qa")]))
    assert ok.status == "submitted"


def test_status_stats_and_not_found(bridge: BridgeProcess) -> None:
    stub = bridge.stub()
    stub.ExecuteDeliberation(request(agents=2))
    status = stub.GetStatus(pb.GetStatusRequest(include_stats=True))
    # No worker here (tests/bridge/test_end_to_end.py starts one and sees "healthy").
    assert status.status == "degraded" and status.uptime_seconds >= 0
    assert status.message.startswith(f"no live worker on queue '{bridge.queue}'"), status
    assert status.stats.total_deliberations == 1 and status.stats.active_deliberations == 1
    assert status.stats.queued_messages == 2
    missing = stub.GetDeliberationStatus(pb.GetDeliberationStatusRequest(deliberation_id="nope"))
    assert missing.status == "not_found" and "not found" in missing.error_message
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetDeliberationStatus(pb.GetDeliberationStatusRequest())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "deliberation_id" in caught.value.details()


def test_cancel_and_watch(bridge: BridgeProcess) -> None:
    stub = bridge.stub()
    reply = stub.ExecuteDeliberation(request(agents=2))
    events: List[pb.DeliberationEvent] = []

    def watch() -> None:
        events.extend(stub.WatchDeliberation(
            pb.WatchDeliberationRequest(deliberation_id=reply.deliberation_id), timeout=30))

    watcher = threading.Thread(target=watch)
    watcher.start()
    until(lambda: events, "the watch stream's first event")  # the cancel comes to a watcher
    cancelled = stub.CancelDeliberation(pb.CancelDeliberationRequest(
        deliberation_id=reply.deliberation_id, reason="changed plans"))
    assert cancelled.status == "cancelled"
    watcher.join(30)
    assert not watcher.is_alive(), "the watch stream ends with the deliberation"
    assert [e.event for e in events] == ["submitted", "cancelled"]
    assert json.loads(events[-1].data_json)["reason"] == "changed plans"
    again = stub.CancelDeliberation(pb.CancelDeliberationRequest(
        deliberation_id=reply.deliberation_id))
    assert again.status == "cancelled" and again.message == "already cancelled"
    status = stub.GetDeliberationStatus(
        pb.GetDeliberationStatusRequest(deliberation_id=reply.deliberation_id))
    assert status.status == "cancelled" and "changed plans" in status.error_message
    assert [a.status for a in status.agents] == ["cancelled", "cancelled"]
    assert all(a.end_time.seconds for a in status.agents)
    for call, req in [(stub.CancelDeliberation, pb.CancelDeliberationRequest),
                      (stub.WatchDeliberation, pb.WatchDeliberationRequest)]:
        with pytest.raises(grpc.RpcError) as caught:
            result = call(req(deliberation_id="delib-missing"))
            list(result) if not isinstance(result, pb.CancelDeliberationResponse) else None
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_and_reflection(bridge: BridgeProcess) -> None:
    channel = grpc.insecure_channel(bridge.address)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "ray_executor.v1.RayExecutorService"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        list_services="")]))
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"ray_executor.v1.RayExecutorService", "grpc.health.v1.Health"} <= names


def test_a_stop_under_load_answers_every_call_and_half_writes_nothing(
        bridge: BridgeProcess, redis_url: str) -> None:
    """SIGTERM while 32 callers keep submitting: calls in flight finish, later ones are
    refused, and exactly the deliberations whose submit was answered are enqueued."""
    answered: List[str] = []  # task ids the bridge said were submitted
    answered_by = [0] * 32  # answers per caller
    refused: List[grpc.StatusCode] = []

    async def caller(channel: grpc.aio.Channel, index: int) -> None:
        stub = rpc.RayExecutorServiceStub(channel)
        for n in range(10_000):
            task_id = f"stop-{index}-{n}"
            try:
                await stub.ExecuteDeliberation(request(task_id=task_id, agents=1), timeout=20)
            except grpc.aio.AioRpcError as exc:
                refused.append(exc.code())
                return
            answered.append(task_id)
            answered_by[index] += 1

    async def scenario() -> None:
        async with grpc.aio.insecure_channel(bridge.address) as channel:
            callers = [asyncio.ensure_future(caller(channel, i)) for i in range(32)]
            # The stop comes under load: every caller has been answered and keeps calling.
            await until_async(lambda: all(answered_by), "an answer to each of the 32 callers")
            bridge.process.terminate()
            await asyncio.gather(*callers)

    asyncio.run(scenario())
    assert bridge.process.wait(30) == 0
    assert len(refused) == 32, refused  # each caller went on until the stop refused it
    assert set(refused) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, refused
    enqueued = [m["kwargs"]["task_id"] for m in queued(redis_url, bridge)]
    assert sorted(enqueued) == sorted(answered), "an answered call not enqueued, or the reverse"


def test_the_client_waits_times_out_and_reports_a_cancelled_deliberation(
        bridge: BridgeProcess) -> None:
    """``RayExecutorClient.wait``: no worker runs here, so the deliberation stays queued until
    the client itself cancels it."""

    async def scenario() -> None:
        async with RayExecutorClient(bridge.address) as client:
            submitted = await client.execute_deliberation(
                task_id=f"wait-{time.time_ns()}", task_description="Wait for me",
                agents=[("a1", "DEV")])
            with pytest.raises(DeliberationTimeout):
                await client.wait(submitted.deliberation_id, timeout=0.5)
            waiting = asyncio.ensure_future(client.wait(submitted.deliberation_id, timeout=30))
            await asyncio.sleep(0.3)
            cancelled = await client.cancel(submitted.deliberation_id, reason="not needed")
            assert cancelled.status == "cancelled"
            with pytest.raises(DeliberationFailed) as caught:
                await waiting
            assert caught.value.status.status == "cancelled"
            assert "not needed" in str(caught.value)

    asyncio.run(scenario())


def test_the_best_result_is_the_highest_score_then_the_earliest_completion() -> None:
    agents = [{"agent_id": "a", "status": "completed", "result": {"score": 0.5}, "end_ms": 10},
              {"agent_id": "b", "status": "completed", "result": {"score": 0.9}, "end_ms": 30},
              {"agent_id": "c", "status": "completed", "result": {"score": 0.9}, "end_ms": 20},
              {"agent_id": "d", "status": "failed", "result": {"score": 1.0}, "end_ms": 5},
              {"agent_id": "e", "status": "completed", "result": {}, "end_ms": 1}]
    assert best_result(agents)["agent_id"] == "c"  # type: ignore[index]
    assert best_result([agents[3]]) is None  # failed agents never count


async def concurrently(address: str, requests: List[pb.ExecuteDeliberationRequest]
                       ) -> List[Any]:
    """Each request's reply, or its ``AioRpcError``, all sent at once on one channel (so they
    reach the bridge together and are recorded in the same group commits)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = rpc.RayExecutorServiceStub(channel)
        await channel.channel_ready()
        return await asyncio.gather(*(stub.ExecuteDeliberation(r, timeout=20) for r in requests),
                                    return_exceptions=True)


def test_fifty_concurrent_duplicates_make_one_deliberation(bridge: BridgeProcess,
                                                           redis_url: str) -> None:
    """The same task_id 50 times at once: the calls share group commits, whose script checks
    each submission's idempotency key after the previous one's write."""
    same = request(agents=2)
    replies = asyncio.run(concurrently(bridge.address, [same] * 50))
    assert all(isinstance(r, pb.ExecuteDeliberationResponse) for r in replies), replies
    assert {r.status for r in replies} == {"submitted"}
    assert len({r.deliberation_id for r in replies}) == 1
    assert sum("already submitted" not in r.message for r in replies) == 1
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    assert client.hget(f"{bridge.prefix}:stats", "total") == "1"
    assert len(queued(redis_url, bridge)) == 2


def test_a_submission_redis_refuses_mid_batch_alone_answers_unavailable(
        bridge: BridgeProcess, redis_url: str) -> None:
    """30 calls at once, 10 of whose idempotency keys Redis holds as lists (a real error of
    the script's GET, in the middle of the group): exactly those 10 are answered UNAVAILABLE
    and have nothing written; the 20 others are submitted and their messages enqueued."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    requests = [request(task_id=f"mid-{i}-{time.time_ns()}", agents=1) for i in range(30)]
    broken = {r.task_id for r in requests[1::3]}
    for task_id in broken:
        client.rpush(f"{bridge.prefix}:idem:task:{task_id}", "not a deliberation id")
    replies = asyncio.run(concurrently(bridge.address, requests))
    refused = {r.task_id for r, reply in zip(requests, replies)
               if isinstance(reply, grpc.aio.AioRpcError)}
    assert refused == broken, replies
    for reply in replies:
        if isinstance(reply, grpc.aio.AioRpcError):
            assert reply.code() == grpc.StatusCode.UNAVAILABLE and "WRONGTYPE" in reply.details()
        else:
            assert reply.status == "submitted" and "already" not in reply.message
    enqueued = [m["kwargs"]["task_id"] for m in queued(redis_url, bridge)]
    assert sorted(enqueued) == sorted(r.task_id for r in requests if r.task_id not in broken)
    assert client.hget(f"{bridge.prefix}:stats", "total") == "20"
    records = [client.hget(key, "task_id") for key in client.scan_iter(f"{bridge.prefix}:d:*")
               if client.type(key) == "hash" and not key.endswith((":agents", ":messages"))]
    assert sorted(records) == sorted(enqueued)
