"""Deliberation state in Redis, changed only by atomic Lua scripts.

One script per transition, so a crash or a Redis outage never leaves half a deliberation:

- ``submit``: idempotency key, deliberation record, agent records, the ``submitted`` event and
  the Dramatiq messages of every agent (pushed the way Dramatiq's own ``enqueue`` does), all
  at once. A second submit with the same key returns the first deliberation and pushes nothing.
  One call records a whole group of deliberations, each on its own (``submit_all``) and each
  on the queue its record names (its route's; ``RAY_EXECUTOR_QUEUE`` when none). Each
  agent's message is also kept with the deliberation, for a retry.
- ``start``: an agent job begins an attempt (or learns it must not run: the deliberation was
  cancelled, or a redelivered message finds the agent already finished).
- ``finish``: an agent's outcome; the last one also finishes the deliberation.
- ``cancel``: the deliberation is cancelled unless it already ended.
- ``retry`` (``core.retry``): a finished deliberation's failed agents queued again, as a new
  round.

Each lifecycle change appends to the deliberation's event stream (``WatchDeliberation``) and,
for what goes to NATS, writes an outbox entry in the same script (see ``core.outbox``).
Async (``redis.asyncio``): the bridge awaits it directly; the workers run it on their
process's event-loop thread.
"""

from __future__ import annotations

import asyncio
import json
import os
from itertools import chain
from pathlib import Path
from typing import Any, AsyncIterator, Dict, List, NamedTuple, Optional, Sequence, Tuple

from redis.asyncio import Redis

from core import contract, dramatiq_internals
from core.batching import Batcher
from core.contract import AgentJob
from core.errors import StateUnavailable
from core.keys import WAKE_CHANNEL, Keys
from core.settings import Settings

OUTBOX_LEASE_MS = 5000  # the writer publishes at once; others take over after this
GROUP_LIMIT = 128  # submissions per submit.lua call: a bigger group would hold valkey longer
_LUA = Path(__file__).parent / "lua"


class Finished(NamedTuple):
    """What ``DeliberationStore.finish`` did, and the state its events are rendered from:
    ``agents`` holds the finished agent, or every agent when the deliberation ended."""

    what: str
    final: str = ""
    record: Optional[Dict[str, str]] = None
    agents: List[Dict[str, Any]] = []


# What one deliberation's submit takes: (idempotency key, record, jobs, message options).
Submission = Tuple[str, Dict[str, Any], List[AgentJob], Optional[Dict[str, Any]]]


def lifecycle_event(event: str, **fields: Any) -> str:
    """An entry of a deliberation's event stream (``WatchDeliberation``), as JSON."""
    return json.dumps({"event": event, "time_ms": contract.now_ms(), **fields})


