"""An OpenAI-compatible stand-in for vLLM: answers chat completions without any model.

Used by the tests, the benchmarks and the embedded run command. Every answer says plainly
that it comes from a stand-in. What it does (latency, HTTP errors, hanging, garbage, resets)
is set at start and changed at run time with ``POST /control``, so tests can make it misbehave
on purpose; ``GET /stats`` counts what it saw, including requests whose client went away
before the answer (``cancelled``: how a test proves a Ray task really closed its request),
and lists the W3C ``traceparent`` headers of the last chat requests (``traceparents``).

Endpoints: ``POST /v1/chat/completions``; ``GET /v1/models``, ``/health``, ``/stats``,
``/control``; ``POST /control`` (JSON, any subset of the behaviour fields) and
``POST /control/reset`` (back to the behaviour it was started with, counters zeroed).

Behaviour fields: ``latency`` (seconds before every chat answer, whatever the answer is),
``status`` (non-200: answer that status with an OpenAI-style error), ``retry_after`` (adds a
``Retry-After`` header to error answers), ``hang`` (never answer until the client goes away),
``garbage`` (answer 200 with a body that is not JSON), ``reset`` (close the connection without
answering) and ``fail_count``: how many next chat requests get the fault (``status``, ``hang``,
``garbage`` or ``reset``); -1 means all of them. Once they are used up the faults are cleared
and requests succeed again. Setting a fault without ``fail_count`` sets it to -1.

Pure asyncio: one coroutine per connection and no thread per request, so thousands of slow
requests are in flight at once. HTTP/1.1 with keep-alive, ``Content-Length`` bodies only.
Standard library only, Python 3.9 compatible (the worker-side tests run it too)::

    python -m bridge.standin_llm --port 8000 --latency 0.2
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import http
import json
import logging
import signal
import socket
import struct
import sys
import threading
import time
import uuid
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Set, Tuple

logger = logging.getLogger("ray_executor.standin_llm")

MARKER = "[stand-in LLM, not a real model]"
REASONING = "Stand-in reasoning: no model ran; this text is fixed and says nothing."
ECHO_CHARS = 200
MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024
_READ_SIZE = 64 * 1024
_BACKLOG = 4096
_TRACEPARENTS_KEPT = 256
_FAULTS = ("status", "hang", "garbage", "reset")
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
                413: "invalid_request_error", 422: "invalid_request_error",
                429: "rate_limit_error", 503: "service_unavailable"}


class ControlError(ValueError):
    """A behaviour setting has an unknown name or a value of the wrong type."""


@dataclasses.dataclass
class Behaviour:
    """What the stand-in does with chat requests; shared by all of them."""

    latency: float = 0.0
    status: int = 200
    fail_count: int = -1
    retry_after: Optional[float] = None
    hang: bool = False
    garbage: bool = False
    reset: bool = False

    def faulty(self) -> bool:
        return self.status != 200 or self.hang or self.garbage or self.reset

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
    }
    if name not in valid:
        raise ControlError(f"unknown setting {name!r} (known: {', '.join(valid)})")
    if not valid[name]():
        raise ControlError(f"invalid value for {name}: {value!r}")
    return float(value) if name in ("latency", "retry_after") and value is not None else value


@dataclasses.dataclass
class Stats:
    """Counters of chat requests (other endpoints are not counted)."""

    requests: int = 0  # received
    in_flight: int = 0  # received, not yet answered or closed
    peak_in_flight: int = 0
    completed: int = 0  # answered with a chat completion
    errors: int = 0  # answered with an error status, garbage or a reset
    cancelled: int = 0  # the client went away before the answer


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_body(status: int, message: str) -> Dict[str, Any]:
    """OpenAI-style error JSON."""
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "code": status}}


# --- chat completions -------------------------------------------------------------------


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


def completion(request: Any, default_model: str) -> Dict[str, Any]:
    """The chat completion the stand-in answers to ``request`` (the decoded JSON body)."""
    if not isinstance(request, dict):
        raise _HttpError(400, "the body must be a JSON object")
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages or \
            not all(isinstance(m, dict) for m in messages):
        raise _HttpError(400, "'messages' must be a non-empty list of objects")
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
        content = json.dumps(value)
    else:
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


# --- HTTP -------------------------------------------------------------------------------


class _Connection:
    """One client connection with its own read buffer, so that watching for the client to go
    away (which reads) never loses the bytes of a pipelined next request."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buffer = bytearray()
        self.eof = False

    async def _fill(self) -> bool:
        if self.eof:
            return False
        try:
            data = await self.reader.read(_READ_SIZE)
        except OSError:  # ConnectionResetError and friends
            data = b""
        if not data:
            self.eof = True
            return False
        self.buffer += data
        return True

    async def read_head(self) -> Optional[bytes]:
        """The next request's head (without the blank line), or None at end of input."""
        while True:
            while self.buffer.startswith(b"\r\n"):  # stray CRLF between requests
                del self.buffer[:2]
            end = self.buffer.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self.buffer[:end])
                del self.buffer[:end + 4]
                return head
            if len(self.buffer) > MAX_HEAD_BYTES:
                raise _HttpError(431, "request head too large")
            if not await self._fill():
                return None

    async def read_body(self, length: int) -> Optional[bytes]:
        while len(self.buffer) < length:
            if not await self._fill():
                return None
        body = bytes(self.buffer[:length])
        del self.buffer[:length]
        return body

    async def gone(self) -> None:
        """Return once the client has closed the connection (EOF or reset)."""
        while await self._fill():
            if len(self.buffer) > MAX_HEAD_BYTES + MAX_BODY_BYTES:  # stop reading a flood
                await asyncio.get_running_loop().create_future()

    def reset(self) -> None:
        """Close the connection at once with a TCP reset, answering nothing."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def send(self, status: int, body: bytes, *, keep_alive: bool,
                   content_type: str = "application/json",
                   headers: Optional[Dict[str, str]] = None) -> bool:
        """Write one answer; False when the client is gone."""
        try:
            reason = http.HTTPStatus(status).phrase
        except ValueError:
            reason = "Error"
        lines = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {content_type}",
                 f"Content-Length: {len(body)}",
                 f"Connection: {'keep-alive' if keep_alive else 'close'}",
                 "Server: standin-llm"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        try:
            self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
            await self.writer.drain()
        except OSError:
            return False
        return True

    async def send_json(self, status: int, value: Any, *, keep_alive: bool,
                        headers: Optional[Dict[str, str]] = None) -> bool:
        return await self.send(status, json.dumps(value).encode(), keep_alive=keep_alive,
                               headers=headers)


def _parse_head(head: bytes) -> Tuple[str, str, str, Dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _HttpError(400, "malformed request line")
    headers: Dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise _HttpError(400, "malformed header line")
        headers[name.strip().lower()] = value.strip()
    return parts[0].upper(), parts[1].split("?", 1)[0], parts[2], headers


def _keep_alive(version: str, headers: Mapping[str, str]) -> bool:
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    return "keep-alive" in tokens if version == "HTTP/1.0" else "close" not in tokens


def _host_for_url(host: str) -> str:
    if host in ("", "0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _raise_fd_limit() -> None:
    """Thousands of concurrent connections need descriptors: raise the soft limit to the hard."""
    try:
        import resource
    except ImportError:  # not on Unix
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            logger.debug("could not raise the descriptor limit from %s", soft)


class StandinLLM:
    """The stand-in server; ``start()`` and ``stop()`` run on the caller's event loop."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, model: str = "standin",
                 latency: float = 0.0, status: int = 200, fail_count: int = -1,
                 retry_after: Optional[float] = None, hang: bool = False,
                 garbage: bool = False, reset: bool = False) -> None:
        self.host = host
        self.port = port
        self.model = model
        self._initial = Behaviour()
        self._initial.update({"latency": latency, "status": status, "retry_after": retry_after,
                              "hang": hang, "garbage": garbage, "reset": reset,
                              "fail_count": fail_count})
        self.behaviour = dataclasses.replace(self._initial)
        self.counters = Stats()
        self.traceparents: Deque[str] = collections.deque(maxlen=_TRACEPARENTS_KEPT)
        self._server: Optional[asyncio.AbstractServer] = None
        self._tasks: Set[asyncio.Task[Any]] = set()
        self._closing = False

    @property
    def url(self) -> str:
        return f"http://{_host_for_url(self.host)}:{self.port}"

    async def start(self) -> StandinLLM:
        _raise_fd_limit()
        self._closing = False
        self._server = await asyncio.start_server(self._serve, self.host, self.port,
                                                  backlog=_BACKLOG)
        self.port = int(self._server.sockets[0].getsockname()[1])
        logger.info("stand-in LLM (not a real model) listening at %s", self.url)
        return self

    async def stop(self) -> None:
        """Stop listening and close every connection (hanging requests included)."""
        server, self._server = self._server, None
        if server is None:
            return
        self._closing = True
        server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        close_clients = getattr(server, "close_clients", None)  # Python 3.13+
        if close_clients is not None:
            close_clients()
        try:
            await asyncio.wait_for(server.wait_closed(), 5)
        except asyncio.TimeoutError:
            logger.warning("stand-in LLM: connections still open after stop")
        logger.info("stand-in LLM at %s stopped", self.url)

    def control(self, **changes: Any) -> Dict[str, Any]:
        """Change the behaviour (call on the server's loop); returns the new behaviour."""
        self.behaviour.update(changes)
        logger.info("stand-in LLM behaviour: %s", dataclasses.asdict(self.behaviour))
        return dataclasses.asdict(self.behaviour)

    def reset(self) -> None:
        """Back to the behaviour given at start; counters zeroed (``in_flight`` is live)."""
        self.behaviour = dataclasses.replace(self._initial)
        in_flight = self.counters.in_flight
        self.counters = Stats(in_flight=in_flight, peak_in_flight=in_flight)
        self.traceparents.clear()

    def stats(self) -> Dict[str, int]:
        return dataclasses.asdict(self.counters)

    # --- connections ---

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        connection = _Connection(reader, writer)
        try:
            while not self._closing and await self._one_request(connection):
                pass
        except Exception:
            logger.exception("stand-in LLM: connection failed")
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    async def _one_request(self, conn: _Connection) -> bool:
        """Read and answer one request; False when the connection must close."""
        try:
            head = await conn.read_head()
            if head is None:
                return False
            method, path, version, headers = _parse_head(head)
            if "chunked" in headers.get("transfer-encoding", "").lower():
                raise _HttpError(411, "chunked bodies are not supported; send Content-Length")
            try:
                length = int(headers.get("content-length", "0"))
            except ValueError:
                raise _HttpError(400, "invalid Content-Length") from None
            if length < 0:
                raise _HttpError(400, "invalid Content-Length")
            if length > MAX_BODY_BYTES:
                raise _HttpError(413, f"body larger than {MAX_BODY_BYTES} bytes")
        except _HttpError as exc:
            await conn.send_json(exc.status, error_body(exc.status, exc.message),
                                 keep_alive=False)
            return False
        if length and headers.get("expect", "").lower() == "100-continue":
            conn.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = await conn.read_body(length)
        if body is None:
            return False
        keep_alive = _keep_alive(version, headers)
        if path == "/v1/chat/completions" and method == "POST":
            if headers.get("traceparent"):
                self.traceparents.append(headers["traceparent"])
            return await self._chat(conn, body, keep_alive) and keep_alive
        status, value = self._route(method, path, body)
        sent = await conn.send_json(status, value, keep_alive=keep_alive)
        return sent and keep_alive

    def _route(self, method: str, path: str, body: bytes) -> Tuple[int, Any]:
        """Every endpoint but chat completions: (status, JSON value)."""
        routes: Dict[Tuple[str, str], Callable[[], Any]] = {
            ("GET", "/health"): lambda: {"status": "ok"},
            ("GET", "/v1/models"): lambda: {"object": "list", "data": [
                {"id": self.model, "object": "model", "created": 0, "owned_by": "standin"}]},
            ("GET", "/stats"): lambda: {**self.stats(),
                                        "traceparents": list(self.traceparents)},
            ("GET", "/control"): lambda: dataclasses.asdict(self.behaviour),
            ("POST", "/control"): lambda: self._control_request(body),
            ("POST", "/control/reset"): self._reset_request,
        }
        handler = routes.get((method, path))
        if handler is None:
            if any(route_path == path for _, route_path in routes) or \
                    path == "/v1/chat/completions":
                return 405, error_body(405, f"method {method} not allowed on {path}")
            return 404, error_body(404, f"no route {path}")
        try:
            return 200, handler()
        except _HttpError as exc:
            return exc.status, error_body(exc.status, exc.message)

    def _control_request(self, body: bytes) -> Dict[str, Any]:
        try:
            changes = json.loads(body or b"{}")
        except ValueError:
            raise _HttpError(400, "the body must be JSON") from None
        if not isinstance(changes, dict):
            raise _HttpError(400, "the body must be a JSON object")
        try:
            return self.control(**changes)
        except ControlError as exc:
            raise _HttpError(400, str(exc)) from None

    def _reset_request(self) -> Dict[str, Any]:
        self.reset()
        return dataclasses.asdict(self.behaviour)

    def _take_fault(self) -> Optional[Behaviour]:
        """The fault this chat request gets, if any (uses up one of ``fail_count``)."""
        behaviour = self.behaviour
        if not behaviour.faulty() or behaviour.fail_count == 0:
            return None
        fault = dataclasses.replace(behaviour)
        if behaviour.fail_count > 0:
            behaviour.fail_count -= 1
            if behaviour.fail_count == 0:
                behaviour.clear_faults()
        return fault

    async def _chat(self, conn: _Connection, body: bytes, keep_alive: bool) -> bool:
        counters = self.counters
        counters.requests += 1
        counters.in_flight += 1
        counters.peak_in_flight = max(counters.peak_in_flight, counters.in_flight)
        try:
            latency = self.behaviour.latency
            fault = self._take_fault()
            wait = None if fault is not None and fault.hang else latency
            if (wait is None or wait > 0) and not await self._wait_unless_gone(conn, wait):
                self.counters.cancelled += 1
                return False
            if fault is not None and fault.reset:
                self.counters.errors += 1
                conn.reset()
                return False
            if fault is not None and fault.status != 200:
                headers = {} if fault.retry_after is None else \
                    {"Retry-After": f"{fault.retry_after:g}"}
                message = f"stand-in LLM: injected HTTP {fault.status}"
                sent = await conn.send_json(fault.status, error_body(fault.status, message),
                                            keep_alive=keep_alive, headers=headers)
                outcome = "errors"
            elif fault is not None and fault.garbage:
                sent = await conn.send(200, b"<html>stand-in garbage: this is not JSON",
                                       keep_alive=keep_alive)
                outcome = "errors"
            else:
                try:
                    request = json.loads(body)
                    answer = completion(request, self.model)
                except ValueError:
                    status, value, outcome = 400, error_body(400, "the body must be JSON"), \
                        "errors"
                except _HttpError as exc:
                    status, value, outcome = exc.status, error_body(exc.status, exc.message), \
                        "errors"
                else:
                    status, value, outcome = 200, answer, "completed"
                sent = await conn.send_json(status, value, keep_alive=keep_alive)
            if not sent:
                outcome = "cancelled"
            setattr(self.counters, outcome, getattr(self.counters, outcome) + 1)
            return sent
        finally:
            self.counters.in_flight -= 1

    @staticmethod
    async def _wait_unless_gone(conn: _Connection, seconds: Optional[float]) -> bool:
        """Wait ``seconds`` (None: forever); False if the client went away meanwhile."""
        watcher = asyncio.ensure_future(conn.gone())
        try:
            await asyncio.wait([watcher], timeout=seconds)
        finally:
            if not watcher.done():
                watcher.cancel()
                await asyncio.wait([watcher])  # no two reads of the stream at once
        return watcher.cancelled()  # cancelled by us: the wait ended with the client there


