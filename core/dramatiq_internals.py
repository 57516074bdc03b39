"""Every use of Dramatiq's internals, in one module, guarded by Dramatiq's version.

ray-executor goes past Dramatiq's public API in four places, each here:

- ``submit.lua`` (``core.store``) writes agent-job messages into Dramatiq's Redis layout
  itself, so a deliberation's record and its messages land in one atomic script: a message
  is its encoded JSON in the hash ``<ns>:<queue>.msgs`` under its ``redis_message_id`` and
  that id pushed on the list ``<ns>:<queue>``, as ``RedisBroker.enqueue`` does
  (``encode``, ``queue_key``, ``messages_key``). A test compares the two byte for byte.
- The queue depths read the delay queue's message hash and the dead-letter zset
  (``queue_depths``).
- The workers' consumer (``PromptConsumer``) subclasses the private ``_RedisConsumer`` and
  re-implements its fetch step, to wake on a submit and refill a freed prefetch place at once.
- The workers' heartbeat calls the broker's ``dispatch`` Lua script with a command it does
  not know, which refreshes the heartbeat and runs the requeue of dead workers' messages
  (``heartbeat``).
- A named worker group's processes take Dramatiq worker ids under the group's name, and the
  group, restarted, requeues what its previous processes held from their ack sets
  (``process_id``, ``requeue_previous``).

Any of these may change in another Dramatiq release without notice, and a silent change
would lose messages: importing this module with a release not in ``SUPPORTED`` fails at once,
naming the release and what to do.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any, Dict, Optional

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.common import compute_backoff, dq_name, xq_name
from dramatiq.errors import ConnectionClosed

# The releases whose internals this module was checked against (pyproject pins the same).
SUPPORTED = ("1.18.0",)
NAMESPACE = "dramatiq"  # RedisBroker's default key namespace


class UnsupportedDramatiq(ImportError):
    """The installed Dramatiq is not a release this module was checked against."""


def check_version(version: str) -> None:
    """Raise ``UnsupportedDramatiq`` unless ``version`` is in ``SUPPORTED``."""
    if version not in SUPPORTED:
        raise UnsupportedDramatiq(
            f"ray-executor writes Dramatiq's Redis layout and subclasses its private consumer "
            f"(core/dramatiq_internals.py), checked against Dramatiq {', '.join(SUPPORTED)}; "
            f"this environment has Dramatiq {version}. Install dramatiq=={SUPPORTED[-1]} "
            f"(pyproject.toml pins it), or check each internal use in that module against "
            f"Dramatiq {version}, run tests/bridge/test_dramatiq_internals.py, and add the "
            f"release to SUPPORTED.")


check_version(dramatiq.__version__)


# --- the Redis layout ----------------------------------------------------------------------


def queue_key(queue: str) -> str:
    """List of the queue's ready message ids."""
    return f"{NAMESPACE}:{queue}"


def messages_key(queue: str) -> str:
    """Hash of the queue's messages: redis message id -> encoded message."""
    return queue_key(queue) + ".msgs"


def encode(queue: str, actor_name: str, kwargs: Dict[str, Any], options: Dict[str, Any],
           redis_message_id: str, *, message_id: Optional[str] = None,
           message_timestamp: Optional[int] = None) -> str:
    """The encoded message ``RedisBroker.enqueue`` stores for an actor call on ``queue`` (the
    process's encoder: JSON on both sides), with ``redis_message_id`` among its options.

    Written as Dramatiq's ``JSONEncoder`` writes ``Message.asdict()`` (its fields in their
    order, its separators) without building a ``Message``, which cost three times as much per
    job; the test of this module compares the bytes with ``RedisBroker.enqueue``'s."""
    return json.dumps({
        "queue_name": queue, "actor_name": actor_name, "args": [], "kwargs": kwargs,
        "options": {**options, "redis_message_id": redis_message_id},
        "message_id": message_id or str(uuid.uuid4()),
        "message_timestamp": message_timestamp or int(time.time() * 1000),
    }, separators=(",", ":"))


def dead_letter_key(queue: str) -> str:
    """Zset of the queue's dead-lettered message ids (their messages: ``messages_key`` of
    it), where a message that raised past its retries ends."""
    return queue_key(xq_name(queue))


def queue_depths(pipe: Any, queue: str) -> None:
    """Queue on ``pipe`` (sync or asyncio) the three depth reads of ``queue``, in this order:
    ready (messages no worker has fetched yet), delayed (every message waiting for its time,
    those a worker already holds in memory included: Dramatiq workers fetch delayed messages
    early, so the delay queue's list alone reads about 0), dead-lettered."""
    pipe.llen(queue_key(queue))
    pipe.hlen(messages_key(dq_name(queue)))
    pipe.zcard(dead_letter_key(queue))


def unacked(pipe: Any, queue: str) -> None:
    """Queue on ``pipe`` the count of ``queue``'s messages not yet acked: ready ones and those
    workers have fetched and are running (Dramatiq keeps each in the queue's message hash
    until its ack)."""
    pipe.hlen(messages_key(queue))


