"""The prompt of one agent job: its system persona, the task message, sampling parameters.

``build_messages`` and ``sampling`` turn an ``AgentJob`` into the body of one OpenAI chat
completion (``cluster.vllm`` sends it). A template or metadata that cannot make a request
raises ``LLMError`` (``invalid_prompt_template`` / ``invalid_request``: not retried).

Runs on the Ray cluster; standard library only.
"""

from __future__ import annotations

import json
import string
from typing import Any, Dict, List, Mapping

from core import task_types
from core.contract import AgentJob
from core.errors import LLMError

PERSONAS: Dict[str, str] = {
    "DEV": (
        "You are a senior software developer on a council of expert agents. Turn the task "
        "into a concrete, working implementation plan: the code changes, interfaces and data "
        "structures, edge cases and error handling, and how you would test it. Prefer simple, "
        "maintainable solutions and say what you would deliberately leave out."
    ),
    "QA": (
        "You are a quality assurance engineer on a council of expert agents. Look for what "
        "could go wrong: missing or ambiguous requirements, edge cases, failure modes and "
        "regressions. Propose a test strategy with concrete test cases and acceptance "
        "criteria, and say how you would know the work is done."
    ),
    "ARCHITECT": (
        "You are a software architect on a council of expert agents. Describe the components, "
        "their boundaries and the data flow; weigh the alternatives on scalability, "
        "reliability, security and cost; state your decisions with their reasons and risks."
    ),
    "DEVOPS": (
        "You are a DevOps and platform engineer on a council of expert agents. Cover how the "
        "work is built, configured, deployed, observed (logs, metrics, traces) and rolled back, "
        "its capacity and cost, and the security of its runtime."
    ),
    "DATA": (
        "You are a data engineer on a council of expert agents. Cover the data model, sources "
        "and their quality, pipelines and storage, privacy and retention, and the metrics that "
        "would show the result works."
    ),
}
GENERIC_PERSONA = (
    "You are an expert with the role {role} on a council of expert agents. Answer the task "
    "from the point of view of that role: concrete, correct and concise, with the reasons for "
    "your choices."
)
DIVERSITY_INSTRUCTION = (
    "Propose an approach different from the obvious one: take a distinct angle from the other "
    "agents of this council and name the trade-off it makes."
)
TEMPLATE_FIELDS = ("task", "role", "rubric", "requirements")
# Metadata that is not context for the model: tracing, idempotency, sampling parameters.
NOT_CONTEXT = {"idempotency_key", "traceparent", "tracestate", "rubric", "requirements",
               "max_tokens", "response_format"}
MAX_CONTEXT_ITEMS = 20
MAX_CONTEXT_CHARS = 300
DEFAULT_MAX_TOKENS = 1024


def persona(role: str) -> str:
    """The system prompt of a role; an unknown role gets a generic one naming it."""
    key = role.strip().upper()
    return PERSONAS.get(key) or GENERIC_PERSONA.format(role=role.strip() or "generalist")


def render_template(template: str, values: Mapping[str, str]) -> str:
    """Fill ``{task}``, ``{role}``, ``{rubric}`` and ``{requirements}``; nothing else.

    Only plain placeholders are allowed (no attribute access, index, conversion or format
    spec); literal braces are doubled. Anything else raises ``invalid_prompt_template``.
    """
    allowed = ", ".join("{" + name + "}" for name in TEMPLATE_FIELDS)
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise LLMError(f"invalid prompt_template: {exc} (write literal braces as {{{{ }}}})",
                       "invalid_prompt_template", False) from None
    parts: List[str] = []
    for literal, field, spec, conversion in parsed:
        parts.append(literal)
        if field is None:
            continue
        if field not in TEMPLATE_FIELDS or spec or conversion:
            shown = field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            raise LLMError(f"invalid prompt_template: unknown placeholder {{{shown}}}; "
                           f"allowed: {allowed} (write literal braces as {{{{ }}}})",
                           "invalid_prompt_template", False)
        parts.append(values[field])
    return "".join(parts)


def meta(job: AgentJob, key: str) -> str:
    value = job.metadata.get(key)
    return "" if value is None else str(value)


def build_messages(job: AgentJob) -> List[Dict[str, str]]:
    """The chat messages of one agent: its system prompt and the task."""
    rubric, requirements = meta(job, "rubric"), meta(job, "requirements")
    if job.prompt_template.strip():
        system = render_template(job.prompt_template, {
            "task": job.task_description, "role": job.role, "rubric": rubric,
            "requirements": requirements})
    else:
        system = persona(job.role)
    lines = [f"Task: {job.task_description}"]
    if job.task_role:
        lines.append(f"Task role: {job.task_role}")
    if job.story_id:
        lines.append(f"Story: {job.story_id}")
    if job.plan_id:
        lines.append(f"Plan: {job.plan_id}")
    if rubric:
        lines += ["", "Rubric:", rubric]
    if requirements:
        lines += ["", "Requirements:", requirements]
    context = [(key, str(value)) for key, value in sorted(job.metadata.items())
               if key not in NOT_CONTEXT and str(value).strip()][:MAX_CONTEXT_ITEMS]
    if context:
        lines += ["", "Context:"]
        lines += [f"- {key}: {_clip(value, MAX_CONTEXT_CHARS)}" for key, value in context]
    if job.agent_index > 0:
        lines += ["", f"You are agent {job.agent_index + 1} of {max(job.num_agents, 1)} on "
                      f"this council. {DIVERSITY_INSTRUCTION}"]
    return [{"role": "system", "content": system},
            {"role": "user", "content": "\n".join(lines)}]


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def temperature(agent_index: int) -> float:
    """0.7 for the first agent; the others explore: 0.9 and up by 0.05 each, at most 1.2."""
    if agent_index <= 0:
        return 0.7
    return round(min(1.2, 0.9 + 0.05 * (agent_index - 1)), 2)


def sampling(job: AgentJob) -> Dict[str, Any]:
    """Sampling parameters of the request: temperature, max_tokens, response_format (a
    task-extraction job's own schema at temperature 0, ``core.task_types``)."""
    params: Dict[str, Any] = {"temperature": temperature(job.agent_index),
                              "max_tokens": DEFAULT_MAX_TOKENS}
    raw = job.metadata.get("max_tokens")
    if raw is not None and str(raw).strip():
        try:
            params["max_tokens"] = int(str(raw).strip())
        except ValueError:
            params["max_tokens"] = 0
        if params["max_tokens"] <= 0:
            raise LLMError(f"metadata max_tokens must be a positive integer, not {raw!r}",
                           "invalid_request", False)
    schema = job.metadata.get("response_format")
    if task_types.task_type(job.metadata) == task_types.TASK_EXTRACTION:
        # upstream's consumer needs exactly this shape, and the same answer each time
        params.update(temperature=0.0, response_format=task_types.response_format())
    elif schema is not None and str(schema).strip():
        params["response_format"] = _response_format(schema)
    return params


def _response_format(raw: Any) -> Dict[str, Any]:
    """OpenAI ``response_format`` from metadata: a JSON schema (as JSON text), or already an
    OpenAI ``response_format`` object (type ``json_schema`` or ``json_object``)."""
    try:
        value = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError as exc:
        raise LLMError(f"metadata response_format is not valid JSON: {exc}",
                       "invalid_request", False) from None
    if not isinstance(value, dict):
        raise LLMError("metadata response_format must be a JSON schema object",
                       "invalid_request", False)
    if value.get("type") in ("json_schema", "json_object"):
        return value
    return {"type": "json_schema", "json_schema": {"name": "proposal", "schema": value}}
