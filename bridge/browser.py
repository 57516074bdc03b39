"""The deliberation browser: deliberations, their agents and the NATS dead letters, as pages
served by ``ray-executor dashboard`` behind its ``AuthMiddleware``.

It reads and acts through the bridge's gRPC API (``RAY_EXECUTOR_DASHBOARD_BRIDGE``, with
``RAY_EXECUTOR_GRPC_TOKEN``, over TLS with ``RAY_EXECUTOR_DASHBOARD_BRIDGE_CA``), with the
sync gRPC client from the WSGI threads: listing, status, cancel, retry, dead letters and
replays are the bridge's code, checked and recorded there exactly as for the CLI. The
dashboard needs no NATS connection (replays publish from the bridge) and no event loop of its
own, and live updates are ``WatchDeliberation``, the stream Watch's clients read, relayed as
server-sent events.

Routes (``GET`` unless noted):

- ``/deliberations``: newest first; filters ``status``, ``task_id``, ``story_id``, ``model``,
  ``route``, ``after``/``before`` (ISO 8601, UTC unless a zone is given); ``size`` (page
  size) and ``page`` (the token of the next page); above it, per route (``GetRoutes``) its
  queue depth, live workers and jobs running, each endpoint's slots and circuit, and the
  last hour's plots.
- ``/deliberations/<id>``: its agents; ``?part=state`` is the block live updates replace;
  ``/deliberations/<id>/events``: its lifecycle events as ``text/event-stream``.
- ``POST /deliberations/<id>/cancel`` and ``/retry``, ``POST /dead-letters/<seq>/replay``: a
  form with a required ``reason``; the operator is who authenticated (the Basic user, or
  ``token``). Each is the gRPC call, so as idempotent as it. A POST must come from a page of
  this site: its ``Origin`` (or, without one, ``Referer``) must name this host (CSRF).
- ``/dead-letters`` (``after``: the sequence to go on after) and ``/dead-letters/<seq>``.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import grpc
import jinja2
from google.protobuf.timestamp_pb2 import Timestamp

from bridge import browser_pages as pages
from bridge import browser_plot
from bridge.operations import MAX_PAGE
from core import contract
from core.settings import PREFIX, Settings, SettingsError
from ray_executor.v1 import operations_pb2 as ops
from ray_executor.v1 import operations_pb2_grpc as ops_rpc
from ray_executor.v1 import ray_executor_pb2 as pb
from ray_executor.v1 import ray_executor_pb2_grpc as rpc

logger = logging.getLogger("ray_executor.browser")

PREFIXES = ("/deliberations", "/dead-letters")
OPERATOR_KEY = "ray_executor.operator"  # set in the environ by AuthMiddleware
CALL_TIMEOUT = 15.0  # seconds of one unary call to the bridge
MAX_FORM = 16384  # bytes of a POSTed form
PLOT_PAGES = 4  # pages of MAX_PAGE read for the last hour's plot
# A stream of live updates ends after this long (the page reconnects): a browser gone away
# is noticed only at the next write, so this bounds how long its thread and its watch on the
# bridge outlive it when nothing happens.
WATCH_SECONDS = 300.0

StartResponse = Callable[..., Any]

_HTTP = {
    grpc.StatusCode.NOT_FOUND: "404 Not Found",
    grpc.StatusCode.INVALID_ARGUMENT: "400 Bad Request",
    grpc.StatusCode.FAILED_PRECONDITION: "409 Conflict",
    grpc.StatusCode.UNAVAILABLE: "503 Service Unavailable",
}


class _Refused(Exception):
    """A request answered with an error page: ``status`` and what to tell the operator."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


def handles(path: str) -> bool:
    """Whether ``path`` is one of the browser's."""
    return any(path == p or path.startswith(p + "/") for p in PREFIXES)


