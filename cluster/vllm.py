"""The vLLM HTTP client of an agent job, on the Ray cluster: call, classify, parse.

``call_vllm`` posts one streamed OpenAI chat completion (the prompt from ``cluster.prompts``)
to vLLM, hands the pieces of the answer to a callback as they come, and returns the agent's
result (the fields ``core.contract.agent_event`` publishes; ``cluster.completion`` adds them
up from the stream). Every failure becomes an ``LLMError`` (``core.errors``) whose
``error_type`` and ``retryable`` the worker uses to retry (honouring ``retry_after``), give
up or open the circuit breaker.

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
from typing import Any, Callable, Dict, Optional

import aiohttp
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from cluster.completion import CompletionStream, error_type_for_status, parse_completion
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
                    timeout: float, on_delta: Optional[Callable[[str], None]] = None
                    ) -> Dict[str, Any]:
    """One streamed chat completion for ``job``; the agent's result, or ``LLMError``.

    Parameters:
      session: the HTTP client session (its connections are reused).
      job: the agent's job (prompt, sampling, model, trace context).
      base_url: the vLLM base URL, resolved for this node (``resolve_url``).
      timeout: seconds (≤ 0 for none) bounding the whole call, connecting and every chunk of
        the stream included.
      on_delta: called with each non-empty piece of the answer's content, in order, as it
        arrives (the raw pieces: a ``<think>`` part the result moves to ``reasoning`` is in
        them). One that raises is logged and called no more: partial output is a courtesy,
        the call goes on.

    The result has the fields of ``parse_completion`` (the same as an unstreamed call's) and
    ``ttft_ms`` (ms from sending the request to the first piece of content or reasoning; 0
    when none came) and ``tokens_per_second`` (completion tokens over the seconds from the
    first piece to the end; 0 under 2 tokens). Cancelling the calling task closes the HTTP
    request. The call is a client span whose parent is the job's W3C trace context
    (``metadata["traceparent"]``/``["tracestate"]``); the span's context goes to vLLM as HTTP
    headers.
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
            result = await _chat(session, job, base_url, timeout, headers, on_delta)
        except LLMError as exc:
            span.set_status(Status(StatusCode.ERROR, str(exc)))
            span.set_attribute("error.type", exc.error_type)
            raise
        span.set_attribute("gen_ai.usage.output_tokens", result["tokens"])
        span.set_attribute("ray_executor.ttft_ms", result["ttft_ms"])
        return result


async def _chat(session: aiohttp.ClientSession, job: AgentJob, base_url: str, timeout: float,
                headers: Dict[str, str], on_delta: Optional[Callable[[str], None]]
                ) -> Dict[str, Any]:
    params = sampling(job)
    payload: Dict[str, Any] = {"messages": build_messages(job), **params, "stream": True,
                               "stream_options": {"include_usage": True}}
    if job.model:
        payload["model"] = job.model
    url = chat_url(base_url)
    limit = aiohttp.ClientTimeout(total=timeout if timeout and timeout > 0 else None)
    started = time.monotonic()
    stream = CompletionStream(job.model, on_delta, started)
    body = b""
    try:
        async with session.post(url, json=payload, timeout=limit,
                                headers=headers or None) as response:
            status = response.status
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            if not 200 <= status < 300 or response.content_type == "application/json":
                body = await response.read()  # an error, or a server that does not stream
            else:
                await stream.read(response.content)
    except asyncio.TimeoutError:
        raise LLMError(f"no answer from {url} within {timeout:g}s", "timeout") from None
    except aiohttp.InvalidURL as exc:
        raise LLMError(f"invalid vLLM URL {url!r}: {exc}", "invalid_request", False) from None
    except aiohttp.ClientResponseError as exc:  # not HTTP, or too many redirects
        raise LLMError(f"invalid HTTP answer from {url}: {exc}", "invalid_response",
                       status=exc.status or None) from None
    except (aiohttp.ClientError, OSError) as exc:
        what = f"the stream from {url} broke after {stream.chunks} chunks" if stream.chunks \
            else f"cannot reach {url}"
        raise LLMError(f"{what}: {type(exc).__name__}: {exc}", "connection") from None
    elapsed_ms = (time.monotonic() - started) * 1000
    if not 200 <= status < 300:
        error_type = error_type_for_status(status)
        logger.debug("vLLM answered %d after %.0f ms (%s)", status, elapsed_ms, error_type)
        raise LLMError(f"vLLM answered HTTP {status}: {_error_message(body)}", error_type,
                       status=status, retry_after=retry_after)
    if stream.ended is not None:
        result = stream.result()
    else:  # answered whole: its first token is known to have come by the end
        result = {**parse_completion(body, default_model=job.model),
                  "ttft_ms": round(elapsed_ms, 3), "tokens_per_second": 0.0}
    result["temperature"] = params["temperature"]
    logger.debug("vLLM answered in %.0f ms, %d tokens, first after %.0f ms", elapsed_ms,
                 result["tokens"], result["ttft_ms"])
    return result
