"""The deliberation browser (``bridge.browser``), in real headless Chromium: the dashboard of
``tests.bridge.browsing`` in front of a real bridge, real Redis and NATS, and, where
deliberations must run, a real worker group on Ray calling the stand-in LLM. Screenshots go
to ``test-artifacts/``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from bridge import browser
from bridge.browser import Browser
from core.logs import redact
from core.settings import Settings, SettingsError
from harness.standin_llm import StandinThread
from ray_executor.v1 import ray_executor_pb2 as pb
from tests.bridge.browsing import PASSWORD, USER, Chromium, Dashboard, basic, serving
from tests.bridge.conftest import BridgeProcess, Channel, make_pki, request
from tests.bridge.test_metrics import Breakers
from tests.bridge.test_nats_ingress import as_json, consumer_ready, settled, with_nats
from tests.bridge.test_operations_e2e import agents_request, final_status
from tests.bridge.test_route_views import FIRST, OTHER, SECOND, submit, two_routes
from tests.conftest import ARTIFACTS
from tests.waiting import until

ORIGIN = "http://127.0.0.1"  # completed with the dashboard's port


def rows(chromium: Chromium, table: str) -> List[List[str]]:
    """The cells' text of each body row of the table with id ``table``."""
    return list(chromium.evaluate(
        f"[...document.getElementById('{table}').tBodies[0].rows]"
        ".map(row => [...row.cells].map(cell => cell.innerText.trim()))"))


def listed(chromium: Chromium) -> List[str]:
    return [row[0] for row in rows(chromium, "deliberations")]


def submit_reason(chromium: Chromium, reason: str) -> int:
    """Fill the page's action form with ``reason`` and press its button; the next page's
    status."""
    return chromium.act(
        f"document.querySelector('#actions input[name=reason], form.action input')"
        f".value = {json.dumps(reason)}; document.querySelector('form.action button').click()")


def posted(dash: Dashboard, path: str, form: Dict[str, str], origin: bool = True
           ) -> Any:
    headers = {"Origin": f"{ORIGIN}:{dash.port}"} if origin else {}
    return dash.http("POST", path, headers=headers, form=form)


def test_wrong_or_missing_credentials_get_nothing(dash: Dashboard, chromium: Chromium
                                                  ) -> None:
    did = dash.bridge.stub().ExecuteDeliberation(request(agents=2)).deliberation_id
    pages = ["/deliberations", f"/deliberations/{did}", f"/deliberations/{did}/events",
             f"/deliberations/{did}?part=state", "/dead-letters", "/dead-letters/1"]
    wrong = {"none": {}, "wrong password": {"Authorization": basic(USER, "nope")},
             "wrong token": {"Authorization": "Bearer nope"},
             "password as token": {"Authorization": f"Bearer {PASSWORD}"}}
    for path in pages:
        for name, headers in wrong.items():
            status, got, body = dash.http("GET", path, auth=None, headers=headers)
            assert (status, body) == (401, "401 Unauthorized\n"), (path, name)
            assert got["www-authenticate"] == 'Basic realm="ray-executor"'
    for name, headers in wrong.items():
        status, _, _ = dash.http("POST", f"/deliberations/{did}/cancel", auth=None,
                                 headers={**headers, "Origin": f"{ORIGIN}:{dash.port}"},
                                 form={"reason": "no"})
        assert status == 401, name
    stub = dash.bridge.stub()
    assert stub.GetDeliberationStatus(
        pb.GetDeliberationStatusRequest(deliberation_id=did)).status == "queued"

    # In the browser: the prompt cancelled, the 401 page holds nothing of ours.
    assert chromium.navigate(f"{dash.url}deliberations/{did}") == 401
    assert did not in chromium.evaluate("document.documentElement.outerHTML")
    chromium.credentials = (USER, PASSWORD)
    assert chromium.navigate(f"{dash.url}deliberations/{did}") == 200
    assert chromium.evaluate("document.getElementById('status').dataset.status") == "queued"
    for auth in ("basic", "bearer"):
        status, _, body = dash.http("GET", "/deliberations", auth=auth)
        assert status == 200 and did in body, auth


