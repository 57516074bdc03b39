"""The last hour at a glance, as inline SVG on the deliberation list: how many deliberations
finished in each five minutes (bars) and how long they took on average (line), from the
deliberations created in the last hour as the listing gives them; one plot for them all and,
with several routes, one per route."""

from __future__ import annotations

from html import escape
from typing import List, Sequence, Tuple

from ray_executor.v1 import operations_pb2 as ops

HOUR_MS = 3_600_000
BUCKET_MS = 300_000
BUCKETS = HOUR_MS // BUCKET_MS
WIDTH, HEIGHT, TOP = 600, 120, 16  # pixels: the plot area, and room for its caption above


def buckets(found: Sequence[ops.DeliberationSummary], now_ms: int
            ) -> List[Tuple[int, int]]:
    """Per five minutes of the last hour, oldest first: (deliberations finished, their mean
    duration in ms)."""
    counts, totals = [0] * BUCKETS, [0] * BUCKETS
    start = now_ms - HOUR_MS
    for summary in found:
        finished = summary.finished.ToMilliseconds()
        if not summary.finished.seconds or not start <= finished < now_ms:
            continue
        index = (finished - start) // BUCKET_MS
        counts[index] += 1
        totals[index] += finished - summary.created.ToMilliseconds()
    return [(n, total // n if n else 0) for n, total in zip(counts, totals)]


def per_route(found: Sequence[ops.DeliberationSummary], now_ms: int, complete: bool,
              routes: Sequence[str]) -> str:
    """The plot of all, then, with more than one route, one per route (``id`` hour-NAME)."""
    plots = "".join(svg([d for d in found if d.route == route], now_ms, complete, route=route)
                    for route in routes) if len(routes) > 1 else ""
    return svg(found, now_ms, complete) + (f'<div id="route-plots">{plots}</div>' if plots
                                           else "")


def svg(found: Sequence[ops.DeliberationSummary], now_ms: int, complete: bool,
        route: str = "") -> str:
    """The plot (of one route's deliberations when ``route`` is given); ``complete`` is False
    when the hour held more deliberations than were read (the caption says so)."""
    data = buckets(found, now_ms)
    most = max(n for n, _ in data) or 1
    slowest = max(ms for _, ms in data) or 1
    width, height = (WIDTH // 2, HEIGHT // 2) if route else (WIDTH, HEIGHT)  # a route's: small
    step = width / BUCKETS
    bars = "".join(
        f'<rect data-count="{n}" x="{i * step + 2:.0f}" y="{TOP + height - height * n / most:.0f}"'
        f' width="{step - 4:.0f}" height="{height * n / most:.0f}" fill="#93c5fd">'
        f"<title>{n} finished, mean {ms} ms</title></rect>"
        for i, (n, ms) in enumerate(data))
    points = " ".join(f"{(i + 0.5) * step:.0f},{TOP + height - height * ms / slowest:.0f}"
                      for i, (n, ms) in enumerate(data) if n)
    total = sum(n for n, _ in data)
    slowest_s = f"{slowest / 1000 if total else 0:.1f} s"
    caption = (f"route {escape(route)}: {total} finished, slowest mean {slowest_s}" if route
               else f"last hour, per 5 min: {total} finished (bars, most "
                    f"{most if total else 0}); mean duration (line, slowest {slowest_s})")
    caption += "" if complete else "; only the newest deliberations read"
    plot_id = f"hour-{escape(route)}" if route else "hour"
    return (f'<svg id="{plot_id}" data-total="{total}" width="{width}" height="{TOP + height + 2}"'
            f' role="img"><text x="0" y="11" font-size="11">{caption}</text>{bars}'
            f'<polyline points="{points}" fill="none" stroke="#b91c1c" stroke-width="2"/>'
            f'<line x1="0" y1="{TOP + height}" x2="{width}" y2="{TOP + height}" '
            'stroke="#999"/></svg>')
