"""Upstream's consumers of ``agent.response.*`` as ``../shared/design/UPSTREAM.md`` §4 records
them (consumer file @commit there): each reads our stream through its own durable pull
consumer and subject filter, parses the body as it does (envelope required or raw JSON) and
takes the fields it reads, raising ``ValueError`` where the consumer would drop or nak the
message. What each returns is what that consumer goes on to use.

Our own copies of their parsing rules, not their code (upstream's code stays out of the
project). Shared by the bridge tests.
"""

from __future__ import annotations

import asyncio
import datetime
import json
from typing import Any, Dict, List

import nats
import nats.errors
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig

ENVELOPE_FIELDS = ("event_type", "payload", "idempotency_key", "correlation_id", "timestamp",
                   "producer")
BACKLOG_REVIEW_ROLES = {"ARCHITECT", "QA", "DEVOPS", "DEVELOPER", "PO", "DATA"}


async def read(js: JetStreamContext, stream: str, subject: str, durable: str, count: int,
               timeout: float = 60) -> List[Dict[str, Any]]:
    """``count`` messages of ``subject`` through the durable pull consumer ``durable`` (batch
    1, 5 s waits, each acked, as the consumers fetch), then checks none is left: exactly
    ``count`` were stored there. Bodies as decoded JSON."""
    sub = await js.pull_subscribe(subject, durable=durable, stream=stream, config=ConsumerConfig(
        durable_name=durable, ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
        max_deliver=3))
    bodies: List[Dict[str, Any]] = []
    deadline = asyncio.get_running_loop().time() + timeout
    while len(bodies) < count:
        try:
            messages = await sub.fetch(1, timeout=5)
        except nats.errors.TimeoutError:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{len(bodies)} of {count} messages on {subject}") from None
            continue
        for message in messages:
            bodies.append(json.loads(message.data))
            await message.ack_sync()
    info = await sub.consumer_info()
    assert info.num_pending == 0 and info.num_ack_pending == 0, \
        f"more than {count} messages on {subject}: {info.num_pending} left"
    await sub.unsubscribe()
    return bodies


def read_all(nats_url: str, stream: str, reads: Dict[str, Any],
             timeout: float = 60) -> Dict[str, List[Dict[str, Any]]]:
    """{durable: bodies} for each ``durable: (subject, count)`` (``read``), in that order."""
    async def main() -> Dict[str, List[Dict[str, Any]]]:
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            return {durable: await read(js, stream, subject, durable, count, timeout)
                    for durable, (subject, count) in reads.items()}
        finally:
            await nc.close()

    return asyncio.run(main())


def stream_config(nats_url: str, stream: str) -> StreamConfig:
    """The configuration of ``stream``."""
    async def main() -> StreamConfig:
        nc = await nats.connect(nats_url)
        try:
            return (await nc.jetstream().stream_info(stream)).config
        finally:
            await nc.close()

    return asyncio.run(main())


def iso_time(value: Any) -> datetime.datetime:
    """An ISO 8601 timestamp, ``Z`` accepted, as upstream parses them."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"not an ISO 8601 timestamp: {value!r}")
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


def parse_required_envelope(data: Any) -> Dict[str, Any]:
    """``parse_required_envelope`` (UPSTREAM.md §3.1): the envelope, or ValueError."""
    if not isinstance(data, dict):
        raise ValueError("EventEnvelope must be an object")
    for field in ENVELOPE_FIELDS:
        if field not in data or (field != "payload" and not data[field]):
            raise ValueError(f"Missing required EventEnvelope field: {field}")
    if not isinstance(data["payload"], dict):
        raise ValueError("EventEnvelope payload must be an object")
    if not isinstance(data.get("metadata", {}), dict):
        raise ValueError("EventEnvelope metadata must be an object")
    iso_time(data["timestamp"])
    return data


def backlog_review_result(data: Any) -> Dict[str, Any]:
    """backlog_review_processor ``BacklogReviewResultConsumer``: task_id
    ``ceremony-*:story-*:role-<ROLE>``, status, agent, proposal (its feedback), timestamp,
    the constraints and counts."""
    payload = parse_required_envelope(data)["payload"]
    parts = str(payload["task_id"]).split(":")
    if len(parts) != 3 or not parts[0].startswith("ceremony-") or \
            not parts[1].startswith("story-") or not parts[2].startswith("role-"):
        raise ValueError(f"task_id {payload['task_id']!r} is not ceremony-*:story-*:role-*")
    role = parts[2][len("role-"):]
    if role not in BACKLOG_REVIEW_ROLES:
        raise ValueError(f"not a backlog review role: {role}")
    if payload.get("status") not in ("completed", "failed"):
        raise ValueError(f"status {payload.get('status')!r}")
    proposal = payload.get("proposal", {})
    if not isinstance(proposal, dict):
        raise ValueError("proposal must be an object")
    constraints = payload.get("constraints") or {}
    metadata = constraints.get("metadata") or {}
    return {
        "ceremony_id": parts[0][len("ceremony-"):], "story_id": parts[1][len("story-"):],
        "role": role, "agent_id": payload.get("agent_id", "unknown"),
        "status": payload["status"],
        "feedback": proposal.get("feedback", proposal.get("content", str(proposal))),
        "timestamp": iso_time(payload["timestamp"]),
        "constraints": {key: constraints.get(key) for key in
                        ("story_id", "plan_id", "timeout_seconds", "max_retries")},
        "metadata": {key: metadata.get(key) for key in
                     ("story_id", "ceremony_id", "task_type", "task_id", "num_agents")},
        "num_agents": payload.get("num_agents"), "duration_ms": payload.get("duration_ms"),
    }


def task_extraction_result(data: Any) -> Dict[str, Any]:
    """backlog_review_processor ``TaskExtractionResultConsumer``: the canonical event,
    deduplicated on the envelope's idempotency_key."""
    envelope = parse_required_envelope(data)
    payload = envelope["payload"]
    if not isinstance(payload.get("tasks"), list):
        raise ValueError("tasks must be a list")
    for key in ("task_id", "story_id", "ceremony_id"):
        if not isinstance(payload.get(key), str) or not payload[key]:
            raise ValueError(f"{key} is required")
    tasks = []
    for task in payload["tasks"]:
        if not task.get("title"):
            raise ValueError("a task has no title")
        tasks.append({key: task.get(key) for key in
                      ("title", "description", "estimated_hours", "deliberation_indices")})
    return {"idempotency_key": envelope["idempotency_key"], "task_id": payload["task_id"],
            "story_id": payload["story_id"], "ceremony_id": payload["ceremony_id"],
            "tasks": tasks}


