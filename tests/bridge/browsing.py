"""What the browser tests share: the dashboard under test (served in this process on a free
port, in front of a real bridge) and headless Chromium driven over the DevTools protocol on a
pipe (``--remote-debugging-pipe``): no chromedriver, no Python package."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Tuple
from urllib.parse import urlencode

import pytest
import redis

from bridge import dashboard
from core.settings import Settings
from harness import servers
from tests.waiting import until

if TYPE_CHECKING:
    from tests.bridge.conftest import BridgeProcess

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
USER, PASSWORD = "operator", "correct horse battery staple"


# --- the dashboard under test ---


@dataclass
class Dashboard:
    bridge: BridgeProcess
    settings: Settings
    port: int
    redis: redis.Redis

    @property
    def queue(self) -> str:
        return self.bridge.queue

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def http(self, method: str, path: str, *, auth: Optional[str] = "basic",
             headers: Optional[Dict[str, str]] = None, form: Optional[Dict[str, str]] = None
             ) -> Tuple[int, Dict[str, str], str]:
        """One request: ``(status, headers lower-cased, body)``; redirects are not followed."""
        sent = dict(headers or {})
        if auth == "basic":
            sent["Authorization"] = basic(USER, PASSWORD)
        elif auth == "bearer":
            sent["Authorization"] = f"Bearer {self.settings.dashboard_token}"
        body = None
        if form is not None:
            body = urlencode(form).encode()
            sent["Content-Type"] = "application/x-www-form-urlencoded"
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request(method, path, body=body, headers=sent)
            response = connection.getresponse()
            return (response.status, {k.lower(): v for k, v in response.getheaders()},
                    response.read().decode("utf-8"))
        finally:
            connection.close()

    def counts(self) -> Dict[str, int]:
        """What Redis holds for our queue: ready, delayed and dead-lettered messages."""
        key = f"dramatiq:{self.queue}"
        return {"ready": self.redis.hlen(f"{key}.msgs"),
                "delayed": self.redis.hlen(f"{key}.DQ.msgs"),
                "dead": self.redis.zcard(f"{key}.XQ")}


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@contextlib.contextmanager
def serving(bridge: BridgeProcess, redis_url: str, **settings: Any) -> Iterator[Dashboard]:
    """The dashboard of ``bridge``'s queue, in this process on a free port, with Basic and
    Bearer credentials (and ``settings``); stopped on exit."""
    port = servers.free_port()
    settings = Settings(redis_url=redis_url, queue=bridge.queue, dashboard_host="127.0.0.1",
                        dashboard_bridge=bridge.address, dashboard_port=port,
                        dashboard_user=USER, dashboard_password=PASSWORD,
                        dashboard_token=f"tok-{uuid.uuid4().hex}", **settings)
    stop = threading.Event()
    thread = threading.Thread(target=dashboard.serve, args=(settings, stop), daemon=True)
    thread.start()
    servers.wait_for_port(port, 10)
    client = redis.Redis.from_url(redis_url)
    try:
        yield Dashboard(bridge, settings, port, client)
    finally:
        stop.set()
        thread.join(10)
        client.close()
    assert not thread.is_alive(), "the dashboard did not stop when asked"


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe.

    ``--remote-debugging-pipe`` reads NUL-terminated JSON commands on fd 3 and writes replies
    and events on fd 4; a shell maps those to our stdin/stdout pipes. One page, attached in
    flat mode. Every request is let through (``Fetch.requestPaused``), and an HTTP auth
    challenge is answered with ``credentials`` or, when None, cancelled
    (``Fetch.authRequired``), as a person would at the browser's prompt.
    """

    def __init__(self, profile: Path, log: Path, width: int = 1280, height: int = 900) -> None:
        if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
            pytest.fail(f"{CHROMIUM} not found: install the Debian packages chromium and "
                        "chromium-driver (apt-get install -y chromium chromium-driver)")
        profile.mkdir(parents=True, exist_ok=True)
        self.credentials: Optional[Tuple[str, str]] = None
        self.auth_challenges = 0
        self._log = log.open("ab")
        self.process = subprocess.Popen(
            ["/bin/sh", "-c", 'exec "$0" "$@" 3<&0 4>&1 0</dev/null 1>&2', CHROMIUM,
             *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
             "--remote-debugging-pipe", "about:blank"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log)
        self._ids = 0
        self._write = threading.Lock()
        self._changed = threading.Condition()
        self._replies: Dict[int, Dict[str, Any]] = {}
        self._events: List[Dict[str, Any]] = []
        self._closed = False
        threading.Thread(target=self._read, name="chromium-cdp", daemon=True).start()
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target,
                                 flatten=True)["sessionId"]
        for method in ("Page.enable", "Network.enable"):
            self.call(method, session=self.session)
        self.call("Emulation.setDeviceMetricsOverride", session=self.session, width=width,
                  height=height, deviceScaleFactor=1, mobile=False)
        self.call("Fetch.enable", session=self.session, handleAuthRequests=True)

    def _send(self, method: str, params: Dict[str, Any], session: Optional[str]) -> int:
        with self._write:
            self._ids += 1
            message: Dict[str, Any] = {"id": self._ids, "method": method, "params": params}
            if session:
                message["sessionId"] = session
            assert self.process.stdin is not None
            self.process.stdin.write(json.dumps(message).encode() + b"\0")
            self.process.stdin.flush()
            return self._ids

    def _read(self) -> None:
        assert self.process.stdout is not None
        buffer = b""
        while True:
            chunk = os.read(self.process.stdout.fileno(), 1 << 16)
            if not chunk:
                break
            buffer += chunk
            *complete, buffer = buffer.split(b"\0")
            for raw in complete:
                self._dispatch(json.loads(raw))
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def _dispatch(self, message: Dict[str, Any]) -> None:
        method, params = message.get("method"), message.get("params", {})
        session = message.get("sessionId")
        if method == "Fetch.requestPaused":
            self._send("Fetch.continueRequest", {"requestId": params["requestId"]}, session)
        elif method == "Fetch.authRequired":
            self.auth_challenges += 1
            answer: Dict[str, Any] = {"response": "CancelAuth"}
            if self.credentials:
                answer = {"response": "ProvideCredentials", "username": self.credentials[0],
                          "password": self.credentials[1]}
            self._send("Fetch.continueWithAuth", {"requestId": params["requestId"],
                                                  "authChallengeResponse": answer}, session)
        with self._changed:
            if "id" in message:
                self._replies[message["id"]] = message
            else:
                self._events.append(message)
            self._changed.notify_all()

    def _wait(self, ready: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = ready()
                if found:
                    return found
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    raise AssertionError(f"Chromium: no {what} within {timeout:.0f}s "
                                         f"(closed: {self._closed}; log: {self._log.name})")
                self._changed.wait(left)

    def call(self, method: str, session: Optional[str] = None, timeout: float = 30,
             **params: Any) -> Dict[str, Any]:
        sent = self._send(method, params, session)
        reply = self._wait(lambda: self._replies.pop(sent, None), timeout, f"reply to {method}")
        if "error" in reply:
            raise AssertionError(f"Chromium: {method} failed: {reply['error']}")
        return dict(reply.get("result", {}))

    def navigate(self, url: str, timeout: float = 30) -> int:
        """Open ``url`` and wait for its load event; the main document's HTTP status."""
        seen = len(self._events)
        reply = self.call("Page.navigate", session=self.session, url=url)
        assert not reply.get("errorText"), f"navigating to {url}: {reply['errorText']}"
        return self._loaded(seen, timeout, f"load of {url}")

    def act(self, expression: str, timeout: float = 30) -> int:
        """Run ``expression`` (a click that loads a page, e.g. a form's button) and wait
        for the new page's load event; its HTTP status."""
        seen = len(self._events)
        self.evaluate(expression)
        return self._loaded(seen, timeout, f"a page loaded by {expression}")

    def _loaded(self, seen: int, timeout: float, what: str) -> int:
        self._wait(lambda: any(e.get("method") == "Page.loadEventFired"
                               for e in self._events[seen:]), timeout, what)
        return int(self.evaluate(
            "performance.getEntriesByType('navigation')[0].responseStatus"))

    def wait_for(self, expression: str, timeout: float = 30) -> Any:
        """Poll ``expression`` in the page until it is truthy; its value."""
        return until(lambda: self.evaluate(expression), f"Chromium: {expression}", timeout,
                     interval=0.1)

    def evaluate(self, expression: str) -> Any:
        reply = self.call("Runtime.evaluate", session=self.session, expression=expression,
                          returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in reply, reply["exceptionDetails"]
        return reply["result"].get("value")

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", session=self.session, format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
            self.process.wait(10)
        except (AssertionError, OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait(10)
        finally:
            self._log.close()