def test_the_browser_reaches_a_bridge_with_tls_and_a_token(
        start_bridge: Callable[..., BridgeProcess], redis_url: str, tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    bridge = start_bridge(RAY_EXECUTOR_GRPC_TLS_CERT=pki["server.pem"],
                          RAY_EXECUTOR_GRPC_TLS_KEY=pki["server.key"],
                          RAY_EXECUTOR_GRPC_TOKEN="s3cret-token")
    with serving(bridge, redis_url, dashboard_bridge_ca=pki["ca.pem"],
                 grpc_token="s3cret-token") as dash:
        status, _, body = dash.http("GET", "/deliberations")
        assert status == 200 and '<span class="s-degraded">degraded</span>' in body
    with serving(bridge, redis_url, dashboard_bridge_ca=pki["ca.pem"]) as dash:
        status, _, body = dash.http("GET", "/deliberations")
        assert status == 502 and "UNAUTHENTICATED" in body and "s3cret" not in body
    with pytest.raises(SettingsError, match="RAY_EXECUTOR_DASHBOARD_BRIDGE_CA=/nowhere"):
        Browser(Settings(dashboard_bridge_ca="/nowhere"))


def test_the_list_filters_and_pages(dash: Dashboard, chromium: Chromium) -> None:
    stub = dash.bridge.stub()

    def submit(story: str, **fields: Any) -> str:
        req = request(agents=2, **fields)
        req.constraints.story_id = story
        return str(stub.ExecuteDeliberation(req).deliberation_id)

    older = [submit("S-A"), submit("S-A")]
    boundary = int(time.time() * 1000) + 1
    until(lambda: time.time() * 1000 > boundary + 1, "the clock past the boundary")
    newer = [submit("S-B"), submit("S-A", task_id="T-only"), submit("S-B", vllm_model="m2")]
    stub.CancelDeliberation(pb.CancelDeliberationRequest(deliberation_id=newer[0],
                                                         reason="test"))
    everything = list(reversed(older + newer))  # newest first

    chromium.credentials = (USER, PASSWORD)
    assert chromium.navigate(f"{dash.url}deliberations") == 200
    assert listed(chromium) == everything
    # Queue depth: every agent job (a cancelled one's too, skipped when a worker takes it),
    # four deliberations active, none running without a worker.
    assert rows(chromium, "queue") == [["10", "0", "0", "4", "0"]]
    health = chromium.evaluate("document.getElementById('health').innerText")
    assert health.startswith("service degraded: ") and "worker" in health, health
    # The last hour's plot: one deliberation finished (the cancelled one), in the last bar.
    assert chromium.evaluate("document.getElementById('hour').dataset.total") == "1"
    assert chromium.evaluate("[...document.querySelectorAll('#hour rect')]"
                             ".map(bar => +bar.dataset.count)") == [0] * 11 + [1]
    chromium.screenshot(ARTIFACTS / "browser-list.png")

    def filtered(**fields: str) -> List[str]:
        fill = "".join(f"document.querySelector('#filters [name={name}]').value = "
                       f"{json.dumps(value)};" for name, value in fields.items())
        assert chromium.act(f"{fill} document.querySelector('#filters button').click()") \
            == 200
        found = listed(chromium)
        assert chromium.navigate(f"{dash.url}deliberations") == 200  # filters cleared
        return found

    assert filtered(story_id="S-A") == [newer[1], older[1], older[0]]
    assert filtered(status="cancelled") == [newer[0]]
    assert filtered(task_id="T-only") == [newer[1]]
    assert filtered(model="m2") == [newer[2]]
    moment = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(boundary / 1000)) + \
        f".{boundary % 1000:03d}"
    assert filtered(before=moment) == list(reversed(older))
    assert filtered(after=moment, story_id="S-B") == [newer[2], newer[0]]

    # Pages of two, following the "Older" link.
    assert chromium.navigate(f"{dash.url}deliberations?size=2") == 200
    seen = [listed(chromium)]
    while chromium.evaluate("!!document.getElementById('next')") and len(seen) < 4:
        assert chromium.act("document.getElementById('next').click()") == 200
        seen.append(listed(chromium))
    assert seen == [everything[0:2], everything[2:4], everything[4:]]
    chromium.screenshot(ARTIFACTS / "browser-list-last-page.png")

    status, _, body = dash.http("GET", "/deliberations?after=yesterday")
    assert status == 400 and "after: an ISO 8601 time" in body


