"""Tracing with OpenTelemetry, the standard way: the code uses only the OpenTelemetry API, and
the SDK is configured from the ``OTEL_*`` environment variables when it is installed.

- ``configure(service)`` installs a ``TracerProvider`` when ``opentelemetry-sdk`` is importable
  and an exporter or OTLP endpoint is configured (see its docstring): resource from
  ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES`` (``service`` when neither names one),
  sampler from ``OTEL_TRACES_SAMPLER``, exporters named by ``OTEL_TRACES_EXPORTER`` (default
  ``otlp``) and loaded from the ``opentelemetry_traces_exporter`` entry points, each reading its own
  ``OTEL_EXPORTER_*`` settings, behind a ``BatchSpanProcessor`` (``OTEL_BSP_*``). Without the SDK
  every span is a no-op and trace context still passes through.
- The W3C trace context (``traceparent`` and ``tracestate``) travels as a small dict, the
  *carrier*: gRPC metadata and NATS headers in, the deliberation record and the Dramatiq
  message options across Redis, NATS headers out, and the job's metadata to Ray and vLLM.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Mapping, Optional, Tuple

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

logger = logging.getLogger("ray_executor.tracing")

FIELDS = ("traceparent", "tracestate")


def configure(service: str) -> bool:
    """Install the SDK's tracer provider for this process, as described above, when asked to:
    ``OTEL_TRACES_EXPORTER`` or an OTLP endpoint (``OTEL_EXPORTER_OTLP_ENDPOINT``,
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set and ``OTEL_SDK_DISABLED`` is not ``true``.
    (The SDK alone would default to exporting to localhost:4318; an installed SDK with nothing
    configured stays silent here instead.) Returns whether spans are now exported."""
    env = os.environ
    asked = env.get("OTEL_TRACES_EXPORTER") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or \
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if not asked or env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = [name.strip() for name in
                 env.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if name.strip()]
    if not exporters or exporters == ["none"]:
        return False
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.util._importlib_metadata import entry_points
    except ImportError:  # API only: spans are no-ops, context still propagates
        return False
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") or \
        "service.name=" in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "") else \
        {SERVICE_NAME: service}
    provider = TracerProvider(resource=Resource.create(attributes))
    loaded = []
    for name in exporters:
        found = list(entry_points(group="opentelemetry_traces_exporter", name=_entry_point(name)))
        if not found:
            logger.warning("OTEL_TRACES_EXPORTER names %r (%s), which is not installed", name,
                           _entry_point(name))
            continue
        provider.add_span_processor(BatchSpanProcessor(found[0].load()()))
        loaded.append(name)
    if not loaded:
        return False
    trace.set_tracer_provider(provider)
    logger.info("tracing: exporting spans of %s with %s", service, ", ".join(loaded))
    return True


def _entry_point(exporter: str) -> str:
    """The entry point of an ``OTEL_TRACES_EXPORTER`` name. ``otlp`` means the OTLP exporter of
    the configured protocol (``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL``, ``http/protobuf`` by
    default as the specification says): the exporter packages register it as
    ``otlp_proto_http`` / ``otlp_proto_grpc``, and only the ``opentelemetry-exporter-otlp``
    meta-package adds a plain ``otlp`` name (for gRPC)."""
    if exporter != "otlp":
        return exporter
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or \
        os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    return "otlp_proto_grpc" if protocol.strip() == "grpc" else "otlp_proto_http"


def shutdown() -> None:
    """Flush and stop the exporters (a no-op without the SDK)."""
    stop = getattr(trace.get_tracer_provider(), "shutdown", None)
    if stop is not None:
        stop()


def recording() -> bool:
    """Whether spans are recorded: a tracer provider is installed (``configure``, or any other
    code's). Without one every span is a no-op, which still costs an extract, an inject and a
    context switch; the gRPC ingress then makes none and passes the caller's context on."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def carrier(source: Optional[Mapping[str, Any]]) -> Dict[str, str]:
    """The trace-context fields of ``source`` (headers, metadata, a record), as strings."""
    if not source:
        return {}
    return {key: str(source[key]) for key in FIELDS if source.get(key)}


def parent(source: Optional[Mapping[str, Any]]) -> otel_context.Context:
    """The context whose span is the remote parent named by ``source``'s trace fields."""
    return propagate.extract(carrier(source))


def current() -> Dict[str, str]:
    """The carrier of the current span (empty when no span is valid)."""
    out: Dict[str, str] = {}
    propagate.inject(out)
    return carrier(out)


def start(name: str, kind: trace.SpanKind, source: Optional[Mapping[str, Any]],
          attributes: Optional[Dict[str, Any]] = None) -> Tuple[trace.Span, Dict[str, str]]:
    """Start (not make current) a span named ``name`` whose parent is ``source``'s trace
    context, and return it with the carrier to pass on: the span's own context, or ``source``'s
    unchanged when spans are no-ops (no SDK), so the caller's trace still goes through. The
    caller ends the span."""
    span = trace.get_tracer("ray_executor").start_span(
        name, context=parent(source), kind=kind, attributes=attributes)
    out: Dict[str, str] = {}
    propagate.inject(out, context=trace.set_span_in_context(span))
    return span, carrier(out) or carrier(source)
