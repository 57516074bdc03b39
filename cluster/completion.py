"""The agent's result from a vLLM chat completion, answered whole (``parse_completion``) or
streamed (``CompletionStream``, fed the events ``cluster.sse`` decodes), and the error classes
of vLLM's failures (``error_type_for_status``, ``stream_error``). Both ways give the same
result for the same answer: ``completion_result`` makes it from the answer's parts.

Python 3.9 compatible (the Ray cluster's Python); needs aiohttp, never Ray or Dramatiq.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any, Callable, Dict, List, Optional

import aiohttp

from cluster.sse import EventTooLarge, SSEDecoder
from core.errors import LLMError

logger = logging.getLogger("ray_executor.vllm")


def error_type_for_status(status: int) -> str:
    """The ``LLMError.error_type`` of an HTTP answer (or a stream's error) of ``status``."""
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


class CompletionStream:
    """The chat completion that a stream of chunks adds up to, read from an event stream.

    Parameters:
      default_model: the model the result names when no chunk names one.
      on_delta: ``call_vllm``'s ``on_delta``.
      started: ``time.monotonic()`` when the request was sent.
    """

    def __init__(self, default_model: str, on_delta: Optional[Callable[[str], None]],
                 started: float) -> None:
        self.model = default_model
        self.on_delta = on_delta
        self.started = started
        self.content: List[str] = []
        self.reasoning: List[str] = []
        self.usage: Dict[str, Any] = {}
        self.finish_reason = ""
        self.chunks = 0  # JSON chunks read
        self.choices = 0  # chunks with a choice 0
        self.first: Optional[float] = None  # when the first content or reasoning came
        self.ended: Optional[float] = None  # when [DONE] came

    async def read(self, content: aiohttp.StreamReader) -> None:
        """Read the event stream up to ``[DONE]``; ``LLMError`` if it ends before."""
        decoder = SSEDecoder()
        async for data in content.iter_any():
            try:
                events = decoder.feed(data)
            except EventTooLarge as exc:
                raise LLMError(f"vLLM stream: {exc}", "invalid_response", status=200) from None
            for event in events:
                self.event(event)
                if self.ended is not None:
                    return
        raise LLMError(f"the vLLM stream ended before [DONE] after {self.chunks} chunks",
                       "connection")

    def event(self, data: str) -> None:
        """Take one event's data: a JSON chunk, an error, or ``[DONE]``."""
        if self.ended is not None:  # nothing counts after [DONE]
            return
        if data.strip() == "[DONE]":
            self.ended = time.monotonic()
            if not self.choices:
                raise LLMError("the vLLM stream ended without any choice", "invalid_response",
                               status=200)
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            chunk = None
        if not isinstance(chunk, dict):
            raise LLMError(f"vLLM stream chunk is not a JSON object: {data[:200]!r}",
                           "invalid_response", status=200)
        self.chunks += 1
        error = stream_error(chunk)
        if error is not None:
            raise error
        if chunk.get("model"):
            self.model = str(chunk["model"])
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        choices = chunk.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices else None
        if not isinstance(choice, dict) or choice.get("index", 0) != 0:
            return
        self.choices += 1
        delta = choice.get("delta")
        delta = delta if isinstance(delta, dict) else {}
        reasoning = _text(delta.get("reasoning_content")) or _text(delta.get("reasoning"))
        piece = _text(delta.get("content"))
        if (reasoning or piece) and self.first is None:
            self.first = time.monotonic()
        if reasoning:
            self.reasoning.append(reasoning)
        if piece:
            self.content.append(piece)
            self._deliver(piece)
        if choice.get("finish_reason"):
            self.finish_reason = str(choice["finish_reason"])

    def _deliver(self, piece: str) -> None:
        if self.on_delta is None:
            return
        try:
            self.on_delta(piece)
        except Exception:
            logger.exception("the partial-output callback failed; no more pieces go to it")
            self.on_delta = None

    def result(self) -> Dict[str, Any]:
        """The agent's result (``parse_completion``'s fields, ``ttft_ms``,
        ``tokens_per_second``); call once ``read`` returned."""
        result = completion_result("".join(self.content), "".join(self.reasoning), self.model,
                                   self.usage, self.finish_reason)
        ended = self.ended if self.ended is not None else time.monotonic()
        first = self.first
        generating = ended - first if first is not None else 0.0
        tokens = result["tokens"]
        result["ttft_ms"] = round((first - self.started) * 1000, 3) if first is not None else 0.0
        result["tokens_per_second"] = round(tokens / generating, 3) \
            if tokens >= 2 and generating > 0 else 0.0
        return result


def stream_error(chunk: Dict[str, Any]) -> Optional[LLMError]:
    """The failure a chunk reports (vLLM's ``{"error": {...}}`` or ``{"object": "error", ...}``)
    as the ``LLMError`` an HTTP answer of its ``code`` gets; a server error (retryable) when it
    has no HTTP status; None for a chunk that is no error."""
    error = chunk.get("error")
    if chunk.get("object") == "error":
        info: Dict[str, Any] = chunk
    elif isinstance(error, dict):
        info = error
    elif isinstance(error, str) and error:
        info = {"message": error}
    else:
        return None
    status = None
    for key in ("code", "status"):
        value = info.get(key)
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and 400 <= value <= 599:
            status = value
            break
    error_type = error_type_for_status(status) if status is not None else "server_error"
    message = str(info.get("message") or info.get("type") or "no message")[:500]
    return LLMError(f"vLLM stream failed ({status or error_type}): {message}", error_type,
                    status=status)


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
    reasoning = _text(message.get("reasoning_content")) or _text(message.get("reasoning"))
    usage = data.get("usage")
    return completion_result(_text(message.get("content")), reasoning,
                             str(data.get("model") or default_model),
                             usage if isinstance(usage, dict) else {},
                             str(choice.get("finish_reason") or ""))


def completion_result(content: str, reasoning: str, model: str, usage: Dict[str, Any],
                      finish_reason: str) -> Dict[str, Any]:
    """The agent's result from a completion's parts, streamed or not (``temperature`` is the
    caller's): a ``</think>`` part of the content becomes the reasoning when vLLM's reasoning
    parser gave none."""
    if not reasoning and "</think>" in content:  # a model without vLLM's reasoning parser
        thought, _, content = content.partition("</think>")
        reasoning = thought.replace("<think>", "", 1).strip()
        content = content.strip()
    tokens = usage.get("completion_tokens")
    return {
        "content": content,
        "reasoning": reasoning,
        "model": model,
        "tokens": tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else 0,
        "usage": usage,
        "temperature": None,
        "score": extract_score(content),
        "finish_reason": finish_reason,
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
