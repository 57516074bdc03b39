"""Runners: one long-lived async Ray actor per job kind and worker process.

A runner holds a kind's function, its resources and (for HTTP-calling kinds) a connection
pool, and runs up to ``max_concurrency`` jobs at once as asyncio tasks. Submitting a job is a
method call through the process's Ray client connection (a few ms), not the ≈430 ms of
creating an actor. Cancelling the call (``ray.cancel``) cancels the job's asyncio task on the
cluster, which closes its HTTP request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Dict

from bridge.contract import AgentJob

if TYPE_CHECKING:
    from actors.jobs import JobKind
    from actors.runtime import WorkerRuntime

logger = logging.getLogger("ray_executor.runner")
CANCEL_POLL = 2.0  # seconds between checks that the job's deliberation was not cancelled


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

    async def run(self, kind: JobKind, job: AgentJob,
                  is_cancelled: Callable[[], Awaitable[bool]]) -> Dict:
        """Run ``job`` on the cluster, awaiting its result on the process's event loop.

        Raises the job's own error, ``JobTimeout``, ``JobCancelled`` or ``RayLost``.
        """
        import ray
        from ray.exceptions import RayError, RayTaskError

        loop = asyncio.get_running_loop()
        try:
            handle = self.handles.get(kind.name)
            if handle is None or not self.runtime.ray.connected:  # connect/create off the loop
                handle = await loop.run_in_executor(None, self._runner, kind)
            ref = handle.run.remote(job)
            # A Ray client ref learns its object id from the client server a round trip
            # after .remote(); ref.future() blocks until then. Waiting for it here keeps the
            # loop free for the other jobs (blocking serialized every submission).
            id_assigned = getattr(ref, "_id_future", None)
            if id_assigned is not None:
                await asyncio.wrap_future(id_assigned)
            result = asyncio.wrap_future(ref.future())
        except Exception as exc:  # any failure to hand the job over means the client is gone
            self._reset()
            raise RayLost(f"cannot submit to Ray: {type(exc).__name__}: {exc}") from exc
        deadline = loop.time() + job.timeout_seconds
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    ray.cancel(ref)
                    raise JobTimeout(f"no answer within {job.timeout_seconds}s; Ray task cancelled")
                done, _ = await asyncio.wait({result}, timeout=min(remaining, CANCEL_POLL))
                if done:
                    return result.result()  # type: ignore[no-any-return]
                if await is_cancelled():
                    ray.cancel(ref)
                    raise JobCancelled("deliberation cancelled")
        except RayTaskError as exc:  # the job's own exception, raised on the cluster
            cause = getattr(exc, "cause", None)
            if cause is not None and hasattr(cause, "error_type"):
                raise cause from None
            raise JobError(f"{type(cause).__name__}: {cause}" if cause else str(exc)) from None
        except (JobTimeout, JobCancelled):
            raise
        except RayError as exc:  # the runner, its worker or its node died
            self._forget(kind)
            raise RayLost(f"lost the job on Ray: {exc}") from exc
        except Exception as exc:  # the client's channel broke (gRPC or connection errors)
            self._reset()
            raise RayLost(f"lost Ray while waiting: {type(exc).__name__}: {exc}") from exc
        finally:
            if not result.done():  # timed out or cancelled: nobody will read its outcome
                result.cancel()

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
