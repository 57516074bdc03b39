"""Credentials on every connection: NATS user/password and Redis passwords are required and
wrong ones refused; messages cross the broker as JSON, never pickle."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from pathlib import Path
from typing import Any, Tuple

import grpc
import nats
import pytest
import redis

from harness import servers
from tests.bridge.conftest import make_pki, request


def test_nats_refuses_wrong_credentials_and_the_bridge_uses_right_ones(
        start_bridge: Any, tmp_path: Path) -> None:
    server = servers.nats(tmp_path, extra_args=["--user", "rx", "--pass", "n4ts-secret"]).start()
    port = server.port
    try:
        async def refused(url: str) -> None:
            with pytest.raises(Exception) as caught:
                await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0,
                                   allow_reconnect=False)
            assert "uthorization" in str(caught.value) or "refused" in str(caught.value), \
                caught.value

        asyncio.run(refused(f"nats://127.0.0.1:{port}"))
        asyncio.run(refused(f"nats://rx:wrong@127.0.0.1:{port}"))
        bridge = start_bridge(NATS_URL=f"nats://rx:n4ts-secret@127.0.0.1:{port}")
        reply = bridge.stub().ExecuteDeliberation(request(agents=1))

        async def submitted_event() -> Any:
            nc = await nats.connect(f"nats://rx:n4ts-secret@127.0.0.1:{port}")
            js = nc.jetstream()
            deadline = time.monotonic() + 20
            while True:
                try:
                    sub = await js.subscribe("orchestration.deliberation.submitted",
                                             ordered_consumer=True)
                    msg = await sub.next_msg(timeout=2)
                    break
                except Exception:
                    assert time.monotonic() < deadline, "no submitted event"
                    await asyncio.sleep(0.5)
            await nc.close()
            return json.loads(msg.data)

        assert asyncio.run(submitted_event())["deliberation_id"] == reply.deliberation_id
        assert "n4ts-secret" not in bridge.log.read_text()
    finally:
        server.stop()


def test_redis_password_is_required(start_bridge: Any, tmp_path: Path) -> None:
    server = servers.valkey(tmp_path, password="r3dis-secret").start()
    try:
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port, password="wrong").ping()
        with pytest.raises((redis.AuthenticationError, redis.exceptions.ResponseError)):
            redis.Redis(port=server.port).set("k", "v")  # no password at all
        wrong = start_bridge(REDIS_URL=f"redis://:wrong@127.0.0.1:{server.port}/0")
        with pytest.raises(grpc.RpcError) as caught:
            wrong.stub().ExecuteDeliberation(request(agents=1))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value
        right = start_bridge(REDIS_URL=server.url)
        assert right.stub().ExecuteDeliberation(request(agents=2)).status == "submitted"
        client = redis.Redis.from_url(server.url)
        for raw in client.hvals(f"dramatiq:{right.queue}.msgs"):
            assert not raw.startswith(b"\x80"), "pickle on the broker"
            assert json.loads(raw)["actor_name"] == "vllm_agent"
        for bridge in (wrong, right):
            assert "r3dis-secret" not in bridge.log.read_text()
    finally:
        server.stop()


def test_nats_over_tls_needs_the_ca(start_bridge: Any, tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    server = servers.nats(tmp_path, extra_args=[
        "--tls", "--tlscert", pki["server.pem"], "--tlskey", pki["server.key"],
        "--user", "rx", "--pass", "tls-secret"]).start()
    url = f"tls://rx:tls-secret@127.0.0.1:{server.port}"
    try:
        async def connect(**options: Any) -> None:
            nc = await nats.connect(url, connect_timeout=3, allow_reconnect=False, **options)
            await nc.close()

        with pytest.raises((OSError, nats.errors.Error)):  # the private CA is not trusted
            asyncio.run(connect())
        trusted = ssl.create_default_context(cafile=pki["ca.pem"])
        asyncio.run(connect(tls=trusted))
        bridge = start_bridge(NATS_URL=url, RAY_EXECUTOR_NATS_TLS_CA=pki["ca.pem"])

        async def submit_and_hear() -> Tuple[Any, Any]:
            nc = await nats.connect(url, tls=trusted, allow_reconnect=False)
            try:
                heard = await nc.subscribe("orchestration.deliberation.submitted")
                await nc.flush()
                reply = bridge.stub().ExecuteDeliberation(request(agents=1), timeout=30)
                return reply, await heard.next_msg(timeout=30)
            finally:
                await nc.close()

        reply, event = asyncio.run(submit_and_hear())  # the bridge published over TLS
        assert reply.status == "submitted" and reply.deliberation_id, reply
        assert json.loads(event.data)["deliberation_id"] == reply.deliberation_id
        assert "tls-secret" not in bridge.log.read_text()
    finally:
        server.stop()
