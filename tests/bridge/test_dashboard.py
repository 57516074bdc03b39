"""``ray-executor dashboard``: dramatiq-dashboard for our queue, behind authentication.

Against real Redis and a real bridge: the dashboard runs in this process on a free port with
the test bridge's queue; messages come from ``ExecuteDeliberation`` calls. The browser is
headless Debian Chromium driven over the DevTools protocol on a pipe
(``--remote-debugging-pipe``, ``tests.bridge.browsing``). It answers the Basic-auth
challenge the way a person typing into the browser's prompt does (``Fetch.authRequired``),
or cancels it. Screenshots go to ``test-artifacts/``.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import re
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Tuple

import dramatiq
import pytest
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Prometheus, default_middleware

from bridge import dashboard
from bridge.dashboard import DashboardConfigError, check_credentials
from core.settings import Settings
from harness import servers
from tests.bridge.browsing import PASSWORD, USER, Chromium, Dashboard, basic
from tests.bridge.conftest import BridgeProcess, request, run_stock_worker
from tests.conftest import ARTIFACTS


def burst(bridge: BridgeProcess, deliberations: int, agents: int) -> None:
    stub = bridge.stub()
    for _ in range(deliberations):
        assert stub.ExecuteDeliberation(request(agents=agents)).status == "submitted"


# --- settings ---


def test_refuses_to_start_without_credentials_unless_on_loopback() -> None:
    for host in ("127.0.0.1", "127.9.9.9", "::1", "[::1]", "localhost"):
        check_credentials(Settings(dashboard_host=host))  # open, but loopback only
    for host in ("0.0.0.0", "::", "", "10.1.2.3", "dashboard.example"):
        with pytest.raises(DashboardConfigError, match="RAY_EXECUTOR_DASHBOARD_USER"):
            check_credentials(Settings(dashboard_host=host))
        check_credentials(Settings(dashboard_host=host, dashboard_token="t"))
        check_credentials(Settings(dashboard_host=host, dashboard_user="u",
                                   dashboard_password="p"))
    with pytest.raises(DashboardConfigError, match="set together"):
        check_credentials(Settings(dashboard_user="u"))
    with pytest.raises(DashboardConfigError, match="set together"):
        check_credentials(Settings(dashboard_password="p", dashboard_token="t"))


def run_main(env: Dict[str, str]) -> subprocess.Popen:
    code = ("import sys; from bridge import dashboard; from core.settings import Settings; "
            "sys.exit(dashboard.main(Settings.from_env()))")
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_main_exits_2_without_credentials_and_0_on_sigterm(redis_url: str) -> None:
    port = servers.free_port()
    refused = run_main({"REDIS_URL": redis_url, "RAY_EXECUTOR_DASHBOARD_HOST": "0.0.0.0",
                        "RAY_EXECUTOR_DASHBOARD_PORT": str(port)})
    out, _ = refused.communicate(timeout=30)
    assert refused.returncode == 2, out
    assert "refusing to serve the dashboard on '0.0.0.0' without credentials" in out

    serving = run_main({"REDIS_URL": redis_url, "RAY_EXECUTOR_DASHBOARD_HOST": "0.0.0.0",
                        "RAY_EXECUTOR_DASHBOARD_PORT": str(port),
                        "RAY_EXECUTOR_DASHBOARD_TOKEN": "t0k"})
    try:
        servers.wait_for_port(port, 30, serving)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/", headers={"Authorization": "Bearer t0k"})
        assert connection.getresponse().status == 200
        connection.close()
    finally:
        serving.terminate()
        out, _ = serving.communicate(timeout=30)
    assert serving.returncode == 0, out


# --- authentication over plain HTTP ---


def test_every_page_needs_credentials(dash: Dashboard) -> None:
    burst(dash.bridge, 1, 2)
    pages = ["/", f"/queues/{dash.queue}", f"/queues/{dash.queue}/failed", "/nowhere"]
    wrong = {
        "none": {},
        "wrong password": {"Authorization": basic(USER, "nope")},
        "wrong user": {"Authorization": basic("admin", PASSWORD)},
        "password as token": {"Authorization": f"Bearer {PASSWORD}"},
        "wrong token": {"Authorization": "Bearer not-the-token"},
        "token as basic": {"Authorization": basic(dash.settings.dashboard_token, "")},
        "garbage": {"Authorization": "Basic %%%"},
    }
    for path in pages:
        for name, headers in wrong.items():
            status, got, body = dash.http("GET", path, auth=None, headers=headers)
            assert status == 401, (path, name)
            assert got["www-authenticate"] == 'Basic realm="ray-executor"', (path, name)
            assert dash.queue not in body
    status, _, _ = dash.http("POST", "/delete-message", auth=None,
                             form={"queue": dash.queue, "id": "x"})
    assert status == 401

    for auth in ("basic", "bearer"):
        status, got, body = dash.http("GET", "/", auth=auth)
        assert status == 200 and dash.queue in body, auth
        assert got["x-frame-options"] == "DENY" and got["cache-control"] == "no-store"
    status, _, body = dash.http("GET", "/healthz", auth=None)  # for probes; says nothing
    assert (status, body) == (200, "ok\n")


def test_redis_down_is_a_503_page() -> None:
    settings = Settings(redis_url=f"redis://127.0.0.1:{servers.free_port()}/0", queue="q",
                        dashboard_token="t")
    app = dashboard.make_app(settings)
    answers: List[Tuple[str, List[Tuple[str, str]]]] = []
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "HTTP_AUTHORIZATION": "Bearer t",
               "wsgi.input": io.BytesIO()}
    body = b"".join(app(environ, lambda status, headers: answers.append((status, headers))))
    assert answers[0][0] == "503 Service Unavailable" and body == b"Redis unavailable\n"


# --- the browser ---


TABLE_ROWS = """[...document.querySelectorAll('table')[0].tBodies[0].rows]
                .map(row => [...row.cells].map(cell => cell.innerText.trim()))"""


def test_browser_sees_our_queue_with_the_burst_counted(dash: Dashboard, chromium: Chromium
                                                       ) -> None:
    burst(dash.bridge, deliberations=5, agents=3)
    assert dash.counts() == {"ready": 15, "delayed": 0, "dead": 0}

    # No credentials: the prompt is cancelled and the browser is left with the 401.
    assert chromium.navigate(dash.url) == 401
    assert chromium.auth_challenges == 1
    assert dash.queue not in chromium.evaluate("document.documentElement.outerHTML")

    chromium.credentials = (USER, PASSWORD)
    assert chromium.navigate(dash.url) == 200
    assert chromium.evaluate("document.title") == "Dashboard :: Dramatiq Dashboard"
    rows = {row[0]: row[1:] for row in chromium.evaluate(TABLE_ROWS)}
    assert rows == {dash.queue: ["15", "0", "0"]}  # queue: jobs, delayed, failed
    chromium.screenshot(ARTIFACTS / "dashboard.png")
    links = chromium.evaluate("[...document.querySelectorAll('.nav a')]"
                              ".map(a => a.getAttribute('href'))")
    assert links == ["/", "/deliberations", "/dead-letters"]  # the deliberation browser's

    # Follow the queue's link, as a person would: the standard tab lists the 15 messages.
    chromium.evaluate(f"document.querySelector('a[href=\"/queues/{dash.queue}\"]').click()")
    chromium.wait_for(f"location.pathname == '/queues/{dash.queue}' "
                      "&& document.readyState == 'complete'")
    tabs = chromium.evaluate("[...document.querySelectorAll('.tabs__tab')]"
                             ".map(tab => tab.innerText.trim())")
    assert tabs == ["STANDARD (15)", "DELAYED (0)", "FAILED (0)"]
    jobs = chromium.evaluate(TABLE_ROWS)
    assert len(jobs) == 15 and all(job[0].startswith("vllm_agent(") for job in jobs)
    chromium.screenshot(ARTIFACTS / "dashboard-queue.png")
    assert chromium.auth_challenges == 2  # the browser reused the credentials it was given


# --- dead letters: requeue and delete ---


@contextlib.contextmanager
def failing_worker(redis_url: str, queue: str, until: Callable[[], bool]
                   ) -> Iterator[RedisBroker]:
    """A stock Dramatiq worker takes our messages until ``until()``: agent-0 and agent-1
    fail for good (``throws``: dead-lettered), every other agent asks for a retry in 10
    minutes (``dramatiq.Retry``: to the delay queue, and held by the worker until then).
    Yields the worker's broker while it runs."""
    broker = stock_broker(redis_url)

    @dramatiq.actor(actor_name="vllm_agent", queue_name=queue, broker=broker,
                    throws=(ValueError,))
    def vllm_agent(**job: Any) -> None:
        if job["agent_id"] in ("agent-0", "agent-1"):
            raise ValueError("the model refused, for good")
        raise dramatiq.Retry("later", delay=600_000)

    worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        deadline = time.monotonic() + 30
        while not until():
            assert time.monotonic() < deadline, "the stock worker did not fail the jobs"
            time.sleep(0.05)
        yield broker
    finally:
        worker.stop()
        broker.close()


