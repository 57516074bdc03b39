"""The message contract shared by the bridge and the workers.

What one Dramatiq message of an agent job carries (``AgentJob``), the NATS subjects and the
payloads of every event published there (Redis key names: ``core.keys``). Standard library
only, Python 3.9 compatible: both sides and the cluster import it.

Event payloads are rendered from the stored state (the deliberation record and its agents'
records), never from a worker's memory, so an event published again after a crash carries the
same content under the same ``Nats-Msg-Id``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Any, Dict, List, Mapping, Optional

from core import task_types
from core.settings import Settings

# Deliberation and agent statuses.
QUEUED = "queued"
RUNNING = "running"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"
NOT_FOUND = "not_found"
FINAL_STATUSES = (COMPLETED, FAILED, CANCELLED)

# Job kind of the first (and default) agent job.
VLLM_AGENT = "vllm_agent"


def now_ms() -> int:
    return int(time.time() * 1000)


def iso(ms: Optional[int] = None) -> str:
    """ISO-8601 UTC with milliseconds, e.g. ``2026-11-29T10:00:00.000Z``."""
    ms = now_ms() if ms is None else int(ms)
    return f"{_iso_second(ms // 1000)}{ms % 1000:03d}Z"


@functools.lru_cache(maxsize=8)
def _iso_second(second: int) -> str:
    # Events come many to a second: formatting each second once saves most of the cost.
    return time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))


@dataclasses.dataclass(frozen=True)
class AgentJob:
    """One agent of one deliberation: the keyword arguments of its Dramatiq message."""

    deliberation_id: str
    task_id: str
    agent_id: str
    agent_index: int
    num_agents: int
    role: str
    model: str
    prompt_template: str
    task_description: str
    task_role: str
    vllm_url: str
    timeout_seconds: int
    max_retries: int
    story_id: str = ""
    plan_id: str = ""
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)
    kind: str = VLLM_AGENT
    # The route the ingress picked (core.routes); empty in messages older than routes.
    route: str = ""

    def to_kwargs(self) -> Dict[str, Any]:
        # Not dataclasses.asdict: its deep copy was a visible share of each request's CPU.
        data = {name: getattr(self, name) for name in _AGENT_JOB_FIELDS}
        data["metadata"] = dict(self.metadata)
        return data

    @classmethod
    def from_kwargs(cls, data: Mapping[str, Any]) -> AgentJob:
        return cls(**{key: value for key, value in data.items() if key in _AGENT_JOB_FIELDS})


_AGENT_JOB_FIELDS = frozenset(field.name for field in dataclasses.fields(AgentJob))


class Subjects:
    """NATS subjects and streams (docs/architecture.md), all from settings."""

    def __init__(self, settings: Settings) -> None:
        self.commands = settings.nats_commands_prefix
        self.responses = settings.nats_responses_prefix
        self.events = settings.nats_events_prefix
        self.deliberate = f"{self.commands}.deliberate"
        self.dead_letter = f"{self.commands}.dlq.deliberate"
        self.streaming = settings.nats_streaming_prefix
        self.streams = {
            settings.nats_commands_stream: [f"{self.commands}.>"],
            settings.nats_responses_stream: [f"{self.responses}.>"],
            settings.nats_events_stream: [f"{self.events.split('.')[0]}.>"],
            settings.nats_streaming_stream: [f"{self.streaming}.>"],
        }
        # (max age in seconds, max messages) of each stream the service creates; 0: none.
        # Commands have none: a burst past a limit, while no bridge consumes, would drop the
        # oldest requests unread.
        stream_limits = (settings.nats_stream_max_age, settings.nats_stream_max_msgs)
        self.limits = {settings.nats_commands_stream: (0, 0),
                       settings.nats_responses_stream: stream_limits,
                       settings.nats_streaming_stream: stream_limits,
                       settings.nats_events_stream: (settings.nats_events_max_age,
                                                     settings.nats_events_max_msgs)}

    def agent(self, outcome: str) -> str:
        """``agent.response.completed|failed|progress``."""
        return f"{self.responses}.{outcome}"

    def agent_result(self, outcome: str, record: Mapping[str, Any]) -> str:
        """The subject of an agent's ``outcome``: a completed agent's is routed by its
        request's ``metadata.task_type`` (``core.task_types``)."""
        if outcome != COMPLETED:
            return self.agent(outcome)
        kind = task_types.task_type(metadata_of(record))
        return self.agent(outcome) + task_types.completed_suffix(kind)

    def stream_start(self, deliberation_id: str) -> str:
        """``vllm.streaming.<deliberation_id>``."""
        return f"{self.streaming}.{deliberation_id}"

    def deliberation(self, outcome: str) -> str:
        """``orchestration.deliberation.submitted|completed|failed|cancelled``."""
        return f"{self.events}.{outcome}"