class DeliberationStore:
    """Reads and changes deliberation state.

    Parameters:
      redis: a ``redis.asyncio.Redis`` client (``decode_responses=True``).
      settings: where key prefix, queue and TTLs come from.
    """

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.batcher = Batcher(redis)
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self._submit, self._start, self._finish, self._cancel = (
            (_LUA / f"{name}.lua").read_text() for name in ("submit", "start", "finish", "cancel"))
        self._group: List[Tuple[Sequence[Submission], asyncio.Future]] = []
        self._committer: Optional[asyncio.Future] = None

    # --- the bridge's side ---

    async def submit(self, idempotency_key: str, record: Dict[str, Any], jobs: List[AgentJob],
                     options: Optional[Dict[str, Any]] = None
                     ) -> Tuple[str, bool, Dict[str, Any]]:
        """Record a deliberation and enqueue one message per agent, atomically.

        Returns ``(deliberation_id, created, record as stored)``; ``created`` is False when
        the idempotency key was already used, in which case nothing was written or enqueued.
        """
        outcome = (await self.submit_all([(idempotency_key, record, jobs, options)]))[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def submit_all(self, submissions: Sequence[Submission]) -> List[Any]:
        """``submit`` for each ``(idempotency_key, record, jobs, options)``: each outcome is
        what ``submit`` returns, or the ``StateUnavailable`` it would raise (for every one
        when Redis is unreachable; for that one alone when Redis refused its writes).

        Group commit: the submissions of every caller that arrive while the previous group's
        script call is out go together in the next one (``submit.lua`` takes many), so under
        load a call costs a share of one script call instead of one each."""
        if not submissions:
            return []
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._group.append((submissions, future))
        if self._committer is None or self._committer.get_loop() is not loop:
            self._committer = asyncio.ensure_future(self._commit())
        return await future  # type: ignore[no-any-return]

    async def _commit(self) -> None:
        try:
            while self._group:  # what arrives while a group is out goes in the next one
                group, self._group = self._group, []
                await self._commit_group(group)
        finally:
            self._committer = None

    async def _commit_group(self, group: List[Tuple[Sequence[Submission], asyncio.Future]]
                            ) -> None:
        now = contract.now_ms()
        submissions = [submission for wanted, _ in group for submission in wanted]
        calls = [self._submit_call(submissions[i:i + GROUP_LIMIT], now)
                 for i in range(0, len(submissions), GROUP_LIMIT)]
        outcomes: List[Any] = []
        try:
            replies = await self.batcher.batched(*(command for command, _ in calls),
                                                 return_exceptions=True)
        except StateUnavailable as exc:  # unreachable: nothing of the group was written
            replies = [exc] * len(calls)
        for reply, (_, records) in zip(replies, calls):
            if isinstance(reply, Exception):  # the call did not run: none of it was written
                outcomes += [_refused(reply)] * len(records)
                continue
            for (code, value), record in zip(zip(reply[::2], reply[1::2]), records):
                outcomes.append(_refused(value) if code == -1 else
                                (str(value), code == 1, record))
        start = 0
        for wanted, future in group:
            if not future.done():  # else its caller was cancelled
                future.set_result(outcomes[start:start + len(wanted)])
            start += len(wanted)

    def _submit_call(self, submissions: Sequence[Submission], now: int
                     ) -> Tuple[Tuple[Any, ...], List[Dict[str, Any]]]:
        """The ``submit.lua`` call recording ``submissions``, and their records as they will
        be stored."""
        keys = [self.keys.active, self.keys.stats, self.keys.outbox, self.keys.outbox_due,
                self.keys.index]
        submitted = lifecycle_event("submitted", status=contract.QUEUED)
        args: List[Any] = [now, self.settings.state_ttl_seconds, now + OUTBOX_LEASE_MS,
                           WAKE_CHANNEL, submitted, self.settings.idempotency_ttl_seconds]
        records = []
        for idempotency_key, record, jobs, options in submissions:
            deliberation_id = record["id"]
            queue = self.queue_of(record)
            record = {**record, "status": contract.QUEUED, "created_ms": now,
                      "completed": 0, "failed": 0, "num_agents": len(jobs)}
            records.append(record)
            keys += (self.keys.idempotency(idempotency_key),
                     self.keys.deliberation(deliberation_id),
                     self.keys.agents(deliberation_id), self.keys.events(deliberation_id),
                     self.keys.messages(deliberation_id), dramatiq_internals.queue_key(queue),
                     dramatiq_internals.messages_key(queue))
            args += (deliberation_id, queue, len(record),
                     *chain.from_iterable(record.items()), len(jobs))
            for job in jobs:
                redis_id = unique_id()
                args += (job.agent_id, json.dumps({
                    "agent_id": job.agent_id, "role": job.role, "model": job.model,
                    "index": job.agent_index, "status": contract.QUEUED, "attempts": 0,
                }), redis_id, dramatiq_internals.encode(
                    queue, job.kind, job.to_kwargs(),
                    {"max_retries": job.max_retries, **(options or {})}, redis_id))
        return self.batcher.command(self._submit, keys, args), records

    async def cancel(self, deliberation_id: str, reason: str = "") -> Tuple[bool, str]:
        """Cancel unless already ended: ``(cancelled_now, status after the call)``."""
        keys = [self.keys.deliberation(deliberation_id), self.keys.events(deliberation_id),
                self.keys.active, self.keys.stats, self.keys.outbox, self.keys.outbox_due,
                self.keys.agents(deliberation_id), self.keys.messages(deliberation_id)]
        args = [deliberation_id, contract.now_ms(), reason,
                lifecycle_event("cancelled", status=contract.CANCELLED, reason=reason),
                self.settings.state_ttl_seconds, OUTBOX_LEASE_MS]
        changed, status = await self.batcher.eval(self._cancel, keys, args)
        return bool(changed), str(status)

    async def get(self, deliberation_id: str) -> Optional[Tuple[Dict[str, str], List[Dict]]]:
        """The deliberation record and its agents (by index), or None."""
        record, agents = await self.batcher.pipelined(lambda pipe: (
            pipe.hgetall(self.keys.deliberation(deliberation_id)),
            pipe.hvals(self.keys.agents(deliberation_id))))
        if not record:
            return None
        return record, _decode_agents(agents)

    def queue_of(self, record: Dict[str, Any]) -> str:
        """The Dramatiq queue of a deliberation's jobs: its route's, which bridge.validation
        puts in the record (``RAY_EXECUTOR_QUEUE`` for records from before routes)."""
        return record.get("queue") or self.settings.queue

    async def active_jobs(self) -> List[Tuple[Dict[str, str], Dict[str, Any]]]:
        """(deliberation record, agent) of every agent job queued or running."""
        ids = await self.batcher.guard(self.redis.zrange(self.keys.active, 0, -1))
        jobs = []
        for deliberation_id in ids:
            found = await self.get(deliberation_id)
            if found is None:
                continue
            record, agents = found
            jobs += [(record, a) for a in agents
                     if a.get("status") in (contract.QUEUED, contract.RUNNING)]
        return jobs

    async def stats(self) -> Dict[str, int]:
        """Deliberation counters and the number active (the queues' depths, per route:
        ``bridge.health``)."""
        counters, active = await self.batcher.pipelined(lambda pipe: (
            pipe.hgetall(self.keys.stats), pipe.zcard(self.keys.active)))
        counts = {k: int(v) for k, v in counters.items()}
        counts["active"] = active
        return counts

    async def events(self, deliberation_id: str, block_ms: int = 5000
                     ) -> AsyncIterator[Dict[str, Any]]:
        """Every event of a deliberation from the first, as they happen; ends after the last."""
        key = self.keys.events(deliberation_id)
        last = "0"
        while True:
            batches = await self.batcher.guard(
                self.redis.xread({key: last}, block=block_ms, count=100))
            for _, entries in batches or []:
                for entry_id, fields in entries:
                    last = entry_id
                    event = json.loads(fields["event"])
                    yield event
                    if event["event"] in contract.FINAL_STATUSES and \
                            contract.round_of(event) >= await self._round(deliberation_id):
                        return  # else a retry (core.retry) started a later round
            if not batches and not await self.batcher.guard(self.redis.exists(key)):
                return

    async def _round(self, deliberation_id: str) -> int:
        record = self.keys.deliberation(deliberation_id)
        return int(await self.batcher.guard(self.redis.hget(record, "round")) or 1)

    # --- the workers' side ---

    async def start(self, job: AgentJob, retry: int) -> Tuple[str, int]:
        """Begin an attempt: ``(verdict, attempts so far)``. The verdict is ``run``, ``done``
        (already finished), ``missing`` or the deliberation's final status (``cancelled``
        ...): only ``run`` means run the job. ``retry`` is Dramatiq's retry number."""
        keys = [self.keys.deliberation(job.deliberation_id),
                self.keys.agents(job.deliberation_id), self.keys.events(job.deliberation_id)]
        args = [job.agent_id, contract.now_ms(), retry,
                lifecycle_event("agent_started", agent_id=job.agent_id, status=contract.RUNNING,
                       retry=retry)]
        result = await self.batcher.eval(self._start, keys, args)
        return str(result[0]), int(result[1]) if len(result) > 1 else 0

    async def finish(self, job: AgentJob, outcome: Dict[str, Any]) -> Finished:
        """Record an agent's final outcome (``status`` completed or failed, and its fields).

        ``Finished.what`` is ``recorded``, ``final`` (this outcome ended the deliberation),
        ``duplicate`` (already recorded), ``cancelled`` or ``missing``; for the first two it
        carries the state the events are rendered from.
        """
        now = contract.now_ms()
        outcome = {**outcome, "end_ms": now}
        status = outcome["status"]
        event_id = contract.event_id(job.deliberation_id, status, job.agent_id)
        entry = {"kind": "agent", "event": status, "deliberation_id": job.deliberation_id,
                 "agent_id": job.agent_id}
        keys = [self.keys.deliberation(job.deliberation_id),
                self.keys.agents(job.deliberation_id), self.keys.events(job.deliberation_id),
                self.keys.active, self.keys.outbox, self.keys.outbox_due, self.keys.stats,
                self.keys.messages(job.deliberation_id)]
        event = lifecycle_event("agent_" + status, agent_id=job.agent_id, status=status,
                       error=outcome.get("error", ""))
        args = [job.agent_id, now, json.dumps(outcome), event, event_id, json.dumps(entry),
                self.settings.state_ttl_seconds, OUTBOX_LEASE_MS]
        result = await self.batcher.eval(self._finish, keys, args)
        if len(result) < 4:
            return Finished(str(result[0]))
        record = dict(zip(result[2][::2], result[2][1::2]))
        agents = [json.loads(result[3])] if isinstance(result[3], str) else \
            _decode_agents(result[3])
        return Finished(str(result[0]), str(result[1]), record, agents)

    async def is_cancelled(self, deliberation_id: str) -> bool:
        status = await self.batcher.guard(
            self.redis.hget(self.keys.deliberation(deliberation_id), "status"))
        return status == contract.CANCELLED

    async def progress(self, deliberation_id: str, event: str) -> None:
        """Add a running agent's partial output (``lifecycle_event``) to the deliberation's
        event stream; not to a stream that is gone (an expired deliberation's)."""
        await self.batcher.guard(self.redis.xadd(self.keys.events(deliberation_id),
                                                 {"event": event}, nomkstream=True))

def _refused(error: Any) -> StateUnavailable:
    """A submission Redis did not record (its error as Redis or redis-py gave it)."""
    if isinstance(error, StateUnavailable):
        return error
    return StateUnavailable(f"Redis refused the submit: {error}")


def _decode_agents(raw: List[str]) -> List[Dict[str, Any]]:
    """A deliberation's stored agents (JSON each), in their request order."""
    return sorted((json.loads(a) for a in raw), key=lambda a: a.get("index", 0))


def new_deliberation_id() -> str:
    return f"delib-{unique_id()}"


def unique_id() -> str:
    """128 random bits in hex, as ``uuid4().hex`` but without building a UUID (4.8 -> 0.5 µs)."""
    return os.urandom(16).hex()
