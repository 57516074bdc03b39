# syntax=docker/dockerfile:1
# The worker side of ray-executor: `ray-executor worker` (Dramatiq workers holding one Ray
# client connection per process; Prometheus /metrics of every process on 9465).
#
# Ray client refuses to connect unless the client runs the cluster's Ray version AND Python
# minor version, so both are build arguments: build it for your cluster, e.g.
#   docker build -f docker/worker.Dockerfile \
#     --build-arg PYTHON_VERSION=3.9 --build-arg RAY_VERSION=2.49.2 \
#     -t ray-executor-worker:0.1.0-py39-ray2.49.2 .
# A mismatch stops the worker at start with exit code 3 and a message naming both versions.
#
# Base images are pinned by tag. Pin them by digest as well (python:3.9-slim@sha256:...) in
# your registry or CI: digests could not be fetched on the machine these files were written on.
ARG PYTHON_VERSION=3.9

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

# --- runtime
FROM python:${PYTHON_VERSION}-slim
ARG RAY_VERSION=2.49.2
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    HOME=/tmp
# The `worker` extra is `core` + `cluster` + ray[client] pinned to the default cluster (the
# `worker-next` extra: the same with the newer cluster's Ray). Ray is installed here from
# RAY_VERSION instead, so one Dockerfile builds the worker of any cluster, e.g. the newer one:
#   --build-arg PYTHON_VERSION=3.13 --build-arg RAY_VERSION=2.60.0
# The rest of the extra is listed as it is in pyproject.toml (a test checks).
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install "$(ls /wheels/ray_executor-*.whl)[core,cluster,tracing]" "ray[client]==${RAY_VERSION}" \
    && groupadd --gid 1000 rx \
    && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin rx
USER 1000:1000
WORKDIR /tmp
EXPOSE 9465
# Healthy when every live worker process has booted and its broker heartbeat reaches Redis:
# the gauge ray_executor_worker_ready (min over the live processes) served by Dramatiq's
# master on /metrics is 1, refreshed every 5 s by each process's heartbeat thread. It does not
# follow Ray (ray_executor_ray_connected, alerted on): a Ray outage leaves jobs queued, and
# restarting workers would not bring Ray back. The chart's readiness probe is the same command.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request as u; t = u.urlopen('http://127.0.0.1:%s/metrics' % os.environ.get('RAY_EXECUTOR_WORKER_METRICS_PORT', '9465'), timeout=3).read().decode(); v = [float(l.split()[-1]) for l in t.splitlines() if l.startswith('ray_executor_worker_ready')]; sys.exit(0 if v and min(v) >= 1 else 1)"]
ENTRYPOINT ["ray-executor"]
CMD ["worker"]
