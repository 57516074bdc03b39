"""Upstream's EventEnvelope, the body of every event when ``RAY_EXECUTOR_EVENT_FORMAT`` is
``envelope`` (``../shared/design/UPSTREAM.md`` §3.1): the consumers of upstream's newest
generation parse it and drop anything else.

Two things differ from upstream on purpose, where upstream had defects:

- ``idempotency_key`` is the event's ``Nats-Msg-Id`` (``core.contract.event_id``: the
  deliberation, the agent, the event and the round), so it is the same for a republished
  event and different for every other one; upstream gave every agent of a deliberation one
  key, so a consumer that deduplicates on it kept only the first agent's answer.
- ``correlation_id`` is carried from the request to every event of its deliberation: the
  ``correlation_id`` metadata key, else the W3C trace id of the request, else the
  deliberation id; upstream made a fresh random one per event, so nobody could join them.

Standard library only, Python 3.9 compatible.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Mapping

from core.contract import iso, metadata_of

PRODUCER = "ray-executor"
CORRELATION_METADATA_KEY = "correlation_id"
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")


def correlation_id(record: Mapping[str, Any]) -> str:
    """The correlation id of every event of a deliberation (see the module's docstring)."""
    given = str(metadata_of(record).get(CORRELATION_METADATA_KEY) or "").strip()
    if given:
        return given
    trace = _TRACEPARENT.match(str(record.get("traceparent") or "").strip().lower())
    if trace and trace.group(1) != "0" * 32:
        return trace.group(1)
    return str(record.get("id") or "")


def wrap(event_type: str, payload: Dict[str, Any], event_id: str,
         record: Mapping[str, Any]) -> Dict[str, Any]:
    """``payload`` as an EventEnvelope of ``event_type`` (``event_id``: its ``Nats-Msg-Id``,
    ``record``: its deliberation's record). The timestamp is the payload's own, so a
    republished event is the same envelope."""
    timestamp = payload.get("timestamp")
    return {
        "event_type": event_type,
        "payload": payload,
        "idempotency_key": event_id,
        "correlation_id": correlation_id(record),
        "timestamp": timestamp if isinstance(timestamp, str) and timestamp else iso(),
        "producer": PRODUCER,
        "metadata": {"deliberation_id": str(record.get("id") or ""),
                     "task_id": str(record.get("task_id") or "")},
    }
