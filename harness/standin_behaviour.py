"""What the stand-in LLM does: its behaviour settings (latency and injected faults), its
counters, and the chat completion it answers (an echo that says it is a stand-in, or a
placeholder that fits the request's JSON schema). Standard library only, Python 3.9
compatible."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from typing import Any, Dict, Mapping, Optional

from harness.standin_http import HttpError

MARKER = "[stand-in LLM, not a real model]"
REASONING = "Stand-in reasoning: no model ran; this text is fixed and says nothing."
ECHO_CHARS = 200
_FAULTS = ("status", "hang", "garbage", "reset", "break_after", "error_after")


class ControlError(ValueError):
    """A behaviour setting has an unknown name or a value of the wrong type."""


@dataclasses.dataclass
class Behaviour:
    """What the stand-in does with chat requests; shared by all of them.

    ``latency``: seconds before every chat answer, whatever the answer is. Faults: ``status``
    (non-200: answer that status with an OpenAI-style error, with a ``Retry-After`` header
    when ``retry_after`` is set), ``hang`` (never answer until the client goes away),
    ``garbage`` (answer 200 with a body, or a streamed chunk, that is not JSON), ``reset``
    (close the connection without answering), ``break_after``/``error_after`` (below); each
    for the next ``fail_count`` chat requests (-1: all), after which the faults are cleared.
    Setting a fault without ``fail_count`` sets it to -1. ``hold``: every chat request waits
    until it is set false again (a test fills a concurrency limit exactly, whatever the
    machine's speed). ``capacity``: chat requests served at once, as a server of fixed size
    (0: no limit); the others wait their turn, before their latency. ``content``: the answer
    of every successful chat (e.g. a structured answer that does not fit its schema).
    """

    latency: float = 0.0
    status: int = 200
    fail_count: int = -1
    retry_after: Optional[float] = None
    hang: bool = False
    garbage: bool = False
    reset: bool = False
    hold: bool = False  # chat requests wait (before their latency) until it is set false
    capacity: int = 0
    content: Optional[str] = None  # answer every chat with this content (e.g. a bad answer)
    # Streamed answers (``"stream": true``; harness.standin_stream): ``stream`` false answers
    # them whole, as a server that cannot stream would; the content goes in pieces of
    # ``piece_chars`` characters, ``piece_delay`` seconds apart.
    stream: bool = True
    piece_chars: int = 8
    piece_delay: float = 0.0
    # Faults of streamed answers only (a request that does not stream is answered whole and
    # uses up one of fail_count all the same): after this many content pieces, close the
    # connection (no end, no [DONE]), or send vLLM's error chunk (then [DONE], as vLLM does).
    break_after: Optional[int] = None
    error_after: Optional[int] = None

    def faulty(self) -> bool:
        return self.status != 200 or self.hang or self.garbage or self.reset \
            or self.break_after is not None or self.error_after is not None

    def update(self, changes: Mapping[str, Any]) -> None:
        """Apply ``changes`` (validated first: nothing changes when one is invalid)."""
        values = {name: _checked(name, value) for name, value in changes.items()}
        if "fail_count" not in values and any(name in values for name in _FAULTS):
            values["fail_count"] = -1
        for name, value in values.items():
            setattr(self, name, value)

    def clear_faults(self) -> None:
        self.status = 200
        self.hang = self.garbage = self.reset = False
        self.break_after = self.error_after = None
        self.fail_count = -1


def _checked(name: str, value: Any) -> Any:
    def number(minimum: float) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) \
            and value >= minimum

    def integer(low: int, high: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high

    valid = {
        "latency": lambda: number(0),
        "status": lambda: integer(200, 599),
        "fail_count": lambda: integer(-1, 2**31),
        "retry_after": lambda: value is None or number(0),
        "hang": lambda: isinstance(value, bool),
        "garbage": lambda: isinstance(value, bool),
        "reset": lambda: isinstance(value, bool),
        "hold": lambda: isinstance(value, bool),
        "capacity": lambda: integer(0, 2**31),
        "content": lambda: value is None or isinstance(value, str),
        "stream": lambda: isinstance(value, bool),
        "piece_chars": lambda: integer(1, 2**31),
        "piece_delay": lambda: number(0),
        "break_after": lambda: value is None or integer(0, 2**31),
        "error_after": lambda: value is None or integer(0, 2**31),
    }
    if name not in valid:
        raise ControlError(f"unknown setting {name!r} (known: {', '.join(valid)})")
    if not valid[name]():
        raise ControlError(f"invalid value for {name}: {value!r}")
    return float(value) if name in ("latency", "retry_after", "piece_delay") \
        and value is not None else value


@dataclasses.dataclass
class Stats:
    """Counters of chat requests (other endpoints are not counted)."""

    requests: int = 0  # received
    in_flight: int = 0  # received, not yet answered or closed
    peak_in_flight: int = 0
    serving: int = 0  # in flight past the wait for a place (``capacity``)
    peak_serving: int = 0
    completed: int = 0  # answered with a chat completion
    errors: int = 0  # answered with an error status, garbage or a reset
    cancelled: int = 0  # the client went away before the answer


def _text(content: Any) -> str:
    """The text of a message's content: a string or a list of OpenAI content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part["text"] for part in content
                        if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


def placeholder(schema: Any, depth: int = 0) -> Any:
    """A value valid for a simple JSON schema: objects get their ``required`` properties."""
    if not isinstance(schema, dict) or depth > 16:
        return "stand-in"
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return placeholder(schema[key][0], depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    if kind == "object":
        properties = schema.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        required = schema.get("required")
        return {name: placeholder(properties.get(name), depth + 1)
                for name in (required if isinstance(required, list) else [])
                if isinstance(name, str)}
    if kind == "array":
        count = schema.get("minItems")
        count = min(count, 8) if isinstance(count, int) and count > 0 else 0
        return [placeholder(schema.get("items"), depth + 1) for _ in range(count)]
    simple = {"string": "stand-in", "number": 0.5, "integer": 1, "boolean": True, "null": None}
    return simple.get(kind, "stand-in")


def completion(request: Any, default_model: str, content: Optional[str] = None
               ) -> Dict[str, Any]:
    """The chat completion the stand-in answers to ``request`` (the decoded JSON body):
    ``content`` as the answer when given, else an echo or a placeholder for its schema."""
    if not isinstance(request, dict):
        raise HttpError(400, "the body must be a JSON object")
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages or \
            not all(isinstance(m, dict) for m in messages):
        raise HttpError(400, "'messages' must be a non-empty list of objects")
    users = [m for m in messages if m.get("role") == "user"] or messages
    echo = " ".join(_text(users[-1].get("content")).split())[:ECHO_CHARS]
    answer = f"{MARKER} Echo of the last user message: {echo}"
    response_format = request.get("response_format")
    if isinstance(response_format, dict) and \
            response_format.get("type") in ("json_schema", "json_object"):
        schema = None
        if isinstance(response_format.get("json_schema"), dict):
            schema = response_format["json_schema"].get("schema")
        value = placeholder(schema) if isinstance(schema, dict) else \
            {"proposal": answer, "score": 0.5}
        answer = json.dumps(value)
    if content is None:
        content = answer
    model = request.get("model")
    prompt_tokens = sum(len(_text(m.get("content")).split()) for m in messages)
    completion_tokens = len(content.split())
    return {
        "id": f"chatcmpl-standin-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model if isinstance(model, str) and model else default_model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content,
                        "reasoning_content": REASONING},
            "finish_reason": "stop",
        }],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }
