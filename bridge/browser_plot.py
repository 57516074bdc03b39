"""The last hour at a glance, as inline SVG on the deliberation list: how many deliberations
finished in each five minutes (bars) and how long they took on average (line), from the
deliberations created in the last hour as the listing gives them."""

from __future__ import annotations

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


def svg(found: Sequence[ops.DeliberationSummary], now_ms: int, complete: bool) -> str:
    """The plot; ``complete`` is False when the hour held more deliberations than were read
    (the caption says so)."""
    data = buckets(found, now_ms)
    most = max(n for n, _ in data) or 1
    slowest = max(ms for _, ms in data) or 1
    step = WIDTH / BUCKETS
    bars = "".join(
        f'<rect data-count="{n}" x="{i * step + 2:.0f}" y="{TOP + HEIGHT - HEIGHT * n / most:.0f}"'
        f' width="{step - 4:.0f}" height="{HEIGHT * n / most:.0f}" fill="#93c5fd">'
        f"<title>{n} finished, mean {ms} ms</title></rect>"
        for i, (n, ms) in enumerate(data))
    points = " ".join(f"{(i + 0.5) * step:.0f},{TOP + HEIGHT - HEIGHT * ms / slowest:.0f}"
                      for i, (n, ms) in enumerate(data) if n)
    total = sum(n for n, _ in data)
    caption = (f"last hour, per 5 min: {total} finished (bars, most {most if total else 0}); "
               f"mean duration (line, slowest {slowest / 1000 if total else 0:.1f} s)"
               + ("" if complete else "; only the newest deliberations read"))
    return (f'<svg id="hour" data-total="{total}" width="{WIDTH}" height="{TOP + HEIGHT + 2}"'
            f' role="img"><text x="0" y="11" font-size="11">{caption}</text>{bars}'
            f'<polyline points="{points}" fill="none" stroke="#b91c1c" stroke-width="2"/>'
            f'<line x1="0" y1="{TOP + HEIGHT}" x2="{WIDTH}" y2="{TOP + HEIGHT}" '
            'stroke="#999"/></svg>')
