"""Retrying the failed agents of a finished deliberation, as a new round.

A deliberation ends in round 1. A retry (an operator's, ``OperationsService.RetryDeliberation``)
puts its failed agents back in the queue as round 2 (then 3 ...): each is queued again from the
Dramatiq message it was submitted with (``submit.lua`` keeps them, ``Keys.messages``), under new
message ids, so Dramatiq's retry count starts again. The workers run them as any job; when the
last one finishes, the deliberation ends again and its final event is published again. Events
of round 2 on carry ``round`` in their payload and ``:r<round>`` at the end of their id
(``contract.event_id``); round 1's are what they always were.

``retry.lua`` applies a retry atomically, after checking that the state is still the one the
messages were encoded from. Who asked, when and why is kept in the record (``retries``, one
action per round); a call while that round runs answers with its action and enqueues nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional

from core import contract, dramatiq_internals
from core.keys import WAKE_CHANNEL
from core.store import DeliberationStore, lifecycle_event, unique_id

_SCRIPT = (Path(__file__).parent / "lua" / "retry.lua").read_text()
_RACES = 3  # reads again when the state changed between the read and the script


class Refused(Exception):
    """The deliberation cannot be retried now; the message says why."""


class NotFound(Exception):
    """No such deliberation (never submitted, or expired)."""


class Retry(NamedTuple):
    """What ``retry_failed`` did: ``retried`` False when it answered with the round already
    in progress; ``action`` is that round's (by, reason, time ms, round, agents)."""

    retried: bool
    action: Dict[str, Any]


async def retry_failed(store: DeliberationStore, deliberation_id: str, *, by: str,
                       reason: str) -> Retry:
    """Queue the failed agents of ``deliberation_id`` again as a new round.

    Raises ``NotFound``, ``Refused`` (cancelled, still running its first round, nothing
    failed, or its last events not yet published) or ``StateUnavailable``."""
    for _ in range(_RACES):
        done = await _try(store, deliberation_id, by, reason)
        if done is not None:
            return done
    raise Refused("the deliberation kept changing while the retry was prepared; try again")


async def _try(store: DeliberationStore, deliberation_id: str, by: str, reason: str
               ) -> Optional[Retry]:
    keys = store.keys
    record, agents, messages = await store.batcher.pipelined(lambda pipe: (
        pipe.hgetall(keys.deliberation(deliberation_id)),
        pipe.hvals(keys.agents(deliberation_id)),
        pipe.hgetall(keys.messages(deliberation_id))))
    if not record:
        raise NotFound(f"deliberation {deliberation_id!r} not found")
    status, round = record.get("status"), contract.round_of(record)
    retries = json.loads(record.get("retries") or "[]")
    if status in (contract.QUEUED, contract.RUNNING):
        if retries:  # the round a retry started is running: answer with its action
            return Retry(False, retries[-1])
        raise Refused(f"deliberation {deliberation_id} is {status}: only a finished one "
                      "can be retried")
    if status == contract.CANCELLED:
        raise Refused(f"deliberation {deliberation_id} was cancelled")
    failed = [json.loads(a) for a in agents]
    failed = [a["agent_id"] for a in failed if a.get("status") == contract.FAILED]
    if not failed:
        raise Refused(f"deliberation {deliberation_id} is {status} with no failed agent")
    missing = [agent_id for agent_id in failed if agent_id not in messages]
    if missing:
        raise Refused(f"the messages of {', '.join(missing)} were not kept (submitted before "
                      "retries existed)")
    action = {"round": round + 1, "by": by, "reason": reason, "time_ms": contract.now_ms(),
              "agents": failed}
    pending = [contract.event_id(deliberation_id, status, "", round)] + [
        contract.event_id(deliberation_id, contract.FAILED, agent_id, round)
        for agent_id in failed]
    retried = lifecycle_event("retried", status=contract.QUEUED, **action)
    queue = store.queue_of(record)
    args: List[Any] = [deliberation_id, action["time_ms"], round, json.dumps(action), retried,
                       WAKE_CHANNEL, queue, len(pending), *pending]
    for agent_id in failed:
        args += _requeued(queue, agent_id, messages[agent_id])
    dead = dramatiq_internals.dead_letter_key(queue)
    outcome = await store.batcher.eval(_SCRIPT, [
        keys.deliberation(deliberation_id), keys.agents(deliberation_id),
        keys.events(deliberation_id), keys.messages(deliberation_id), keys.active, keys.stats,
        dramatiq_internals.queue_key(queue), dramatiq_internals.messages_key(queue), dead,
        dramatiq_internals.messages_key(dead), keys.outbox], args)
    verdict = str(outcome[0])
    if verdict == "retried":
        return Retry(True, json.loads(outcome[1]))
    if verdict == "not_found":
        raise NotFound(f"deliberation {deliberation_id!r} not found")
    if verdict == "unpublished":
        raise Refused(f"deliberation {deliberation_id}'s round {round} events are not all "
                      "published to NATS yet; retry once they are")
    return None  # moved on since the read: read again


def _requeued(queue: str, agent_id: str, encoded: str) -> List[str]:
    """``retry.lua``'s arguments for one agent: its id, the redis message id it last had, and
    its message encoded again under new ids. The kept message is the one submitted (or the
    last retry's), never a copy Dramatiq added its retry count to: its options are as given."""
    message = json.loads(encoded)
    redis_id = unique_id()
    return [agent_id, message["options"]["redis_message_id"], redis_id,
            dramatiq_internals.encode(queue, message["actor_name"], message["kwargs"],
                                      message["options"], redis_id)]
