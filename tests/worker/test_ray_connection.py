"""The worker environment reaches a real Ray head over ray://, and a mismatch is explained."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Tuple

import pytest

from actors.connection import RayConnection

pytestmark = pytest.mark.worker_env

ROOT = Path(__file__).resolve().parents[2]


def test_connects_and_runs_a_remote_function(ray_address: str) -> None:
    import ray

    connection = RayConnection(ray_address)
    # ensure(): connect with retries, as workers do (a Ray head hands each client a server on
    # a port from a machine-wide range, which another head on this machine may take first).
    connection.ensure()
    try:
        assert connection.connected

        @ray.remote
        def square(x: int) -> int:
            return x * x

        assert ray.get(square.remote(12), timeout=60) == 144
        assert ray.get([square.remote(i) for i in range(5)], timeout=60) == [0, 1, 4, 9, 16]
    finally:
        connection.disconnect()
    assert not connection.connected


def test_the_worker_environment_is_the_clusters_python_and_ray(ray_address: str) -> None:
    """This environment (what workers run on) is Python 3.9 with the pinned Ray, and so is the
    cluster: a task reports the Python (major.minor, what Ray client compares) and Ray it
    runs on."""
    import ray

    pin = re.search(r"ray\[client\]==([0-9.]+)", (ROOT / "pyproject.toml").read_text())
    assert pin, "pyproject.toml pins ray[client]"
    here = (".".join(platform.python_version_tuple()[:2]), ray.__version__)
    assert sys.version_info[:2] == (3, 9) and ray.__version__ == pin.group(1), here
    connection = RayConnection(ray_address)
    connection.ensure()
    try:
        @ray.remote
        def versions() -> Tuple[str, str]:
            import platform

            import ray
            return ".".join(platform.python_version_tuple()[:2]), ray.__version__

        assert ray.get(versions.remote(), timeout=60) == here
    finally:
        connection.disconnect()


def test_a_mismatched_python_gets_an_actionable_error(ray_address: str) -> None:
    """The worker command on another Python (with the same Ray) refuses to start: exit 3, both
    versions named, what to change."""
    python = os.environ.get("RAY_EXECUTOR_MISMATCH_PYTHON")
    if not python:
        pytest.fail("RAY_EXECUTOR_MISMATCH_PYTHON must name a non-3.9 python with Ray (make envs)")
    env = dict(os.environ, RAY_ADDRESS=ray_address, REDIS_URL="redis://127.0.0.1:9/0")
    for _ in range(3):  # the head may fail to start a client server (a port another head
        # on this machine still holds: Ray picks them from one machine-wide range)
        run = subprocess.run([python, "-m", "actors"], capture_output=True, text=True,
                             timeout=120, env=env)
        if "Starting Ray client server failed" not in run.stderr:
            break
    assert run.returncode == 3, run.stderr[-2000:]
    [message] = [line for line in run.stderr.splitlines()
                 if line.startswith("ray-executor worker: ")]
    other = subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert f"Python {platform.python_version()}" in message  # the cluster's (this env's)
    assert f"Python {other}" in message  # the client's
    assert "ray==2.49.2" in message and "RAY_ADDRESS" in message
    assert "Traceback" not in run.stderr
