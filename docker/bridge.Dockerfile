# syntax=docker/dockerfile:1
# The ingress side of ray-executor: `ray-executor bridge` (gRPC on 50056, NATS ingress,
# /metrics + /healthz on 9464), `ray-executor dashboard` (8181) and the stand-in LLM
# (`python -m harness.standin_llm`). No Ray here: the bridge never imports it.
#
#   docker build -f docker/bridge.Dockerfile -t ray-executor-bridge:0.1.0 .
#
# Base images are pinned by tag. Pin them by digest as well (python:3.13-slim@sha256:...) in
# your registry or CI: digests could not be fetched on the machine these files were written on.
ARG PYTHON_VERSION=3.13

# --- builder: build the wheel; the hatch build hook (hatch_build.py) runs grpcio-tools and
# generates the protobuf/gRPC packages ray_executor.v1 and fleet.ray_executor.v1 into it. Build
# tools stay in this stage.
FROM python:${PYTHON_VERSION}-slim AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml hatch_build.py README.md ./
COPY protos/ protos/
COPY bridge/ bridge/
COPY actors/ actors/
COPY core/ core/
COPY cluster/ cluster/
COPY harness/ harness/
RUN pip wheel --no-deps --wheel-dir /wheels .

# --- runtime: the wheel with the `bridge` extra, nothing else.
FROM python:${PYTHON_VERSION}-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    HOME=/tmp
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install "$(ls /wheels/ray_executor-*.whl)[bridge,tracing]" \
    && groupadd --gid 1000 rx \
    && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin rx
USER 1000:1000
WORKDIR /tmp
# gRPC, metrics/healthz, dashboard, stand-in LLM.
EXPOSE 50056 9464 8181 8000
# The bridge's own gRPC health (grpc.health.v1, exempt from the bearer token). Compose and
# Kubernetes set their own checks for the other commands this image runs.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; r = g.HealthStub(grpc.insecure_channel('127.0.0.1:' + os.environ.get('RAY_EXECUTOR_GRPC_PORT', '50056'))).Check(h.HealthCheckRequest(), timeout=3); sys.exit(r.status != h.HealthCheckResponse.SERVING)"]
ENTRYPOINT ["ray-executor"]
CMD ["bridge"]
