"""TLS, mTLS and token auth; Redis outages; a client built only from the .proto file."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bridge.client import RayExecutorClient
from harness import servers
from ray_executor.v1 import ray_executor_pb2 as pb
from ray_executor.v1 import ray_executor_pb2_grpc as rpc
from tests.bridge.conftest import make_pki, request

ROOT = Path(__file__).resolve().parents[2]


def test_tls_and_token(start_bridge: Any, tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    bridge = start_bridge(RAY_EXECUTOR_GRPC_TLS_CERT=pki["server.pem"],
                          RAY_EXECUTOR_GRPC_TLS_KEY=pki["server.key"],
                          RAY_EXECUTOR_GRPC_TOKEN="s3cret-token")

    async def scenario() -> None:
        async with RayExecutorClient(bridge.address, token="s3cret-token",
                                     tls_ca=pki["ca.pem"]) as client:
            submitted = await client.execute_deliberation(
                task_id="tls-1", task_description="over TLS", agents=[("a1", "DEV")])
            assert submitted.status == "submitted"
            assert (await client.status(submitted.deliberation_id)).status == "queued"
        for token in ("", "wrong"):
            async with RayExecutorClient(bridge.address, token=token,
                                         tls_ca=pki["ca.pem"]) as client:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await client.service_status()
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED

    asyncio.run(scenario())
    plaintext = rpc.RayExecutorServiceStub(grpc.insecure_channel(bridge.address))
    with pytest.raises(grpc.RpcError) as caught:
        plaintext.GetStatus(pb.GetStatusRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    secure = grpc.secure_channel(bridge.address, grpc.ssl_channel_credentials(
        Path(pki["ca.pem"]).read_bytes()))
    health = health_pb2_grpc.HealthStub(secure).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes need no token
    assert "s3cret-token" not in bridge.log.read_text()


def test_mutual_tls(start_bridge: Any, tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    bridge = start_bridge(RAY_EXECUTOR_GRPC_TLS_CERT=pki["server.pem"],
                          RAY_EXECUTOR_GRPC_TLS_KEY=pki["server.key"],
                          RAY_EXECUTOR_GRPC_TLS_CLIENT_CA=pki["ca.pem"])

    async def scenario() -> None:
        async with RayExecutorClient(bridge.address, tls_ca=pki["ca.pem"],
                                     tls_cert=pki["client.pem"],
                                     tls_key=pki["client.key"]) as client:
            answer = await client.service_status()  # no worker here: degraded, saying so
            assert answer.status == "degraded" and "no live worker" in answer.message, answer
        async with RayExecutorClient(bridge.address, tls_ca=pki["ca.pem"], timeout=5) as client:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.service_status()
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

    asyncio.run(scenario())


def test_redis_outage_gives_unavailable_and_writes_nothing(start_bridge: Any,
                                                           tmp_path: Path) -> None:
    server = servers.valkey(tmp_path, appendonly=True).start()
    try:
        bridge = start_bridge(REDIS_URL=server.url)
        stub = bridge.stub()
        assert stub.ExecuteDeliberation(request(agents=1)).status == "submitted"
        server.stop()
        with pytest.raises(grpc.RpcError) as caught:
            stub.ExecuteDeliberation(request(task_id="during-outage", agents=3))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "Redis" in caught.value.details()
        assert stub.GetStatus(pb.GetStatusRequest(include_stats=True)).status == "degraded"
        server.start()
        client = redis.Redis.from_url(server.url)
        assert client.llen(f"dramatiq:{bridge.queue}") == 1, "only the first deliberation"
        assert client.get(f"{bridge.prefix}:idem:task:during-outage") is None
        again = stub.ExecuteDeliberation(request(task_id="during-outage", agents=3))
        assert again.status == "submitted"
        assert client.llen(f"dramatiq:{bridge.queue}") == 4
    finally:
        server.stop()


def test_a_client_generated_from_the_proto_alone(bridge: Any, tmp_path: Path) -> None:
    """What the Orchestrator does: compile the .proto itself and call the bridge."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "executor.proto").write_bytes(
        (ROOT / "protos/ray_executor/v1/ray_executor.proto").read_bytes())
    from grpc_tools import protoc

    assert protoc.main(["protoc", f"-I{source}", f"-I{Path(protoc.__file__).parent / '_proto'}",
                        f"--python_out={source}", f"--grpc_python_out={source}",
                        "executor.proto"]) == 0
    code = textwrap.dedent(f"""
        import grpc, executor_pb2 as m, executor_pb2_grpc as s
        stub = s.RayExecutorServiceStub(grpc.insecure_channel({bridge.address!r}))
        r = stub.ExecuteDeliberation(m.ExecuteDeliberationRequest(
            task_id="proto-only", task_description="d", role="QA",
            constraints=m.TaskConstraints(timeout_seconds=30, max_retries=1),
            agents=[m.Agent(id="x", role="QA", model="m")]))
        assert r.status == "submitted" and r.deliberation_id, r
        st = stub.GetDeliberationStatus(m.GetDeliberationStatusRequest(
            deliberation_id=r.deliberation_id))
        assert st.status == "queued" and st.error_message == "", st
        g = stub.GetStatus(m.GetStatusRequest(include_stats=True))
        assert g.status == "degraded" and "no live worker" in g.message, g  # none started
        assert g.stats.total_deliberations >= 1, g
        jobs = stub.GetActiveJobs(m.GetActiveJobsRequest()).jobs
        j = [j for j in jobs if j.submission_id == r.deliberation_id][0]
        assert (j.role, j.task_id, j.status) == ("QA", "proto-only", "queued"), j
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=f"{source}{os.pathsep}{sysconfig.get_paths()['purelib']}")
    run = subprocess.run([sys.executable, "-S", "-c", code], env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.stdout.strip() == "ok", run.stderr
