"""Listing deliberations newest first, filtered and paged, from the listing index.

``submit.lua`` adds every deliberation to ``Keys.index`` (a sorted set scored by creation ms)
and trims what the state TTL no longer keeps, so the index holds at most the TTL's worth. A
page walks the index down from its cursor in chunks, reading the few fields a summary needs
(one pipeline per chunk), and keeps the deliberations that match the filters. Without a filter
a page costs one chunk of the page's size; with one, the chunks grow fourfold (up to
``CHUNK``), and a filter that matches rarely costs at most ``SCAN_LIMIT`` entries per call:
the page comes back short, with a cursor to go on from.

The cursor is ``<created ms>:<id>``: members of equal score come in reverse order of their id,
so the next page starts strictly after the last one returned even when many deliberations
were created in the same millisecond (a group commit gives them one timestamp).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from core.store import DeliberationStore

CHUNK = 500
SCAN_LIMIT = 20_000
SUMMARY_FIELDS = ("status", "task_id", "story_id", "model", "created_ms", "finished_ms",
                  "num_agents", "completed", "failed", "route")


class BadCursor(ValueError):
    """The page token is not one this service handed out."""


@dataclass(frozen=True)
class Filters:
    """Exact matches on the record's fields (empty: any) and a creation window in ms."""

    status: str = ""
    task_id: str = ""
    story_id: str = ""
    model: str = ""
    created_after_ms: int = 0  # exclusive; 0: no bound
    created_before_ms: int = 0  # exclusive; 0: no bound
    route: str = ""
    # The route of records older than routes (they name none): the one serving their queue.
    unrouted: str = ""

    def match(self, summary: Dict[str, str]) -> bool:
        route = summary.get("route") or self.unrouted
        return all(not wanted or found == wanted for found, wanted in (
            (summary.get("status"), self.status), (summary.get("task_id"), self.task_id),
            (summary.get("story_id"), self.story_id), (summary.get("model"), self.model),
            (route, self.route)))


async def list_deliberations(store: DeliberationStore, filters: Filters, limit: int,
                             cursor: str = "") -> Tuple[List[Dict[str, str]], str]:
    """Up to ``limit`` summaries (``id`` plus ``SUMMARY_FIELDS``) newest first, and the cursor
    of the next page ("" when the index has nothing more)."""
    top, after_id = _parse(cursor, filters)
    index = store.keys.index
    floor = f"({filters.created_after_ms}" if filters.created_after_ms else "-inf"
    found: List[Dict[str, str]] = []
    scanned, offset, last, size = 0, 0, cursor, limit
    while len(found) < limit and scanned < SCAN_LIMIT:
        chunk = await store.batcher.guard(store.redis.zrevrangebyscore(
            index, top, floor, start=offset, num=size, withscores=True))
        size = min(CHUNK, size * 4)  # the filters rejected some: read further ahead
        if not chunk:
            return found, ""
        offset += len(chunk)
        if after_id:  # equal scores come in reverse id order: skip what was returned before
            chunk = [(i, s) for i, s in chunk if s != float(top) or i < after_id]
        if not chunk:
            continue
        fields = await store.batcher.pipelined(functools.partial(_read_summaries, store, chunk))
        for (deliberation_id, score), values in zip(chunk, fields):
            scanned += 1
            last = f"{int(score)}:{deliberation_id}"
            if values[0] is None:  # expired since: its index entry goes with the next trim
                continue
            summary = {"id": deliberation_id, **dict(zip(SUMMARY_FIELDS, values))}
            if filters.match(summary):
                found.append(summary)
                if len(found) == limit:
                    break
    return found, last


def _read_summaries(store: DeliberationStore, chunk: List[Tuple[str, float]], pipe: Any
                    ) -> None:
    for deliberation_id, _ in chunk:
        pipe.hmget(store.keys.deliberation(deliberation_id), SUMMARY_FIELDS)


def _parse(cursor: str, filters: Filters) -> Tuple[str, Optional[str]]:
    """The index's upper bound for this page, and the id to continue after (or None)."""
    if not cursor:
        return (f"({filters.created_before_ms}" if filters.created_before_ms else "+inf"), None
    score, _, deliberation_id = cursor.partition(":")
    if not score.isdigit() or not deliberation_id:
        raise BadCursor(f"not a page token of this service: {cursor[:100]!r}")
    return score, deliberation_id
