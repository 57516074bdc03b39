"""Bridge processes for the tests: the real ``ray-executor bridge`` command, each with its own
key prefix and queue so tests sharing one Redis do not see each other's work."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Sequence

import dramatiq
import grpc
import nats
import pytest
from dramatiq.brokers.redis import RedisBroker

from core.contract import Subjects
from core.settings import Settings
from harness import servers
from harness.standin_llm import StandinThread, run_in_thread
from ray_executor.v1 import ray_executor_pb2 as pb
from ray_executor.v1 import ray_executor_pb2_grpc as rpc
from tests.bridge.browsing import Chromium, Dashboard, serving
from tests.workers import WorkerGroup

CLI = str(Path(sys.executable).parent / "ray-executor")


class BridgeProcess:
    def __init__(self, env: Dict[str, str], log: Path) -> None:
        self.env = env
        self.port = int(env["RAY_EXECUTOR_GRPC_PORT"])
        self.address = f"127.0.0.1:{self.port}"
        self.queue = env["RAY_EXECUTOR_QUEUE"]
        self.prefix = env["RAY_EXECUTOR_KEY_PREFIX"]
        self.log = log
        self.process = subprocess.Popen([CLI, "bridge"], env=env, stdout=log.open("ab"),
                                        stderr=subprocess.STDOUT)
        servers.wait_for_port(self.port, 30, self.process)

    def stub(self) -> rpc.RayExecutorServiceStub:
        return rpc.RayExecutorServiceStub(grpc.insecure_channel(self.address))

    def stop(self) -> int:
        self.process.terminate()
        return self.process.wait(30)


@pytest.fixture
def start_bridge(redis_url: str, nats_url: str, tmp_path: Path
                 ) -> Iterator[Callable[..., BridgeProcess]]:
    started: List[BridgeProcess] = []

    def start(**overrides: str) -> BridgeProcess:
        tag = uuid.uuid4().hex[:8]
        env = dict(os.environ, REDIS_URL=redis_url, NATS_URL=nats_url,
                   RAY_EXECUTOR_GRPC_HOST="127.0.0.1",
                   RAY_EXECUTOR_GRPC_PORT=str(servers.free_port()),
                   RAY_EXECUTOR_METRICS_PORT=str(servers.free_port()),
                   RAY_EXECUTOR_QUEUE=f"q{tag}", RAY_EXECUTOR_KEY_PREFIX=f"t{tag}",
                   RAY_EXECUTOR_LOG_FORMAT="text")
        env.update(overrides)
        bridge = BridgeProcess(env, tmp_path / f"bridge-{tag}.log")
        started.append(bridge)
        return bridge

    yield start
    hung = []
    for bridge in started:
        if bridge.process.poll() is None:
            try:
                bridge.stop()
            except subprocess.TimeoutExpired:  # killed, so no bridge outlives its test
                bridge.process.kill()
                bridge.process.wait(10)
                hung.append(bridge.log.name)
    assert not hung, f"bridges that did not stop within 30 s of SIGTERM (killed): {hung}"


class Channel:
    """One test's stream, subjects and durable consumer (as bridge environment)."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:8]
        self.tag = tag
        self.stream = f"CMD_{tag}"
        self.consumer = f"ingress-{tag}"
        self.env = {"RAY_EXECUTOR_NATS_COMMANDS_PREFIX": f"t{tag}.cmd",
                    "RAY_EXECUTOR_NATS_COMMANDS_STREAM": self.stream,
                    "RAY_EXECUTOR_NATS_CONSUMER": self.consumer}
        self.subjects = Subjects(Settings.from_env(self.env))


def delete_streams(nats_url: str, *names: str) -> None:
    """Delete a test's streams (those that exist)."""
    async def delete() -> None:
        nc = await nats.connect(nats_url)
        for name in names:
            with contextlib.suppress(Exception):
                await nc.jetstream().delete_stream(name)
        await nc.close()

    asyncio.run(delete())


@pytest.fixture
def channel(nats_url: str) -> Iterator[Channel]:
    chan = Channel()
    yield chan
    delete_streams(nats_url, chan.stream)


