"""Validation of an ``ExecuteDeliberationRequest``: one code path for gRPC and NATS ingress.

``plan`` turns a request into what gets recorded and enqueued, or raises ``InvalidRequest``
naming the offending field (``agents[1].id``, ``constraints.timeout_seconds`` ...). Nothing is
written before a request has passed. The plan carries the request's route (``core.routes``):
its queue and name in the record, its name in each job; a request no route takes is refused
naming ``vllm_model`` or ``constraints.metadata``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import unicodedata
from typing import Any, Dict, FrozenSet, List, Tuple
from urllib.parse import urlparse

from core.contract import AgentJob
from core.routes import NoRoute, Route, Routes
from core.settings import Settings
from ray_executor.v1 import ray_executor_pb2 as pb

MAX_ID_CHARS = 256
MAX_TIMEOUT_SECONDS = 24 * 3600
MAX_RETRIES = 20
MAX_METADATA_ENTRIES = 64
IDEMPOTENCY_METADATA_KEY = "idempotency_key"
_ROLE_RE = re.compile(r"[\w-]+")  # \w: what str.isalnum() accepts, and "_"
BACKLOG_REVIEW_TASK_ID = "ceremony-{id}:story-{id}:role-{ROLE}"
# Upstream's backlog review consumer splits the task_id on ":" into exactly these three parts
# to file each role's answer under its ceremony and story: anything else is lost there.
_BACKLOG_REVIEW_TASK_ID_RE = re.compile(r"ceremony-[^:]+:story-[^:]+:role-[^:]+")


class InvalidRequest(ValueError):
    """A request field is invalid; ``field`` names it."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one valid request becomes."""

    idempotency_key: str
    record: Dict[str, Any]
    jobs: List[AgentJob]


def plan(request: pb.ExecuteDeliberationRequest, settings: Settings,
         deliberation_id: str, routes: Routes) -> Plan:
    """The request's plan, its route picked from ``routes`` (``core.routes.load``)."""
    size = request.ByteSize()
    if size > settings.max_request_bytes:
        raise InvalidRequest("request", f"{size} bytes, more than {settings.max_request_bytes}")
    task_id = _identifier("task_id", request.task_id)
    description = _text("task_description", request.task_description, settings, required=True)
    task_role = _role("role", request.role, settings, required=False)
    constraints = request.constraints
    if constraints.timeout_seconds < 0 or constraints.timeout_seconds > MAX_TIMEOUT_SECONDS:
        raise InvalidRequest("constraints.timeout_seconds",
                             f"must be between 0 and {MAX_TIMEOUT_SECONDS}")
    if constraints.max_retries < 0 or constraints.max_retries > MAX_RETRIES:
        raise InvalidRequest("constraints.max_retries", f"must be between 0 and {MAX_RETRIES}")
    metadata = _metadata(constraints.metadata, settings)
    story_id = _text("constraints.story_id", constraints.story_id, settings, limit=MAX_ID_CHARS)
    plan_id = _text("constraints.plan_id", constraints.plan_id, settings, limit=MAX_ID_CHARS)
    if request.vllm_url:
        _url("vllm_url", request.vllm_url)
    model = _text("vllm_model", request.vllm_model, settings, limit=MAX_ID_CHARS)
    model = model or settings.vllm_model
    route = _route(routes, model, metadata)
    # A route's first endpoint stands for its pool (the workers choose within it).
    vllm_url = request.vllm_url.strip() or route.endpoints[0].url

    if not request.agents:
        raise InvalidRequest("agents", "at least one agent is required")
    if len(request.agents) > settings.max_agents:
        raise InvalidRequest("agents", f"{len(request.agents)} agents, at most "
                                       f"{settings.max_agents} allowed")
    seen = set()
    jobs = []
    for index, agent in enumerate(request.agents):
        where = f"agents[{index}]"
        agent_id = _identifier(f"{where}.id", agent.id)
        if agent_id in seen:
            raise InvalidRequest(f"{where}.id", f"duplicate agent id {agent_id!r}")
        seen.add(agent_id)
        role = _role(f"{where}.role", agent.role or task_role, settings, required=True)
        jobs.append(AgentJob(
            deliberation_id=deliberation_id, task_id=task_id, agent_id=agent_id,
            agent_index=index, num_agents=len(request.agents), role=role,
            model=_text(f"{where}.model", agent.model, settings, limit=MAX_ID_CHARS) or model,
            prompt_template=_text(f"{where}.prompt_template", agent.prompt_template, settings),
            task_description=description, task_role=task_role, vllm_url=vllm_url,
            timeout_seconds=constraints.timeout_seconds or settings.job_timeout_seconds,
            max_retries=constraints.max_retries or settings.max_retries,
            story_id=story_id, plan_id=plan_id, metadata=metadata, route=route.name,
        ))
    record = {
        "id": deliberation_id, "task_id": task_id, "role": task_role,
        "story_id": story_id, "plan_id": plan_id, "vllm_url": vllm_url, "model": model,
        # for the events' constraints (core.contract.constraints_of)
        "timeout_seconds": jobs[0].timeout_seconds, "max_retries": jobs[0].max_retries,
        "metadata": json.dumps(metadata) if metadata else "",
        "route": route.name, "queue": route.queue,  # the queue: where core.store enqueues
    }
    key = metadata.get(IDEMPOTENCY_METADATA_KEY) or f"task:{task_id}"
    return Plan(idempotency_key=key, record=record, jobs=jobs)


