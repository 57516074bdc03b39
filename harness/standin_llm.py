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

Behaviour fields (``harness.standin_behaviour.Behaviour`` says each): ``latency``, the faults
``status`` (with ``retry_after``), ``hang``, ``garbage``, ``reset`` and, of streamed answers,
``break_after`` and ``error_after``, each for the next ``fail_count`` chat requests (-1: all),
``hold``, ``content``, and how an answer is streamed: ``stream``, ``piece_chars``,
``piece_delay``. A request with ``"stream": true`` gets the answer it would get whole as
vLLM's server-sent events (``harness.standin_stream``); ``GET /stats`` lists the
``temperature``, ``response_format`` and ``stream`` asked for (``sampling``).

Pure asyncio: one coroutine per connection and no thread per request, so thousands of slow
requests are in flight at once. HTTP/1.1 with keep-alive, ``Content-Length`` request bodies.
Standard library only, Python 3.9 compatible (the worker-side tests run it too). The
behaviour and the answers' bodies live in ``harness.standin_behaviour``, the streamed answers
in ``harness.standin_stream``, the HTTP/1.1 plumbing in ``harness.standin_http``; what stays
here (the server, its control API and its command line) is one unit that tests drive as a
whole::

    python -m harness.standin_llm --port 8000 --latency 0.2
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import logging
import signal
import sys
import threading
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple

from harness.standin_behaviour import Behaviour, ControlError, Stats, completion
from harness.standin_http import (
    MAX_BODY_BYTES,
    Connection,
    HttpError,
    error_body,
    host_for_url,
    keep_alive_wanted,
    parse_head,
    raise_fd_limit,
)
from harness.standin_stream import (
    GARBAGE,
    include_usage,
    send_garbage_stream,
    send_stream,
    wants_stream,
)

logger = logging.getLogger("ray_executor.standin_llm")