def test_cancel_from_the_page(dash: Dashboard, chromium: Chromium) -> None:
    stub = dash.bridge.stub()
    did = stub.ExecuteDeliberation(request(agents=2)).deliberation_id
    path = f"/deliberations/{did}/cancel"

    # Refused: no Origin (CSRF), another site's Origin, no reason.
    assert posted(dash, path, {"reason": "x"}, origin=False)[0] == 403
    assert dash.http("POST", path, headers={"Origin": "http://evil.example"},
                     form={"reason": "x"})[0] == 403
    status, _, body = posted(dash, path, {"reason": "  "})
    assert status == 400 and "reason: is required" in body
    status_of = pb.GetDeliberationStatusRequest(deliberation_id=did)
    assert stub.GetDeliberationStatus(status_of).status == "queued"

    chromium.credentials = (USER, PASSWORD)
    assert chromium.navigate(f"{dash.url}deliberations/{did}") == 200
    assert submit_reason(chromium, "wrong story") == 200
    assert chromium.evaluate("document.getElementById('status').dataset.status") == \
        "cancelled"
    assert chromium.evaluate("document.getElementById('notice').innerText") == \
        f"cancelled (by {USER})"
    chromium.screenshot(ARTIFACTS / "browser-cancelled.png")
    final = stub.GetDeliberationStatus(status_of)
    assert final.status == "cancelled" and f"{USER}: wrong story" in final.error_message

    # Again (a reload, a second operator, here a script with the token and a Referer):
    # nothing changes, and the page says so.
    status, headers, _ = dash.http("POST", path, auth="bearer", form={"reason": "twice"},
                                   headers={"Referer": f"{ORIGIN}:{dash.port}/x"})
    assert (status, headers["location"]) == (
        303, f"/deliberations/{did}?notice=already+cancelled+%28by+token%29")

    # What the bridge refuses is an error page saying why: nothing to retry, no such id.
    status, _, body = posted(dash, f"/deliberations/{did}/retry", {"reason": "again"})
    assert status == 409 and "FAILED_PRECONDITION" in body and "cancelled" in body
    status, _, body = dash.http("GET", "/deliberations/delib-nope")
    assert status == 404 and "no deliberation delib-nope" in body


