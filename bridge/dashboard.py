"""``ray-executor dashboard``: dramatiq-dashboard for our Redis broker, behind authentication.

dramatiq-dashboard (0.4.0) is a plain WSGI app with three gaps this module fills:

- it shows only the queues declared on the broker object it is given, so it gets a
  ``RedisBroker`` of its own with our queue declared (which also declares its delay queue;
  the dashboard shows both, and the dead-letter queue, as the tabs of one row);
- it has no authentication, so it is wrapped in ``AuthMiddleware``: HTTP Basic
  (``RAY_EXECUTOR_DASHBOARD_USER``/``_PASSWORD``) or ``Authorization: Bearer`` with
  ``RAY_EXECUTOR_DASHBOARD_TOKEN``, compared in constant time; anything else gets 401 with a
  Basic challenge, so a browser asks for the user and password. Without credentials it only
  starts on a loopback address (``check_credentials``);
- its worker list runs ``KEYS`` inside a Lua script (blocking Redis for a scan of the whole
  keyspace on every page view), so ``_Interface`` replaces that one call with a bounded one.

The broker here never consumes: it has no middleware, and it writes to Redis only when an
operator requeues or deletes a message. It is configured like the workers' broker (namespace
``dramatiq``, heartbeat timeout) so Dramatiq's maintenance pass, which any broker call may run,
behaves the same whoever runs it.

The deliberation browser (``bridge.browser``) is served beside it, behind the same
middleware, and linked from its navigation bar.

Served by the standard library's ``wsgiref`` server with one thread per connection: the
dashboard is an operator tool with a handful of users, and this adds no dependency.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import logging
import signal
import socket
import socketserver
import sys
import threading
from types import FrameType
from typing import Any, Callable, Iterable, List, Optional, Tuple
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from dramatiq.brokers.redis import RedisBroker
from dramatiq_dashboard import DashboardApp
from dramatiq_dashboard.interface import RedisInterface
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bridge import browser
from core.dramatiq_internals import NAMESPACE as DRAMATIQ_NAMESPACE
from core.settings import PREFIX, Settings, SettingsError

logger = logging.getLogger("ray_executor.dashboard")

REALM = "ray-executor"
HEALTH_PATH = "/healthz"
REQUEST_TIMEOUT = 30.0  # seconds a connection may stay silent before the server drops it

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict, StartResponse], Iterable[bytes]]


class DashboardConfigError(SettingsError):
    """The dashboard's settings do not allow it to start; the message says what to set."""


# --- settings checks ---


def is_loopback(host: str) -> bool:
    """True when ``host`` is a loopback address (``127.0.0.0/8``, ``::1``) or ``localhost``.

    An empty host or ``0.0.0.0``/``::`` means every interface, so it is not loopback; a host
    name other than ``localhost`` is not resolved and counts as not loopback.
    """
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_credentials(settings: Settings) -> None:
    """Refuse settings the dashboard must not start with.

    Raises ``DashboardConfigError`` when only one of user and password is set, or when no
    credentials at all (user and password, or token) are set and the listen address is not
    loopback. Returns normally otherwise.
    """
    user, password = settings.dashboard_user, settings.dashboard_password
    if bool(user) != bool(password):
        raise DashboardConfigError(
            f"{PREFIX}DASHBOARD_USER and {PREFIX}DASHBOARD_PASSWORD must be set together"
        )
    if ":" in user:
        raise DashboardConfigError(f"{PREFIX}DASHBOARD_USER must not contain ':'")
    if not (user or settings.dashboard_token) and not is_loopback(settings.dashboard_host):
        raise DashboardConfigError(
            f"refusing to serve the dashboard on {settings.dashboard_host!r} without "
            f"credentials: set {PREFIX}DASHBOARD_USER and {PREFIX}DASHBOARD_PASSWORD "
            f"(HTTP Basic) and/or {PREFIX}DASHBOARD_TOKEN (Bearer), or bind "
            f"{PREFIX}DASHBOARD_HOST to a loopback address such as 127.0.0.1"
        )


# --- authentication ---


