"""Dramatiq worker groups (``python -m actors``) for the tests, and the settings they run with.

Shared by tests/worker (Python 3.9, with Ray) and tests/bridge (newest Python, never Ray): this
module imports neither Ray nor ``actors``; the group runs in the worker environment's Python.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

from core.settings import Settings
from harness.servers import free_port
from tests.conftest import worker_python

# The test-only job kind (tests/worker/kinds.py) for RAY_EXECUTOR_JOB_MODULES.
TEST_KINDS = "tests.worker.kinds"


def worker_settings(redis_url: str, nats_url: str, ray_address: str,
                    **overrides: str) -> Settings:
    """Settings for one worker group with its own queue and key prefix (so tests sharing one
    Redis do not see each other's work): one process, 32 threads, text logs, a free metrics
    port. ``overrides`` are further ``RAY_EXECUTOR_*`` variables."""
    tag = uuid.uuid4().hex[:8]
    env = {"REDIS_URL": redis_url, "NATS_URL": nats_url, "RAY_ADDRESS": ray_address,
           "RAY_EXECUTOR_QUEUE": f"q{tag}", "RAY_EXECUTOR_KEY_PREFIX": f"t{tag}",
           "RAY_EXECUTOR_WORKER_PROCESSES": "1", "RAY_EXECUTOR_WORKER_THREADS": "32",
           "RAY_EXECUTOR_LOG_FORMAT": "text", "RAY_EXECUTOR_WORKER_METRICS_PORT": str(free_port())}
    env.update(overrides)
    return Settings.from_env(env)


class WorkerGroup:
    """``python -m actors`` with ``env``, in a session of its own (signals reach every
    process of the group), its output appended to ``log``. ``python`` defaults to the worker
    environment's interpreter (``tests.conftest.worker_python``); ``command`` replaces
    ``python -m actors`` (e.g. the ``ray-executor worker`` the containers run)."""

    def __init__(self, env: Mapping[str, str], log: Path, python: Optional[str] = None,
                 command: Sequence[str] = ()) -> None:
        self.env: Dict[str, str] = dict(env)
        self.log = log
        self.command = list(command) or [python or worker_python(), "-m", "actors"]
        self.process = self.start()

    @classmethod
    def with_settings(cls, settings: Settings, log: Path,
                      python: Optional[str] = None) -> WorkerGroup:
        """A group with this process's environment plus ``settings``."""
        return cls(dict(os.environ, **settings.as_env()), log, python)

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.command, env=self.env,
                                stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
                                start_new_session=True)

    def kill(self) -> None:
        """SIGKILL to the whole group, and reap it."""
        os.killpg(self.process.pid, 9)
        self.process.wait()

    def stop(self, timeout: float = 60, kill_on_timeout: bool = False) -> None:
        """SIGTERM to the whole group if it still runs, and wait ``timeout`` seconds for it to
        drain; past that, SIGKILL it if ``kill_on_timeout``, else raise
        ``subprocess.TimeoutExpired``."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                if not kill_on_timeout:
                    raise
                self.kill()
