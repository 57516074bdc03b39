"""What each worker process holds: an event loop thread, the state store, the NATS outbox,
the Ray client connection, and a broker heartbeat.

``WorkerRuntime`` is a Dramatiq middleware: it opens everything in ``after_process_boot``
(after the fork, never at import) and closes it in ``after_worker_shutdown``. Actor threads run
async state and NATS code on the process's one loop (``run``), since nats-py and
``redis.asyncio`` objects are bound to the loop that created them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from concurrent.futures import Future
from typing import Any, Coroutine, List, Optional, Tuple, TypeVar

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from actors import metrics
from actors.connection import RayConnection
from actors.runners import RayRunners
from cluster.kinds import KINDS
from core import dramatiq_internals, routes, tracing
from core.connections import connect
from core.contract import Subjects
from core.keys import Keys
from core.outbox import Outbox, attach_nats
from core.settings import Settings
from core.store import DeliberationStore

logger = logging.getLogger("ray_executor.runtime")
T = TypeVar("T")


class WorkerRuntime(dramatiq.Middleware):
    """Per-process resources of a worker.

    Parameters:
      settings: connection URLs and the queue.
      heartbeat_interval: seconds between broker heartbeats (see ``_heartbeat``).
    """

    def __init__(self, settings: Settings, heartbeat_interval: float = 5.0) -> None:
        self.settings = settings
        self.heartbeat_interval = heartbeat_interval
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.store: Optional[DeliberationStore] = None
        self.outbox: Optional[Outbox] = None
        self.ray = RayConnection(settings.ray_address, namespace=settings.ray_namespace)
        self.runners = RayRunners(self.ray, settings.progress_interval_ms / 1000,
                                  settings.progress_tokens,
                                  routes.load(settings).named(settings.route).node_resource)
        self.keys = Keys(settings.key_prefix)
        self._stop = threading.Event()
        self._async_stop: Optional[asyncio.Event] = None
        self._threads: List[threading.Thread] = []

    # --- lifecycle hooks ---

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        tracing.configure("ray-executor-worker")  # per process: exporter threads do not fork
        ready = threading.Event()
        loop_thread = threading.Thread(target=self._loop_main, args=(ready,),
                                       name="rx-loop", daemon=True)
        loop_thread.start()
        ready.wait()
        if isinstance(broker, RedisBroker):
            beat = threading.Thread(target=self._heartbeat, args=(broker,), name="rx-heartbeat",
                                    daemon=True)
            beat.start()
            self._threads.append(beat)
        self._threads.append(loop_thread)
        self._connect_ray()

    def _connect_ray(self) -> None:
        """Connect to Ray and create this process's runners before the process takes jobs, so
        no job holds a rate-limiter slot while a runner is being created (seconds on a busy
        cluster). One attempt: Dramatiq serves /metrics (the readiness probe) only once every
        process has booted, an unreachable Ray costs Ray client's 30 s timeout per attempt, and
        jobs wait for Ray themselves. Not in a thread of its own: tried, the first jobs raced
        that connection (runners lost, jobs requeued) and a worker stalled."""
        try:
            self.ray.ensure(attempts=1)
        except ConnectionError as exc:  # jobs will retry the connection and back off
            logger.warning("Ray not reachable at boot: %s", exc)
            return
        finally:
            metrics.get().ray_connected.set(1 if self.ray.connected else 0)
        for kind in KINDS.values():
            try:
                self.runners.warm(kind)
            except Exception as exc:  # the first job of the kind tries again
                logger.warning("runner for %s not created at boot: %s", kind.name, exc)

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        # Dramatiq 1.18 never emits ``process_stop``; this runs once the worker's threads have
        # finished their jobs (the drain), before the broker closes.
        self._stop.set()
        if self.loop is not None and self._async_stop is not None:
            self.loop.call_soon_threadsafe(self._async_stop.set)
        for thread in self._threads:
            thread.join(10)
        self.ray.disconnect()
        tracing.shutdown()

    # --- used by actor threads ---

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: Optional[float] = 60) -> T:
        """Run ``coroutine`` on the process's loop and wait for its result."""
        assert self.loop is not None, "the worker runtime has not booted"
        future: Future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout)

    def redis(self, *commands: Tuple[Any, ...]) -> List[Any]:
        """Run Redis commands (each ``(name, *args)``) from an actor thread on the process's
        one connection, batched with the other calls of the moment
        (``core.batching.Batcher``): hundreds of threads need no connection each."""
        assert self.store is not None, "the worker runtime has not booted"
        return self.run(self.store.batcher.batched(*commands))

    def redis_soon(self, *commands: Tuple[Any, ...], failed: str = "") -> None:
        """``redis`` without waiting for the reply, from an actor thread or the loop itself
        (where it is scheduled directly, without waking the loop through its self-pipe); a
        failure is logged with ``failed``."""
        assert self.loop is not None and self.store is not None, "the worker runtime has not booted"
        batch = self.store.batcher.batched(*commands)
        future: Any
        if _running_loop() is self.loop:
            future = asyncio.ensure_future(batch)
        else:
            future = asyncio.run_coroutine_threadsafe(batch, self.loop)

        def report(done: Any) -> None:
            if not done.cancelled() and done.exception() is not None:
                logger.warning("%s: %s", failed or "Redis call failed", done.exception())

        future.add_done_callback(report)

    def eval(self, source: str, keys: List[str], args: List[Any]) -> Any:
        """``redis`` for a Lua script."""
        assert self.store is not None, "the worker runtime has not booted"
        return self.run(self.store.batcher.eval(source, keys, args))

    # --- threads ---

    def _loop_main(self, ready: threading.Event) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve(ready))
        self.loop.close()

    async def _serve(self, ready: threading.Event) -> None:
        self._async_stop = asyncio.Event()
        redis = connect(self.settings.redis_url)
        self.store = DeliberationStore(redis, self.settings)
        self.outbox = Outbox(self.store, None, Subjects(self.settings))
        ready.set()
        flusher = asyncio.ensure_future(self.outbox.run(self._async_stop))
        nc = await attach_nats(self.settings, self.outbox, "ray-executor-worker",
                               self._async_stop)
        await self._async_stop.wait()
        await flusher
        if nc is not None:
            await nc.drain()
        await redis.close()

    def _heartbeat(self, broker: RedisBroker) -> None:
        """Keep this process's broker heartbeat fresh and requeue dead workers' messages,
        every few seconds (``core.dramatiq_internals.heartbeat``): Dramatiq refreshes a
        heartbeat only on a fetch or an ack, so a process whose prefetch is full of long jobs
        would look dead after ``heartbeat_timeout``."""
        queues = [self.settings.queue, dramatiq_internals.delay_queue(self.settings.queue)]
        while True:
            beating = True
            now_ms = int(time.time() * 1000)
            try:
                for queue in queues:
                    dramatiq_internals.heartbeat(broker, queue, now_ms)
                self._announce(broker, now_ms)
            except Exception as exc:  # Redis down: the next beat tries again
                logger.warning("broker heartbeat failed: %s", exc)
                beating = False
            metrics.get().worker_ready.set(1 if beating else 0)
            metrics.get().ray_connected.set(1 if self.ray.connected else 0)
            if self._stop.wait(self.heartbeat_interval):
                with contextlib.suppress(Exception):  # gone at once, not after the timeout
                    broker.client.zrem(self.keys.workers(self.settings.queue), broker.broker_id)
                return

    def _announce(self, broker: RedisBroker, now_ms: int) -> None:
        """List this process among the queue's live workers (``core.keys.Keys.workers``),
        dropping those whose last beat is older than the heartbeat timeout; the list expires
        with the last of them."""
        key = self.keys.workers(self.settings.queue)
        timeout_ms = self.settings.worker_heartbeat_timeout * 1000
        with broker.client.pipeline(transaction=True) as pipe:
            pipe.zadd(key, {broker.broker_id: now_ms})
            pipe.zremrangebyscore(key, 0, now_ms - timeout_ms)
            pipe.pexpire(key, timeout_ms)
            pipe.execute()


def _running_loop() -> Optional[asyncio.AbstractEventLoop]:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # not on a loop's thread
        return None
