"""The stand-in LLM's HTTP/1.1 plumbing: one connection's reads and answers, request heads.

Just what ``harness.standin_llm`` needs: ``Content-Length`` request bodies, answers with a
``Content-Length`` or in chunks (a streamed answer), keep-alive, pipelined requests, a TCP
reset on demand, OpenAI-style error bodies. Standard library only, Python 3.9 compatible.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import logging
import socket
import struct
from typing import Any, Awaitable, Dict, Mapping, Optional, Tuple

logger = logging.getLogger("ray_executor.standin_llm")

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024
READ_SIZE = 64 * 1024
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
                413: "invalid_request_error", 422: "invalid_request_error",
                429: "rate_limit_error", 503: "service_unavailable"}


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_body(status: int, message: str) -> Dict[str, Any]:
    """OpenAI-style error JSON."""
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "code": status}}


class Connection:
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
            data = await self.reader.read(READ_SIZE)
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
                raise HttpError(431, "request head too large")
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

    async def wait_unless_gone(self, seconds: Optional[float],
                               until: Optional[Awaitable[Any]] = None) -> bool:
        """Wait ``seconds`` (None: forever) or until ``until`` is done; False if the client
        went away meanwhile."""
        watcher = asyncio.ensure_future(self.gone())
        waits = [watcher] if until is None else [watcher, asyncio.ensure_future(until)]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                if not wait.done():
                    wait.cancel()
                    await asyncio.wait([wait])  # no two reads of the stream at once
        return watcher.cancelled()  # cancelled by us: the wait ended with the client there

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
        head = _head(status, content_type, keep_alive,
                     {"Content-Length": str(len(body)), **(headers or {})})
        return await self._write(head + body)

    async def start_chunked(self, status: int, content_type: str, *, keep_alive: bool) -> bool:
        """Write the head of an answer whose body follows in chunks (``send_chunk``, then
        ``end_chunked``); False when the client is gone."""
        head = _head(status, content_type, keep_alive, {"Transfer-Encoding": "chunked",
                                                        "Cache-Control": "no-cache"})
        return await self._write(head)

    async def send_chunk(self, data: bytes) -> bool:
        """One chunk of a chunked body, sent at once; False when the client is gone."""
        return await self._write(b"%x\r\n%s\r\n" % (len(data), data)) if data else True

    async def end_chunked(self) -> bool:
        return await self._write(b"0\r\n\r\n")

    async def _write(self, data: bytes) -> bool:
        if self.writer.is_closing():
            return False
        try:
            self.writer.write(data)
            await self.writer.drain()
        except OSError:
            return False
        return True

    async def send_json(self, status: int, value: Any, *, keep_alive: bool,
                        headers: Optional[Dict[str, str]] = None) -> bool:
        return await self.send(status, json.dumps(value).encode(), keep_alive=keep_alive,
                               headers=headers)


def _head(status: int, content_type: str, keep_alive: bool,
          headers: Mapping[str, str]) -> bytes:
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = "Error"
    lines = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {content_type}",
             f"Connection: {'keep-alive' if keep_alive else 'close'}", "Server: standin-llm"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def parse_head(head: bytes) -> Tuple[str, str, str, Dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HttpError(400, "malformed request line")
    headers: Dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise HttpError(400, "malformed header line")
        headers[name.strip().lower()] = value.strip()
    return parts[0].upper(), parts[1].split("?", 1)[0], parts[2], headers


def keep_alive_wanted(version: str, headers: Mapping[str, str]) -> bool:
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    return "keep-alive" in tokens if version == "HTTP/1.0" else "close" not in tokens


def host_for_url(host: str) -> str:
    if host in ("", "0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def raise_fd_limit() -> None:
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
