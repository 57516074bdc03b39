"""The bridge process: gRPC ingress, NATS ingress and the outbox publisher on one event loop.

``run`` connects Redis and NATS, serves until ``stop`` is set, then shuts down gracefully:
health goes NOT_SERVING, new calls are refused, in-flight calls get
``RAY_EXECUTOR_GRPC_SHUTDOWN_GRACE`` seconds, pending publishes finish, connections close.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, List, Optional

from nats.aio.client import Client as NATS

from bridge.grpc_server import build_server, mark_serving
from bridge.health import Watch
from bridge.ingress import Ingress
from bridge.metrics import serve as serve_metrics
from bridge.nats_ingress import NatsIngress
from bridge.operations import OperationsServicer
from core import tracing
from core.connections import connect
from core.contract import Subjects
from core.outbox import Outbox, attach_nats
from core.routes import RoutesError
from core.routes import load as load_routes
from core.settings import Settings
from core.store import DeliberationStore

logger = logging.getLogger("ray_executor.bridge")


async def run(settings: Settings, stop: asyncio.Event,
              on_ready: Optional[Callable[[int], None]] = None) -> None:
    """Serve until ``stop`` is set. ``on_ready`` gets the bound gRPC port."""
    if not settings.redis_url:
        raise SystemExit("REDIS_URL is required for the bridge (or use `ray-executor up`)")
    try:
        routes = load_routes(settings)  # once: a changed file takes a restart
    except RoutesError as exc:
        raise SystemExit(f"ray-executor bridge: {exc}") from None
    tracing.configure("ray-executor-bridge")
    redis = connect(settings.redis_url)
    store = DeliberationStore(redis, settings)
    outbox = Outbox(store, None, Subjects(settings))
    ingress = Ingress(store, settings, outbox, routes)
    # /metrics listens before the gRPC port is bound: whoever waits for that port (tests,
    # `ray-executor up`) may scrape right away.
    watch = Watch(store, settings, routes)
    metrics = serve_metrics(settings, routes, health=lambda: watch.latest)
    operations = OperationsServicer(store, settings, outbox.subjects, lambda: outbox.js, routes)
    server, health, port = build_server(ingress, settings, watch, operations)
    await server.start()
    await mark_serving(health, True)
    logger.info("gRPC listening on %s:%d", settings.grpc_host, port)
    if on_ready is not None:
        on_ready(port)

    consumer = NatsIngress(ingress, settings, outbox.subjects) if settings.nats_ingress else None

    async def connected(nc: NATS) -> None:
        watch.nats = nc
        if consumer is not None:
            await consumer.start(nc)

    tasks: List[asyncio.Task] = [asyncio.ensure_future(outbox.run(stop)),
                                 asyncio.ensure_future(watch.run(stop))]
    nats_task = asyncio.ensure_future(attach_nats(
        settings, outbox, "ray-executor-bridge", stop, on_connected=connected))
    try:
        await stop.wait()
    finally:
        logger.info("bridge stopping: draining in-flight calls")
        await mark_serving(health, False)
        # gRPC calls get their grace while the NATS consumer stops fetching and finishes
        # (and acks) the messages in hand.
        await asyncio.gather(server.stop(settings.grpc_shutdown_grace),
                             *([consumer.stop()] if consumer is not None else []))
        await ingress.drain()
        nc = await nats_task
        await asyncio.gather(*tasks, return_exceptions=True)
        if nc is not None:
            await nc.drain()
        await redis.close()
        if metrics is not None:
            metrics.shutdown()
        tracing.shutdown()
        logger.info("bridge stopped")
