"""Redis restarts: with AOF persistence, queued and delayed messages and the deliberation
state survive; without it (the embedded default is AOF on), everything in Redis is lost —
docs/reliability.md says so."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import dramatiq
import pytest
import redis
from dramatiq.brokers.redis import RedisBroker

from harness import servers
from ray_executor.v1 import ray_executor_pb2 as pb
from tests.bridge.conftest import request


@pytest.mark.parametrize("appendonly", [True, False])
def test_queued_and_delayed_messages_across_a_redis_restart(
        appendonly: bool, start_bridge: Any, tmp_path: Path) -> None:
    server = servers.valkey(tmp_path, appendonly=appendonly).start()
    try:
        bridge = start_bridge(REDIS_URL=server.url)
        ids = [bridge.stub().ExecuteDeliberation(request(agents=3)).deliberation_id
               for _ in range(4)]
        broker = RedisBroker(url=server.url, middleware=[])
        delayed_actor = dramatiq.actor(lambda **_: None, actor_name="vllm_agent",
                                       queue_name=bridge.queue, broker=broker)
        for _ in range(5):  # e.g. retries waiting out their backoff
            broker.enqueue(delayed_actor.message_with_options(kwargs={"n": str(uuid.uuid4())}),
                           delay=600_000)
        client = redis.Redis.from_url(server.url)
        before = (client.llen(f"dramatiq:{bridge.queue}"),
                  client.hlen(f"dramatiq:{bridge.queue}.DQ.msgs"))
        assert before == (12, 5)
        server.restart()
        after = (client.llen(f"dramatiq:{bridge.queue}"),
                 client.hlen(f"dramatiq:{bridge.queue}.DQ.msgs"))
        status = bridge.stub().GetDeliberationStatus(
            pb.GetDeliberationStatusRequest(deliberation_id=ids[0]))
        if appendonly:
            assert after == before
            assert status.status == "queued" and status.total_agents == 3
        else:
            assert after == (0, 0)
            assert status.status == "not_found"
        broker.close()
    finally:
        server.stop()


def test_a_restarted_valkey_serves_once_its_start_returns(tmp_path: Path) -> None:
    """The harness's valkey is started only once it serves: replaying a large append-only
    file, it listens but answers LOADING (a test read right after a restart failed so)."""
    server = servers.valkey(tmp_path, appendonly=True).start()
    try:
        client = redis.Redis.from_url(server.url)
        for start in range(0, 1_000_000, 100_000):  # a second or so to replay
            client.mset({f"k{i}": "x" * 100 for i in range(start, start + 100_000)})
        server.restart()
        assert client.dbsize() == 1_000_000
    finally:
        server.stop()