_BACKLOG = 4096
_TRACEPARENTS_KEPT = 256


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
        # temperature and response_format of the last chat requests: what a test asks for
        self.sampling: Deque[Dict[str, Any]] = collections.deque(maxlen=_TRACEPARENTS_KEPT)
        self._server: Optional[asyncio.AbstractServer] = None
        self._tasks: Set[asyncio.Task[Any]] = set()
        self._closing = False
        self._released: Optional[asyncio.Event] = None  # set while requests are not held
        self._places: Optional[asyncio.Condition] = None  # of the capacity's places

    @property
    def url(self) -> str:
        return f"http://{host_for_url(self.host)}:{self.port}"

    async def start(self) -> StandinLLM:
        raise_fd_limit()
        self._closing = False
        self._released = asyncio.Event()  # made on the server's loop (Python 3.9 binds it)
        self._places = asyncio.Condition()
        self._sync_hold()
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
        self._sync_hold()
        logger.info("stand-in LLM behaviour: %s", dataclasses.asdict(self.behaviour))
        return dataclasses.asdict(self.behaviour)

    def reset(self) -> None:
        """Back to the behaviour given at start; counters zeroed (``in_flight`` is live)."""
        self.behaviour = dataclasses.replace(self._initial)
        self._sync_hold()
        in_flight, serving = self.counters.in_flight, self.counters.serving
        self.counters = Stats(in_flight=in_flight, peak_in_flight=in_flight, serving=serving,
                              peak_serving=serving)
        self.traceparents.clear()
        self.sampling.clear()

    def stats(self) -> Dict[str, int]:
        return dataclasses.asdict(self.counters)

    def _sync_hold(self) -> None:
        if self._released is not None:
            (self._released.clear if self.behaviour.hold else self._released.set)()

    # --- connections ---

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        connection = Connection(reader, writer)
        try:
            while not self._closing and await self._one_request(connection):
                pass
        except Exception:
            logger.exception("stand-in LLM: connection failed")
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    async def _one_request(self, conn: Connection) -> bool:
        """Read and answer one request; False when the connection must close."""
        try:
            head = await conn.read_head()
            if head is None:
                return False
            method, path, version, headers = parse_head(head)
            if "chunked" in headers.get("transfer-encoding", "").lower():
                raise HttpError(411, "chunked bodies are not supported; send Content-Length")
            try:
                length = int(headers.get("content-length", "0"))
            except ValueError:
                raise HttpError(400, "invalid Content-Length") from None
            if length < 0:
                raise HttpError(400, "invalid Content-Length")
            if length > MAX_BODY_BYTES:
                raise HttpError(413, f"body larger than {MAX_BODY_BYTES} bytes")
        except HttpError as exc:
            await conn.send_json(exc.status, error_body(exc.status, exc.message),
                                 keep_alive=False)
            return False
        if length and headers.get("expect", "").lower() == "100-continue":
            conn.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = await conn.read_body(length)
        if body is None:
            return False
        keep_alive = keep_alive_wanted(version, headers)
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
                                        "traceparents": list(self.traceparents),
                                        "sampling": list(self.sampling)},
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
        except HttpError as exc:
            return exc.status, error_body(exc.status, exc.message)

    def _control_request(self, body: bytes) -> Dict[str, Any]:
        try:
            changes = json.loads(body or b"{}")
        except ValueError:
            raise HttpError(400, "the body must be JSON") from None
        if not isinstance(changes, dict):
            raise HttpError(400, "the body must be a JSON object")
        try:
            return self.control(**changes)
        except ControlError as exc:
            raise HttpError(400, str(exc)) from None

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

    async def _chat(self, conn: Connection, body: bytes, keep_alive: bool) -> bool:
        counters = self.counters
        counters.requests += 1
        counters.in_flight += 1
        counters.peak_in_flight = max(counters.peak_in_flight, counters.in_flight)
        placed = False
        try:
            if self.behaviour.hold and self._released is not None and \
                    not await conn.wait_unless_gone(None, self._released.wait()):
                self.counters.cancelled += 1
                return False
            if self.behaviour.capacity:
                placed = await self._place()
            latency = self.behaviour.latency
            fault = self._take_fault()
            wait = None if fault is not None and fault.hang else latency
            if (wait is None or wait > 0) and not await conn.wait_unless_gone(wait):
                self.counters.cancelled += 1
                return False
            if fault is not None and fault.reset:
                self.counters.errors += 1
                conn.reset()
                return False
            request = _decoded(body)
            if fault is not None and fault.status != 200:
                headers = {} if fault.retry_after is None else \
                    {"Retry-After": f"{fault.retry_after:g}"}
                message = f"stand-in LLM: injected HTTP {fault.status}"
                sent = await conn.send_json(fault.status, error_body(fault.status, message),
                                            keep_alive=keep_alive, headers=headers)
                outcome = "errors"
            elif fault is not None and fault.garbage:
                sent = await (send_garbage_stream(conn, keep_alive=keep_alive)
                              if wants_stream(request) else
                              conn.send(200, GARBAGE, keep_alive=keep_alive))
                outcome = "errors"
            else:
                status, value, outcome = self._answer(request)
                if status == 200 and wants_stream(request) and self.behaviour.stream:
                    outcome = await send_stream(
                        conn, value, usage=include_usage(request), keep_alive=keep_alive,
                        piece_chars=self.behaviour.piece_chars,
                        piece_delay=self.behaviour.piece_delay,
                        break_after=fault.break_after if fault is not None else None,
                        error_after=fault.error_after if fault is not None else None,
                        pause=conn.wait_unless_gone)
                    sent = outcome != "cancelled"
                else:
                    sent = await conn.send_json(status, value, keep_alive=keep_alive)
            if not sent:
                outcome = "cancelled"
            setattr(self.counters, outcome, getattr(self.counters, outcome) + 1)
            return sent
        finally:
            self.counters.in_flight -= 1
            if placed:
                await self._leave()

    async def _place(self) -> bool:
        """Wait for one of ``capacity``'s places and take it."""
        assert self._places is not None
        async with self._places:
            await self._places.wait_for(lambda: not self.behaviour.capacity
                                        or self.counters.serving < self.behaviour.capacity)
            counters = self.counters
            counters.serving += 1
            counters.peak_serving = max(counters.peak_serving, counters.serving)
        return True

    async def _leave(self) -> None:
        assert self._places is not None
        async with self._places:
            self.counters.serving -= 1
            self._places.notify()

    def _answer(self, request: Any) -> Tuple[int, Any, str]:
        """(status, JSON value, outcome) of a chat request: its decoded body, None when the
        body is not JSON."""
        if request is None:
            return 400, error_body(400, "the body must be JSON"), "errors"
        if isinstance(request, dict):
            self.sampling.append({key: request.get(key) for key in
                                  ("temperature", "response_format", "stream")})
        try:
            return 200, completion(request, self.model, self.behaviour.content), "completed"
        except HttpError as exc:
            return exc.status, error_body(exc.status, exc.message), "errors"


def _decoded(body: bytes) -> Any:
    """The JSON value of a request body, None when it is not JSON."""
    try:
        return json.loads(body)
    except ValueError:
        return None


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

    def sampling(self) -> List[Dict[str, Any]]:
        """``temperature``, ``response_format`` and ``stream`` of the last chat requests,
        oldest first."""
        return self._call(lambda: list(self.server.sampling))  # type: ignore[no-any-return]

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
        prog="python -m harness.standin_llm",
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
