"""Server-sent events (``text/event-stream``) decoded as they arrive: bytes in, events' data out.

Just what vLLM's streamed chat completions need of the format (WHATWG HTML, "server-sent
events"): a line ends in LF, CRLF or CR; a ``data:`` line's value (one space after the colon
dropped) is added to the event, several joined by LF; a blank line dispatches the event;
comment lines (``:`` first) and the other fields (``event``, ``id``, ``retry``) are ignored.
An event still open when the stream ends is never dispatched (the format says so).

Python 3.9, standard library only (runs on the Ray cluster).
"""

from __future__ import annotations

import re
from typing import List

_LINE_END = re.compile(rb"\r\n|\r|\n")
MAX_EVENT_BYTES = 16 * 1024 * 1024  # far beyond any chunk of a chat completion


class EventTooLarge(ValueError):
    """One event (or one line) grew beyond the decoder's ``max_event_bytes``."""


class SSEDecoder:
    """Decodes one event stream fed in pieces of any size (a line or a UTF-8 character may be
    split between two pieces).

    Parameters:
      max_event_bytes: the most bytes one event may hold; beyond it ``feed`` raises
        ``EventTooLarge`` instead of buffering without end.
    """

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self.max_event_bytes = max_event_bytes
        self._buffer = bytearray()  # bytes of the line not yet ended
        self._data: List[str] = []  # data lines of the event not yet dispatched
        self._size = 0  # bytes in _data

    def feed(self, chunk: bytes) -> List[str]:
        """The data of every event that ``chunk`` completes, in order."""
        self._buffer += chunk
        events: List[str] = []
        position = 0
        while True:
            end = _LINE_END.search(self._buffer, position)
            if end is None:
                break
            if end.group() == b"\r" and end.end() == len(self._buffer):
                break  # maybe the CR of a CRLF whose LF comes in the next piece
            self._line(bytes(self._buffer[position:end.start()]), events)
            position = end.end()
        del self._buffer[:position]
        if len(self._buffer) + self._size > self.max_event_bytes:
            raise EventTooLarge(f"an event of more than {self.max_event_bytes} bytes")
        return events

    def _line(self, line: bytes, events: List[str]) -> None:
        if not line:
            if self._data:
                events.append("\n".join(self._data))
            self._data, self._size = [], 0
            return
        if line.startswith(b":"):  # a comment (servers send them to keep a connection open)
            return
        field, _, value = line.partition(b":")
        if field != b"data":
            return
        if value.startswith(b" "):
            value = value[1:]
        self._size += len(value) + 1
        if self._size > self.max_event_bytes:
            raise EventTooLarge(f"an event of more than {self.max_event_bytes} bytes")
        self._data.append(value.decode("utf-8", "replace"))
