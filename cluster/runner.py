"""The runner: one long-lived async Ray actor per job kind and worker process, on the cluster.

A runner holds a kind's function, its resources and (for HTTP-calling kinds) a connection
pool, and runs up to ``max_concurrency`` jobs at once as asyncio tasks. Jobs reach it in
batches (``start``) and their outcomes go back in batches (``collect``, a long poll); the
worker's side of that exchange is ``actors.runners``. Cancelling a job (its time limit passed,
or its deliberation was cancelled) cancels its asyncio task, which closes its HTTP request.

Runs on the Ray cluster: imports nothing of this project but ``core.contract`` and
``core.errors`` (docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from typing import Any, Awaitable, Callable, Dict, List, Optional, Tuple

from core import tracing
from core.contract import AgentJob
from core.errors import JobError, RayLost, classify

Outcome = Tuple[bool, Any]  # (True, result) or (False, the job's exception)

# The running job's progress callback (set by the runner for each job's task; None outside one).
PROGRESS: contextvars.ContextVar[Optional[Callable[[str], None]]] = contextvars.ContextVar(
    "ray_executor_progress", default=None)


def progress_sink() -> Optional[Callable[[str], None]]:
    """The callback a job kind gives each piece of partial output to, or None."""
    return PROGRESS.get()


class Runner:
    """The Ray actor class (made remote by ``actors.runners.RayRunners``).

    Parameters:
      function: the job kind's ``async def function(job) -> dict``.
    """

    def __init__(self, function: Callable[[AgentJob], Awaitable[Dict[str, Any]]]) -> None:
        # Spans made on the cluster (the vLLM calls) are exported when the Ray image has the
        # SDK and its nodes the OTEL_* variables (core.tracing).
        tracing.configure("ray-executor-runner")
        self.function = function
        self.tasks: Dict[str, asyncio.Task] = {}
        self.outcomes: Dict[str, Outcome] = {}
        self.ended: Optional[asyncio.Event] = None  # created on the actor's loop

    def ready(self) -> bool:
        return True

    async def start(self, jobs: List[Tuple[str, AgentJob]]) -> None:
        """Start each ``(key, job)``; its outcome waits for ``collect`` under ``key``."""
        for key, job in jobs:
            task = asyncio.ensure_future(self.function(job))
            self.tasks[key] = task
            task.add_done_callback(lambda done, key=key: self._ended(key, done))

    async def collect(self, jobs: List[Tuple[str, AgentJob]],
                      timeout: float) -> Dict[str, Outcome]:
        """Start ``jobs`` (as ``start`` does), then return the outcomes ready now, or the
        first ones within ``timeout`` seconds."""
        await self.start(jobs)
        if self.ended is None:
            self.ended = asyncio.Event()
        if not self.outcomes:
            self.ended.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.ended.wait(), timeout)
        outcomes, self.outcomes = self.outcomes, {}
        return outcomes

    async def cancel(self, keys: List[str]) -> None:
        for key in keys:
            task = self.tasks.pop(key, None)
            if task is not None:
                task.cancel()

    def _ended(self, key: str, task: asyncio.Task) -> None:
        if self.tasks.pop(key, None) is None:  # cancelled: the worker no longer waits for it
            return
        if task.cancelled():  # not by us: the actor is going away
            self.outcomes[key] = (False, RayLost("the job's task was cancelled on the cluster"))
        elif task.exception() is not None:
            self.outcomes[key] = (False, _classified(task.exception()))
        else:
            self.outcomes[key] = (True, task.result())
        if self.ended is not None:
            self.ended.set()


def _classified(error: BaseException) -> BaseException:
    """The job's exception as the worker will raise it (``core.errors.classify``). A classified
    error that cannot be pickled goes as a ``JobError`` naming it: one outcome that cannot
    travel must not fail the whole ``collect`` call."""
    from ray import cloudpickle

    classified = classify(error)
    try:
        cloudpickle.loads(cloudpickle.dumps(classified))
        return classified
    except Exception:
        return JobError(f"{type(error).__name__}: {error}")
