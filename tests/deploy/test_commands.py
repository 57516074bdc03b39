"""The commands the chart puts in pods, run for real: the worker readiness probe against a
/metrics it reads, and the stream hook's script against a real nats-server."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from http.server import ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Tuple

import pytest

from tests.deploy import tooling
from tests.deploy.tooling import Doc, MetricsPage, component, env_of, kinds

fake_metrics = tooling.fake_metrics

# A probe command and the stream script run with the interpreter running the tests (the
# bridge image's Python has the same standard library and nats-py).




def readiness_command(rendered: Dict[str, List[Doc]]) -> List[str]:
    commands = {tuple(d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["exec"][
        "command"]) for docs in rendered.values() for d in kinds(docs, "Deployment")
        if component(d) == "worker"}
    (command,) = commands  # every route's workers use the same probe
    assert command[:2] == ("python", "-c")
    return list(command)


@pytest.mark.parametrize(("metrics", "ready"), [
    # Booted, broker works: ready, whatever Ray does (a Ray outage must not make every worker
    # unready: nodes could not drain and the PDB would count nothing available).
    ("# TYPE ray_executor_worker_ready gauge\nray_executor_worker_ready 1.0\n"
     "ray_executor_ray_connected 0.0\n", True),
    ("ray_executor_worker_ready 1.0\nray_executor_ray_connected 1.0\n", True),
    # One process's broker cannot reach Redis.
    ("ray_executor_worker_ready 0.0\nray_executor_ray_connected 1.0\n", False),
    # Started, but no process reported yet.
    ("dramatiq_workers_total 2.0\n", False),
])
def test_worker_readiness_follows_the_broker_not_ray(
        rendered: Dict[str, List[Doc]], fake_metrics: Tuple[int, Callable[[str], None]],
        metrics: str, ready: bool) -> None:
    command = readiness_command(rendered)
    port, serve = fake_metrics
    serve(metrics)
    env = dict(os.environ, RAY_EXECUTOR_WORKER_METRICS_PORT=str(port))
    result = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True,
                            text=True, timeout=30, check=False)
    assert (result.returncode == 0) is ready, result.stderr


def test_worker_readiness_fails_when_nothing_serves_metrics(
        rendered: Dict[str, List[Doc]]) -> None:
    command = readiness_command(rendered)
    server = ThreadingHTTPServer(("127.0.0.1", 0), MetricsPage)
    port = server.server_address[1]
    server.server_close()
    env = dict(os.environ, RAY_EXECUTOR_WORKER_METRICS_PORT=str(port))
    assert subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True,
                          timeout=30, check=False).returncode != 0


def stream_job(docs: List[Doc]) -> Tuple[List[str], Dict[str, str]]:
    (job,) = kinds(docs, "Job")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python", "-c"]
    env = {k: v["value"] for k, v in env_of(container).items() if "value" in v}
    return container["args"], env


def service_streams(env: Dict[str, str]) -> Tuple[Dict[str, List[str]], float]:
    """The service's own stream table and duplicate window, from its code."""
    from core.contract import Subjects
    from core.outbox import DUPLICATE_WINDOW_SECONDS
    from core.settings import Settings

    return Subjects(Settings.from_env(env)).streams, DUPLICATE_WINDOW_SECONDS


async def stream_configs(nats_url: str, names: List[str]) -> Dict[str, Any]:
    from nats.aio.client import Client as NATS

    nc = NATS()
    await nc.connect(nats_url)
    try:
        js = nc.jetstream()
        return {name: (await js.stream_info(name)).config for name in names}
    finally:
        await nc.close()


def test_stream_hook_creates_and_resizes_the_service_streams(
        rendered: Dict[str, List[Doc]], nats_url: str) -> None:
    args, env = stream_job(rendered["full"])
    # One local nats-server: one replica and a little disk (the full values ask for a
    # cluster's 3 replicas and 50 GiB per stream).
    local = {"--replicas": "1", "--max-bytes": str(64 << 20)}
    args = [f"{a.split('=')[0]}={local[a.split('=')[0]]}" if a.split("=")[0] in local else a
            for a in args]
    run_env = dict(os.environ, **env, NATS_URL=nats_url)
    for _ in range(2):  # idempotent: the hook runs on every install and upgrade
        result = subprocess.run([sys.executable, "-c", *args], env=run_env, capture_output=True,
                                text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        assert "streams ready: AGENT_COMMANDS, AGENT_RESPONSES, ORCHESTRATOR_EVENTS" in \
            result.stdout
    expected, window = service_streams(env)
    configs = asyncio.run(stream_configs(nats_url, list(expected)))
    limits = dict(a.lstrip("-").split("=") for a in args[1:])
    for name, subjects in expected.items():
        config = configs[name]
        assert config.subjects == subjects, name
        assert config.duplicate_window == window, name
        assert config.max_age == float(limits["max-age"]), name
        assert config.max_bytes == int(limits["max-bytes"]), name
    # An upgrade with other limits resizes the existing streams.
    (default_args, _) = stream_job(rendered["default"])
    default_args = [a if not a.startswith("--max-bytes=") else f"--max-bytes={32 << 20}"
                    for a in default_args]
    result = subprocess.run([sys.executable, "-c", *default_args], env=run_env,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0 and "updated AGENT_COMMANDS" in result.stdout, result.stderr
    limits = dict(a.lstrip("-").split("=") for a in default_args[1:])
    configs = asyncio.run(stream_configs(nats_url, list(expected)))
    assert {c.max_age for c in configs.values()} == {float(limits["max-age"])}


def test_stream_hook_without_nats_url_fails(rendered: Dict[str, List[Doc]]) -> None:
    args, env = stream_job(rendered["default"])
    run_env = {k: v for k, v in os.environ.items() if k != "NATS_URL"}
    result = subprocess.run([sys.executable, "-c", *args], env=dict(run_env, **env),
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2 and "NATS_URL is not set" in result.stderr
