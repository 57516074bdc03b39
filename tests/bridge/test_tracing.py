"""OpenTelemetry spans across real processes: the bridge and the worker export their spans
with the SDK configured from ``OTEL_*`` (``core.tracing``) to an OTLP/HTTP receiver this test
runs, and the spans form one trace with the caller's: gRPC or NATS request -> the bridge's
span -> each agent job's span in the worker -> the vLLM request's ``traceparent`` (through
Ray, whose image here has no SDK, so its client span is a no-op and passes the job's context
on). ``tracestate`` travels with it.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Iterator, List

import nats
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from bridge.client import RayExecutorClient
from core.settings import Settings
from tests.bridge.conftest import request
from tests.nats_events import Recorder
from tests.waiting import until


class OtlpReceiver:
    """An OTLP/HTTP (protobuf) trace receiver on loopback; ``spans`` lists what arrived."""

    def __init__(self) -> None:
        self.spans: List[Dict[str, Any]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.add(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, export: Any) -> None:
        with self._lock:
            for resource_spans in export.resource_spans:
                service = {a.key: a.value.string_value
                           for a in resource_spans.resource.attributes}.get("service.name")
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        self.spans.append({
                            "service": service, "name": span.name, "kind": span.kind,
                            "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                            "parent_id": span.parent_span_id.hex(),
                            "attributes": {a.key: a.value for a in span.attributes}})

    def find(self, trace_id: str, name: str) -> List[Dict[str, Any]]:
        with self._lock:
            return [s for s in self.spans if s["trace_id"] == trace_id and s["name"] == name]


@pytest.fixture
def otlp() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    yield receiver
    receiver.server.shutdown()


def exporting(otlp: OtlpReceiver) -> Dict[str, str]:
    """The standard OTEL_* variables that make a process export to ``otlp``, quickly."""
    return {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.url,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_BSP_SCHEDULE_DELAY": "200"}


def test_one_trace_from_the_grpc_caller_through_the_worker_to_vllm(
        otlp: OtlpReceiver, start_bridge: Any, start_worker: Any, standin: Any,
        recorder: Recorder) -> None:
    bridge = start_bridge(VLLM_URL=standin.url, VLLM_MODEL="standin-model", **exporting(otlp))
    start_worker(bridge)
    trace_id, caller = secrets.token_hex(16), secrets.token_hex(8)
    metadata = (("traceparent", f"00-{trace_id}-{caller}-01"), ("tracestate", "rx=caller"))
    reply = bridge.stub().ExecuteDeliberation(
        request(agents=2, vllm_url=standin.url, vllm_model="standin-model"), metadata=metadata)

    async def final() -> Any:
        async with RayExecutorClient(bridge.address) as client:
            return await client.wait(reply.deliberation_id, timeout=180)

    assert asyncio.run(final()).status == "completed"
    name = "ray_executor.v1.RayExecutorService/ExecuteDeliberation"
    [server] = until(lambda: otlp.find(trace_id, name), "the bridge's span")
    assert server["service"] == "ray-executor-bridge" and server["parent_id"] == caller
    assert server["attributes"]["ray_executor.deliberation_id"].string_value == \
        reply.deliberation_id
    jobs = until(lambda: len(otlp.find(trace_id, "ray_executor.agent_job")) == 2 and
                 otlp.find(trace_id, "ray_executor.agent_job"), "both agent jobs' spans")
    assert {job["service"] for job in jobs} == {"ray-executor-worker"}
    assert {job["parent_id"] for job in jobs} == {server["span_id"]}
    # Each vLLM request is a child of its job's span (Ray passes the context on unchanged).
    sent = standin.traceparents()
    assert sorted(value.split("-")[2] for value in sent) == sorted(j["span_id"] for j in jobs)
    assert {value.split("-")[1] for value in sent} == {trace_id}

    published = recorder.final(reply.deliberation_id, 4, Settings.from_env(bridge.env))
    assert len(published) == 4
    for msg in published:  # the deliberation's events continue the bridge's span
        assert msg.headers["traceparent"].split("-")[1:3] == [trace_id, server["span_id"]]
        assert msg.headers["tracestate"] == "rx=caller", msg.headers


def test_a_nats_request_gets_a_consumer_span_in_the_callers_trace(
        otlp: OtlpReceiver, start_bridge: Any, nats_url: str) -> None:
    bridge = start_bridge(**exporting(otlp))
    trace_id, caller = secrets.token_hex(16), secrets.token_hex(8)

    async def publish() -> Any:
        nc = await nats.connect(nats_url)
        try:
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox)
            await nc.jetstream().publish(
                "agent.cmd.deliberate", json.dumps({
                    "task_id": f"nats-trace-{trace_id}", "task_description": "Plan it",
                    "role": "DEV", "agents": [{"id": "a", "role": "DEV"}]}).encode(),
                headers={"Reply-To": inbox, "traceparent": f"00-{trace_id}-{caller}-01"})
            return json.loads((await sub.next_msg(timeout=60)).data)
        finally:
            await nc.close()

    answer = asyncio.run(publish())
    assert answer["status"] == "submitted", answer
    [span] = until(lambda: otlp.find(trace_id, "agent.cmd.deliberate process"),
                   "the NATS ingress's span")
    assert span["service"] == "ray-executor-bridge" and span["parent_id"] == caller
    assert bridge.queue  # the bridge that answered is this test's
