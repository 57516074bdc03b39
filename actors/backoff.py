"""Retry delays: exponential with full jitter, bounded, honouring a server's Retry-After.

Retryable job failures raise ``RetryJob`` (a ``dramatiq.Retry``), so Dramatiq's ``Retries``
middleware counts the attempt against ``max_retries`` and requeues the message with the delay
computed here. Failures that retrying cannot fix raise ``PermanentJobError``, which the job
kinds' actors declare in ``throws``: Dramatiq dead-letters them at once.
"""

from __future__ import annotations

import random
from typing import Optional

import dramatiq

from core.errors import ClassifiedError


class RetryJob(dramatiq.Retry, ClassifiedError):
    """Retry this job after ``delay`` ms; ``error_type`` says why (for the circuit breaker)."""

    def __init__(self, message: str, *, delay: int, error_type: str) -> None:
        dramatiq.Retry.__init__(self, message, delay=delay)
        ClassifiedError.__init__(self, message, error_type=error_type, retryable=True)


class PermanentJobError(ClassifiedError):
    """A job failed in a way retrying cannot fix."""

    retryable = False


def delay_ms(retry: int, *, minimum: float, maximum: float,
             retry_after: Optional[float] = None) -> int:
    """Delay before retry number ``retry`` (0-based), in ms.

    Full jitter: uniform in [0, min(maximum, minimum * 2**retry)], never below ``minimum``;
    a server's ``Retry-After`` (seconds) is a floor, capped at ``maximum``.
    """
    ceiling = min(maximum, minimum * (2 ** min(retry, 30)))
    seconds = max(minimum, random.uniform(0, ceiling))
    if retry_after:
        seconds = max(seconds, min(float(retry_after), maximum))
    return int(seconds * 1000)