class Browser:
    """The WSGI app of the browser's routes (see the module docstring)."""

    def __init__(self, settings: Settings) -> None:
        """Raises ``SettingsError`` when ``RAY_EXECUTOR_DASHBOARD_BRIDGE_CA`` cannot be read."""
        target, ca = settings.dashboard_bridge, settings.dashboard_bridge_ca
        if ca:
            try:
                credentials = grpc.ssl_channel_credentials(Path(ca).read_bytes())
            except OSError as exc:
                raise SettingsError(f"{PREFIX}DASHBOARD_BRIDGE_CA={ca}: {exc.strerror}"
                                    ) from None
            self._channel = grpc.secure_channel(target, credentials)
        else:
            self._channel = grpc.insecure_channel(target)
        self._main = rpc.RayExecutorServiceStub(self._channel)
        self._ops = ops_rpc.OperationsServiceStub(self._channel)
        token = settings.grpc_token
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def close(self) -> None:
        self._channel.close()

    def __call__(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        parts = [p for p in environ.get("PATH_INFO", "").split("/") if p]
        query = {k: v[-1].strip() for k, v in
                 parse_qs(environ.get("QUERY_STRING", "")).items()}
        try:
            if method == "POST":
                return self._post(environ, parts, start_response)
            if method != "GET":
                raise _Refused("405 Method Not Allowed", f"{method} is not served here")
            if parts[0] == "dead-letters":
                return self._dead_letters(parts, query, start_response)
            if len(parts) == 3 and parts[2] == "events":
                return self._events(parts[1], start_response)
            if len(parts) == 2:
                return self._deliberation(parts[1], query, start_response)
            if len(parts) == 1:
                return self._list(query, start_response)
            raise _Refused("404 Not Found", "no such page")
        except _Refused as refused:
            return _html(start_response, pages.error_page(refused.status, str(refused)),
                         refused.status)
        except grpc.RpcError as exc:
            status = _HTTP.get(exc.code(), "502 Bad Gateway")
            logger.info("bridge answered %s: %s", exc.code(), exc.details())
            return _html(start_response, pages.error_page(
                status, f"the bridge answered {exc.code().name}: {exc.details()}"), status)

    # --- calls to the bridge ---

    def _call(self, method: Callable[..., Any], request: Any) -> Any:
        return method(request, timeout=CALL_TIMEOUT, metadata=self._metadata)

    # --- pages ---

    def _list(self, query: Dict[str, str], start_response: StartResponse) -> Iterable[bytes]:
        request = ops.ListDeliberationsRequest(
            status=query.get("status", ""), task_id=query.get("task_id", ""),
            story_id=query.get("story_id", ""), model=query.get("model", ""),
            route=query.get("route", ""), page_size=_number(query, "size"),
            page_token=query.get("page", ""))
        for name, field in (("after", request.created_after),
                            ("before", request.created_before)):
            if query.get(name):
                field.CopyFrom(_time(name, query[name]))
        found = self._call(self._ops.ListDeliberations, request)
        status = self._call(self._main.GetStatus, pb.GetStatusRequest(include_stats=True))
        routes = self._call(self._ops.GetRoutes, ops.GetRoutesRequest()).routes
        filters = {k: v for k, v in query.items() if k in (*pages.FILTERS, "size", "page")}
        plot = "" if request.page_token else self._hour([route.name for route in routes])
        return _html(start_response, pages.deliberations(found, filters, status, routes,
                                                         plot, query.get("notice", "")))

    def _hour(self, routes: List[str]) -> str:
        """The last hour's plots (``browser_plot``: all, and per route), from at most
        ``PLOT_PAGES`` pages of the deliberations created in it."""
        now_ms = contract.now_ms()
        request = ops.ListDeliberationsRequest(page_size=MAX_PAGE)
        request.created_after.FromMilliseconds(now_ms - browser_plot.HOUR_MS)
        found: List[ops.DeliberationSummary] = []
        for _ in range(PLOT_PAGES):
            page = self._call(self._ops.ListDeliberations, request)
            found += page.deliberations
            request.page_token = page.next_page_token
            if not request.page_token:
                break
        return browser_plot.per_route(found, now_ms, not request.page_token, routes)

    def _status(self, deliberation_id: str) -> pb.GetDeliberationStatusResponse:
        status = self._call(self._main.GetDeliberationStatus,
                            pb.GetDeliberationStatusRequest(deliberation_id=deliberation_id))
        if status.status == "not_found":
            raise _Refused("404 Not Found", f"no deliberation {deliberation_id}")
        return status

    def _deliberation(self, deliberation_id: str, query: Dict[str, str],
                      start_response: StartResponse) -> Iterable[bytes]:
        status = self._status(deliberation_id)
        if query.get("part") == "state":
            return _html(start_response, pages.state_block(status))
        return _html(start_response, pages.deliberation(status, query.get("notice", "")))

    def _events(self, deliberation_id: str, start_response: StartResponse
                ) -> Iterable[bytes]:
        self._status(deliberation_id)  # a 404 page rather than an empty stream
        call = self._main.WatchDeliberation(
            pb.WatchDeliberationRequest(deliberation_id=deliberation_id),
            timeout=WATCH_SECONDS, metadata=self._metadata)
        start_response("200 OK", [("Content-Type", "text/event-stream; charset=utf-8"),
                                  ("X-Accel-Buffering", "no")])
        return _relay(call)

    def _dead_letters(self, parts: List[str], query: Dict[str, str],
                      start_response: StartResponse) -> Iterable[bytes]:
        notice = query.get("notice", "")
        if len(parts) == 1:
            after = _number(query, "after")
            found = self._call(self._ops.ListDeadLetters,
                               ops.ListDeadLettersRequest(after_sequence=after))
            return _html(start_response, pages.dead_letters(found, after, notice))
        if len(parts) == 2 and parts[1].isdigit():
            letter = self._call(self._ops.GetDeadLetter,
                                ops.GetDeadLetterRequest(sequence=int(parts[1])))
            return _html(start_response, pages.dead_letter(letter, notice))
        raise _Refused("404 Not Found", "no such page")

    # --- actions ---

    def _post(self, environ: dict, parts: List[str], start_response: StartResponse
              ) -> Iterable[bytes]:
        if not same_origin(environ):
            raise _Refused("403 Forbidden", "a form of this site must send this request "
                                            "(its Origin or Referer is not this host)")
        if len(parts) != 3:
            raise _Refused("404 Not Found", "no such action")
        form = _form(environ)
        reason = form.get("reason", "").strip()
        if not reason:
            raise _Refused("400 Bad Request", "reason: is required (actions are recorded: "
                                              "who and why)")
        by = environ.get(OPERATOR_KEY) or "anonymous"
        kind, target, action = parts
        if kind == "deliberations" and action == "cancel":
            reply = self._call(self._main.CancelDeliberation, pb.CancelDeliberationRequest(
                deliberation_id=target, reason=f"{by}: {reason}"))
            message = f"{reply.message} (by {by})"
            logger.info("deliberation %s cancel by %s: %s (%s)", target, by, reason,
                        reply.message)
        elif kind == "deliberations" and action == "retry":
            message = self._call(self._ops.RetryDeliberation, ops.RetryDeliberationRequest(
                deliberation_id=target, by=by, reason=reason)).message
        elif kind == "dead-letters" and action == "replay" and target.isdigit():
            message = self._call(self._ops.ReplayDeadLetter, ops.ReplayDeadLetterRequest(
                sequence=int(target), by=by, reason=reason)).message
        else:
            raise _Refused("404 Not Found", "no such action")
        # Post/redirect/get: a reload of the page the operator lands on repeats nothing.
        location = f"/{kind}/{quote(target)}?{urlencode({'notice': message})}"
        start_response("303 See Other", [("Location", location), ("Content-Length", "0")])
        return [b""]


# --- helpers ---

_NAV = '{{ nav_item("Dashboard", "") }}'
_BROWSER_NAV = "".join(f'<li class="nav__items__item"><a href="{path}">{label}</a></li>'
                       for label, path in (("Deliberations", "/deliberations"),
                                           ("Dead letters", "/dead-letters")))


def link_from(dashboard: Any) -> None:
    """Add the browser's pages to the navigation bar of dramatiq-dashboard's pages (of its
    ``DashboardApp``): its base template, with two more items, loaded ahead of the packaged
    one."""
    templates = dashboard.templates
    source = templates.loader.get_source(templates, "_base.html")[0]
    if _NAV in source:  # else a dashboard version whose template we do not know: leave it
        templates.loader = jinja2.ChoiceLoader([
            jinja2.DictLoader({"_base.html": source.replace(_NAV, _NAV + _BROWSER_NAV)}),
            templates.loader])


def same_origin(environ: dict) -> bool:
    """Whether a request's ``Origin`` (else ``Referer``) names the host it was sent to.

    Browsers send ``Origin`` with every POST from a form; a page of another site cannot
    make it name ours. A POST with neither header is refused too.
    """
    source = environ.get("HTTP_ORIGIN") or environ.get("HTTP_REFERER") or ""
    host = environ.get("HTTP_HOST", "")
    return bool(source and host) and urlsplit(source).netloc == host


def _relay(call: Any) -> Iterator[bytes]:
    """The watch's events as server-sent events, then ``end``; cancels the call when the
    browser goes away (the server closes this generator). Past ``WATCH_SECONDS`` the stream
    just ends, without ``end``."""
    try:
        yield b"retry: 1000\n\n"  # reconnect after a second (the browser's default is 3 s)
        for event in call:
            data = {"event": event.event, "agent_id": event.agent_id,
                    "status": event.status,
                    "time": event.time.ToDatetime(timezone.utc).isoformat(timespec="seconds"),
                    "data": json.loads(event.data_json or "{}")}
            yield f"event: lifecycle\ndata: {json.dumps(data)}\n\n".encode()
        yield b"event: end\ndata: {}\n\n"
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return  # the browser reconnects (EventSource does) and is sent every event again
        details = json.dumps({"code": exc.code().name, "details": exc.details()})
        yield f"event: error\ndata: {details}\n\n".encode()
    finally:
        call.cancel()


def _html(start_response: StartResponse, body: str, status: str = "200 OK"
          ) -> List[bytes]:
    data = body.encode("utf-8")
    start_response(status, [("Content-Type", "text/html; charset=utf-8"),
                            ("Content-Length", str(len(data)))])
    return [data]


def _number(query: Dict[str, str], name: str) -> int:
    raw = query.get(name, "")
    if raw and not raw.isdigit():
        raise _Refused("400 Bad Request", f"{name}: a whole number, got {raw[:40]!r}")
    return int(raw or 0)


def _time(name: str, raw: str) -> Timestamp:
    """An ISO 8601 time (UTC unless it names a zone) as a Timestamp."""
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        raise _Refused("400 Bad Request", f"{name}: an ISO 8601 time such as "
                                          f"2026-01-31T14:30, got {raw[:40]!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _form(environ: dict) -> Dict[str, str]:
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    if length > MAX_FORM:
        raise _Refused("413 Content Too Large", f"a form of at most {MAX_FORM} bytes")
    raw = environ["wsgi.input"].read(length).decode("utf-8", "replace") if length else ""
    return {k: v[-1] for k, v in parse_qs(raw).items()}
