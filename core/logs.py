"""Log setup: JSON lines for deployments, human-readable text for the embedded run.

Fields named in ``CONTEXT_FIELDS`` (passed with ``extra=``) appear on every line that
concerns them, as keys of the JSON object or as ``key=value`` in text.

Secrets stay out of the logs: both formatters pass the message and any traceback through
``redact`` (the credentials of URLs such as ``redis://:password@host`` or
``nats://token@host``, and ``Bearer`` tokens), and code logging a configured address logs
``redact(url)`` in the first place.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import Any, Dict

CONTEXT_FIELDS = ("deliberation_id", "task_id", "agent_id", "message_id", "traceparent")

# Greedy up to the last "@" of the word: a password may hold "/" or an unencoded "@".
_URL_CREDENTIALS = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)[^\s'\"<>]+@")
_BEARER = re.compile(r"(?P<scheme>\bBearer\s+)[^\s'\",]+", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with URL credentials (``user:password@``, ``token@``) and ``Bearer`` tokens
    replaced by ``***``."""
    if "@" in text:
        text = _URL_CREDENTIALS.sub(r"\g<scheme>***@", text)
    if "earer" in text:
        text = _BEARER.sub(r"\g<scheme>***", text)
    return text


def message_context(message: Any) -> Dict[str, str]:
    """The ``extra=`` of a log line about one agent-job message (a Dramatiq ``Message``):
    its deliberation, task, agent, message id and ``traceparent``."""
    kwargs = getattr(message, "kwargs", None) or {}
    context = {key: str(kwargs[key]) for key in ("deliberation_id", "task_id", "agent_id")
               if kwargs.get(key)}
    context["message_id"] = str(getattr(message, "message_id", ""))
    traceparent = (getattr(message, "options", None) or {}).get("traceparent")
    if traceparent:
        context["traceparent"] = str(traceparent)
    return context


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
            "process": record.process,
        }
        data.update({k: getattr(record, k) for k in CONTEXT_FIELDS if hasattr(record, k)})
        if record.exc_info:
            data["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(data, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        context = " ".join(f"{k}={getattr(record, k)}" for k in CONTEXT_FIELDS
                           if hasattr(record, k))
        line = redact(super().format(record))
        return f"{line} [{context}]" if context else line


def configure(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
