"""What ``constraints.metadata.task_type`` changes, as upstream's callers and consumers expect
it (``../shared/design/UPSTREAM.md`` §3.2 to §4): the subject of a completed agent's event, its
payload, and the structured output asked of vLLM.

| task_type | completed agent's subject | payload |
|---|---|---|
| ``BACKLOG_REVIEW_ROLE`` | ``<responses>.completed.backlog-review.role`` | the agent event |
| ``TASK_EXTRACTION`` | ``<responses>.completed.task-extraction`` | ``task_extraction_event`` |
| anything else | ``<responses>.completed`` | the agent event |

A failed agent always goes to ``<responses>.failed``. A task-extraction agent asks vLLM for
JSON matching ``TASK_EXTRACTION_SCHEMA`` at temperature 0, and its answer is checked on the
cluster (``tasks_of``) before it counts as completed: an answer that does not match fails the
agent as ``invalid_response``, not retried (the same prompt would get the same answer).

Standard library only, Python 3.9 compatible: the cluster, the workers and the bridge use it.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Mapping, Optional

BACKLOG_REVIEW_ROLE = "BACKLOG_REVIEW_ROLE"
TASK_EXTRACTION = "TASK_EXTRACTION"
# Subject suffix after ``<responses>.completed`` of each routed task type.
ROUTED = {BACKLOG_REVIEW_ROLE: ".backlog-review.role", TASK_EXTRACTION: ".task-extraction"}

TASK_EXTRACTION_SCHEMA: Dict[str, Any] = {
    "type": "object",
    "properties": {
        "tasks": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {
                    "title": {"type": "string", "minLength": 1},
                    "description": {"type": "string"},
                    "estimated_hours": {"type": "number", "minimum": 0},
                    "deliberation_indices": {"type": "array", "items": {"type": "integer",
                                                                        "minimum": 0}},
                },
                "required": ["title", "description", "estimated_hours",
                             "deliberation_indices"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["tasks"],
    "additionalProperties": False,
}


def task_type(metadata: Mapping[str, Any]) -> str:
    """The request's ``constraints.metadata.task_type``, stripped ('' when absent)."""
    return str(metadata.get("task_type") or "").strip()


def completed_suffix(kind: str) -> str:
    """What follows ``<responses>.completed`` in the subject of a completed agent of ``kind``."""
    return ROUTED.get(kind, "")


def response_format() -> Dict[str, Any]:
    """The OpenAI ``response_format`` a task-extraction agent sends to vLLM."""
    return {"type": "json_schema", "json_schema": {
        "name": "task_extraction", "schema": TASK_EXTRACTION_SCHEMA, "strict": True}}


def tasks_of(content: str) -> List[Dict[str, Any]]:
    """The tasks of a task-extraction answer, checked against ``TASK_EXTRACTION_SCHEMA``;
    ``ValueError`` naming the first field that does not match."""
    try:
        value = json.loads(content)
    except ValueError as exc:
        raise ValueError(f"answer is not JSON: {exc}") from None
    if not isinstance(value, dict) or not isinstance(value.get("tasks"), list):
        raise ValueError("tasks: expected a list")
    if not value["tasks"]:
        raise ValueError("tasks: expected at least one task")
    return [_task(index, item) for index, item in enumerate(value["tasks"])]


def _task(index: int, item: Any) -> Dict[str, Any]:
    where = f"tasks[{index}]"
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected an object")
    title, description = item.get("title"), item.get("description", "")
    if not isinstance(title, str) or not title.strip():
        raise ValueError(f"{where}.title: expected a non-empty string")
    if not isinstance(description, str):
        raise ValueError(f"{where}.description: expected a string")
    hours = item.get("estimated_hours", 0)
    if isinstance(hours, bool) or not isinstance(hours, (int, float)) or hours < 0:
        raise ValueError(f"{where}.estimated_hours: expected a number ≥ 0")
    indices = item.get("deliberation_indices", [])
    if not isinstance(indices, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
        raise ValueError(f"{where}.deliberation_indices: expected a list of integers ≥ 0")
    return {"title": title, "description": description, "estimated_hours": hours,
            "deliberation_indices": indices}


def task_extraction_event(agent_event: Mapping[str, Any], metadata: Mapping[str, Any],
                          validated_at: Optional[str] = None) -> Dict[str, Any]:
    """The canonical ``agent.response.completed.task-extraction`` payload upstream's
    ``TaskExtractionResultConsumer`` reads, from a completed agent's event (whose proposal
    passed ``tasks_of`` on the cluster). ``validated_at`` is when that was (the agent's end)."""
    content = (agent_event.get("proposal") or {}).get("content", "")
    try:
        tasks = tasks_of(content)
    except ValueError:  # checked on the cluster; an older worker's answer: none, as upstream
        tasks = []
    return {
        "task_id": agent_event.get("task_id"),
        "story_id": str(metadata.get("story_id") or agent_event.get("story_id") or ""),
        "ceremony_id": str(metadata.get("ceremony_id") or ""),
        "tasks": tasks,
        "model": agent_event.get("model", ""),
        "timestamp": agent_event.get("timestamp"),
        "duration_ms": agent_event.get("duration_ms", 0),
        "validated_at": validated_at or agent_event.get("timestamp"),
        # ours: which deliberation and agent it came from
        "deliberation_id": agent_event.get("deliberation_id"),
        "agent_id": agent_event.get("agent_id"),
    }
