"""The stand-in LLM's streamed answers: a chat completion sent as vLLM streams one.

For a request with ``"stream": true`` the stand-in sends the answer it would send whole
(``harness.standin_behaviour.completion``) as server-sent events over a chunked body, shaped
as vLLM shapes them: a first chunk with the assistant's role, the reasoning then the content in
pieces of ``piece_chars`` characters (``piece_delay`` seconds apart), a last chunk with the
``finish_reason``, a chunk with the usage when ``stream_options.include_usage`` is set, then
``data: [DONE]``. Its faults: the connection closed after ``break_after`` content pieces, or
vLLM's error chunk after ``error_after`` pieces. Standard library only, Python 3.9 compatible.
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable, Dict, Iterator, List, Optional

from harness.standin_http import Connection

# What a streamed answer came to, named as the stand-in's counters are.
COMPLETED, ERRORS, CANCELLED = "completed", "errors", "cancelled"
ERROR_CHUNK = {"error": {"message": "stand-in LLM: injected error in the middle of the stream",
                         "type": "InternalServerError", "param": None, "code": 500}}
GARBAGE = b"<html>stand-in garbage: this is not JSON"


def wants_stream(request: Any) -> bool:
    """Whether a chat request (its decoded JSON body) asks for a streamed answer."""
    return isinstance(request, dict) and request.get("stream") is True


def include_usage(request: Dict[str, Any]) -> bool:
    options = request.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def pieces(text: str, size: int) -> List[str]:
    """``text`` cut into pieces of ``size`` characters (the last one shorter)."""
    return [text[start:start + size] for start in range(0, len(text), size)]


def chunks(answer: Dict[str, Any], piece_chars: int) -> Iterator[Dict[str, Any]]:
    """The ``chat.completion.chunk`` objects of ``answer`` (a whole chat completion), usage
    aside: each content piece is a chunk whose delta has ``content`` alone."""
    choice = answer["choices"][0]
    message = choice["message"]

    def chunk(delta: Dict[str, Any], finish_reason: Optional[str] = None) -> Dict[str, Any]:
        return {"id": answer["id"], "object": "chat.completion.chunk",
                "created": answer["created"], "model": answer["model"],
                "choices": [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": finish_reason}]}

    yield chunk({"role": "assistant", "content": ""})
    for piece in pieces(message.get("reasoning_content") or "", piece_chars):
        yield chunk({"reasoning_content": piece})
    for piece in pieces(message["content"], piece_chars):
        yield chunk({"content": piece})
    yield chunk({}, choice["finish_reason"])


def usage_chunk(answer: Dict[str, Any]) -> Dict[str, Any]:
    return {"id": answer["id"], "object": "chat.completion.chunk", "created": answer["created"],
            "model": answer["model"], "choices": [], "usage": answer["usage"]}


def event(data: Any) -> bytes:
    """One server-sent event carrying ``data`` (a JSON value, or raw bytes as they are)."""
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return b"data: " + raw + b"\n\n"


async def send_stream(conn: Connection, answer: Dict[str, Any], *, usage: bool,
                      piece_chars: int, piece_delay: float, break_after: Optional[int],
                      error_after: Optional[int], keep_alive: bool,
                      pause: Callable[[float], Awaitable[bool]]) -> str:
    """Send ``answer`` streamed; what it came to: ``COMPLETED``, ``ERRORS`` (a fault ended it)
    or ``CANCELLED`` (the client went away).

    Parameters:
      conn: the request's connection.
      answer: the whole chat completion to stream.
      usage: send the usage chunk before ``[DONE]``.
      piece_chars, piece_delay: size of the pieces and seconds between two of them.
      break_after, error_after: the stream's fault, if any (content pieces before it).
      keep_alive: keep the connection open after the answer.
      pause: waits the seconds it is given; False when the client went away meanwhile.
    """
    if not await conn.start_chunked(200, "text/event-stream; charset=utf-8",
                                    keep_alive=keep_alive):
        return CANCELLED
    sent_pieces = 0
    for number, chunk in enumerate(chunks(answer, piece_chars)):
        content = "content" in chunk["choices"][0]["delta"] and number > 0
        if content and sent_pieces == break_after:
            conn.writer.transport.abort()  # mid-stream: no end chunk, no [DONE]
            return ERRORS
        if content and sent_pieces == error_after:
            await conn.send_chunk(event(ERROR_CHUNK) + event(b"[DONE]"))
            return ERRORS if await conn.end_chunked() else CANCELLED
        if number > 0 and piece_delay > 0 and not await pause(piece_delay):
            return CANCELLED
        if not await conn.send_chunk(event(chunk)):
            return CANCELLED
        sent_pieces += content
    end = (event(usage_chunk(answer)) if usage else b"") + event(b"[DONE]")
    if not await conn.send_chunk(end) or not await conn.end_chunked():
        return CANCELLED
    return COMPLETED


async def send_garbage_stream(conn: Connection, *, keep_alive: bool) -> bool:
    """An event stream whose one chunk is not JSON (the ``garbage`` fault of a streamed
    request); False when the client is gone."""
    return await conn.start_chunked(200, "text/event-stream; charset=utf-8",
                                    keep_alive=keep_alive) \
        and await conn.send_chunk(event(GARBAGE) + event(b"[DONE]")) \
        and await conn.end_chunked()