def job_ids(page: str) -> List[str]:
    """The message ids a queue page lists (each has a requeue and/or a delete form)."""
    return list(dict.fromkeys(re.findall(r'name="id" value="([^"]+)"', page)))


def keys_calls(client: redis.Redis) -> int:
    """How many KEYS commands the Redis server has run (scripts' calls included)."""
    return int(client.info("commandstats").get("cmdstat_keys", {}).get("calls", 0))


def stock_broker(redis_url: str) -> RedisBroker:
    """A RedisBroker with Dramatiq's default middleware, but Prometheus: that one sets its
    metrics up only in a worker process started by the ``dramatiq`` command."""
    return RedisBroker(url=redis_url, middleware=[
        middleware() for middleware in default_middleware if middleware is not Prometheus])


def post(dash: Dashboard, path: str, page_status: Tuple[int, Dict[str, str], str],
         **form: str) -> Tuple[int, Dict[str, str], str]:
    """Submit one of the page's forms: its CSRF cookie and hidden token, and ``form``."""
    _, headers, page = page_status
    cookie = headers["set-cookie"].split(";")[0]
    token = re.search(r'name="__dd_csrf" value="([^"]+)"', page)
    assert token and cookie == f"__dd_csrf={token.group(1)}"
    return dash.http("POST", path, headers={"Cookie": cookie},
                     form={"__dd_csrf": token.group(1), **form})