def event_id(deliberation_id: str, event: str, agent_id: str = "", round: int = 1) -> str:
    """Deterministic ``Nats-Msg-Id``: a redelivered job publishes the same id again. Events
    of a retried round (``round`` 2 on, ``core.retry``) end in ``:r<round>``, so JetStream's
    deduplication and the outbox do not take them for the first round's."""
    base = f"{deliberation_id}:{agent_id}:{event}" if agent_id else f"{deliberation_id}:{event}"
    return f"{base}:r{round}" if round > 1 else base


def round_of(state: Mapping[str, Any]) -> int:
    """The round a deliberation record or an agent record is in: 1 until a retry."""
    return int(state.get("round") or 1)


def _with_round(payload: Dict[str, Any], state: Mapping[str, Any]) -> Dict[str, Any]:
    """``payload`` with ``round`` when ``state`` is past its first round: first-round
    payloads stay as they were before retries existed (absent ``round`` means 1)."""
    if round_of(state) > 1:
        payload["round"] = round_of(state)
    return payload


def metadata_of(record: Mapping[str, Any]) -> Dict[str, str]:
    """The request's ``constraints.metadata`` kept in a deliberation record (JSON there)."""
    raw = record.get("metadata")
    if isinstance(raw, str):
        return json.loads(raw) if raw else {}
    return dict(raw or {})


def constraints_of(record: Mapping[str, Any]) -> Dict[str, Any]:
    """The request's constraints as upstream's worker passed them on (and its consumers read
    them back): ``timeout`` (upstream's worker's name) beside ``timeout_seconds``, and
    ``num_agents`` (an int) and ``story_id`` added to the metadata."""
    metadata: Dict[str, Any] = dict(metadata_of(record))
    metadata["num_agents"] = int(record.get("num_agents") or 0)
    if record.get("story_id") and not metadata.get("story_id"):
        metadata["story_id"] = record["story_id"]
    timeout = int(record.get("timeout_seconds") or 0)
    return {"story_id": record.get("story_id", ""), "plan_id": record.get("plan_id", ""),
            "timeout_seconds": timeout, "timeout": timeout,
            "max_retries": int(record.get("max_retries") or 0), "metadata": metadata}


