"""Dramatiq's internals, guarded: what ``submit.lua`` writes is byte for byte what Dramatiq's
own ``RedisBroker.enqueue`` stores for the same message, and any other Dramatiq release is
refused at import with a message saying what to do."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from typing import Any, Dict, List, Tuple
from urllib.parse import urlsplit, urlunsplit

import dramatiq
import pytest
import redis
from dramatiq.brokers.redis import RedisBroker

from core import dramatiq_internals
from core.connections import connect
from core.contract import AgentJob
from core.settings import Settings
from core.store import DeliberationStore
from tests.bridge.test_state import new_record


def dramatiq_keys(client: redis.Redis, queue: str) -> Dict[bytes, Any]:
    """Every key of Dramatiq's layout for ``queue``, with its content."""
    found: Dict[bytes, Any] = {}
    for key in client.scan_iter(match=f"{dramatiq_internals.NAMESPACE}:{queue}*"):
        kind = client.type(key)
        if kind == b"list":
            found[key] = client.lrange(key, 0, -1)
        elif kind == b"hash":
            found[key] = client.hgetall(key)
        else:
            found[key] = (kind, None)
    return found


def agent_jobs(deliberation_id: str, count: int) -> List[AgentJob]:
    return [AgentJob(deliberation_id=deliberation_id, task_id="task", agent_id=f"a{i}",
                     agent_index=i, num_agents=count, role="DEV", model="m",
                     prompt_template="", task_description="déjà vu ✓", task_role="DEV",
                     vllm_url="http://127.0.0.1:9/", timeout_seconds=30, max_retries=2,
                     metadata={"k": "v"}) for i in range(count)]


def submit_ours(redis_url: str, queue: str) -> None:
    settings = Settings(redis_url=redis_url, queue=queue, key_prefix=f"t{uuid.uuid4().hex[:8]}")

    async def main() -> None:
        client = connect(redis_url)
        try:
            record = new_record()
            store = DeliberationStore(client, settings)
            await store.submit(f"task:{record['id']}", record, agent_jobs(record["id"], 3),
                               {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"})
        finally:
            await client.close()

    asyncio.run(main())


def enqueue_theirs(client: redis.Redis, queue: str,
                   ours: List[Tuple[bytes, Dict[str, Any]]]) -> None:
    """Enqueue each of our messages again through ``RedisBroker.enqueue``, with the same
    message id, timestamp and redis message id (Dramatiq draws the last from ``uuid4``)."""
    broker = RedisBroker(client=client)
    broker.declare_queue(queue)
    for redis_id, fields in ours:
        message = dramatiq.Message(
            queue_name=fields["queue_name"], actor_name=fields["actor_name"],
            args=tuple(fields["args"]), kwargs=fields["kwargs"],
            options={k: v for k, v in fields["options"].items() if k != "redis_message_id"},
            message_id=fields["message_id"], message_timestamp=fields["message_timestamp"])
        uuid4 = dramatiq.brokers.redis.uuid4
        dramatiq.brokers.redis.uuid4 = lambda redis_id=redis_id: redis_id.decode()
        try:
            broker.enqueue(message)
        finally:
            dramatiq.brokers.redis.uuid4 = uuid4


def test_submit_writes_what_redis_broker_enqueue_writes(redis_url: str) -> None:
    queue = f"q{uuid.uuid4().hex[:8]}"
    ours_url, theirs_url = (urlunsplit(urlsplit(redis_url)._replace(path=f"/{db}"))
                            for db in (2, 3))
    ours_db, theirs_db = redis.Redis.from_url(ours_url), redis.Redis.from_url(theirs_url)
    submit_ours(ours_url, queue)
    ours = dramatiq_keys(ours_db, queue)
    messages = ours[dramatiq_internals.messages_key(queue).encode()]
    assert len(messages) == 3
    order = ours[dramatiq_internals.queue_key(queue).encode()]
    enqueue_theirs(theirs_db, queue, [(redis_id, json.loads(messages[redis_id]))
                                     for redis_id in order])
    theirs = dramatiq_keys(theirs_db, queue)
    assert theirs == ours  # the same keys, the same ids in the same order, the same bytes
    ours_db.flushdb()
    theirs_db.flushdb()


def test_another_dramatiq_release_is_refused_naming_both_and_the_way_out() -> None:
    with pytest.raises(dramatiq_internals.UnsupportedDramatiq) as refused:
        dramatiq_internals.check_version("2.0.0")
    message = str(refused.value)
    assert "Dramatiq 2.0.0" in message and "1.18.0" in message
    assert "core/dramatiq_internals.py" in message and "dramatiq==1.18.0" in message
    dramatiq_internals.check_version(dramatiq.__version__)  # this environment's passes


def test_the_guard_runs_at_import() -> None:
    code = ("import dramatiq; dramatiq.__version__ = '1.19.0'\n"
            "try:\n    import core.dramatiq_internals\n"
            "except ImportError as exc:\n    print(type(exc).__name__, exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith("UnsupportedDramatiq") and "Dramatiq 1.19.0" in out


def test_a_restarted_group_takes_back_what_its_previous_processes_held(redis_url: str) -> None:
    """Real Dramatiq consumers fetch without acking, as a SIGKILLed process leaves them: the
    group's restart puts its own processes' messages back first, and only theirs."""
    queue = f"q{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(redis_url)

    def broker_of(group: str) -> RedisBroker:
        broker = RedisBroker(url=redis_url)
        broker.broker_id = dramatiq_internals.process_id(group)
        broker.declare_queue(queue)
        return broker

    def fetch(broker: RedisBroker, count: int) -> List[str]:
        consumer = broker.consume(queue, prefetch=count, timeout=100)
        taken: List[str] = []
        for message in consumer:  # Dramatiq registers each in the worker's ack set
            if message is not None:
                taken.append(message.message_id)
            if len(taken) == count:
                return taken
        raise AssertionError("unreachable")

    crashed = [broker_of("grp"), broker_of("grp")]
    other, alike = broker_of("grp2"), broker_of("grp.1")  # other groups, similar names
    sent = [crashed[0].enqueue(dramatiq.Message(
        queue_name=queue, actor_name="noop", args=(i,), kwargs={}, options={})).message_id
        for i in range(8)]
    held = fetch(crashed[0], 2) + fetch(crashed[1], 2)
    others = fetch(other, 1) + fetch(alike, 1)
    assert held + others == sent[:6]

    found = dramatiq_internals.requeue_previous(client, "grp", queue)

    assert found == {"processes": 2, "messages": 4}
    fresh = broker_of("grp")
    assert sorted(fetch(fresh, 4)) == sorted(held), "the crashed processes' messages, first"
    assert fetch(fresh, 2) == sent[6:]
    heartbeats = {m.decode() for m in client.zrange(f"{dramatiq_internals.NAMESPACE}:"
                                                    "__heartbeats__", 0, -1)}
    assert not heartbeats & {b.broker_id for b in crashed}
    for broker in (other, alike):  # untouched: still theirs
        assert broker.broker_id in heartbeats
        assert client.scard(f"dramatiq:__acks__.{broker.broker_id}.{queue}") == 1
    assert dramatiq_internals.requeue_previous(client, "grp-none", queue) == {
        "processes": 0, "messages": 0}
    client.delete(*client.keys(f"dramatiq:*{queue}*"))
