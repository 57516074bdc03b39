"""Prometheus metrics of the worker processes (multiprocess mode).

Dramatiq's ``Prometheus`` middleware sets up the multiprocess directory after each process
boots and serves every process's samples from the master process on
``RAY_EXECUTOR_WORKER_METRICS_PORT``; the metrics here are created on first use, after that, so they
land in the same directory. Dramatiq's own message counters and durations come with it.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Optional

_lock = threading.Lock()
_metrics: Optional[SimpleNamespace] = None


def get() -> SimpleNamespace:
    global _metrics
    with _lock:
        if _metrics is None:
            import prometheus_client as prom

            _metrics = SimpleNamespace(
                jobs=prom.Counter("ray_executor_agent_jobs", "Agent job attempts by outcome.",
                                  ["kind", "outcome"]),
                job_seconds=prom.Histogram(
                    "ray_executor_agent_job_seconds", "Duration of one agent job attempt.",
                    ["kind"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
                                       600, 1800)),
                vllm_seconds=prom.Histogram(
                    "ray_executor_vllm_seconds", "vLLM chat completion latency seen on Ray.",
                    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)),
                vllm_ttft_seconds=prom.Histogram(
                    "ray_executor_vllm_time_to_first_token_seconds",
                    "Time from sending the streamed vLLM request to its first token, seen on "
                    "Ray.", ["endpoint", "model"],
                    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)),
                vllm_tokens_per_second=prom.Histogram(
                    "ray_executor_vllm_tokens_per_second",
                    "Completion tokens per second of a streamed vLLM answer, first token to "
                    "end.", ["endpoint", "model"],
                    buckets=(1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)),
                retries=prom.Counter("ray_executor_retries", "Retries by error type.",
                                     ["error_type"]),
                limiter_waits=prom.Counter(
                    "ray_executor_limiter_waits", "Jobs sent back for want of a slot or rate.",
                    ["reason"]),
                slots_in_use=prom.Gauge(
                    "ray_executor_limiter_slots_held",
                    "Concurrency slots this pod holds, by vLLM endpoint.", ["endpoint"],
                    multiprocess_mode="livesum"),
                circuit_open=prom.Counter(
                    "ray_executor_circuit_opened", "Times an endpoint's circuit opened.",
                    ["endpoint"]),
                circuit_waits=prom.Counter(
                    "ray_executor_circuit_waits", "Jobs sent back because a circuit was open."),
                ray_connected=prom.Gauge(
                    "ray_executor_ray_connected", "1 while every process holds its Ray client "
                    "connection (min over processes).", multiprocess_mode="livemin"),
                worker_ready=prom.Gauge(
                    "ray_executor_worker_ready", "1 while every live process has booted and "
                    "its broker heartbeat reaches Redis (min over processes); independent of "
                    "Ray, so a Ray outage does not make a pod unready.",
                    multiprocess_mode="livemin"),
            )
        return _metrics
