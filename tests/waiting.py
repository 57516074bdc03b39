"""Waiting on a state instead of sleeping: poll a check until it holds, with a generous
deadline, and fail saying what was still missing. Shared by both suites (Python 3.9)."""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any, Callable


def until(check: Callable[[], Any], what: str, timeout: float = 60.0,
          interval: float = 0.05) -> Any:
    """Return ``check()``'s first truthy value; raise AssertionError naming ``what`` after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} "
                                 f"(last seen: {value!r})")
        time.sleep(interval)


async def until_async(check: Callable[[], Any], what: str, timeout: float = 60.0,
                      interval: float = 0.05) -> Any:
    """``until`` for a loop: ``check`` may return a value or an awaitable of one."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} "
                                 f"(last seen: {value!r})")
        await asyncio.sleep(interval)