# --- running it -------------------------------------------------------------------------


class StandinThread:
    """A ``StandinLLM`` served by its own event loop in a daemon thread."""

    def __init__(self, server: StandinLLM, loop: asyncio.AbstractEventLoop,
                 thread: threading.Thread) -> None:
        self.server = server
        self.url = server.url
        self.port = server.port
        self._loop = loop
        self._thread = thread

    def _call(self, function: Callable[..., Any], **kwargs: Any) -> Any:
        async def call() -> Any:
            return function(**kwargs)

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(30)

    def control(self, **changes: Any) -> Dict[str, Any]:
        """Change the behaviour (same fields as ``POST /control``)."""
        return self._call(self.server.control, **changes)  # type: ignore[no-any-return]

    def reset(self) -> None:
        self._call(self.server.reset)

    def stats(self) -> Dict[str, int]:
        return self._call(self.server.stats)  # type: ignore[no-any-return]

    def traceparents(self) -> List[str]:
        """``traceparent`` headers of the last chat requests, oldest first."""
        return self._call(lambda: list(self.server.traceparents))  # type: ignore[no-any-return]

    def stop(self, timeout: float = 15.0) -> None:
        if not self._thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(timeout)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)

    def __enter__(self) -> StandinThread:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def run_in_thread(**kwargs: Any) -> StandinThread:
    """Start a ``StandinLLM(**kwargs)`` in a background thread; returns once it listens."""
    server = StandinLLM(**kwargs)  # invalid settings raise here, in the caller's thread
    loop = asyncio.new_event_loop()
    started = threading.Event()
    failure: List[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(server.start())
        except BaseException as exc:
            failure.append(exc)
            loop.close()
            return
        finally:
            started.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    thread = threading.Thread(target=run, name="standin-llm", daemon=True)
    thread.start()
    if not started.wait(30):
        raise RuntimeError("stand-in LLM did not start within 30 s")
    if failure:
        raise failure[0]
    return StandinThread(server, loop, thread)


async def _serve_until_signalled(server: StandinLLM) -> None:
    await server.start()
    print(f"stand-in LLM (not a real model) listening at {server.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bridge.standin_llm",
        description="OpenAI-compatible stand-in for vLLM (answers without any model).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--model", default="standin", help="name listed by /v1/models")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per answer")
    parser.add_argument("--status", type=int, default=200, help="non-200: answer this error")
    parser.add_argument("--fail-count", type=int, default=-1,
                        help="how many requests get the error (-1: all)")
    parser.add_argument("--retry-after", type=float, default=None,
                        help="Retry-After seconds on error answers")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        server = StandinLLM(args.host, args.port, model=args.model, latency=args.latency,
                            status=args.status, fail_count=args.fail_count,
                            retry_after=args.retry_after)
    except ControlError as exc:
        parser.error(str(exc))
    asyncio.run(_serve_until_signalled(server))
    return 0


if __name__ == "__main__":
    sys.exit(main())
