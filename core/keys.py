"""Every Redis key and channel name of ray-executor, in one place (arq's ``constants`` is the
model). Our keys live under ``RAY_EXECUTOR_KEY_PREFIX``; the keys of Dramatiq's own layout
are named in ``core.dramatiq_internals``.

Standard library only, Python 3.9 compatible: both sides import it.
"""

from __future__ import annotations

# Pub/sub channel on which a submit announces the queue it pushed to: idle workers wait on it
# instead of sleeping through Dramatiq's poll backoff (``core.dramatiq_internals``).
WAKE_CHANNEL = "dramatiq:enqueued"


class Keys:
    """Redis keys of the deliberation state and of the workers' shared limits.

    Parameters:
      prefix: ``RAY_EXECUTOR_KEY_PREFIX``.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.active = f"{prefix}:active"  # zset: deliberation id -> created ms
        # zset: every deliberation id -> created ms, for listing (trimmed to the state TTL)
        self.index = f"{prefix}:index"
        self.stats = f"{prefix}:stats"  # hash of counters
        self.outbox = f"{prefix}:outbox"  # hash: event id -> JSON of what to publish
        self.outbox_due = f"{prefix}:outbox:due"  # zset: event id -> ms it is due to be sent
        # hash per vLLM endpoint (its URL as configured): failures, opened_until ms (actors.circuit)
        self.circuits = f"{prefix}:circuit"
        # hash: endpoint -> opened_until ms (0: failures recorded, closed); what health and
        # metrics read instead of scanning the keyspace for circuit records
        self.circuit_index = f"{prefix}:circuits"
        self.limits = f"{prefix}:limit"
        # hash: dead letter's stream sequence -> JSON of its replay (by, reason, time, sequence)
        self.replays = f"{prefix}:dlq:replays"

    def workers(self, queue: str) -> str:
        """Zset: id of each worker process serving ``queue`` -> ms of its last heartbeat
        (``GetStatus`` counts the live ones)."""
        return f"{self.prefix}:workers:{queue}"

    # --- one deliberation ---

    def deliberation(self, deliberation_id: str) -> str:
        """Hash: the deliberation record."""
        return f"{self.prefix}:d:{deliberation_id}"

    def agents(self, deliberation_id: str) -> str:
        """Hash: agent id -> the agent's record (JSON)."""
        return f"{self.prefix}:d:{deliberation_id}:agents"

    def events(self, deliberation_id: str) -> str:
        """Stream: the deliberation's lifecycle events (``WatchDeliberation``)."""
        return f"{self.prefix}:d:{deliberation_id}:events"

    def messages(self, deliberation_id: str) -> str:
        """Hash: agent id -> the agent job's encoded Dramatiq message as submitted, from
        which a retry (``core.retry``) enqueues it again."""
        return f"{self.prefix}:d:{deliberation_id}:messages"

    def idempotency(self, key: str) -> str:
        """String: the deliberation id a task id (or idempotency key) was given."""
        return f"{self.prefix}:idem:{key}"

    # --- one vLLM endpoint (its URL as configured, ``actors.endpoints``) ---

    def circuit(self, endpoint: str) -> str:
        """Hash: the endpoint's consecutive failures and ``opened_until`` ms."""
        return f"{self.circuits}:{endpoint}"

    def circuit_probe(self, endpoint: str) -> str:
        """String: the message id of the half-open circuit's one probe job."""
        return f"{self.circuits}:{endpoint}:probe"

    def limit_slots(self, endpoint: str) -> str:
        """Zset: concurrency leases (message id -> lease expiry ms)."""
        return f"{self.limits}:{endpoint}:slots"

    def limit_window(self, endpoint: str, window: int) -> str:
        """Counter: requests started in rate window number ``window``."""
        return f"{self.limits}:{endpoint}:rate:{window}"