def _equal(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


class AuthMiddleware:
    """WSGI middleware admitting only requests with the configured credentials.

    Accepts ``Authorization: Basic`` with ``user``/``password`` (when both are set) and
    ``Authorization: Bearer`` with ``token`` (when set); every comparison is constant-time.
    Anything else gets ``401`` and ``WWW-Authenticate: Basic realm="ray-executor"``. With no
    credentials configured every request passes (``check_credentials`` allows that only on
    loopback). ``/healthz`` answers ``ok`` without credentials, for probes; it reveals nothing.
    Every response gets headers that forbid framing and caching.
    """

    def __init__(self, app: WSGIApp, *, user: str = "", password: str = "",
                 token: str = "") -> None:
        self.app = app
        self.user = user
        self.password = password
        self.token = token

    @property
    def open(self) -> bool:
        """True when no credentials are configured (every request passes)."""
        return not ((self.user and self.password) or self.token)

    def authorized(self, header: str) -> bool:
        """Whether an ``Authorization`` header value carries valid credentials."""
        scheme, _, value = header.strip().partition(" ")
        scheme, value = scheme.lower(), value.strip()
        if scheme == "bearer" and self.token:
            return _equal(value, self.token)
        if scheme == "basic" and self.user and self.password:
            try:
                decoded = base64.b64decode(value, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return False
            user, sep, password = decoded.partition(":")
            # Both comparisons always run, so the time does not tell which part was wrong.
            user_ok = _equal(user, self.user)
            password_ok = _equal(password, self.password)
            return bool(sep) and user_ok and password_ok
        return False

    def operator(self, header: str) -> str:
        """Who an authorized request comes from, as actions record it: the Basic user, or
        ``token``; ``anonymous`` when no credentials are configured."""
        if self.open:
            return "anonymous"
        return self.user if header.strip().lower().startswith("basic") else "token"

    def __call__(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        def respond(status: str, headers: List[Tuple[str, str]], *args: Any) -> Any:
            return start_response(status, [*headers, *_SECURITY_HEADERS], *args)

        if environ.get("PATH_INFO") == HEALTH_PATH:
            return _plain(respond, "200 OK", "ok\n")
        header = environ.get("HTTP_AUTHORIZATION", "")
        if not self.open and not self.authorized(header):
            logger.debug("unauthorized %s %s from %s", environ.get("REQUEST_METHOD"),
                         environ.get("PATH_INFO"), environ.get("REMOTE_ADDR"))
            return _plain(respond, "401 Unauthorized", "401 Unauthorized\n",
                          [("WWW-Authenticate", f'Basic realm="{REALM}"')])
        environ[browser.OPERATOR_KEY] = self.operator(header)
        return _guarded(self.app, environ, respond)


_SECURITY_HEADERS = [
    ("X-Frame-Options", "DENY"),
    ("Content-Security-Policy", "frame-ancestors 'none'"),
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
]


def _plain(start_response: StartResponse, status: str, body: str,
           headers: Optional[List[Tuple[str, str]]] = None) -> List[bytes]:
    data = body.encode("utf-8")
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(data))), *(headers or [])])
    return [data]