@pytest.mark.slow
def test_a_running_deliberation_updates_live_and_its_failed_agent_is_retried(
        start_bridge: Callable[..., BridgeProcess], start_worker: Any,
        standin: StandinThread, redis_url: str, chromium: Chromium,
        monkeypatch: pytest.MonkeyPatch) -> None:
    bridge = start_bridge()
    start_worker(bridge)
    standin.control(latency=5, status=400, fail_count=1)  # one agent fails, one completes
    did = bridge.stub().ExecuteDeliberation(agents_request(standin, 2)).deliberation_id
    with serving(bridge, redis_url) as dash:
        chromium.credentials = (USER, PASSWORD)
        assert chromium.navigate(f"{dash.url}deliberations/{did}") == 200
        assert chromium.evaluate("document.getElementById('status').dataset.status") in (
            "queued", "running")
        chromium.evaluate("window.stayed = true")  # gone if the page were loaded again
        chromium.wait_for("document.body.dataset.live == 'on'")
        chromium.wait_for("!!document.querySelector('#agents .s-running')", timeout=120)
        chromium.screenshot(ARTIFACTS / "browser-running.png")
        chromium.wait_for("document.body.dataset.live == 'ended'", timeout=180)
        assert chromium.evaluate("window.stayed") is True
        assert chromium.evaluate("document.getElementById('status').dataset.status") == \
            "completed"
        agents = {row[0]: row for row in rows(chromium, "agents")}
        assert sorted(row[2] for row in agents.values()) == ["completed", "failed"]
        [failed] = [name for name, row in agents.items() if row[2] == "failed"]
        assert agents[failed][4] and agents[failed][3] == "1"  # error class, one attempt
        events = chromium.evaluate("[...document.querySelectorAll('#events li')]"
                                   ".map(item => item.innerText.split(' ').slice(1).join(' '))")
        # Partial output is best effort: whether the stand-in's answer comes in one batch of
        # the runner's or in several depends on timing; the lifecycle is what is checked here.
        events = [event for event in events if not event.startswith("agent_progress")]
        assert events[0] == "submitted" and events[-1] == "completed"
        assert sorted(events[1:-1]) == sorted(
            [f"agent_started {a}" for a in agents] +
            [f"agent_{agents[a][2]} {a}" for a in agents])
        chromium.screenshot(ARTIFACTS / "browser-completed.png")

        # Retry the failed agent from the page: a new round, followed live to its end, over
        # streams cut short every 2 s: each reconnect is sent every event again.
        monkeypatch.setattr(browser, "WATCH_SECONDS", 2.0)
        standin.control(latency=6)
        assert submit_reason(chromium, "stand-in fixed") == 200
        assert chromium.evaluate("document.getElementById('notice').innerText") == \
            f"round 2 queued: {failed}"
        chromium.wait_for("document.body.dataset.live == 'ended'", timeout=180)
        assert int(chromium.evaluate("document.body.dataset.connections")) >= 2
        events = chromium.evaluate("[...document.querySelectorAll('#events li')]"
                                   ".map(item => item.innerText.split(' ')[1])")
        assert events.count("submitted") == 1 and events.count("retried") == 1, events
        assert events.count("completed") == 2 and events[-1] == "completed", events
        agents = {row[0]: row for row in rows(chromium, "agents")}
        assert [row[2] for row in agents.values()] == ["completed", "completed"]
        assert "stand-in" in agents[failed][9]  # its proposal
        chromium.screenshot(ARTIFACTS / "browser-retried.png")
        final = final_status(bridge, did)
        assert (final.status, final.completed_agents, final.failed_agents) == (
            "completed", 2, 0)
        assert chromium.navigate(f"{dash.url}deliberations") == 200  # a live worker now
        assert chromium.evaluate("document.getElementById('health').innerText") == \
            "service healthy"


@pytest.mark.slow
def test_a_dead_letter_replayed_from_the_page_completes(
        start_bridge: Callable[..., BridgeProcess], start_worker: Any,
        standin: StandinThread, channel: Channel, nats_url: str, redis_url: str,
        chromium: Chromium) -> None:
    strict = start_bridge(RAY_EXECUTOR_ALLOWED_ROLES="DEV,QA", **channel.env)
    refused = agents_request(standin, 3)  # its third agent is an ARCHITECT

    async def publish(nc: NATS, js: JetStreamContext) -> None:
        await consumer_ready(js, channel)
        await js.publish(channel.subjects.deliberate, as_json(refused))
        await settled(js, channel)

    with_nats(nats_url, publish)
    with serving(strict, redis_url) as dash:
        chromium.credentials = (USER, PASSWORD)
        assert chromium.navigate(f"{dash.url}dead-letters") == 200
        [letter] = rows(chromium, "dead-letters")
        assert letter[2] == "agents[2].role" and letter[5] == ""
        chromium.screenshot(ARTIFACTS / "browser-dead-letters.png")
        assert chromium.act("document.querySelector('#dead-letters a').click()") == 200
        payload = json.loads(chromium.evaluate("document.getElementById('payload').innerText"))
        assert payload["task_id"] == refused.task_id

        # The fix: the same service restarted, on the same port, with every role allowed.
        assert strict.stop() == 0
        fixed = start_bridge(RAY_EXECUTOR_QUEUE=strict.queue,
                             RAY_EXECUTOR_KEY_PREFIX=strict.prefix,
                             RAY_EXECUTOR_GRPC_PORT=str(strict.port), **channel.env)
        start_worker(fixed)
        assert submit_reason(chromium, "ARCHITECT allowed") == 200
        notice = chromium.evaluate("document.getElementById('notice').innerText")
        assert notice.startswith("replayed as sequence "), notice
        assert chromium.evaluate("document.getElementById('replayed').innerText") \
            .startswith(f"replayed by {USER} at ")
        chromium.screenshot(ARTIFACTS / "browser-dead-letter-replayed.png")
        # A second replay (a reload of the form, another operator) publishes nothing.
        status, headers, _ = posted(dash, f"/dead-letters/{letter[0]}/replay",
                                    {"reason": "twice"})
        assert status == 303 and "already+replayed+by" in headers["location"]

        # The replayed request, found in the list by its task_id, runs to completion.
        found = until(lambda: chromium.navigate(
            f"{dash.url}deliberations?task_id={refused.task_id}") == 200 and listed(chromium),
            "the replayed request listed")
        assert len(found) == 1
        final = final_status(fixed, found[0])
        assert (final.status, final.completed_agents) == ("completed", 3)
        assert chromium.navigate(f"{dash.url}deliberations/{found[0]}") == 200
        assert chromium.evaluate("document.getElementById('status').dataset.status") == \
            "completed"


