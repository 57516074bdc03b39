"""The runner: one long-lived async Ray actor per job kind and worker process, on the cluster.

A runner holds a kind's function, its resources and (for HTTP-calling kinds) a connection
pool, and runs up to ``max_concurrency`` jobs at once as asyncio tasks. Jobs reach it in
batches (``start``) and their outcomes go back in batches (``collect``, a long poll); the
worker's side of that exchange is ``actors.runners``. Cancelling a job (its time limit passed,
or its deliberation was cancelled) cancels its asyncio task, which closes its HTTP request.

A job may report partial output (a streamed answer's pieces) to ``progress_sink()``; it goes
back with the outcomes, batched: ``collect`` returns for it at once for a job's first piece
(the time to the first token is what a reader waits for), then once ``progress_interval``
seconds passed since the first piece waiting, or once a job has ``progress_pieces`` waiting.
The pieces left when a job ends go with (before) its outcome, unless none went before: an
answer that came whole within one batch has no partial output to show.

Runs on the Ray cluster: imports nothing of this project but ``core.contract`` and
``core.errors`` (docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
from typing import Any, Awaitable, Callable, Dict, List, Optional, Set, Tuple

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
      progress_interval: seconds a piece of partial output may wait to be collected with
        others; 0: jobs get no ``progress_sink()`` (nothing partial is sent).
      progress_pieces: pieces of one job that are collected at once, before the interval.
    """

    def __init__(self, function: Callable[[AgentJob], Awaitable[Dict[str, Any]]],
                 progress_interval: float = 0.25, progress_pieces: int = 64) -> None:
        # Spans made on the cluster (the vLLM calls) are exported when the Ray image has the
        # SDK and its nodes the OTEL_* variables (core.tracing).
        tracing.configure("ray-executor-runner")
        self.function = function
        self.progress_interval = progress_interval
        self.progress_pieces = max(1, progress_pieces)
        self.tasks: Dict[str, asyncio.Task] = {}
        self.outcomes: Dict[str, Outcome] = {}
        self.pieces: Dict[str, List[str]] = {}  # partial output not collected yet, by job
        self.pieces_due = False
        self.pieces_timer: Optional[asyncio.TimerHandle] = None
        self.streaming: Set[str] = set()  # jobs some partial output of which was collected
        self.ended: Optional[asyncio.Event] = None  # created on the actor's loop

    def ready(self) -> bool:
        return True

    async def start(self, jobs: List[Tuple[str, AgentJob]]) -> None:
        """Start each ``(key, job)``; its outcome waits for ``collect`` under ``key``."""
        for key, job in jobs:
            context = contextvars.copy_context()
            if self.progress_interval > 0:
                context.run(PROGRESS.set, functools.partial(self._progress, key))
            # The task runs in (a copy of) the context it is created in: the job's own sink.
            task = context.run(asyncio.ensure_future, self.function(job))
            self.tasks[key] = task
            task.add_done_callback(lambda done, key=key: self._ended(key, done))

    async def collect(self, jobs: List[Tuple[str, AgentJob]], timeout: float
                      ) -> Tuple[Dict[str, Outcome], Dict[str, str]]:
        """Start ``jobs`` (as ``start`` does), then return ``(outcomes, partial output)``
        ready now, or the first within ``timeout`` seconds. The partial output of a job is
        the text of its pieces since the last collect, and comes before its outcome."""
        await self.start(jobs)
        if self.ended is None:
            self.ended = asyncio.Event()
        if not self.outcomes and not self.pieces_due:
            self.ended.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.ended.wait(), timeout)
        outcomes, self.outcomes = self.outcomes, {}
        partial: Dict[str, str] = {}
        if outcomes or self.pieces_due:  # with outcomes, every piece goes along for free
            for key, pieces in self.pieces.items():
                if key not in outcomes or key in self.streaming:
                    partial[key] = "".join(pieces)
            self.streaming.update(key for key in partial if key not in outcomes)
            self.streaming.difference_update(outcomes)
            self.pieces = {}
            self.pieces_due = False
            if self.pieces_timer is not None:
                self.pieces_timer.cancel()
                self.pieces_timer = None
        return outcomes, partial

    async def cancel(self, keys: List[str]) -> None:
        for key in keys:
            self.pieces.pop(key, None)
            self.streaming.discard(key)
            task = self.tasks.pop(key, None)
            if task is not None:
                task.cancel()

    def _progress(self, key: str, piece: str) -> None:
        if key not in self.tasks or not piece:  # a cancelled job's last words are not sent
            return
        pieces = self.pieces.setdefault(key, [])
        pieces.append(piece)
        first = len(pieces) == 1 and key not in self.streaming
        if first or len(pieces) >= self.progress_pieces:
            self._pieces_due()
        elif self.pieces_timer is None and not self.pieces_due:
            self.pieces_timer = asyncio.get_running_loop().call_later(
                self.progress_interval, self._pieces_due)

    def _pieces_due(self) -> None:
        if self.pieces_timer is not None:
            self.pieces_timer.cancel()
            self.pieces_timer = None
        self.pieces_due = True
        if self.ended is not None:
            self.ended.set()

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
