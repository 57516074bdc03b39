"""Prometheus metrics of the bridge, served on ``/metrics`` with ``/healthz`` beside it.

Queue depth per queue is read from Redis at scrape time: it is the metric the worker HPA
scales on (``ray_executor_queue_depth{queue,state}``; states ``ready``, ``delayed`` and
``dead_letter`` as ``core.dramatiq_internals.queue_depths`` reads them), and per route the
jobs pending (ready, delayed or running) against the route's capacity, which the worker
autoscalers scale on (``ray_executor_route_pending_jobs{route}``,
``ray_executor_route_capacity{route}``: the sum of its vLLM endpoints' concurrency), for each
route of ``core.routes``.
``ray_executor_circuit_open{endpoint}`` is read from the circuit breakers' index
(``actors.circuit``, ``core.keys.Keys.circuit_index``): one hash read, no keyspace scan.
Deliberation totals come from the shared Redis counters, so every bridge replica reports the
same numbers; ``ray_executor_ingress_requests_total`` counts what this replica accepted or
refused.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, Iterator, Optional

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from bridge.health import Health
from core.connections import connect_sync
from core.dramatiq_internals import queue_depths, unacked
from core.keys import Keys
from core.logs import redact
from core.routes import Routes
from core.settings import Settings

logger = logging.getLogger("ray_executor.metrics")

REGISTRY = CollectorRegistry(auto_describe=True)
INGRESS_REQUESTS = Counter(
    "ray_executor_ingress_requests", "Deliberation requests by ingress and outcome.",
    ["ingress", "outcome"], registry=REGISTRY)
INGRESS_LATENCY = Histogram(
    "ray_executor_ingress_seconds", "Time to validate, record and enqueue one request.",
    ["ingress"], registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))


# The labelled children, looked up once each: ``labels()`` takes a lock and builds a key on
# every call, a visible share of a request's CPU.
@functools.cache
def ingress_requests(ingress: str, outcome: str) -> Any:
    return INGRESS_REQUESTS.labels(ingress, outcome)


@functools.cache
def ingress_latency(ingress: str) -> Any:
    return INGRESS_LATENCY.labels(ingress)


class QueueCollector:
    """Reads queue depths per route and deliberation totals from Redis at each scrape."""

    def __init__(self, settings: Settings, routes: Routes) -> None:
        self.settings = settings
        self.routes = routes
        self.redis = connect_sync(settings.redis_url, decode_responses=True)
        self.keys = Keys(settings.key_prefix)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("ray_executor_queue_depth",
                                  "Messages per queue and state (ready, delayed, dead_letter).",
                                  labels=["queue", "state"])
        totals = GaugeMetricFamily("ray_executor_deliberations",
                                   "Deliberations by outcome, across every replica.",
                                   labels=["status"])
        up = GaugeMetricFamily("ray_executor_redis_up", "1 when Redis answered the scrape.")
        circuits = GaugeMetricFamily(
            "ray_executor_circuit_open", "1 while a vLLM endpoint's circuit is open (jobs wait), "
            "0 while it has failures recorded but is closed or letting a probe through.",
            labels=["endpoint"])
        pending = GaugeMetricFamily(
            "ray_executor_route_pending_jobs", "Jobs of the route's queue that are ready, "
            "delayed or running: what the route's worker autoscaler scales on.", labels=["route"])
        capacity = GaugeMetricFamily(
            "ray_executor_route_capacity", "The most jobs the route's vLLM endpoints run at once.",
            labels=["route"])
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(self.keys.stats)
                pipe.zcard(self.keys.active)
                for route in self.routes:
                    queue_depths(pipe, route.queue)
                    unacked(pipe, route.queue)
                stats, active, *depths = pipe.execute()
            opened = self._circuits()
        except redis.RedisError as exc:
            logger.warning("metrics scrape could not read Redis: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        for number, route in enumerate(self.routes):
            ready, delayed, dead, running_or_ready = depths[4 * number:4 * number + 4]
            for state, value in (("ready", ready), ("delayed", delayed), ("dead_letter", dead)):
                depth.add_metric([route.queue, state], value)
            pending.add_metric([route.name], running_or_ready + delayed)
            capacity.add_metric([route.name], route.capacity)
        for status in ("total", "completed", "failed", "cancelled"):
            totals.add_metric([status], int(stats.get(status, 0)))
        totals.add_metric(["active"], active)
        now = time.time() * 1000
        for endpoint, opened_until in opened.items():
            circuits.add_metric([redact(endpoint)], 1 if opened_until > now else 0)
        yield from (depth, totals, circuits, pending, capacity, up)

    def _circuits(self) -> Dict[str, float]:
        """``opened_until`` (ms, 0 when closed) of every endpoint with failures recorded."""
        return {endpoint: float(until)
                for endpoint, until in self.redis.hgetall(self.keys.circuit_index).items()}


def serve(settings: Settings, routes: Routes, health: Callable[[], Health]
          ) -> Optional[ThreadingHTTPServer]:
    """Serve ``/metrics`` and ``/healthz`` on ``RAY_EXECUTOR_METRICS_PORT`` in a thread
    (port 0 disables it; a port that cannot be bound ends the bridge with one line naming
    the setting). ``/healthz`` answers ``ok`` (200) or ``degraded: <reasons>`` (503)
    from ``health()``, the bridge's latest verdict (``bridge.health``); the chart's probes use
    gRPC health instead, which follows the bridge alone. Returns the server (``shutdown()``
    stops it)."""
    if not settings.metrics_port:
        return None
    REGISTRY.register(QueueCollector(settings, routes))  # type: ignore[arg-type]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/metrics"):
                body, status, kind = generate_latest(REGISTRY), 200, CONTENT_TYPE_LATEST
            elif self.path.startswith("/healthz"):
                verdict = health()
                body = b"ok\n" if not verdict.reasons else \
                    f"degraded: {verdict.message}\n".encode()
                status, kind = (503 if verdict.reasons else 200), "text/plain; charset=utf-8"
            else:
                body, status, kind = b"not found\n", 404, "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *args: Any) -> None:
            logger.debug(fmt, *args)

    try:
        server = ThreadingHTTPServer((settings.grpc_host, settings.metrics_port), Handler)
    except OSError as exc:
        raise SystemExit(
            f"ray-executor bridge: RAY_EXECUTOR_METRICS_PORT={settings.metrics_port} cannot be "
            f"bound on {settings.grpc_host} ({exc.strerror or exc}): set it to a free port, "
            "or 0 to serve no metrics") from None
    threading.Thread(target=server.serve_forever, name="rx-metrics", daemon=True).start()
    logger.info("metrics on %s:%d/metrics", settings.grpc_host, settings.metrics_port)
    return server