def _route(routes: Routes, model: str, metadata: Dict[str, str]) -> Route:
    """The route taking the request, or ``InvalidRequest`` naming what matched nothing: the
    model when routes name models and none names this one, else the metadata."""
    try:
        return routes.pick(model, metadata)
    except NoRoute as exc:
        by_model = [route for route in routes if route.models]
        if by_model and not any(model in route.models for route in by_model):
            raise InvalidRequest("vllm_model", str(exc)) from None
        raise InvalidRequest("constraints.metadata", str(exc)) from None


def check_backlog_review_task_id(value: str) -> None:
    """A backlog review's ``task_id`` (fleet ``ExecuteBacklogReviewDeliberation``) has the
    format its results' consumer parses, or ``InvalidRequest``; ``plan`` checks the rest."""
    if not _BACKLOG_REVIEW_TASK_ID_RE.fullmatch(value.strip()):
        raise InvalidRequest("task_id", f"must be {BACKLOG_REVIEW_TASK_ID!r}, got {value[:80]!r}")


def _identifier(field: str, value: str) -> str:
    value = value.strip()
    if not value:
        raise InvalidRequest(field, "is required")
    if len(value) > MAX_ID_CHARS:
        raise InvalidRequest(field, f"longer than {MAX_ID_CHARS} characters")
    if value.isascii():  # the usual case, checked without a per-character loop
        bad = " " in value or not value.isprintable()
    else:
        bad = any(ch.isspace() or unicodedata.category(ch)[0] == "C" for ch in value)
    if bad:
        raise InvalidRequest(field, "must not contain spaces or control characters")
    return value


def _text(field: str, value: str, settings: Settings, *, required: bool = False,
          limit: int = 0) -> str:
    if required and not value.strip():
        raise InvalidRequest(field, "is required")
    if limit and len(value) > limit:
        raise InvalidRequest(field, f"longer than {limit} characters")
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > settings.max_field_bytes:
        raise InvalidRequest(field, f"{size} bytes, more than {settings.max_field_bytes}")
    if "\x00" in value:
        raise InvalidRequest(field, "must not contain NUL characters")
    return value


def _role(field: str, value: str, settings: Settings, *, required: bool) -> str:
    role = value.strip().upper()
    if not role:
        if required:
            raise InvalidRequest(field, "is required (or set the request's role)")
        return ""
    if len(role) > 64 or not _ROLE_RE.fullmatch(role):
        raise InvalidRequest(field, "must be a short name of letters, digits, '_' or '-'")
    allowed = _upper(settings.allowed_roles)
    if allowed and role not in allowed:
        raise InvalidRequest(field, f"unknown role {role!r}; allowed: {sorted(allowed)}")
    return role


@functools.lru_cache(maxsize=8)
def _upper(roles: Tuple[str, ...]) -> FrozenSet[str]:
    return frozenset(role.upper() for role in roles)


def _metadata(metadata: Any, settings: Settings) -> Dict[str, str]:
    if len(metadata) > MAX_METADATA_ENTRIES:
        raise InvalidRequest("constraints.metadata", f"more than {MAX_METADATA_ENTRIES} entries")
    result = {}
    for key, value in metadata.items():
        if not key or len(key) > MAX_ID_CHARS:
            raise InvalidRequest("constraints.metadata", f"bad key {key[:40]!r}")
        result[key] = _text(f"constraints.metadata[{key}]", value, settings)
    return result


@functools.lru_cache(maxsize=256)  # the same few vLLM endpoints, request after request
def _url(field: str, value: str) -> None:
    parsed = urlparse(value.strip())
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise InvalidRequest(field, "must be an http(s) URL")
    if len(value) > 2048:
        raise InvalidRequest(field, "longer than 2048 characters")
