# syntax=docker/dockerfile:1
# A Ray node image (head or worker) that can run ray-executor's job code. The runner actors
# unpickle `cluster.*` (the runner, the job kinds, the vLLM client) on the cluster, so the
# package is installed there with its `cluster` extra only: aiohttp and opentelemetry-api
# beside Ray's own packages; Ray's grpcio and protobuf are left as Ray installed them.
# Build it with the same RAY_VERSION/PYTHON_VERSION as the worker image:
#   docker build -f docker/ray-head.Dockerfile \
#     --build-arg RAY_VERSION=2.49.2 --build-arg RAY_PYTHON_TAG=py39 \
#     -t ray-executor-ray:2.49.2-py39 .
# On KubeRay, use it as the image of the RayCluster's head and worker groups (or install the
# wheel through a runtime_env instead: docs/deploy.md).
#
# Base images are pinned by tag. Pin them by digest as well (rayproject/ray:2.49.2-py39@sha256:...)
# in your registry or CI: digests could not be fetched on the machine these files were written on.
ARG RAY_VERSION=2.49.2
# rayproject/ray tags are <ray version>-py<major><minor>, e.g. 2.49.2-py39.
ARG RAY_PYTHON_TAG=py39

# The wheel is pure Python: any Python builds it (the hook needs grpcio-tools, a build-only
# dependency fetched by pip's build isolation in this stage).
FROM python:3.9-slim AS builder
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

FROM rayproject/ray:${RAY_VERSION}-${RAY_PYTHON_TAG}
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# The image runs as its own non-root user `ray` (UID 1000). Ray is already there at
# RAY_VERSION, and the `cluster` extra asks for nothing Ray pins.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install "$(ls /wheels/ray_executor-*.whl)[cluster]"
USER 1000
# gRPC's fork handlers off: the Ray client proxier forks a specific server per client while
# its gRPC threads run, and with the handlers on the child sometimes dies in gRPC's poller
# before it execs (ray-project/ray#63202); the client then fails after a 30 s wait.
ENV GRPC_ENABLE_FORK_SUPPORT=0
# GCS, Ray client server, dashboard.
EXPOSE 6379 10001 8265
# Healthy when the GCS answers and the Ray client server (port 10001) reported itself within
# Ray's health-check expiry (it reports every second).
HEALTHCHECK --interval=15s --timeout=10s --start-period=60s --retries=5 \
    CMD ["ray", "health-check", "--address", "127.0.0.1:6379", "--component", "ray_client_server"]
