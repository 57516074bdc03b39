"""One Ray client connection per worker process.

Ray client only works when the client runs the cluster's Ray version and Python minor
version; otherwise ``ray.init`` fails with Ray's raw "Version mismatch" error, or (a client of
an older Ray) with the cluster's failure to start the session. ``connect`` turns either into
``RayVersionMismatch``, which names both sides and says what to change.
The connection is opened after the worker process forks (never at import) and reopened with
backoff when it drops.
"""

from __future__ import annotations

import logging
import platform
import random
import re
import signal
import threading
import time

from core.logs import redact

logger = logging.getLogger("ray_executor.ray")

_MISMATCH = re.compile(
    r"cluster was started with:\s*Ray:\s*(?P<cluster_ray>\S+)\s*Python:\s*(?P<cluster_py>\S+)"
    r".*?was started with:\s*Ray:\s*(?P<local_ray>\S+)\s*Python:\s*(?P<local_py>\S+)",
    re.S,
)


# A client of an older Ray than the cluster's may fail before Ray compares the versions: the
# cluster's client server cannot start a session from what that client sends (Ray 2.49.2
# against 2.60: "Initialization failure from server: Traceback ... AttributeError: 'JobConfig'
# object has no attribute ..."). The server's traceback shows its Python (the path of its
# site-packages), and a Python minor version other than ours is a mismatch by itself.
_SERVER_PYTHON = re.compile(
    r"Initialization failure from server:.*?/python(?P<python>3\.\d+)/site-packages/ray/", re.S)


class RayVersionMismatch(RuntimeError):
    """The cluster's Ray or Python version differs from this worker's. ``cluster_ray`` is
    empty when the cluster failed the session before Ray could tell its release."""

    def __init__(self, address: str, cluster_ray: str, cluster_python: str,
                 local_ray: str, local_python: str) -> None:
        self.cluster_ray = cluster_ray
        self.cluster_python = cluster_python
        self.local_ray = local_ray
        self.local_python = local_python
        minor = ".".join(cluster_python.split(".")[:2])
        runs = f"Ray {cluster_ray}" if cluster_ray else \
            "a Ray release this worker's cannot start a session with"
        pin = f"ray=={cluster_ray}" if cluster_ray else "the cluster's Ray release"
        build_arg = cluster_ray or "<the cluster's>"
        super().__init__(
            f"Ray cluster at {address} runs {runs} on Python {cluster_python}, "
            f"but this worker runs Ray {local_ray} on Python {local_python}. Ray client needs "
            f"the same Ray version and Python minor version on both sides: run the worker on "
            f"Python {minor} with {pin} (worker image build args PYTHON_VERSION={minor} "
            f"RAY_VERSION={build_arg}), or set RAY_ADDRESS to a cluster "
            f"that matches."
        )


class RayUnavailable(ConnectionError):
    """The Ray cluster cannot be reached right now; the job should be retried later."""


class RayConnection:
    """The Ray client connection of this process.

    Parameters:
      address: a ``ray://host:port`` address.
      namespace: Ray namespace for named runners.
    """

    def __init__(self, address: str, *, namespace: str = "ray-executor") -> None:
        self.address = address
        self.namespace = namespace
        self._lock = threading.Lock()
        self._connected = False

    @property
    def connected(self) -> bool:
        if not self._connected:
            return False
        import ray

        return bool(ray.is_initialized())

    def connect(self) -> None:
        """Open the connection, or raise ``RayVersionMismatch`` / ``RayUnavailable``."""
        import ray

        with self._lock:
            if self.connected:
                return
            started = time.monotonic()
            # ray.init installs a SIGTERM handler that exits at once; the process's own
            # (Dramatiq's graceful shutdown) must stay in charge.
            on_sigterm = signal.getsignal(signal.SIGTERM)
            try:
                ray.init(
                    self.address,
                    namespace=self.namespace,
                    logging_level=logging.WARNING,
                    log_to_driver=False,
                )
            except RuntimeError as exc:
                mismatch = _MISMATCH.search(str(exc))
                if mismatch:
                    raise RayVersionMismatch(self.address, *mismatch.groups()) from None
                raise RayUnavailable(f"cannot connect to Ray at {self.address}: {exc}") from exc
            except ConnectionError as exc:
                server = _SERVER_PYTHON.search(str(exc))
                local = platform.python_version()
                if server and server.group("python") != ".".join(local.split(".")[:2]):
                    raise RayVersionMismatch(self.address, "", server.group("python"),
                                             ray.__version__, local) from None
                raise RayUnavailable(f"cannot connect to Ray at {self.address}: {exc}") from exc
            finally:
                main = threading.current_thread() is threading.main_thread()
                if main and on_sigterm is not None:
                    signal.signal(signal.SIGTERM, on_sigterm)
            self._connected = True
            logger.info(
                "connected to Ray at %s in %.2fs (Ray %s, Python %s)", redact(self.address),
                time.monotonic() - started, ray.__version__, platform.python_version(),
            )

    def ensure(self, attempts: int = 5, base_delay: float = 0.5, max_delay: float = 8.0) -> None:
        """Connect if not connected, retrying with exponential backoff and jitter."""
        for attempt in range(attempts):
            if self.connected:
                return
            try:
                self.connect()
                return
            except RayUnavailable:
                if attempt == attempts - 1:
                    raise
                delay = min(max_delay, base_delay * 2**attempt) * random.uniform(0.5, 1.0)
                logger.warning("Ray at %s unreachable; retrying in %.1fs", redact(self.address),
                               delay)
                self.disconnect()
                time.sleep(delay)

    def disconnect(self) -> None:
        import ray

        with self._lock:
            self._connected = False
            try:
                ray.shutdown()
            except Exception:  # a half-open client may fail to shut down; it is gone anyway
                logger.debug("ray.shutdown failed", exc_info=True)
