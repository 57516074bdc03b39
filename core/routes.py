"""Routes: which Ray cluster, Dramatiq queue and vLLM endpoints serve which requests.

A route names the requests it takes (by model, by ``constraints.metadata`` values, or as the
default), its queue, its Ray client address and its vLLM endpoint pool. The ingress picks the
route when it enqueues; ``ray-executor worker --route NAME`` serves one route's queue with
that route's cluster. Without ``RAY_EXECUTOR_ROUTES_FILE`` there is one implicit route, the
default, made of the single-route settings (``RAY_EXECUTOR_QUEUE``, ``RAY_ADDRESS``,
``VLLM_URL``, ``RAY_EXECUTOR_VLLM_CONCURRENCY``); a route of the file without ``ray_address``
uses ``RAY_ADDRESS``, an endpoint without ``concurrency`` ``RAY_EXECUTOR_VLLM_CONCURRENCY``.

The file is JSON, the shape the Helm chart renders (docs/deploy.md)::

    {"routes": [{"name": "old", "queue": "agent_jobs", "ray_address": "ray://head:10001",
                 "match": {"models": ["m"], "metadata": {"task_type": "X"}, "default": true},
                 "vllm": {"endpoints": [{"url": "http://{node_ip}:8000/v1", "concurrency": 64}],
                          "node_resource": "vllm"}}]}
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from core.settings import Settings

DEFAULT_NAME = "default"
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,23}[a-z0-9])?$")


class RoutesError(ValueError):
    """The routes file is unreadable or invalid; the message names the route and field."""


class NoRoute(LookupError):
    """No route takes a request; the message says what the request asked for."""


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """One vLLM base URL of a route's pool and the jobs it may hold at once."""

    url: str
    concurrency: int


@dataclasses.dataclass(frozen=True)
class Route:
    """One route (module docstring). ``models`` and ``metadata`` empty: it matches on neither."""

    name: str
    queue: str
    ray_address: str
    endpoints: Tuple[Endpoint, ...]
    models: Tuple[str, ...] = ()
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)
    default: bool = False
    node_resource: str = ""

    @property
    def capacity(self) -> int:
        """The most jobs the route's endpoints run at once."""
        return sum(endpoint.concurrency for endpoint in self.endpoints)

    def takes(self, model: str, metadata: Mapping[str, str]) -> bool:
        """Whether the route names this request (the default route aside)."""
        if not self.models and not self.metadata:
            return False
        if self.models and model not in self.models:
            return False
        return all(metadata.get(key) == value for key, value in self.metadata.items())


class Routes:
    """The routes in file order, one of them possibly the default.

    Parameters:
      routes: validated routes (``load`` or ``parse`` build them).
    """

    def __init__(self, routes: Iterable[Route]) -> None:
        self.all: Tuple[Route, ...] = tuple(routes)
        self._by_name = {route.name: route for route in self.all}
        self.default: Optional[Route] = next((r for r in self.all if r.default), None)

    def __iter__(self):
        return iter(self.all)

    def named(self, name: str) -> Route:
        """The route called ``name`` (empty: the default); ``RoutesError`` when none is."""
        route = self._by_name.get(name) if name else self.default
        if route is None:
            known = ", ".join(sorted(self._by_name))
            raise RoutesError(f"no route named {name or DEFAULT_NAME!r} (routes: {known})")
        return route

    def pick(self, model: str, metadata: Mapping[str, str]) -> Route:
        """The first route that names the request, else the default; ``NoRoute`` otherwise."""
        for route in self.all:
            if route.takes(model, metadata):
                return route
        if self.default is not None:
            return self.default
        asked = ", ".join(f"{key}={value}" for key, value in sorted(metadata.items()))
        with_metadata = f" with metadata {asked}" if asked else ""
        raise NoRoute(f"no route takes model {model!r}{with_metadata}")


def load(settings: Settings) -> Routes:
    """The routes of ``RAY_EXECUTOR_ROUTES_FILE``, or the one implicit route without it."""
    if not settings.routes_file:
        return Routes([implicit(settings)])
    try:
        with open(settings.routes_file, encoding="utf-8") as file:
            data = json.load(file)
    except (OSError, ValueError) as error:
        raise RoutesError(f"RAY_EXECUTOR_ROUTES_FILE {settings.routes_file}: {error}") from None
    return parse(data, settings, source=settings.routes_file)