def _guarded(app: WSGIApp, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
    """Run the dashboard; an error before it answered becomes a logged 503/500 page."""
    started = []

    def tracking(status: str, headers: List[Tuple[str, str]], *args: Any) -> Any:
        started.append(status)
        return start_response(status, headers, *args)

    try:
        return app(environ, tracking)
    except Exception as exc:
        if started:
            raise
        if isinstance(exc, (RedisConnectionError, RedisTimeoutError)):
            logger.warning("dashboard: Redis unavailable: %s", exc)
            return _plain(start_response, "503 Service Unavailable", "Redis unavailable\n")
        logger.exception("dashboard: error serving %s %s", environ.get("REQUEST_METHOD"),
                         environ.get("PATH_INFO"))
        return _plain(start_response, "500 Internal Server Error", "Internal error\n")


# --- the dashboard app ---


class _Interface(RedisInterface):  # type: ignore[misc]
    """dramatiq-dashboard's Redis access, with the worker list made cheap.

    The stock ``get_workers`` runs ``KEYS <namespace>:__acks__.<worker>.*`` inside Lua for
    every worker on every view of the main page: a full, blocking scan of the keyspace. The
    ack sets are named after the queue, so counting a worker's in-flight messages needs only
    ``SCARD`` of one set per declared queue (ours and its delay queue).
    """

    def do_get_workers(self) -> List[Tuple[bytes, bytes, int]]:
        client = self.broker.client
        namespace = self.broker.namespace
        queues = sorted(set(self.broker.get_declared_queues())
                        | set(self.broker.get_declared_delay_queues()))
        heartbeats = client.zrange(f"{namespace}:__heartbeats__", 0, -1, withscores=True)
        pipe = client.pipeline(transaction=False)
        for worker_id, _ in heartbeats:
            name = worker_id.decode("utf-8")
            for queue in queues:
                pipe.scard(f"{namespace}:__acks__.{name}.{queue}")
        counts = pipe.execute() if heartbeats and queues else []
        per_worker = max(len(queues), 1)
        return [
            (worker_id, str(int(score)).encode(),
             sum(counts[i * per_worker:(i + 1) * per_worker]))
            for i, (worker_id, score) in enumerate(heartbeats)
        ]


def make_broker(settings: Settings) -> RedisBroker:
    """A ``RedisBroker`` on ``settings.redis_url`` with our queue (and delay queue) declared.

    No middleware: the dashboard never processes messages, and a requeued message keeps the
    options it was dead-lettered with.
    """
    broker = RedisBroker(url=settings.redis_url, middleware=[], namespace=DRAMATIQ_NAMESPACE,
                         heartbeat_timeout=settings.worker_heartbeat_timeout * 1000)
    broker.declare_queue(settings.queue)
    return broker


def make_app(settings: Settings, broker: Optional[RedisBroker] = None) -> AuthMiddleware:
    """The dashboard WSGI app for our broker at ``/`` and the deliberation browser
    (``bridge.browser``) at its paths, both behind ``AuthMiddleware``."""
    dashboard = DashboardApp(broker or make_broker(settings), prefix="")
    dashboard.iface = _Interface(dashboard.broker)
    browser.link_from(dashboard)
    return AuthMiddleware(_Routes(dashboard, browser.Browser(settings)),
                          user=settings.dashboard_user, password=settings.dashboard_password,
                          token=settings.dashboard_token)


class _Routes:
    """The browser's paths to the browser, the rest to dramatiq-dashboard."""

    def __init__(self, dashboard: WSGIApp, pages: browser.Browser) -> None:
        self.dashboard = dashboard
        self.pages = pages

    def __call__(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        app = self.pages if browser.handles(environ.get("PATH_INFO", "")) else self.dashboard
        return app(environ, start_response)

    def close(self) -> None:
        """Close the browser's channel: its open event streams end (the bridge is not left
        waiting on watches nobody reads)."""
        self.pages.close()


# --- the server ---


class _Handler(WSGIRequestHandler):
    """wsgiref's handler with a socket timeout and access lines on our logger."""

    timeout = REQUEST_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        logger.info("%s %s", self.address_string(), format % args)

    def address_string(self) -> str:
        return str(self.client_address[0])


class DashboardServer(socketserver.ThreadingMixIn, WSGIServer):
    """wsgiref's WSGI server with one daemon thread per connection (IPv4 or IPv6)."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, host: str, port: int) -> None:
        name = host.strip("[]")
        if ":" in name:
            self.address_family = socket.AF_INET6
        super().__init__((name, port), _Handler)


def make_server(settings: Settings, broker: Optional[RedisBroker] = None) -> DashboardServer:
    """Check the settings (``check_credentials``) and bind the dashboard's server.

    Raises ``DashboardConfigError`` when the settings are refused, ``OSError`` when the
    address cannot be bound. ``serve_forever`` then runs it.
    """
    check_credentials(settings)
    app = make_app(settings, broker)
    server = DashboardServer(settings.dashboard_host, settings.dashboard_port)
    server.set_app(app)
    host, port = server.server_address[:2]
    schemes = [name for name, on in (("basic", settings.dashboard_user),
                                     ("bearer", settings.dashboard_token)) if on]
    logger.info("dashboard of queue %s on http://%s:%s/ (auth: %s)", settings.queue,
                f"[{host}]" if ":" in str(host) else host, port,
                ", ".join(schemes) or "none, loopback only")
    return server


def run(server: DashboardServer, stop: Optional[threading.Event] = None) -> None:
    """Serve requests until ``stop`` is set (forever when None), then close the server."""
    if stop is not None:
        threading.Thread(target=lambda: (stop.wait(), server.shutdown()),
                         name="dashboard-stop", daemon=True).start()
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
        app = server.get_app()
        if isinstance(app, AuthMiddleware) and isinstance(app.app, _Routes):
            app.app.close()
        logger.info("dashboard stopped")


def serve(settings: Settings, stop: Optional[threading.Event] = None) -> None:
    """Serve the dashboard until ``stop`` is set (forever when ``stop`` is None).

    Raises ``DashboardConfigError`` (before binding) when the settings are refused.
    """
    run(make_server(settings), stop)


def main(settings: Settings) -> int:
    """``ray-executor dashboard``: serve until SIGINT/SIGTERM, then return 0.

    Returns 2, with the reason on stderr, when the settings are refused (no ``REDIS_URL``, or
    no credentials on a non-loopback address), and 1 when the address cannot be bound.
    """
    try:
        if not settings.redis_url:
            raise DashboardConfigError("REDIS_URL must be set (the Redis of the Dramatiq broker)")
        server = make_server(settings)
    except SettingsError as exc:  # DashboardConfigError, or the browser's
        print(f"ray-executor dashboard: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"ray-executor dashboard: cannot listen on {settings.dashboard_host}:"
              f"{settings.dashboard_port}: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()

    def on_signal(signum: int, frame: Optional[FrameType]) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        run(server, stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
