"""Classified errors: the one base of every error that crosses a boundary.

An error raised on the Ray cluster and re-raised in a worker, a worker's outcome read by its
middleware, a state error answered by the ingress: each says what kind of failure it is
(``error_type``, published in ``agent.response.failed``), whether trying again may help
(``retryable``) and how long the other side asked to wait (``retry_after``, seconds). Nobody
reads these by duck typing: ``isinstance(error, ClassifiedError)``.

A ``ClassifiedError`` pickles with its attributes whatever its subclass's ``__init__`` takes,
so it survives Ray's trip from the cluster back to the worker.

Standard library only, Python 3.9 compatible: the cluster side imports it.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Type

# Error types of a vLLM call (``cluster.vllm``), as published.
RATE_LIMITED = "rate_limited"  # HTTP 429
UNAVAILABLE = "unavailable"  # HTTP 503
SERVER_ERROR = "server_error"  # other 5xx
TIMEOUT = "timeout"  # no answer in time (the call's or the job's own time limit)
CONNECTION = "connection"  # refused, reset, DNS
BAD_REQUEST = "bad_request"  # other 4xx
INVALID_RESPONSE = "invalid_response"  # not the JSON we asked for
INVALID_PROMPT_TEMPLATE = "invalid_prompt_template"
INVALID_REQUEST = "invalid_request"  # the job's own parameters cannot be sent
# Error types of the job's life around the call.
JOB_ERROR = "job_error"  # the job's code raised an error it did not classify
CANCELLED = "cancelled"  # its deliberation was cancelled
RAY_UNAVAILABLE = "ray_unavailable"  # the Ray connection, node or worker went away
STATE_UNAVAILABLE = "state_unavailable"  # Redis could not be reached

# The endpoint's fault, not the request's: retried by default, and counted by the circuit
# breaker of the endpoint.
SERVER_SIDE = frozenset({RATE_LIMITED, UNAVAILABLE, SERVER_ERROR, TIMEOUT, CONNECTION})


class ClassifiedError(Exception):
    """An error that says what it is.

    Parameters:
      message: what happened, for people.
      error_type: overrides the class's ``error_type``.
      retryable: overrides the default (the class's, else whether the type is server-side).
      retry_after: seconds the other side asked us to wait, when it said.
    """

    error_type = JOB_ERROR
    retryable: Optional[bool] = None  # None: SERVER_SIDE decides

    def __init__(self, message: str = "", *, error_type: Optional[str] = None,
                 retryable: Optional[bool] = None, retry_after: Optional[float] = None) -> None:
        super().__init__(message)
        self.message = message
        if error_type is not None:
            self.error_type = error_type
        if retryable is None:
            retryable = type(self).retryable
        self.retryable = self.error_type in SERVER_SIDE if retryable is None else bool(retryable)
        self.retry_after = retry_after

    def __str__(self) -> str:
        return self.message or self.error_type

    def __reduce__(self) -> Tuple[Any, ...]:
        return (_restore, (type(self), self.args, dict(self.__dict__)))


def _restore(cls: Type[ClassifiedError], args: Tuple[Any, ...],
             state: Dict[str, Any]) -> ClassifiedError:
    """Unpickle without calling the subclass's ``__init__`` (its signature may differ)."""
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


class JobTimeout(ClassifiedError):
    """The job's own time limit passed; its Ray task was cancelled."""

    error_type = TIMEOUT
    retryable = False


class JobCancelled(ClassifiedError):
    """The job's deliberation was cancelled while it ran."""

    error_type = CANCELLED
    retryable = False


class JobError(ClassifiedError):
    """The job's own code raised an error it did not classify: not retried."""

    error_type = JOB_ERROR
    retryable = False


class RayLost(ClassifiedError):
    """The Ray client connection dropped or a Ray node or worker died under the job."""

    error_type = RAY_UNAVAILABLE
    retryable = True


class RunnerUnplaced(ClassifiedError):
    """No Ray node could take the job's runner in time, e.g. none advertises the route's
    ``vllm.node_resource``: the endpoint is out of reach, so it counts as ``unavailable``."""

    error_type = UNAVAILABLE
    retryable = True


class StateUnavailable(ClassifiedError, ConnectionError):
    """Redis could not be reached; nothing was changed."""

    error_type = STATE_UNAVAILABLE
    retryable = True


class LLMError(ClassifiedError):
    """A failed vLLM call, classified (``core.errors``: rate_limited for 429, unavailable for
    503, server_error for other 5xx, bad_request for other 4xx, timeout, connection,
    invalid_response, invalid_prompt_template, invalid_request). ``retry_after`` is the
    server's ``Retry-After`` in seconds when it sent one; ``status`` its HTTP status."""

    def __init__(self, message: str = "", error_type: str = INVALID_RESPONSE,
                 retryable: Optional[bool] = None, status: Optional[int] = None,
                 retry_after: Optional[float] = None) -> None:
        super().__init__(message, error_type=error_type, retryable=retryable,
                         retry_after=retry_after)
        self.status = status

    def __repr__(self) -> str:
        return (f"LLMError({self.message!r}, error_type={self.error_type!r}, "
                f"retryable={self.retryable}, status={self.status}, "
                f"retry_after={self.retry_after})")


def classify(error: BaseException) -> ClassifiedError:
    """``error`` itself when classified, else a ``JobError`` naming it."""
    if isinstance(error, ClassifiedError):
        return error
    return JobError(f"{type(error).__name__}: {error}")