def delay_queue(queue: str) -> str:
    """The name of ``queue``'s delay queue (retries and delayed messages wait there)."""
    return str(dq_name(queue))


# --- the workers' consumer and heartbeat -----------------------------------------------------


class PromptConsumer(_RedisConsumer):
    """Dramatiq's Redis consumer, prompter on two counts:

    - while its prefetch is full, it waits for a worker thread to ack or nack instead of
      sleeping through its backoff, so the freed place is refilled at once rather than up to
      a poll later (with short jobs and a small prefetch, that pause was a large share of each
      job's time);
    - when a fetch finds nothing, it sleeps Dramatiq's backoff but wakes as soon as a submit
      announces its queue (``wake``), so a job reaching an idle worker starts at once instead
      of up to a poll later.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._room = threading.Event()
        self._woken = threading.Event()

    def wake(self) -> None:
        self._woken.set()

    def ack(self, message: Any) -> None:
        try:
            super().ack(message)
        finally:
            self._room.set()

    def nack(self, message: Any) -> None:
        try:
            super().nack(message)
        finally:
            self._room.set()

    def __next__(self) -> Any:
        if not self.message_cache and self.outstanding_message_count >= self.prefetch:
            self._room.clear()
            if self.outstanding_message_count >= self.prefetch:  # no ack since the check
                self._room.wait(self.timeout / 1000)
            return None  # the consumer thread moves due delayed messages, then asks again
        if not self.message_cache:  # Dramatiq's fetch, with a sleep that a wake cuts short
            self._woken.clear()  # before the fetch: a submit after it wakes the sleep below
            try:
                self.message_cache = self.broker.do_fetch(
                    self.queue_name, self.prefetch - self.outstanding_message_count)
            except redis.ConnectionError as exc:
                raise ConnectionClosed(exc) from None
            if not self.message_cache:
                self.misses, backoff_ms = compute_backoff(self.misses, max_backoff=self.timeout)
                self._woken.wait(backoff_ms / 1000)
                return None
        return super().__next__()  # takes the first cached message, as Dramatiq does


def heartbeat(broker: RedisBroker, queue: str, now_ms: int) -> None:
    """Refresh ``broker``'s worker heartbeat and requeue the unacked messages of workers whose
    heartbeat is older than ``broker.heartbeat_timeout``, on ``queue``.

    Dramatiq refreshes a heartbeat only when the worker fetches or acks, and requeues dead
    workers' messages only on 0.1% of its calls: its ``dispatch`` script given a command it
    does not know, with maintenance on, does both and nothing else."""
    broker.scripts["dispatch"](keys=[broker.namespace], args=[
        "heartbeat", now_ms, queue, broker.broker_id, broker.heartbeat_timeout,
        broker.dead_message_ttl, "1", 1000])


# --- a named worker group's restart ----------------------------------------------------------

# KEYS[1]: the namespace. ARGV[1]: the group's prefix, ARGV[2..]: the queues it consumes.
# For every worker id in the heartbeat set under the prefix, as Dramatiq's maintenance does for
# a dead worker: the unacked messages of each queue go back (to the front: they had started),
# the ack sets go, and so does the heartbeat. Returns {processes, messages}.
_REQUEUE_PREVIOUS = """
local heartbeats = KEYS[1] .. ':__heartbeats__'
local prefix = ARGV[1]
local processes, messages = 0, 0
for _, worker in ipairs(redis.call('zrange', heartbeats, 0, -1)) do
  if string.sub(worker, 1, #prefix) == prefix then
    processes = processes + 1
    for i = 2, #ARGV do
      local queue = KEYS[1] .. ':' .. ARGV[i]
      local acks = KEYS[1] .. ':__acks__.' .. worker .. '.' .. ARGV[i]
      for _, id in ipairs(redis.call('smembers', acks)) do
        if redis.call('hexists', queue .. '.msgs', id) == 1 then
          redis.call('lpush', queue, id)
          messages = messages + 1
        end
      end
      redis.call('del', acks)
    end
    redis.call('zrem', heartbeats, worker)
  end
end
return {processes, messages}
"""


def process_id(worker_id: str) -> str:
    """The Dramatiq worker id of one process of the group named ``worker_id``."""
    return f"{worker_id}/{uuid.uuid4().hex}"


def requeue_previous(client: redis.Redis, worker_id: str, queue: str) -> Dict[str, int]:
    """Before the group named ``worker_id`` starts its processes: put back on ``queue`` and
    its delay queue every message its previous processes fetched and never acked, at once
    instead of after the heartbeat timeout. Any live process under that name would have its
    jobs run twice, hence the name must be unique among live groups. Returns the counts of
    ``processes`` and ``messages``."""
    processes, messages = client.eval(_REQUEUE_PREVIOUS, 1, NAMESPACE, f"{worker_id}/",
                                      queue, delay_queue(queue))
    return {"processes": int(processes), "messages": int(messages)}
