"""The vLLM HTTP client of an agent job, on the Ray cluster: call, classify, parse.

``call_vllm`` posts one OpenAI chat completion (the prompt from ``cluster.prompts``) to vLLM
and returns the agent's result (the fields ``core.contract.agent_event`` publishes). Every
failure becomes an ``LLMError`` (``core.errors``) whose ``error_type`` and ``retryable`` the
worker uses to retry (honouring ``retry_after``), give up or open the circuit breaker.

Python 3.9 compatible (the Ray cluster's Python); needs aiohttp, never Ray or Dramatiq.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import json
import logging
import math
import time
from typing import Any, Dict, Optional

import aiohttp
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from cluster.prompts import build_messages, meta, sampling
from core import tracing
from core.contract import AgentJob
from core.errors import LLMError

logger = logging.getLogger("ray_executor.vllm")


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
    values = {key: meta(job, key).strip() for key in ("traceparent", "tracestate")}
    return {key: value for key, value in values.items()
            if value and value.isascii() and value.isprintable()}


async def call_vllm(session: aiohttp.ClientSession, job: AgentJob, *, base_url: str,
                    timeout: float) -> Dict[str, Any]:
    """One chat completion for ``job``; the agent's result, or ``LLMError``.

    ``timeout`` (seconds, ≤ 0 for none) bounds the whole call, connecting included.
    Cancelling the calling task closes the HTTP request. The call is a client span whose
    parent is the job's W3C trace context (``metadata["traceparent"]``/``["tracestate"]``);
    the span's context goes to vLLM as HTTP headers.
    """
    if not base_url.strip():
        raise LLMError("no vLLM URL configured for this job", "invalid_request", False)
    span, headers = tracing.start(
        f"chat {job.model}".strip(), SpanKind.CLIENT, trace_headers(job),
        {"gen_ai.operation.name": "chat", "gen_ai.request.model": job.model,
         "ray_executor.agent_id": job.agent_id})
    with trace.use_span(span, end_on_exit=True, record_exception=False,
                        set_status_on_exception=False):
        try:
            result = await _chat(session, job, base_url, timeout, headers)
        except LLMError as exc:
            span.set_status(Status(StatusCode.ERROR, str(exc)))
            span.set_attribute("error.type", exc.error_type)
            raise
        span.set_attribute("gen_ai.usage.output_tokens", result["tokens"])
        return result


async def _chat(session: aiohttp.ClientSession, job: AgentJob, base_url: str, timeout: float,
                headers: Dict[str, str]) -> Dict[str, Any]:
    params = sampling(job)
    payload: Dict[str, Any] = {"messages": build_messages(job), **params}
    if job.model:
        payload["model"] = job.model
    url = chat_url(base_url)
    limit = aiohttp.ClientTimeout(total=timeout if timeout and timeout > 0 else None)
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
