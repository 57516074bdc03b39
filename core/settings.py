"""Every setting of ray-executor, typed, read from the environment in one place.

Shared by both sides (the bridge and the Python 3.9 workers), so it uses only the standard
library and Python 3.9 syntax. The five plain names deployments already set (``RAY_ADDRESS``,
``NATS_URL``, ``REDIS_URL``, ``VLLM_URL``, ``VLLM_MODEL``) keep their names; everything else
is under the ``RAY_EXECUTOR_`` prefix. An empty URL means "start one locally" for the embedded
run command (``ray-executor up``) and "not configured" for every other command.

``README.md`` documents each setting; a test checks the two agree.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping, Optional, Tuple

PREFIX = "RAY_EXECUTOR_"
# A worker group's name becomes part of Dramatiq's Redis keys (core.dramatiq_internals).
WORKER_ID = re.compile(r"[A-Za-z0-9._-]{1,253}")  # a pod name fits
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
EVENT_FORMATS = ("json", "envelope")


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names the variable."""


def _setting(env: str, default: Any, doc: str, *, minimum: Optional[float] = None) -> Any:
    return dataclasses.field(
        default=default, metadata={"env": env, "doc": doc, "minimum": minimum}
    )


@dataclasses.dataclass(frozen=True)
class Settings:
    # --- connections (plain names) ---
    ray_address: str = _setting(
        "RAY_ADDRESS", "", "Ray client address of the cluster, e.g. ray://ray-head:10001."
    )
    nats_url: str = _setting(
        "NATS_URL", "", "NATS server URL(s), comma-separated, e.g. nats://nats:4222."
    )
    redis_url: str = _setting(
        "REDIS_URL", "",
        "Redis URL of the Dramatiq broker and state, e.g. redis://redis:6379/0; TLS: "
        "rediss://redis:6380/0?ssl_ca_certs=/path/ca.pem.",
    )
    vllm_url: str = _setting(
        "VLLM_URL",
        "",
        "Default vLLM OpenAI-compatible base URL; `{node_ip}` is replaced on the Ray node.",
    )
    vllm_model: str = _setting("VLLM_MODEL", "Qwen/Qwen3-0.6B", "Default model name for vLLM.")

    # --- gRPC ingress ---
    grpc_host: str = _setting(
        PREFIX + "GRPC_HOST", "0.0.0.0",
        "Listen address of gRPC and of /metrics (the bridge's and the workers').")
    grpc_port: int = _setting(
        PREFIX + "GRPC_PORT", 50056, "gRPC listen port (the Orchestrator calls 50056).", minimum=0
    )
    grpc_token: str = _setting(
        PREFIX + "GRPC_TOKEN", "", "Bearer token required on every gRPC call; empty: no auth."
    )
    grpc_tls_cert: str = _setting(
        PREFIX + "GRPC_TLS_CERT", "", "Path of the server certificate (PEM); empty: plaintext."
    )
    grpc_tls_key: str = _setting(
        PREFIX + "GRPC_TLS_KEY", "", "Path of the server private key (PEM)."
    )
    grpc_tls_client_ca: str = _setting(
        PREFIX + "GRPC_TLS_CLIENT_CA", "", "Path of a CA bundle; when set, clients need a cert."
    )
    grpc_shutdown_grace: float = _setting(
        PREFIX + "GRPC_SHUTDOWN_GRACE", 10.0, "Seconds in-flight calls get on shutdown.", minimum=0
    )

    # --- request limits (validation) ---
    max_agents: int = _setting(
        PREFIX + "MAX_AGENTS", 16, "Most agents one deliberation may have.", minimum=1
    )
    max_field_bytes: int = _setting(
        PREFIX + "MAX_FIELD_BYTES", 65536, "Largest size of one text field, in bytes.", minimum=1
    )
    max_request_bytes: int = _setting(
        PREFIX + "MAX_REQUEST_BYTES",
        1048576,
        "Largest gRPC request or NATS payload, in bytes (refused naming the field; gRPC "
        "itself refuses a message over 4x this plus 64 KiB with RESOURCE_EXHAUSTED).",
        minimum=1,
    )
    allowed_roles: Tuple[str, ...] = _setting(
        PREFIX + "ALLOWED_ROLES", (), "Comma-separated roles agents may have; empty: any role."
    )

    # --- Dramatiq / Redis ---
    queue: str = _setting(PREFIX + "QUEUE", "agent_jobs", "Dramatiq queue of agent jobs.")
    routes_file: str = _setting(
        PREFIX + "ROUTES_FILE", "",
        "JSON file of the routes (docs/deploy.md): which requests go to which queue, Ray "
        "cluster and vLLM endpoints; empty: one route of RAY_EXECUTOR_QUEUE, RAY_ADDRESS and "
        "VLLM_URL.",
    )
    route: str = _setting(
        PREFIX + "ROUTE", "",
        "The route a worker serves (`ray-executor worker --route`); empty: the default route.",
    )
    key_prefix: str = _setting(
        PREFIX + "KEY_PREFIX", "rx", "Prefix of the Redis keys holding deliberation state."
    )
    state_ttl_seconds: int = _setting(
        PREFIX + "STATE_TTL_SECONDS",
        7 * 24 * 3600,
        "How long a finished deliberation's state stays in Redis.",
        minimum=1,
    )
    idempotency_ttl_seconds: int = _setting(
        PREFIX + "IDEMPOTENCY_TTL_SECONDS",
        7 * 24 * 3600,
        "How long after its submission a task_id (or idempotency_key) keeps answering with "
        "its deliberation; after that the same task_id starts a new one.",
        minimum=1,
    )

    # --- jobs ---
    job_timeout_seconds: int = _setting(
        PREFIX + "JOB_TIMEOUT_SECONDS",
        600,
        "Default time limit of one agent job (constraints.timeout_seconds overrides).",
        minimum=1,
    )
    max_retries: int = _setting(
        PREFIX + "MAX_RETRIES",
        3,
        "Default retries of one agent job (constraints.max_retries overrides).",
        minimum=0,
    )
    progress_interval_ms: int = _setting(
        PREFIX + "PROGRESS_INTERVAL_MS",
        250,
        "Longest a streamed answer's partial output waits before it is published as "
        "`agent.response.progress` (and a Watch event `agent_progress`), with what follows "
        "it; 0: no partial output is published.",
        minimum=0,
    )
    progress_tokens: int = _setting(
        PREFIX + "PROGRESS_TOKENS",
        32,
        "Pieces of one streamed answer (a token each, as vLLM streams) published at once "
        "without waiting for the interval.",
        minimum=1,
    )

    # --- protecting vLLM (worker middleware) ---
    vllm_concurrency: int = _setting(
        PREFIX + "VLLM_CONCURRENCY",
        64,
        "Jobs in flight at once per vLLM endpoint, across every worker: VLLM_URL's, a "
        "routes-file endpoint's without its own concurrency, a URL a request names itself.",
        minimum=1,
    )
    vllm_rate_limit: int = _setting(
        PREFIX + "VLLM_RATE_LIMIT",
        0,
        "Requests per window per vLLM endpoint; 0: no rate limit.",
        minimum=0,
    )
    vllm_rate_window: float = _setting(
        PREFIX + "VLLM_RATE_WINDOW", 1.0, "Seconds of the request-rate window.", minimum=0.01
    )
    circuit_failures: int = _setting(
        PREFIX + "CIRCUIT_FAILURES",
        5,
        "Consecutive server-side failures of an endpoint that open its circuit.",
        minimum=1,
    )
    circuit_cooldown: float = _setting(
        PREFIX + "CIRCUIT_COOLDOWN",
        30.0,
        "Seconds an open circuit waits before letting one probe job through.",
        minimum=0.1,
    )
    backoff_min: float = _setting(
        PREFIX + "BACKOFF_MIN", 1.0, "Seconds of the first retry's backoff.", minimum=0.01
    )
    backoff_max: float = _setting(
        PREFIX + "BACKOFF_MAX", 120.0, "Most seconds one retry waits (Retry-After included).",
        minimum=0.01,
    )

    # --- workers ---
    worker_processes: int = _setting(
        PREFIX + "WORKER_PROCESSES", 2, "Worker processes per `ray-executor worker`.", minimum=1
    )
    worker_threads: int = _setting(
        PREFIX + "WORKER_THREADS",
        256,
        "Worker threads per process: each holds one in-flight job while it waits on Ray.",
        minimum=1,
    )
    worker_prefetch: int = _setting(
        PREFIX + "WORKER_PREFETCH",
        0,
        "Messages a process reserves ahead; 0: its share of its route's capacity, the sum of "
        "the route's endpoint concurrencies (RAY_EXECUTOR_VLLM_CONCURRENCY without a routes "
        "file), at most 2 x threads.",
        minimum=0,
    )
    worker_poll_ms: int = _setting(
        PREFIX + "WORKER_POLL_MS",
        100,
        "Longest pause (ms) between a worker's queue polls while it finds nothing to fetch.",
        minimum=5,
    )
    worker_shutdown_timeout: int = _setting(
        PREFIX + "WORKER_SHUTDOWN_TIMEOUT",
        600,
        "Seconds a stopping worker waits for running jobs before requeueing them.",
        minimum=0,
    )
    worker_heartbeat_timeout: int = _setting(
        PREFIX + "WORKER_HEARTBEAT_TIMEOUT",
        20,
        "Seconds without a heartbeat before a worker's unacked messages are requeued.",
        minimum=10,
    )
    worker_id: str = _setting(
        PREFIX + "WORKER_ID",
        "",
        "Stable name of this worker group, unique among live ones (the pod name): restarted "
        "under the same name, it requeues at once the jobs its previous run held; empty: they "
        "wait for RAY_EXECUTOR_WORKER_HEARTBEAT_TIMEOUT.",
    )
    job_modules: Tuple[str, ...] = _setting(
        PREFIX + "JOB_MODULES",
        (),
        "Extra modules declaring job kinds, loaded by workers beside the built-in ones.",
    )
    ray_namespace: str = _setting(
        PREFIX + "RAY_NAMESPACE", "ray-executor", "Ray namespace of the job runners."
    )

    # --- NATS ---
    nats_create_streams: bool = _setting(
        PREFIX + "NATS_CREATE_STREAMS", True, "Create the JetStream streams when missing."
    )
    nats_commands_stream: str = _setting(
        PREFIX + "NATS_COMMANDS_STREAM", "AGENT_COMMANDS", "Stream of `agent.cmd.>`."
    )
    nats_responses_stream: str = _setting(
        PREFIX + "NATS_RESPONSES_STREAM", "AGENT_RESPONSES", "Stream of `agent.response.>`."
    )
    nats_events_stream: str = _setting(
        PREFIX + "NATS_EVENTS_STREAM", "ORCHESTRATOR_EVENTS", "Stream of `orchestration.>`."
    )
    nats_streaming_stream: str = _setting(
        PREFIX + "NATS_STREAMING_STREAM", "VLLM_STREAMING", "Stream of `vllm.streaming.>`."
    )
    nats_stream_max_age: int = _setting(
        PREFIX + "NATS_STREAM_MAX_AGE", 3600,
        "Seconds the responses and streaming streams keep a message, when the service creates "
        "them (discard old, file storage; the commands stream gets no limit); 0: no limit.",
        minimum=0,
    )
    nats_stream_max_msgs: int = _setting(
        PREFIX + "NATS_STREAM_MAX_MSGS", 10000,
        "Messages the responses and streaming streams keep, when the service creates them; "
        "0: no limit.", minimum=0,
    )
    nats_events_max_age: int = _setting(
        PREFIX + "NATS_EVENTS_MAX_AGE", 604800,
        "Seconds the deliberation events' stream keeps a message, when the service creates "
        "it; 0: no limit.", minimum=0,
    )
    nats_events_max_msgs: int = _setting(
        PREFIX + "NATS_EVENTS_MAX_MSGS", 50000,
        "Messages the deliberation events' stream keeps, when the service creates it; 0: no "
        "limit.", minimum=0,
    )
    nats_commands_prefix: str = _setting(
        PREFIX + "NATS_COMMANDS_PREFIX", "agent.cmd", "Subject prefix of commands."
    )
    nats_responses_prefix: str = _setting(
        PREFIX + "NATS_RESPONSES_PREFIX", "agent.response", "Subject prefix of agent results."
    )
    nats_events_prefix: str = _setting(
        PREFIX + "NATS_EVENTS_PREFIX",
        "orchestration.deliberation",
        "Subject prefix of deliberation events.",
    )
    nats_streaming_prefix: str = _setting(
        PREFIX + "NATS_STREAMING_PREFIX", "vllm.streaming",
        "Subject prefix of the `vllm_stream_start` event of each accepted deliberation "
        "(`<prefix>.<deliberation_id>`).",
    )
    event_format: str = _setting(
        PREFIX + "EVENT_FORMAT", "json",
        "Body of every published event: `json` (the payload itself) or `envelope` (upstream's "
        "EventEnvelope: `event_type`, `payload`, `idempotency_key`, `correlation_id`, "
        "`timestamp`, `producer`, `metadata`).",
    )
    nats_tls_ca: str = _setting(
        PREFIX + "NATS_TLS_CA",
        "",
        "Path of a CA bundle to verify NATS's TLS certificate (use a tls:// URL); empty: the "
        "system's CAs for tls:// URLs.",
    )
    nats_ingress: bool = _setting(
        PREFIX + "NATS_INGRESS", True, "Run the NATS ingress consumer in the bridge."
    )
    nats_consumer: str = _setting(
        PREFIX + "NATS_CONSUMER", "ray-executor-deliberate", "Durable consumer name of the ingress."
    )
    nats_max_ack_pending: int = _setting(
        PREFIX + "NATS_MAX_ACK_PENDING",
        1000,
        "Unacked ingress messages across every bridge replica (set when the consumer is made).",
        minimum=1,
    )
    nats_max_in_flight: int = _setting(
        PREFIX + "NATS_MAX_IN_FLIGHT", 256, "Ingress requests one bridge works on at once.",
        minimum=1,
    )

    # --- dashboard and metrics ---
    dashboard_host: str = _setting(
        PREFIX + "DASHBOARD_HOST", "127.0.0.1", "dramatiq-dashboard listen address."
    )
    dashboard_port: int = _setting(
        PREFIX + "DASHBOARD_PORT", 8181, "dramatiq-dashboard listen port.", minimum=0
    )
    dashboard_user: str = _setting(
        PREFIX + "DASHBOARD_USER", "", "Basic-auth user of the dashboard."
    )
    dashboard_password: str = _setting(
        PREFIX + "DASHBOARD_PASSWORD", "", "Basic-auth password of the dashboard."
    )
    dashboard_token: str = _setting(
        PREFIX + "DASHBOARD_TOKEN", "", "Bearer token accepted by the dashboard."
    )
    dashboard_bridge: str = _setting(
        PREFIX + "DASHBOARD_BRIDGE", "127.0.0.1:50056",
        "host:port of the bridge's gRPC, which the dashboard's deliberation browser calls "
        "(with `RAY_EXECUTOR_GRPC_TOKEN`).",
    )
    dashboard_bridge_ca: str = _setting(
        PREFIX + "DASHBOARD_BRIDGE_CA", "",
        "Path of the CA (PEM) that signed the bridge's gRPC certificate, when the bridge "
        "serves TLS; empty: plaintext. (A bridge requiring client certificates is not "
        "reachable from the dashboard.)",
    )
    metrics_port: int = _setting(
        PREFIX + "METRICS_PORT",
        9464,
        "Port of the bridge's /metrics (Prometheus) and /healthz; 0: not served.",
        minimum=0,
    )
    # Apart from the bridge's, so a bridge and a worker group on one host do not collide.
    worker_metrics_port: int = _setting(
        PREFIX + "WORKER_METRICS_PORT",
        9465,
        "Port of a worker group's /metrics, served by its master process for every worker "
        "process; its readiness check reads `ray_executor_worker_ready` there.",
        minimum=1,
    )

    # --- logs ---
    log_level: str = _setting(PREFIX + "LOG_LEVEL", "INFO", "Log level.")
    log_format: str = _setting(
        PREFIX + "LOG_FORMAT", "json", "`json` (one object a line) or `text` (human-readable)."
    )

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> Settings:
        """Read every setting from ``environ`` (default ``os.environ``).

        Raises ``SettingsError`` naming the variable when a value cannot be used.
        """
        env = os.environ if environ is None else environ
        values = {}
        for field in dataclasses.fields(cls):
            name = field.metadata["env"]
            if name in env:
                values[field.name] = _parse(name, env[name], field.default, field.metadata)
        settings = cls(**values)
        settings._check()
        return settings

    def _check(self) -> None:
        if self.log_format not in ("json", "text"):
            raise SettingsError(
                f"{PREFIX}LOG_FORMAT: expected 'json' or 'text', got {self.log_format!r}"
            )
        if self.event_format not in EVENT_FORMATS:
            raise SettingsError(
                f"{PREFIX}EVENT_FORMAT: expected 'json' or 'envelope', got {self.event_format!r}"
            )
        if self.worker_id and not WORKER_ID.fullmatch(self.worker_id):
            raise SettingsError(
                f"{PREFIX}WORKER_ID: letters, digits, '.', '_' and '-' only (up to 253), "
                f"got {self.worker_id!r}"
            )
        if bool(self.grpc_tls_cert) != bool(self.grpc_tls_key):
            raise SettingsError(
                f"{PREFIX}GRPC_TLS_CERT and {PREFIX}GRPC_TLS_KEY must be set together"
            )

    def as_env(self) -> dict[str, str]:
        """Every setting as its environment variable and text value."""
        return {
            field.metadata["env"]: _format(getattr(self, field.name))
            for field in dataclasses.fields(self)
        }

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def documented() -> list[tuple[str, str, str]]:
    """(variable, default, description) of every setting, in declaration order."""
    return [
        (field.metadata["env"], _format(field.default), field.metadata["doc"])
        for field in dataclasses.fields(Settings)
    ]


def markdown_table() -> str:
    """The README's settings table (``python -m core.settings``)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for env, default, doc in documented():
        rows.append(f"| `{env}` | {f'`{default}`' if default else '(empty)'} | {doc} |")
    return "\n".join(rows)


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return ",".join(value) if isinstance(value, tuple) else str(value)


def _parse(name: str, raw: str, default: Any, meta: Mapping[str, Any]) -> Any:
    text = raw.strip()
    value: Any
    if isinstance(default, bool):
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise SettingsError(f"{name}: expected a boolean (true/false), got {raw!r}")
    if isinstance(default, int):
        try:
            value = int(text)
        except ValueError:
            raise SettingsError(f"{name}: expected an integer, got {raw!r}") from None
    elif isinstance(default, float):
        try:
            value = float(text)
        except ValueError:
            raise SettingsError(f"{name}: expected a number, got {raw!r}") from None
    elif isinstance(default, tuple):
        return tuple(part.strip() for part in text.split(",") if part.strip())
    else:
        return raw
    minimum = meta.get("minimum")
    if minimum is not None and value < minimum:
        raise SettingsError(f"{name}: must be at least {minimum}, got {raw!r}")
    return value


if __name__ == "__main__":
    print(markdown_table())