def test_dead_letters_can_be_requeued_and_deleted(dash: Dashboard, redis_url: str) -> None:
    burst(dash.bridge, deliberations=1, agents=3)
    after = {"ready": 0, "delayed": 1, "dead": 2}
    queue = dash.queue
    with failing_worker(redis_url, queue, until=lambda: dash.counts() == after) as broker:
        # The worker list: the worker holds the delayed message until its time comes. It is
        # counted without KEYS (which the stock dashboard runs in Lua on every view).
        keys_before = keys_calls(dash.redis)
        status, _, home = dash.http("GET", "/")
        assert status == 200 and keys_calls(dash.redis) == keys_before
        worker = re.search(rf">\s*{broker.broker_id}\s*</td>\s*<td[^>]*>\s*(\d+)\s*<", home)
        assert worker and worker.group(1) == "1"

    status, _, home = dash.http("GET", "/")
    assert status == 200
    row = re.search(rf'>\s*{queue}\s*</a>\s*</td>((?:\s*<td[^>]*>\s*\d+\s*</td>){{3}})', home)
    assert row and re.findall(r">\s*(\d+)\s*<", row.group(1)) == ["0", "1", "2"]

    delayed = dash.http("GET", f"/queues/{queue}/delayed")
    assert delayed[0] == 200 and "Delayed (<em class=\"em em--secondary\">1</em>)" in delayed[2]
    assert len(job_ids(delayed[2])) == 1 and "Requeue" not in delayed[2]

    failed = dash.http("GET", f"/queues/{queue}/failed")
    dead = job_ids(failed[2])
    assert failed[0] == 200 and len(dead) == 2 and failed[2].count(">Requeue<") == 2
    stored = {i: json.loads(dash.redis.hget(f"dramatiq:{queue}.XQ.msgs", i)) for i in dead}

    # Without the page's CSRF token a POST is refused, even with credentials.
    assert dash.http("POST", "/requeue-message", form={"queue": f"{queue}.XQ",
                                                        "id": dead[0]})[0] == 403

    status, headers, _ = post(dash, "/requeue-message", failed, queue=f"{queue}.XQ", id=dead[0])
    # dramatiq-dashboard 0.4.0 sends the browser to the new message under the *failed* tab,
    # where it is not, which redirects on to the failed tab: the operator stays on that list.
    assert status == 302 and headers["location"].startswith(f"/queues/{queue}/failed/")
    assert dash.counts() == {"ready": 1, "delayed": 1, "dead": 1}
    new_id = headers["location"].rsplit("/", 1)[1]
    assert dash.redis.lrange(f"dramatiq:{queue}", 0, -1) == [new_id.encode()]
    requeued = json.loads(dash.redis.hget(f"dramatiq:{queue}.msgs", new_id))
    assert requeued["kwargs"] == stored[dead[0]]["kwargs"]  # the same job, ready to run again
    assert requeued["queue_name"] == queue and requeued["options"]["retries"] == 0
    assert dash.http("GET", f"/queues/{queue}/standard/{new_id}")[0] == 200  # its page

    status, headers, _ = post(dash, "/delete-message", failed, queue=f"{queue}.XQ", id=dead[1])
    assert (status, headers["location"]) == (302, f"/queues/{queue}/failed")
    assert dash.counts() == {"ready": 1, "delayed": 1, "dead": 0}
    assert dash.redis.hlen(f"dramatiq:{queue}.XQ.msgs") == 0

    status, _, _ = post(dash, "/delete-message", delayed, queue=f"{queue}.DQ",
                        id=job_ids(delayed[2])[0])
    assert status == 302 and dash.counts() == {"ready": 1, "delayed": 0, "dead": 0}
    assert dash.redis.llen(f"dramatiq:{queue}.DQ") == 0

    # The requeued message is a real Dramatiq message: a stock worker runs it.
    ran = run_stock_worker(stock_broker(redis_url), queue, 1, threads=1)
    assert ran == [stored[dead[0]]["kwargs"]]