def implicit(settings: Settings) -> Route:
    """The single route of a deployment without a routes file."""
    return Route(name=DEFAULT_NAME, queue=settings.queue, ray_address=settings.ray_address,
                 endpoints=(Endpoint(settings.vllm_url, settings.vllm_concurrency),),
                 default=True)


def parse(data: Any, settings: Settings, source: str = "routes") -> Routes:
    """Validated routes from the file's JSON; ``RoutesError`` names the route and field."""
    if not isinstance(data, dict) or not isinstance(data.get("routes"), list) or not data["routes"]:
        raise RoutesError(f"{source}: expected an object with a non-empty list 'routes'")
    routes: List[Route] = []
    for index, entry in enumerate(data["routes"]):
        routes.append(_route(entry, index, settings, source))
    _unique(routes, "name", source)
    _unique(routes, "queue", source)
    defaults = [route.name for route in routes if route.default]
    if len(defaults) > 1:
        raise RoutesError(f"{source}: routes {', '.join(defaults)}: only one may be match.default")
    return Routes(routes)


def _route(entry: Any, index: int, settings: Settings, source: str) -> Route:
    where = f"{source}: route {index}"
    if not isinstance(entry, dict):
        raise RoutesError(f"{where}: expected an object")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise RoutesError(f"{where}: field 'name' must be a DNS label of at most 25 characters")
    where = f"{source}: route {name!r}"

    def field(key: str, kind: type, default: Any) -> Any:
        value = entry.get(key, default)
        if not isinstance(value, kind):
            raise RoutesError(f"{where}: field {key!r} must be a {kind.__name__}")
        return value

    queue = field("queue", str, "")
    if not queue:
        raise RoutesError(f"{where}: field 'queue' is required")
    match = field("match", dict, {})
    models = match.get("models", [])
    if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
        raise RoutesError(f"{where}: field 'match.models' must be a list of model names")
    metadata = match.get("metadata", {})
    if not isinstance(metadata, dict) or not all(
            isinstance(v, str) for v in metadata.values()):
        raise RoutesError(f"{where}: field 'match.metadata' must map keys to string values")
    default = match.get("default", False)
    if not isinstance(default, bool):
        raise RoutesError(f"{where}: field 'match.default' must be true or false")
    if not (models or metadata or default):
        raise RoutesError(f"{where}: field 'match' names no model, metadata or default")
    vllm = field("vllm", dict, {})
    return Route(name=name, queue=queue,
                 ray_address=field("ray_address", str, "") or settings.ray_address,
                 endpoints=_endpoints(vllm.get("endpoints"), where, settings),
                 models=tuple(models), metadata=dict(metadata), default=default,
                 node_resource=_text(vllm.get("node_resource", ""), where, "vllm.node_resource"))


def _endpoints(entries: Any, where: str, settings: Settings) -> Tuple[Endpoint, ...]:
    if not isinstance(entries, list) or not entries:
        raise RoutesError(f"{where}: field 'vllm.endpoints' must be a non-empty list")
    endpoints = []
    for number, entry in enumerate(entries):
        at = f"vllm.endpoints[{number}]"
        if not isinstance(entry, dict):
            raise RoutesError(f"{where}: field {at!r} must be an object with a url")
        url = _text(entry.get("url"), where, f"{at}.url")
        if not url.startswith(("http://", "https://")):
            raise RoutesError(f"{where}: field '{at}.url' must be an http(s) URL, got {url!r}")
        concurrency = entry.get("concurrency", settings.vllm_concurrency)
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise RoutesError(f"{where}: field '{at}.concurrency' must be an integer >= 1")
        endpoints.append(Endpoint(url, concurrency))
    if len({e.url for e in endpoints}) != len(endpoints):
        raise RoutesError(f"{where}: field 'vllm.endpoints' lists one url twice")
    return tuple(endpoints)


def _text(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise RoutesError(f"{where}: field {key!r} must be a string")
    return value


def _unique(routes: List[Route], attribute: str, source: str) -> None:
    seen: Dict[str, str] = {}
    for route in routes:
        value = getattr(route, attribute)
        if value in seen:
            raise RoutesError(f"{source}: route {route.name!r}: field {attribute!r}: "
                              f"{value} is also route {seen[value]!r}'s")
        seen[value] = route.name
