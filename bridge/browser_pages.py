"""The deliberation browser's HTML: pages rendered from the bridge's gRPC answers.

Plain HTML, every value escaped with ``html.escape``; the only script is the deliberation
page's live update (an ``EventSource`` on its ``/events``, refreshing the page's state block in
place until the deliberation ends). Actions are POST forms with a required reason.
"""

from __future__ import annotations

from datetime import datetime, timezone
from html import escape
from typing import Dict, Iterable, List, Optional, Sequence
from urllib.parse import quote, urlencode

from google.protobuf.timestamp_pb2 import Timestamp

from core import contract
from ray_executor.v1 import operations_pb2 as ops
from ray_executor.v1 import ray_executor_pb2 as pb

FILTERS = ("status", "route", "task_id", "story_id", "model", "after", "before")
STATUSES = ("", contract.QUEUED, contract.RUNNING, *contract.FINAL_STATUSES)

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222}
header{background:#1f2937;color:#fff;padding:.6em 1em}header a{color:#fff;margin-right:1.2em}
main{padding:1em}table{border-collapse:collapse;margin:.5em 0}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f4f6}pre{white-space:pre-wrap;max-width:60em;margin:0}
.s-completed{color:#047857}.s-failed{color:#b91c1c}.s-cancelled{color:#6b7280}
.s-running{color:#1d4ed8}.s-degraded{color:#b91c1c}.s-queued{color:#92400e}.notice{background:#ecfdf5;padding:.5em}
.error{background:#fef2f2;padding:.5em}form.action{margin:.5em 0}
"""


def page(title: str, body: str, notice: str = "") -> str:
    """A whole page: the navigation, an optional notice, ``body`` (already HTML)."""
    shown = f'<p class="notice" id="notice">{escape(notice)}</p>' if notice else ""
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{escape(title)}"
            f"</title><style>{_STYLE}</style></head><body><header>"
            '<a href="/deliberations">Deliberations</a><a href="/dead-letters">Dead letters</a>'
            '<a href="/">Dramatiq queues</a></header>'
            f"<main><h1>{escape(title)}</h1>{shown}{body}</main></body></html>")


def error_page(status: str, message: str) -> str:
    return page(status, f'<p class="error" id="error">{escape(message)}</p>')


def when(stamp: Timestamp) -> str:
    """A timestamp as ``YYYY-MM-DD HH:MM:SS`` UTC; "" when unset."""
    if not stamp.seconds and not stamp.nanos:
        return ""
    moment = datetime.fromtimestamp(stamp.seconds + stamp.nanos / 1e9, timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _status(status: str) -> str:
    return f'<span class="s-{escape(status)}">{escape(status)}</span>'


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], table_id: str) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>"
                   for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _action(path: str, label: str, hint: str) -> str:
    """A POST form with a required reason (actions are recorded: who and why)."""
    return (f'<form class="action" method="post" action="{escape(path)}">'
            f'<input name="reason" required placeholder="{escape(hint)}" size="40"> '
            f"<button>{escape(label)}</button></form>")


# --- the list of deliberations ---


def _select(name: str, choices: Sequence[str], chosen: str) -> str:
    options = "".join(f'<option{" selected" if c == chosen else ""}>{escape(c)}</option>'
                      for c in ("", *choices))
    return f'<label>{name} <select name="{name}">{options}</select></label> '


def deliberations(found: ops.ListDeliberationsResponse, filters: Dict[str, str],
                  service: pb.GetStatusResponse, routes: Sequence[ops.RouteState],
                  plot: str = "", notice: str = "") -> str:
    """The list page: the service's health, queue and routes above; ``plot`` (SVG,
    ``bridge.browser_plot``) above the filters."""
    stats = service.stats
    hint = ' placeholder="YYYY-MM-DDTHH:MM (UTC)"'
    inputs = "".join(
        f'<label>{name} <input name="{name}" value="{escape(filters.get(name, ""))}"'
        f'{hint if name in ("after", "before") else ""} size="14"></label> '
        for name in FILTERS[2:])
    form = ('<form id="filters" method="get" action="/deliberations">'
            + _select("status", STATUSES[1:], filters.get("status", ""))
            + _select("route", [r.name for r in routes], filters.get("route", ""))
            + f"{inputs}<button>Filter</button></form>")
    queue = _table(["queued messages", "delayed", "dead-lettered", "active deliberations",
                    "agent jobs in flight"],
                   [[str(stats.queued_messages), str(stats.delayed_messages),
                     str(stats.dead_letter_messages), str(stats.active_deliberations),
                     str(sum(route.running for route in routes))]], "queue")
    rows = [[f'<a href="/deliberations/{quote(d.deliberation_id)}">'
             f"{escape(d.deliberation_id)}</a>", _status(d.status), escape(d.task_id),
             escape(d.story_id), escape(d.model), escape(d.route), when(d.created),
             when(d.finished), f"{d.completed_agents}/{d.failed_agents}/{d.total_agents}"]
            for d in found.deliberations]
    listing = _table(["deliberation", "status", "task_id", "story_id", "model", "route",
                      "created (UTC)", "finished (UTC)", "completed/failed/agents"], rows,
                     "deliberations")
    more = ""
    if found.next_page_token:
        query = urlencode({**{k: v for k, v in filters.items() if v},
                           "page": found.next_page_token})
        more = f'<p><a id="next" href="/deliberations?{escape(query)}">Older &rarr;</a></p>'
    first = '<a href="/deliberations">newest</a>' if filters.get("page") else ""
    health = (f'<p id="health">service <span class="s-{escape(service.status)}">'
              f"{escape(service.status)}</span>"
              + (f": {escape(service.message)}" if service.message else "") + "</p>")
    return page("Deliberations", f"{health}{queue}{routes_panel(routes)}{plot}{form}{listing}"
                                 f"{more}<p>{first}</p>", notice)


def routes_panel(routes: Sequence[ops.RouteState]) -> str:
    """Per route its queue, workers and jobs running; per endpoint of its pool its slots in
    use and its circuit."""
    queues = _table(
        ["route", "queue", "ready", "delayed", "dead-lettered", "live workers", "jobs running"],
        ([f'<a href="/deliberations?{escape(urlencode({"route": r.name}))}">{escape(r.name)}'
          "</a>", escape(r.queue), str(r.ready), str(r.delayed), str(r.dead), str(r.workers),
          str(r.running)] for r in routes), "routes")
    endpoints = _table(
        ["route", "vLLM endpoint", "slots in use", "circuit", "failures"],
        ([escape(r.name), escape(e.url), f"{e.in_use}/{e.concurrency}", _circuit(e),
          str(e.failures)] for r in routes for e in r.endpoints), "endpoints")
    return queues + endpoints


def _circuit(endpoint: ops.EndpointState) -> str:
    if endpoint.circuit == "open":
        return (f'<span class="s-failed">open for {endpoint.open_for_seconds:.0f} s'
                "</span>")
    return escape(endpoint.circuit)


# --- one deliberation ---


def state_block(status: pb.GetDeliberationStatusResponse) -> str:
    """The part of the deliberation page that live updates replace: its status, the action
    its status allows, its agents."""
    results = {r.agent_id: r for r in status.results}
    rows = []
    for agent in status.agents:
        result = results.get(agent.agent_id)
        took = ""
        if agent.start_time.seconds and agent.end_time.seconds:
            took = f"{agent.end_time.ToMilliseconds() - agent.start_time.ToMilliseconds()} ms"
        rows.append([
            escape(agent.agent_id), escape(agent.role), _status(agent.status),
            str(agent.attempts), escape(agent.error_type), escape(agent.error),
            when(agent.start_time), when(agent.end_time), took,
            f"<pre>{escape(result.proposal)}</pre>" if result else "",
            f"<pre>{escape(result.reasoning)}</pre>" if result else ""])
    summary = (f'<p>status <strong id="status" data-status="{escape(status.status)}">'
               f"{_status(status.status)}</strong> &middot; task_id {escape(status.task_id)}"
               f" &middot; {status.completed_agents} completed, {status.failed_agents} failed"
               f" of {status.total_agents}"
               + (f" &middot; {status.duration_ms} ms" if status.duration_ms else "") + "</p>")
    if status.error_message:
        summary += f'<p class="error">{escape(status.error_message)}</p>'
    path = f"/deliberations/{quote(status.deliberation_id)}"
    actions = ""
    if status.status in (contract.QUEUED, contract.RUNNING):
        actions = _action(f"{path}/cancel", "Cancel", "why cancel (required)")
    elif status.status in (contract.COMPLETED, contract.FAILED) and status.failed_agents:
        actions = _action(f"{path}/retry", "Retry failed agents", "why retry (required)")
    return summary + f'<div id="actions">{actions}</div>' + _table(
        ["agent", "role", "status", "attempts", "error class", "error", "started (UTC)",
         "ended (UTC)", "took", "proposal", "reasoning"], rows, "agents")


_LIVE = """<script>
(function () {
  var source = new EventSource(location.pathname + "/events");
  var log = document.getElementById("events");
  function refresh() {
    return fetch(location.pathname + "?part=state", {cache: "no-store"})
      .then(function (r) { return r.text(); })
      .then(function (html) { document.getElementById("state").innerHTML = html; });
  }
  // Each connection (a reconnect too) is sent every event from the first.
  source.addEventListener("open", function () {
    log.innerHTML = "";
    document.body.dataset.connections = (+document.body.dataset.connections || 0) + 1;
  });
  source.addEventListener("lifecycle", function (message) {
    var event = JSON.parse(message.data);
    var item = document.createElement("li");
    item.textContent = [event.time, event.event, event.agent_id].join(" ").trim();
    log.appendChild(item);
    refresh();
  });
  source.addEventListener("end", function () {
    source.close();
    refresh().then(function () { document.body.dataset.live = "ended"; });
  });
  document.body.dataset.live = "on";
})();
</script>"""


def deliberation(status: pb.GetDeliberationStatusResponse, notice: str = "") -> str:
    live = status.status in (contract.QUEUED, contract.RUNNING)
    body = (f'<div id="state">{state_block(status)}</div>'
            '<h2>Events</h2><ol id="events"></ol>' + (_LIVE if live else ""))
    return page(f"Deliberation {status.deliberation_id}", body, notice)


# --- dead letters ---


def _replayed(action: ops.OperatorAction) -> str:
    if not action.by:
        return ""
    return escape(f"by {action.by} at {action.time} as {action.sequence}: {action.reason}")


def dead_letters(found: ops.ListDeadLettersResponse, after: int, notice: str = "") -> str:
    rows = [[f'<a href="/dead-letters/{letter.sequence}">{letter.sequence}</a>',
             escape(letter.time), escape(letter.field), escape(letter.reason),
             escape(letter.subject), _replayed(letter.replayed)]
            for letter in found.dead_letters]
    listing = _table(["sequence", "time", "field", "reason", "subject", "replayed"], rows,
                     "dead-letters")
    more = ""
    if found.next_after_sequence:
        more = (f'<p><a id="next" href="/dead-letters?after={found.next_after_sequence}">'
                "Later &rarr;</a></p>")
    first = '<p><a href="/dead-letters">first</a></p>' if after else ""
    return page("Dead letters (NATS ingress)", listing + more + first, notice)


def dead_letter(letter: ops.DeadLetter, notice: str = "") -> str:
    headers: List[List[str]] = [[escape(k), escape(v)] for k, v in sorted(letter.headers.items())]
    facts = _table(["sequence", "time", "field", "reason", "subject", "request sequence",
                    "delivered"],
                   [[str(letter.sequence), escape(letter.time), escape(letter.field),
                     escape(letter.reason), escape(letter.subject),
                     str(letter.request_sequence), str(letter.delivered)]], "letter")
    replay: Optional[str] = _replayed(letter.replayed)
    action = (f'<p id="replayed">replayed {replay}</p>' if replay else
              _action(f"/dead-letters/{letter.sequence}/replay", "Replay",
                      "what was fixed (required)"))
    body = (f"{facts}<h2>Headers</h2>{_table(['header', 'value'], headers, 'headers')}"
            f"<h2>Payload ({escape(letter.payload_encoding)}, {letter.payload_bytes} bytes"
            f"{', truncated' if letter.truncated else ''})</h2>"
            f'<pre id="payload">{escape(letter.payload)}</pre>{action}')
    return page(f"Dead letter {letter.sequence}", body, notice)
