"""What one agent job does on the Ray cluster: build the prompt, call vLLM, parse the answer.

``call_vllm`` posts one OpenAI chat completion to vLLM and returns the agent's result (the
fields ``bridge.contract.agent_event`` publishes). Every failure becomes an ``LLMError`` whose
``error_type`` and ``retryable`` the worker uses to retry (honouring ``retry_after``), give up
or open the circuit breaker. ``LLMError`` pickles with its attributes, so it survives Ray's
trip from the cluster back to the worker.

Python 3.9 compatible (the Ray cluster's Python); needs aiohttp, never Ray or Dramatiq.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import json
import logging
import math
import string
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

import aiohttp

from bridge.contract import AgentJob

logger = logging.getLogger("ray_executor.vllm_agent")

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
RETRYABLE = frozenset({"rate_limited", "unavailable", "server_error", "timeout", "connection"})


class LLMError(Exception):
    """A failed vLLM call, classified.

    ``error_type``: rate_limited (429), unavailable (503), server_error (other 5xx),
    bad_request (other 4xx), timeout, connection, invalid_response, invalid_prompt_template or
    invalid_request. ``retryable`` defaults from the type; ``retry_after`` is the server's
    ``Retry-After`` in seconds when it sent one.
    """

    def __init__(self, message: str = "", error_type: str = "invalid_response",
                 retryable: Optional[bool] = None, status: Optional[int] = None,
                 retry_after: Optional[float] = None) -> None:
        super().__init__(message)
        self.message = message
        self.error_type = error_type
        self.retryable = error_type in RETRYABLE if retryable is None else bool(retryable)
        self.status = status
        self.retry_after = retry_after

    def __reduce__(self) -> Tuple[Any, Tuple[Any, ...]]:
        return (type(self), (self.message, self.error_type, self.retryable, self.status,
                             self.retry_after))

    def __str__(self) -> str:
        return self.message or self.error_type

    def __repr__(self) -> str:
        return (f"LLMError({self.message!r}, error_type={self.error_type!r}, "
                f"retryable={self.retryable}, status={self.status}, "
                f"retry_after={self.retry_after})")


# --- the prompt -------------------------------------------------------------------------


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


def _meta(job: AgentJob, key: str) -> str:
    value = job.metadata.get(key)
    return "" if value is None else str(value)


def build_messages(job: AgentJob) -> List[Dict[str, str]]:
    """The chat messages of one agent: its system prompt and the task."""
    rubric, requirements = _meta(job, "rubric"), _meta(job, "requirements")
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
    """Sampling parameters of the request: temperature, max_tokens, response_format."""
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
    if schema is not None and str(schema).strip():
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


# --- the call ---------------------------------------------------------------------------


def resolve_url(template: str, node_ip: str) -> str:
    """The vLLM base URL on this node: ``{node_ip}`` replaced, no trailing ``/``."""
    return template.replace("{node_ip}", node_ip).strip().rstrip("/")


def chat_url(base_url: str) -> str:
    """``…/v1/chat/completions`` from a base URL with or without ``/v1``."""
    base = base_url.strip().rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    if base.endswith("/v1"):
        return base + "/chat/completions"
    return base + "/v1/chat/completions"


def parse_retry_after(value: Optional[str]) -> Optional[float]:
    """Seconds from a ``Retry-After`` header: delay-seconds or an HTTP date."""
    if not value or not value.strip():
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value.strip())
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.timezone.utc)
        seconds = (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def error_type_for_status(status: int) -> str:
    if status == 429:
        return "rate_limited"
    if status == 503:
        return "unavailable"
    if status >= 500:
        return "server_error"
    if status == 408:  # the server or a proxy timed out waiting: worth retrying
        return "timeout"
    if 400 <= status < 500:
        return "bad_request"
    return "invalid_response"


def _error_message(body: bytes) -> str:
    """The message of an OpenAI- or vLLM-style error body, else the start of the body."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:500]
        if isinstance(error, str) and error:
            return error[:500]
        if data.get("message"):
            return str(data["message"])[:500]
    return body[:200].decode("utf-8", "replace")


def trace_headers(job: AgentJob) -> Dict[str, str]:
    """The job's W3C trace context as HTTP headers (a value no header can carry is dropped)."""
    values = {key: _meta(job, key).strip() for key in ("traceparent", "tracestate")}
    return {key: value for key, value in values.items()
            if value and value.isascii() and value.isprintable()}


