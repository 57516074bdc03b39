"""Which vLLM endpoints a job may call: its route's pool, or the one URL its caller chose.

The ingress fills a job's ``vllm_url`` with the request's own URL, or else its route's first
endpoint, and names the route in ``route`` (empty in messages older than routes: the worker's
own route, ``RAY_EXECUTOR_ROUTE``). A job whose ``vllm_url`` is one of its route's endpoint
URLs is served from that route's pool, each endpoint with its own concurrency; any other URL
is a fixed endpoint of one, whose concurrency is ``RAY_EXECUTOR_VLLM_CONCURRENCY`` (or the
message's ``concurrency_limit``). Without a routes file the implicit route's pool is
``VLLM_URL`` alone, so a job is served as it was before pools.

An endpoint's limits and circuit are keyed by its URL as configured: a ``{node_ip}`` URL is
resolved on the Ray node that calls it (``cluster.vllm.resolve_url``), so its key is the
template.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Mapping, Optional, Tuple

from core import routes
from core.routes import Endpoint, Route
from core.settings import Settings

logger = logging.getLogger("ray_executor.endpoints")


class EndpointPools:
    """The pool of each job, from the routes (``core.routes.load``).

    Parameters:
      settings: the routes file, the worker's route and the default concurrency.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        loaded = routes.load(settings)
        self.own: Route = loaded.named(settings.route)
        self._routes: Dict[str, Route] = {route.name: route for route in loaded}
        self._unknown: set = set()  # route names already warned about

    def route_of(self, name: str) -> Route:
        """The route called ``name``; the worker's own when empty or unknown here."""
        route = self._routes.get(name) if name else self.own
        if route is None:
            if name not in self._unknown:
                self._unknown.add(name)
                logger.warning("jobs name route %r, unknown to this worker's routes; served "
                               "with route %r's endpoints", name, self.own.name)
            route = self.own
        return route

    def for_job(self, kwargs: Mapping[str, Any], fixed_limit: Optional[int] = None
                ) -> Tuple[Endpoint, ...]:
        """The endpoints a job (its message's ``kwargs``) may take, in the route's order;
        ``fixed_limit`` replaces the default concurrency of a fixed URL."""
        url = str(kwargs.get("vllm_url") or "")
        pool = self.route_of(str(kwargs.get("route") or "")).endpoints
        if any(endpoint.url == url for endpoint in pool):
            return pool
        return (Endpoint(url, fixed_limit or self.settings.vllm_concurrency),)
