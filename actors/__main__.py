"""``python -m actors``: take the route's queue and Ray cluster (``RAY_EXECUTOR_ROUTE``,
``core.routes``), check the cluster's versions, requeue what a named group's previous run
held (``RAY_EXECUTOR_WORKER_ID``), then run Dramatiq's worker on the route's queue.

An unknown route or a bad routes file stops it (exit code 2) with one line naming them.

A worker whose Python or Ray differs from the cluster's refuses to start (exit code 3) with
a message naming both versions; an unreachable cluster only warns, since each process keeps
reconnecting and jobs wait for it.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
from typing import List, Optional

from actors.connection import RayConnection, RayUnavailable, RayVersionMismatch
from core import logs
from core.routes import Route, RoutesError
from core.routes import load as load_routes
from core.settings import Settings

logger = logging.getLogger("ray_executor.worker")


FORK_TIMEOUT_MS = 10 * 60 * 1000


def dramatiq_argv(settings: Settings) -> List[str]:
    return [
        sys.executable, "-m", "dramatiq", "actors.worker",
        "--processes", str(settings.worker_processes),
        "--threads", str(settings.worker_threads),
        "--queues", settings.queue,
        "--worker-shutdown-timeout", str(settings.worker_shutdown_timeout * 1000),
        # Dramatiq starts its fork processes (the Prometheus exposition server) once every
        # worker process has booted, giving up after this; ours connect to Ray and create
        # runners at boot, which past Dramatiq's 30 s left the group without /metrics.
        "--worker-fork-timeout", str(FORK_TIMEOUT_MS),
    ]


def main(argv: Optional[List[str]] = None) -> int:
    settings = Settings.from_env()
    logs.configure(settings.log_level, settings.log_format)
    try:
        route = serving(settings)
    except RoutesError as exc:
        print(f"ray-executor worker: {exc}", file=sys.stderr)
        return 2
    settings = settings.replace(queue=route.queue, ray_address=route.ray_address)
    if not settings.ray_address or not settings.redis_url:
        print("ray-executor worker: RAY_ADDRESS and REDIS_URL are required", file=sys.stderr)
        return 2
    taken = port_taken(settings.grpc_host, settings.worker_metrics_port)
    if taken:
        # Dramatiq's exposition fork would fail later with a traceback and serve nothing.
        print(f"ray-executor worker: RAY_EXECUTOR_WORKER_METRICS_PORT="
              f"{settings.worker_metrics_port} cannot be bound on {settings.grpc_host} "
              f"({taken}): set it to a free port", file=sys.stderr)
        return 2
    connection = RayConnection(settings.ray_address, namespace=settings.ray_namespace)
    try:
        connection.connect()
    except RayVersionMismatch as exc:
        print(f"ray-executor worker: {exc}", file=sys.stderr)
        return 3
    except RayUnavailable as exc:
        logger.warning("Ray not reachable yet (%s); starting anyway", exc)
    finally:
        connection.disconnect()
    if settings.worker_id:
        requeue_previous_run(settings)
    env = dict(os.environ)
    # Dramatiq's processes read their settings again (actors.worker): the route's are theirs.
    env.update(RAY_EXECUTOR_QUEUE=settings.queue, RAY_ADDRESS=settings.ray_address)
    # Dramatiq's Prometheus middleware: our address and port (it would bind 0.0.0.0, even under
    # `ray-executor up`), and a multiprocess directory of this worker group's own (its default
    # is shared by every worker on the machine).
    env["dramatiq_prom_host"] = settings.grpc_host
    env["dramatiq_prom_port"] = str(settings.worker_metrics_port)
    env["dramatiq_prom_db"] = tempfile.mkdtemp(prefix="rx-metrics-")
    env["dramatiq_prom_lock"] = env["dramatiq_prom_db"] + ".lock"
    env["dramatiq_queue_prefetch"] = str(queue_prefetch(settings, route))
    args = dramatiq_argv(settings)
    os.execve(args[0], args, env)
    return 0  # not reached


def serving(settings: Settings) -> Route:
    """The route the worker serves (``RAY_EXECUTOR_ROUTE``; empty: the default route);
    ``RoutesError`` names a bad routes file or an unknown route."""
    route = load_routes(settings).named(settings.route)
    logger.info("serving route %s: queue %s", route.name, route.queue)
    if any("{node_ip}" in endpoint.url for endpoint in route.endpoints) and \
            not route.node_resource:
        # Warned, not refused: on a one-node cluster, or one where every node has a vLLM, the
        # URL is right without a resource (and the implicit route has no way to name one).
        logger.warning("route %s calls vLLM at {node_ip} without vllm.node_resource: its "
                       "runners may land on the head or a node without a vLLM (docs/deploy.md,"
                       " Routes)", route.name)
    return route


def requeue_previous_run(settings: Settings) -> None:
    """This group restarted under its name: its previous processes' unacked jobs go back to
    the queue now, not after the heartbeat timeout. Redis unreachable: they still come back
    that way."""
    # Imported here, past the version check: that check must run (and name both versions)
    # in an environment that has Ray and nothing else of ours.
    import redis

    from core import dramatiq_internals
    from core.connections import connect_sync

    try:
        client = connect_sync(settings.redis_url)
        try:
            found = dramatiq_internals.requeue_previous(client, settings.worker_id,
                                                        settings.queue)
        finally:
            client.close()
    except redis.RedisError as exc:
        logger.warning("could not requeue the previous run's jobs (%s); they come back after "
                       "the heartbeat timeout", exc)
        return
    if found["processes"]:
        logger.info("worker group %s restarted: %d unacked messages of %d previous processes "
                    "requeued", settings.worker_id, found["messages"], found["processes"])


def port_taken(host: str, port: int) -> str:
    """Why ``port`` cannot be bound on ``host`` (e.g. "Address already in use"), or ""."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        # As Dramatiq's exposition server binds (SO_REUSEADDR): a port left in TIME_WAIT by
        # this group's previous run is free for it.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return ""


def queue_prefetch(settings: Settings, route: Route) -> int:
    """Messages each process reserves: ``RAY_EXECUTOR_WORKER_PREFETCH``, or by default the
    process's share of the route's capacity, the sum of its endpoints' concurrency (at most
    Dramatiq's 2 x threads). A process holding more jobs than its endpoints let run only has
    the limiter refuse them and put them back through the delay queue, again and again."""
    if settings.worker_prefetch:
        return settings.worker_prefetch
    share = -(-route.capacity // settings.worker_processes)  # ceiling
    return max(1, min(2 * settings.worker_threads, share))


if __name__ == "__main__":
    sys.exit(main())
