"""The Dramatiq actor of each job kind (``cluster.kinds``): one attempt of one agent job.

``declare_actors`` declares an actor named after each kind on the agent-job queue. For each message
the actor: asks the state whether to run (not when the deliberation was cancelled or the agent
already finished), submits the job to this process's runner for the kind — one long-lived
async Ray actor per kind and worker process, declared with the kind's Ray resources, so no
Ray actor is created per job and HTTP connections are reused — waits for it within the job's
time limit (cancelling the Ray task when it passes or when the deliberation is cancelled),
records the outcome and publishes it to NATS through the outbox. A streamed answer's partial
output is published on the way (``actors.progress``).

Tracing (``core.tracing``): the W3C trace context (``traceparent``, ``tracestate``) the
ingress put in the message options is the parent of a span ``ray_executor.agent_job`` around
the attempt; the span's context goes to the Ray job in its metadata and from there to vLLM as
HTTP headers, and every log line of the attempt carries the ``traceparent``. Spans are exported
when the operator installs the OpenTelemetry SDK (the ``tracing`` extra) and sets ``OTEL_*``;
otherwise they are no-ops and the incoming context passes through unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Dict, Optional, Type, TypeVar

import dramatiq
from dramatiq.middleware import CurrentMessage
from opentelemetry import trace

from actors import backoff, metrics
from actors.backoff import PermanentJobError, RetryJob
from actors.limits import ConcurrencyLimiter
from actors.progress import ProgressPublisher
from actors.runtime import WorkerRuntime
from cluster.kinds import KINDS, JobKind
from core import contract, tracing
from core.contract import AgentJob
from core.errors import CANCELLED, RAY_UNAVAILABLE, classify
from core.logs import redact

logger = logging.getLogger("ray_executor.jobs")
tracer = trace.get_tracer("ray_executor.jobs")

# The job's own timeout cancels its Ray task; Dramatiq's TimeLimit is only a backstop past
# the longest allowed timeout (24 h), since it cannot stop a thread blocked in a Ray call.
TIME_LIMIT_BACKSTOP_MS = 25 * 3600 * 1000
# How often a job may find Ray unreachable before that counts against its retries (with
# backoff up to RAY_EXECUTOR_BACKOFF_MAX, the default 120 s, this waits out long outages).
MAX_RAY_WAITS = 40


def declare_actors(broker: dramatiq.Broker) -> None:
    """Declare a Dramatiq actor for every registered kind on ``broker`` (the worker's).

    Kept apart from ``cluster.kinds.job_kind`` so importing a kind's module (as Ray does on
    the cluster to unpickle its function) declares nothing.
    """
    runtime = _middleware(broker, WorkerRuntime)
    if runtime is None:
        raise RuntimeError("job kinds need a broker with the WorkerRuntime middleware "
                           "(actors.broker.make_broker)")
    limiter = _middleware(broker, ConcurrencyLimiter)
    for kind in KINDS.values():
        if kind.name in broker.actors:
            continue

        def run_job(_kind: JobKind = kind, **kwargs: Any) -> None:
            execute(runtime, _kind, AgentJob.from_kwargs(kwargs), limiter)

        run_job.__name__ = kind.name
        dramatiq.actor(run_job, actor_name=kind.name, queue_name=runtime.settings.queue,
                       broker=broker, throws=(PermanentJobError,),
                       time_limit=TIME_LIMIT_BACKSTOP_MS)


def execute(runtime: WorkerRuntime, kind: JobKind, job: AgentJob,
            limiter: Optional[ConcurrencyLimiter] = None) -> None:
    """One attempt of one job (the body of every job kind's actor) on the vLLM endpoint
    ``limiter`` chose for it (``actors.limits``), whose slot is freed as soon as the Ray call
    ends."""
    message = CurrentMessage.get_current_message()
    choice = limiter.chosen(message.message_id) if limiter and message else None
    if choice is not None and choice.url != job.vllm_url:  # another endpoint of its pool
        job = dataclasses.replace(job, vllm_url=choice.url)
    retry = int(message.options.get("retries", 0)) if message else 0
    received = tracing.carrier(message.options) if message else {}
    ray_waits = int(message.options.get("ray_waits", 0)) if message else 0
    log = {"deliberation_id": job.deliberation_id, "agent_id": job.agent_id,
           "task_id": job.task_id, "message_id": message.message_id if message else ""}
    if received.get("traceparent"):
        log["traceparent"] = received["traceparent"]
    if ray_waits:
        log["ray_waits"] = ray_waits
    attributes = {"ray_executor.deliberation_id": job.deliberation_id,
                  "ray_executor.task_id": job.task_id, "ray_executor.agent_id": job.agent_id,
                  "ray_executor.kind": kind.name, "ray_executor.attempt": retry + 1,
                  "messaging.message.id": log["message_id"]}
    with tracer.start_as_current_span(
            "ray_executor.agent_job", context=tracing.parent(received),
            kind=trace.SpanKind.CONSUMER, attributes=attributes):
        try:
            _attempt(runtime, kind, job, received, retry, log,
                     lambda: limiter.release(message.message_id) if limiter and message else None)
        except WaitForRay as wait:
            # Ray being away is not the job's fault: put it back for later without spending
            # its retries (Dramatiq acks this delivery; the copy keeps the retry count).
            assert message is not None
            dramatiq.get_broker().enqueue(
                message.copy(options={"ray_waits": wait.waits + 1}), delay=wait.delay)
            logger.warning("Ray unavailable (%s); job back in %d ms", wait, wait.delay,
                           extra=log)


class WaitForRay(Exception):
    """Raised on the loop when Ray is unreachable; ``execute`` requeues the message."""

    def __init__(self, message: str, *, waits: int, delay: int) -> None:
        super().__init__(message)
        self.waits = waits
        self.delay = delay


def _traced(job: AgentJob, received: Dict[str, str]) -> AgentJob:
    """``job`` carrying the current span's trace context (else the message's, when spans are
    no-ops) in its metadata, for the Ray side and vLLM."""
    context = tracing.current() or received
    return dataclasses.replace(job, metadata={**job.metadata, **context}) if context else job


def _attempt(runtime: WorkerRuntime, kind: JobKind, job: AgentJob, received: Dict[str, str],
             retry: int, log: Dict[str, Any], release_slot: Callable[[], None]) -> None:
    # One hand-off to the process's event loop for the whole attempt: the thread only waits,
    # so in-flight jobs cost no GIL wake-ups per step (state, Ray, NATS all run on the loop).
    traced = _traced(job, received)
    runtime.run(_attempt_on_loop(runtime, kind, job, traced, retry, log, release_slot),
                timeout=None)


async def _attempt_on_loop(runtime: WorkerRuntime, kind: JobKind, job: AgentJob,
                           traced: AgentJob, retry: int, log: Dict[str, Any],
                           release_slot: Callable[[], None]) -> None:
    store = runtime.store
    assert store is not None
    verdict, attempt = await store.start(job, retry)
    if verdict != "run":
        logger.info("skipping job: %s", verdict, extra=log)
        if verdict == "done":  # a redelivery: make sure its events went out
            await _publish(runtime, job)
        return
    assert runtime.outbox is not None
    progress = ProgressPublisher(store, runtime.outbox, traced, attempt) \
        if runtime.settings.progress_interval_ms > 0 else None
    started = time.monotonic()
    try:
        try:
            result = await runtime.runners.run(
                kind, traced, is_cancelled=lambda: store.is_cancelled(job.deliberation_id),
                on_progress=progress)
        finally:
            release_slot()  # the vLLM call is over: the next job may start while this records
            if progress is not None:  # partial output goes out before the outcome
                await progress.close()
    except Exception as exc:
        await _failed(runtime, job, exc, attempt, retry, started, log)
        return
    elapsed = time.monotonic() - started
    outcome = {"status": contract.COMPLETED, "attempts": attempt, "result": result,
               "duration_ms": int(elapsed * 1000)}
    measured = metrics.get()
    measured.job_seconds.labels(kind.name).observe(elapsed)
    measured.jobs.labels(kind.name, "completed").inc()
    if isinstance(result, dict):
        _observe_vllm(measured, job, result)
    await _record(runtime, job, outcome, log)


def _observe_vllm(measured: Any, job: AgentJob, result: Dict[str, Any]) -> None:
    """The vLLM call's latency, time to first token and tokens per second (the last two by
    the endpoint the job took, as configured, credentials masked, and the model that
    answered)."""
    if result.get("latency_ms"):
        measured.vllm_seconds.observe(result["latency_ms"] / 1000)
    labels = (redact(job.vllm_url), str(result.get("model") or job.model))
    if isinstance(result.get("ttft_ms"), (int, float)) and result["ttft_ms"] > 0:
        measured.vllm_ttft_seconds.labels(*labels).observe(result["ttft_ms"] / 1000)
    if isinstance(result.get("tokens_per_second"), (int, float)) and \
            result["tokens_per_second"] > 0:
        measured.vllm_tokens_per_second.labels(*labels).observe(result["tokens_per_second"])


async def _failed(runtime: WorkerRuntime, job: AgentJob, exc: Exception, attempt: int,
                  retry: int, started: float, log: Dict[str, Any]) -> None:
    error = classify(exc)
    error_type = error.error_type
    if error_type == CANCELLED:
        logger.info("job cancelled with its deliberation", extra=log)
        return
    retryable = error.retryable
    waits = int(log.get("ray_waits", 0))
    if error_type == RAY_UNAVAILABLE and waits < MAX_RAY_WAITS:
        settings = runtime.settings
        raise WaitForRay(str(exc), waits=waits, delay=backoff.delay_ms(
            waits, minimum=settings.backoff_min, maximum=settings.backoff_max))
    if retryable and retry < job.max_retries:
        settings = runtime.settings
        delay = backoff.delay_ms(retry, minimum=settings.backoff_min,
                                 maximum=settings.backoff_max,
                                 retry_after=error.retry_after)
        logger.warning("attempt %d failed (%s: %s); retry in %d ms", attempt, error_type, exc,
                       delay, extra=log)
        metrics.get().retries.labels(error_type).inc()
        metrics.get().jobs.labels(job.kind, "retried").inc()
        raise RetryJob(f"{error_type}: {exc}", delay=delay, error_type=error_type) from exc
    outcome = {"status": contract.FAILED, "attempts": attempt, "error": str(exc)[:2000],
               "error_type": error_type, "retryable": retryable,
               "duration_ms": int((time.monotonic() - started) * 1000)}
    metrics.get().jobs.labels(job.kind, "failed").inc()
    await _record(runtime, job, outcome, log)
    raise PermanentJobError(f"{error_type}: {exc}", error_type=error_type) from exc


async def _record(runtime: WorkerRuntime, job: AgentJob, outcome: Dict[str, Any],
                  log: Dict[str, Any]) -> None:
    store = runtime.store
    assert store is not None
    finished = await store.finish(job, outcome)
    logger.debug("agent %s (%s)%s", outcome["status"], finished.what,
                 f"; deliberation {finished.final}" if finished.final else "", extra=log)
    outbox = runtime.outbox
    assert outbox is not None
    if finished.record is not None:
        await outbox.publish_finished(job.agent_id, finished)
    elif finished.what == "duplicate":  # a redelivery: make sure its events went out
        await _publish(runtime, job)


async def _publish(runtime: WorkerRuntime, job: AgentJob) -> None:
    """Publish whatever outbox entries the job's agent (and its deliberation) still hold."""
    outbox = runtime.outbox
    assert outbox is not None
    await outbox.publish([contract.event_id(job.deliberation_id, status, agent_id)
                          for status in contract.FINAL_STATUSES
                          for agent_id in (job.agent_id, "")])


M = TypeVar("M", bound=dramatiq.Middleware)


def _middleware(broker: dramatiq.Broker, kind: Type[M]) -> Optional[M]:
    return next((m for m in broker.middleware if isinstance(m, kind)), None)