def _first(*values: Any) -> Any:
    return next((value for value in values if value), None)


def task_derivation_result(data: Any) -> Dict[str, Any]:
    """task_derivation ``TaskDerivationResultConsumer``: only TASK_DERIVATION; plan_id and
    story_id from the payload, then the constraints, then their metadata; the LLM text from
    ``result.proposal``, else ``proposal`` (its ``content`` when an object)."""
    payload = parse_required_envelope(data)["payload"]
    constraints = payload.get("constraints") or {}
    metadata = constraints.get("metadata") or {}
    if metadata.get("task_type") != "TASK_DERIVATION":
        return {}  # acked, not for it
    result = payload.get("result")
    text = result["proposal"] if isinstance(result, dict) and "proposal" in result else \
        payload.get("proposal")
    if isinstance(text, dict):
        text = text.get("content")
    return {
        "plan_id": _first(payload.get("plan_id"), constraints.get("plan_id"),
                          metadata.get("plan_id")),
        "story_id": _first(payload.get("story_id"), constraints.get("story_id"),
                           metadata.get("story_id")),
        "role": payload.get("role") or "DEVELOPER", "text": text,
    }


def planning_task_derivation_result(data: Any) -> Dict[str, Any]:
    """planning ``TaskDerivationResultConsumer``: only TASK_DERIVATION; top-level story_id and
    role required, plan_id optional, ``result.proposal`` a required string."""
    payload = parse_required_envelope(data)["payload"]
    metadata = (payload.get("constraints") or {}).get("metadata") or {}
    if metadata.get("task_type") != "TASK_DERIVATION":
        return {}
    result = payload.get("result")
    if not isinstance(result, dict) or not isinstance(result.get("proposal"), str):
        raise ValueError("result.proposal must be a string")
    for key in ("story_id", "role"):
        if not payload.get(key):
            raise ValueError(f"{key} is required")
    return {"plan_id": payload.get("plan_id"), "story_id": payload["story_id"],
            "role": payload["role"], "text": result["proposal"]}


def ceremony_agent_completed(data: Any) -> Dict[str, Any]:
    """planning_ceremony_processor ``AgentResponseCompletedConsumer``: the correlation_id
    finds the ceremony instance."""
    envelope = parse_required_envelope(data)
    return {"correlation_id": envelope["correlation_id"],
            "task_id": envelope["payload"].get("task_id")}


def orchestrator_agent_response(data: Any) -> Dict[str, Any]:
    """orchestrator ``OrchestratorAgentResponseConsumer`` (completed and failed)."""
    payload = parse_required_envelope(data)["payload"]
    keys = ["agent_id", "role", "task_id", "story_id", "timestamp"]
    keys += ["duration_ms"] if payload.get("status") == "completed" else ["error", "error_type"]
    missing = [key for key in keys if key not in payload]
    if missing:
        raise ValueError(f"missing {missing}")
    iso_time(payload["timestamp"])
    return {key: payload[key] for key in [*keys, "num_agents"] if key in payload}


def deliberation_collector(data: Any) -> Dict[str, Any]:
    """orchestrator ``DeliberationResultCollector``: raw JSON (``AgentResponseMessage``), no
    envelope; completes a deliberation once ``num_agents`` responses arrived."""
    if not isinstance(data, dict) or not data.get("task_id") or not data.get("agent_id"):
        raise ValueError("Invalid message")
    keys = ["task_id", "agent_id", "timestamp"]
    keys += (["role", "proposal", "duration_ms", "num_agents"] if "error" not in data
             else ["error"])
    missing = [key for key in keys if key not in data]
    if missing:
        raise ValueError(f"missing {missing}")
    return {key: data[key] for key in keys}