async def call_vllm(session: aiohttp.ClientSession, job: AgentJob, *, base_url: str,
                    timeout: float) -> Dict[str, Any]:
    """One chat completion for ``job``; the agent's result, or ``LLMError``.

    ``timeout`` (seconds, ≤ 0 for none) bounds the whole call, connecting included.
    Cancelling the calling task closes the HTTP request. The job's W3C trace context
    (``metadata["traceparent"]``/``["tracestate"]``) goes to vLLM as HTTP headers.
    """
    if not base_url.strip():
        raise LLMError("no vLLM URL configured for this job", "invalid_request", False)
    params = sampling(job)
    payload: Dict[str, Any] = {"messages": build_messages(job), **params}
    if job.model:
        payload["model"] = job.model
    url = chat_url(base_url)
    limit = aiohttp.ClientTimeout(total=timeout if timeout and timeout > 0 else None)
    headers = trace_headers(job)
    started = time.monotonic()
    try:
        async with session.post(url, json=payload, timeout=limit,
                                headers=headers or None) as response:
            body = await response.read()
            status = response.status
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
    except asyncio.TimeoutError:
        raise LLMError(f"no answer from {url} within {timeout:g}s", "timeout") from None
    except aiohttp.InvalidURL as exc:
        raise LLMError(f"invalid vLLM URL {url!r}: {exc}", "invalid_request", False) from None
    except aiohttp.ClientResponseError as exc:  # not HTTP, or too many redirects
        raise LLMError(f"invalid HTTP answer from {url}: {exc}", "invalid_response",
                       status=exc.status or None) from None
    except (aiohttp.ClientError, OSError) as exc:
        raise LLMError(f"cannot reach {url}: {type(exc).__name__}: {exc}",
                       "connection") from None
    elapsed_ms = (time.monotonic() - started) * 1000
    if not 200 <= status < 300:
        error_type = error_type_for_status(status)
        logger.debug("vLLM answered %d after %.0f ms (%s)", status, elapsed_ms, error_type)
        raise LLMError(f"vLLM answered HTTP {status}: {_error_message(body)}", error_type,
                       status=status, retry_after=retry_after)
    result = parse_completion(body, default_model=job.model)
    result["temperature"] = params["temperature"]
    logger.debug("vLLM answered in %.0f ms, %d tokens", elapsed_ms, result["tokens"])
    return result


def parse_completion(body: bytes, *, default_model: str = "") -> Dict[str, Any]:
    """The agent's result from a chat completion body (``temperature`` is the caller's)."""
    try:
        data = json.loads(body)
    except ValueError:
        raise LLMError(f"vLLM answer is not JSON: {body[:200]!r}", "invalid_response",
                       status=200) from None
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict) \
            or not isinstance(choices[0].get("message"), dict):
        raise LLMError(f"vLLM answer has no choices[0].message: {body[:200]!r}",
                       "invalid_response", status=200)
    choice = choices[0]
    message = choice["message"]
    content = _text(message.get("content"))
    reasoning = _text(message.get("reasoning_content")) or _text(message.get("reasoning"))
    if not reasoning and "</think>" in content:  # a model without vLLM's reasoning parser
        thought, _, content = content.partition("</think>")
        reasoning = thought.replace("<think>", "", 1).strip()
        content = content.strip()
    usage = data.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    tokens = usage.get("completion_tokens")
    return {
        "content": content,
        "reasoning": reasoning,
        "model": str(data.get("model") or default_model),
        "tokens": tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else 0,
        "usage": usage,
        "temperature": None,
        "score": extract_score(content),
        "finish_reason": str(choice.get("finish_reason") or ""),
    }


def _text(content: Any) -> str:
    """Text of a message field: a string, or a list of OpenAI content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part["text"] for part in content
                       if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


def extract_score(content: str) -> float:
    """``score`` of a JSON-object answer when it is a number in [0, 1]; else 0.0."""
    text = content.strip()
    if text.startswith("```"):  # a fenced ```json block
        text = text.split("\n", 1)[1] if "\n" in text else ""
        text = text.rsplit("```", 1)[0]
    try:
        value = json.loads(text)
    except ValueError:
        return 0.0
    score = value.get("score") if isinstance(value, dict) else None
    if isinstance(score, (int, float)) and not isinstance(score, bool) \
            and math.isfinite(score) and 0 <= score <= 1:
        return float(score)
    return 0.0