class Responses:
    """One test's responses and streaming streams and subject prefixes (as bridge
    environment)."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:8]
        self.stream = f"RESP_{tag}"
        self.prefix = f"t{tag}.agent.response"
        self.streaming_stream = f"STREAMING_{tag}"
        self.streaming_prefix = f"t{tag}.vllm.streaming"
        self.env = {"RAY_EXECUTOR_NATS_RESPONSES_STREAM": self.stream,
                    "RAY_EXECUTOR_NATS_RESPONSES_PREFIX": self.prefix,
                    "RAY_EXECUTOR_NATS_STREAMING_STREAM": self.streaming_stream,
                    "RAY_EXECUTOR_NATS_STREAMING_PREFIX": self.streaming_prefix}


@pytest.fixture
def responses(nats_url: str) -> Iterator[Responses]:
    made = Responses()
    yield made
    delete_streams(nats_url, made.stream, made.streaming_stream)


@pytest.fixture
def bridge(start_bridge: Callable[..., BridgeProcess]) -> BridgeProcess:
    return start_bridge()


@pytest.fixture
def standin() -> Iterator[StandinThread]:
    server = run_in_thread(latency=0.2, model="standin-model")
    yield server
    server.stop()


@pytest.fixture
def start_worker(ray_address: str, tmp_path: Path) -> Iterator[Callable[..., WorkerGroup]]:
    started: List[WorkerGroup] = []

    def start(bridge: BridgeProcess, command: Sequence[str] = (), **overrides: str
              ) -> WorkerGroup:
        env = dict(bridge.env, RAY_ADDRESS=ray_address, RAY_EXECUTOR_WORKER_PROCESSES="1",
                   RAY_EXECUTOR_WORKER_THREADS="8",
                   RAY_EXECUTOR_WORKER_METRICS_PORT=str(servers.free_port()))
        env.update(overrides)
        env.pop("VIRTUAL_ENV", None)
        worker = WorkerGroup(env, tmp_path / f"worker-{len(started)}.log", command=command)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop(kill_on_timeout=True)


def request(task_id: str = "", agents: object = 3, **fields: object
            ) -> pb.ExecuteDeliberationRequest:
    """A valid request with ``agents`` agents (a count or a list); keywords override fields."""
    base = pb.ExecuteDeliberationRequest(
        task_id=task_id or f"task-{uuid.uuid4().hex[:8]}",
        task_description="Design a rate limiter for the GPU queue",
        role="DEV",
        constraints=pb.TaskConstraints(story_id="S-1", plan_id="P-1", timeout_seconds=60,
                                       max_retries=2, metadata={"rubric": "clear, short"}),
        agents=agents if isinstance(agents, list) else [
            pb.Agent(id=f"agent-{i}", role=("DEV", "QA", "ARCHITECT")[i % 3])
            for i in range(int(agents))  # type: ignore[call-overload]
        ],
        vllm_url="http://127.0.0.1:9/", vllm_model="test-model",
    )
    for name, value in fields.items():
        if isinstance(value, list):
            del getattr(base, name)[:]
            getattr(base, name).extend(value)
        elif hasattr(value, "CopyFrom"):
            getattr(base, name).CopyFrom(value)
        else:
            setattr(base, name, value)
    return base


def run_stock_worker(broker: RedisBroker, queue: str, count: int, *, threads: int = 2,
                     timeout: float = 20) -> List[Dict[str, Any]]:
    """A stock Dramatiq worker on ``broker`` runs a trivial ``vllm_agent`` actor on ``queue``
    (it only keeps each message's keyword arguments) until ``count`` messages have run, failing
    the test past ``timeout`` seconds; then it stops the worker and closes the broker. Returns
    the jobs' keyword arguments in the order they ran."""
    seen: List[Dict[str, Any]] = []
    done = threading.Event()

    @dramatiq.actor(actor_name="vllm_agent", queue_name=queue, broker=broker)
    def vllm_agent(**job: Any) -> None:
        seen.append(job)
        if len(seen) >= count:
            done.set()

    worker = dramatiq.Worker(broker, worker_threads=threads, worker_timeout=100)
    worker.start()
    try:
        assert done.wait(timeout), f"{len(seen)} of {count} messages ran"
    finally:
        worker.stop()
        broker.close()
    return seen


def make_pki(folder: Path) -> Dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made by openssl."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    # Extensions Python's strict X.509 checks (3.13) require of a CA and its leaves.
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout", "ca.key", "-out", "ca.pem")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr")
        (folder / f"{name}.ext").write_text(
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
            "authorityKeyIdentifier=keyid,issuer\nsubjectKeyIdentifier=hash\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth,clientAuth\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "1", "-extfile", f"{name}.ext", "-out", f"{name}.pem")
    return {name: str(folder / name) for name in
            ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


@pytest.fixture
def dash(start_bridge: Callable[..., BridgeProcess], redis_url: str) -> Iterator[Dashboard]:
    """A bridge, and its dashboard (``tests.bridge.browsing.serving``)."""
    with serving(start_bridge(), redis_url) as served:
        yield served


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[Chromium]:
    browser = Chromium(tmp_path / "chromium-profile", tmp_path / "chromium.log")
    yield browser
    browser.close()
