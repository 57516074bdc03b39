"""Runners: one long-lived async Ray actor per job kind and worker process.

A runner holds a kind's function, its resources and (for HTTP-calling kinds) a connection
pool, and runs up to ``max_concurrency`` jobs at once as asyncio tasks. Submitting a job is a
method call through the process's Ray client connection (a few ms), not the ≈430 ms of
creating an actor. Cancelling the call (``ray.cancel``) cancels the job's asyncio task on the
cluster, which closes its HTTP request.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict

from actors.connection import RayUnavailable
from bridge.contract import AgentJob

if TYPE_CHECKING:
    from actors.jobs import JobKind
    from actors.runtime import WorkerRuntime

logger = logging.getLogger("ray_executor.runner")


class JobTimeout(Exception):
    error_type = "timeout"
    retryable = False


class JobCancelled(Exception):
    error_type = "cancelled"
    retryable = False


class JobError(Exception):
    """The job's own code raised an error it did not classify: not retried."""

    error_type = "job_error"
    retryable = False


class RayLost(Exception):
    """The Ray client connection dropped or a Ray node or worker died under the job."""

    error_type = "ray_unavailable"
    retryable = True


class Runner:
    """The Ray actor class (made remote in ``RayRunners._runner``)."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function

    async def run(self, job: AgentJob) -> Dict[str, Any]:
        return await self.function(job)  # type: ignore[no-any-return]

    def ready(self) -> bool:
        return True


class RayRunners:
    """This process's runners, created on first use and again after the connection drops."""

    _lock = threading.Lock()
    _instances: Dict[int, RayRunners] = {}

    def __init__(self, runtime: WorkerRuntime) -> None:
        self.runtime = runtime
        self.handles: Dict[str, Any] = {}
        self.lock = threading.Lock()

    @classmethod
    def of(cls, runtime: WorkerRuntime) -> RayRunners:
        with cls._lock:
            return cls._instances.setdefault(id(runtime), cls(runtime))

    def run(self, kind: JobKind, job: AgentJob, is_cancelled: Callable[[], bool]) -> Dict:
        """Run ``job`` on the cluster; raises the job's own error, ``JobTimeout``,
        ``JobCancelled`` or ``RayLost``."""
        import ray
        from ray.exceptions import GetTimeoutError, RayError, RayTaskError

        try:
            ref = self._runner(kind).run.remote(job)
        except (ConnectionError, RayUnavailable, RayError) as exc:
            self._reset()
            raise RayLost(f"cannot submit to Ray: {exc}") from exc
        deadline = time.monotonic() + job.timeout_seconds
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    ray.cancel(ref)
                    raise JobTimeout(f"no answer within {job.timeout_seconds}s; Ray task cancelled")
                try:
                    return ray.get(ref, timeout=min(remaining, 2.0))  # type: ignore[no-any-return]
                except GetTimeoutError:
                    if is_cancelled():
                        ray.cancel(ref)
                        raise JobCancelled("deliberation cancelled") from None
        except RayTaskError as exc:  # the job's own exception, raised on the cluster
            cause = getattr(exc, "cause", None)
            if cause is not None and hasattr(cause, "error_type"):
                raise cause from None
            raise JobError(f"{type(cause).__name__}: {cause}" if cause else str(exc)) from None
        except RayError as exc:  # the runner, its worker or its node died
            self._forget(kind)
            raise RayLost(f"lost the job on Ray: {exc}") from exc
        except ConnectionError as exc:
            self._reset()
            raise RayLost(f"lost Ray while waiting: {exc}") from exc

    def warm(self, kind: JobKind) -> None:
        """Create the runner of ``kind`` now rather than on its first job."""
        self._runner(kind)

    def _runner(self, kind: JobKind) -> Any:
        with self.lock:
            handle = self.handles.get(kind.name)
            if handle is not None and self.runtime.ray.connected:
                return handle
            import ray

            self.runtime.ray.ensure()
            started = time.monotonic()
            remote = ray.remote(Runner).options(**kind.ray_options)
            handle = remote.remote(kind.function)
            ray.get(handle.ready.remote(), timeout=120)
            logger.info("runner for %s ready in %.2fs (%s)", kind.name,
                        time.monotonic() - started, kind.ray_options)
            self.handles[kind.name] = handle
            return handle

    def _forget(self, kind: JobKind) -> None:
        with self.lock:
            self.handles.pop(kind.name, None)

    def _reset(self) -> None:
        with self.lock:
            self.handles.clear()
        self.runtime.ray.disconnect()