def test_the_list_by_route_and_the_routes_panel(
        start_bridge: Callable[..., BridgeProcess], redis_url: str, chromium: Chromium,
        tmp_path: Path) -> None:
    bridge = two_routes(start_bridge, tmp_path)
    pooled, rest = submit(bridge, "m-pool", 2), submit(bridge, "test-model", 1)
    bridge.stub().CancelDeliberation(pb.CancelDeliberationRequest(deliberation_id=pooled[0],
                                                                  reason="test"))
    Breakers(bridge, redis_url).fail(FIRST, 3)  # open for ten minutes
    chromium.credentials = (USER, PASSWORD)
    with serving(bridge, redis_url) as served:
        assert chromium.navigate(f"{served.url}deliberations") == 200
        # Each route's queue (one message per agent; a cancelled one's stays until taken).
        assert [row[:6] for row in rows(chromium, "routes")] == [
            ["pool", row_queue(bridge, 0), "2", "0", "0", "0"],
            ["rest", row_queue(bridge, 1), "1", "0", "0", "0"]]
        endpoints = rows(chromium, "endpoints")
        assert [row[:3] for row in endpoints] == [
            ["pool", redact(FIRST), "0/2"], ["pool", SECOND, "0/3"], ["rest", OTHER, "0/64"]]
        assert endpoints[0][3].startswith("open for ") and endpoints[1][3] == "closed"
        assert "s3cret" not in chromium.evaluate("document.body.innerHTML")
        # The last hour per route: the cancelled deliberation finished on route pool.
        totals = {plot: chromium.evaluate(f"document.getElementById('{plot}').dataset.total")
                  for plot in ("hour", "hour-pool", "hour-rest")}
        assert totals == {"hour": "1", "hour-pool": "1", "hour-rest": "0"}
        chromium.screenshot(ARTIFACTS / "browser-routes.png")
        # The filter form's route, and a route's link in the panel.
        assert chromium.act("document.querySelector('#filters [name=route]').value = 'pool';"
                            " document.querySelector('#filters button').click()") == 200
        assert listed(chromium) == list(reversed(pooled))
        assert chromium.navigate(f"{served.url}deliberations") == 200
        assert chromium.act("document.querySelector('#routes a').click()") == 200
        assert listed(chromium) == list(reversed(pooled))
        assert chromium.navigate(f"{served.url}deliberations?route=rest") == 200
        assert listed(chromium) == rest


def row_queue(bridge: BridgeProcess, index: int) -> str:
    """The queue of the ``index``-th route of ``two_routes``' file."""
    routes = json.loads(Path(bridge.env["RAY_EXECUTOR_ROUTES_FILE"]).read_text())["routes"]
    return str(routes[index]["queue"])