def agent_event(record: Mapping[str, Any], agent: Mapping[str, Any]) -> Dict[str, Any]:
    """Payload of ``agent.response.completed`` or ``agent.response.failed``, with every field
    upstream's consumers read (``../shared/design/UPSTREAM.md`` §4) beside our own: the
    caller's ``metadata.task_id`` as ``task_id`` of a completed agent (in ``metadata`` of a
    failed one), ``story_id`` and ``plan_id`` at the top, the ``constraints``, ``success``,
    and for a completed agent ``result.proposal`` as text and empty ``operations``,
    ``artifacts`` and ``audit_trail``."""
    metadata = metadata_of(record)
    original_task_id = metadata.get("task_id") or record.get("task_id")
    common = {
        "task_id": record.get("task_id"),
        "deliberation_id": record.get("id"),
        "agent_id": agent["agent_id"],
        "role": agent.get("role", ""),
        "status": agent["status"],
        "attempts": int(agent.get("attempts") or 0),
        "duration_ms": int(agent.get("duration_ms") or 0),
        "timestamp": iso(int(agent.get("end_ms") or 0) or None),
        "model": agent.get("model", ""),
        "num_agents": int(record.get("num_agents") or 0),
        "story_id": record.get("story_id", ""),
        "plan_id": record.get("plan_id", ""),
        "constraints": constraints_of(record),
        "success": agent["status"] == COMPLETED,
    }
    if agent["status"] == COMPLETED:
        common["task_id"] = original_task_id
        result = agent.get("result") or {}
        common["model"] = result.get("model") or common["model"]
        common["proposal"] = {
            "content": result.get("content", ""),
            "author_id": agent["agent_id"],
            "author_role": agent.get("role", ""),
            "model": common["model"],
            "temperature": result.get("temperature"),
            "tokens": int(result.get("tokens") or 0),
        }
        common["reasoning"] = result.get("reasoning", "")
        common["score"] = float(result.get("score") or 0.0)
        common["usage"] = result.get("usage") or {}
        common["result"] = {"proposal": common["proposal"]["content"]}
        common.update(operations=[], artifacts={}, audit_trail=[], enable_tools=False)
    else:
        common["error"] = agent.get("error", "")
        common["error_type"] = agent.get("error_type", "")
        common["retryable"] = bool(agent.get("retryable", False))
        common["metadata"] = {"task_id": original_task_id}
    return _with_round(common, agent)


def agent_result_event(record: Mapping[str, Any], agent: Mapping[str, Any]) -> Dict[str, Any]:
    """The payload published for an agent's outcome: ``agent_event``, or for a completed
    task-extraction agent the canonical event its consumer reads (``core.task_types``)."""
    payload = agent_event(record, agent)
    metadata = metadata_of(record)
    if agent["status"] == COMPLETED and \
            task_types.task_type(metadata) == task_types.TASK_EXTRACTION:
        return _with_round(task_types.task_extraction_event(payload, metadata), agent)
    return payload


def deliberation_submitted(record: Mapping[str, Any], agents: List[Mapping[str, Any]]
                           ) -> Dict[str, Any]:
    """Payload of ``orchestration.deliberation.submitted`` (the state as it was submitted)."""
    return {
        "deliberation_id": record.get("id"),
        "task_id": record.get("task_id"),
        "status": "submitted",
        "num_agents": int(record.get("num_agents") or len(agents)),
        "agents": [{"agent_id": a["agent_id"], "role": a.get("role", "")} for a in agents],
        "timestamp": iso(int(record.get("created_ms") or 0) or None),
    }


def stream_start(record: Mapping[str, Any]) -> Dict[str, Any]:
    """Payload of ``vllm.streaming.<deliberation_id>`` when a deliberation is accepted, as
    upstream's service published it (``agent_id`` is the deliberation id there, ``timestamp``
    epoch seconds)."""
    return {
        "type": "vllm_stream_start",
        "agent_id": record.get("id"),
        "deliberation_id": record.get("id"),
        "task_id": record.get("task_id"),
        "timestamp": int(record.get("created_ms") or now_ms()) / 1000,
        "role": record.get("role", ""),
        "status": "streaming",
        "model": record.get("model", ""),
    }


def deliberation_event(record: Mapping[str, Any], agents: List[Mapping[str, Any]]
                       ) -> Dict[str, Any]:
    """Payload of ``orchestration.deliberation.submitted|completed|failed|cancelled``."""
    completed = [agent_event(record, a) for a in agents if a.get("status") == COMPLETED]
    failed = [agent_event(record, a) for a in agents if a.get("status") == FAILED]
    created = int(record.get("created_ms") or 0)
    finished = int(record.get("finished_ms") or 0)
    return _with_round({
        "deliberation_id": record.get("id"),
        "task_id": record.get("task_id"),
        "status": record.get("status"),
        "results": completed,
        "failed_agents": failed,
        "num_agents": int(record.get("num_agents") or len(agents)),
        "completed_count": len(completed),
        "failed_count": len(failed),
        "duration_ms": max(0, finished - created) if finished else 0,
        "reason": record.get("cancel_reason", ""),
        "timestamp": iso(finished or created or None),
    }, record)
