"""DeliberationStore against a real valkey: calls made together share one pipeline, a bad
command fails only its caller, scripts come back after SCRIPT FLUSH, and an unreachable Redis
is reported as StateUnavailable to every caller; ``submit_all`` answers each submission on
its own; a group fills each submission's queue, and a retry its route's."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, Awaitable, Callable, Dict, List, Tuple

import redis.exceptions

from core.connections import connect
from core.contract import AgentJob
from core.dramatiq_internals import queue_key
from core.errors import StateUnavailable
from core.keys import WAKE_CHANNEL
from core.retry import retry_failed
from core.settings import Settings
from core.store import DeliberationStore
from harness import servers


def job(deliberation_id: str) -> AgentJob:
    return AgentJob(deliberation_id=deliberation_id, task_id=f"task-{deliberation_id}",
                    agent_id="agent-0", agent_index=0, num_agents=1, role="DEV", model="m",
                    prompt_template="", task_description="d", task_role="DEV",
                    vllm_url="http://127.0.0.1:9/", timeout_seconds=30, max_retries=1)


def run(redis_url: str, scenario: Callable[[DeliberationStore], Awaitable[Any]]) -> Any:
    settings = Settings(redis_url=redis_url, queue=f"q{uuid.uuid4().hex[:8]}",
                        key_prefix=f"t{uuid.uuid4().hex[:8]}")

    async def main() -> Any:
        client = connect(redis_url)
        try:
            return await scenario(DeliberationStore(client, settings))
        finally:
            await client.close()

    return asyncio.run(main())


def new_record(task_id: str = "") -> Dict[str, Any]:
    did = f"delib-{uuid.uuid4().hex}"
    return {"id": did, "task_id": task_id or f"task-{did}", "role": "DEV", "story_id": "",
            "plan_id": "", "vllm_url": "http://127.0.0.1:9/", "model": "m"}


async def submit(store: DeliberationStore) -> Tuple[str, bool, Any]:
    record = new_record()
    return await store.submit(f"task:{record['id']}", record, [job(record["id"])])


def test_concurrent_calls_share_one_pipeline(redis_url: str) -> None:
    pipelines: List[int] = []

    async def scenario(store: DeliberationStore) -> Any:
        await submit(store)  # loads the submit script: a NOSCRIPT reload would add a pipeline
        pipelined = store.batcher.pipelined

        async def counted(*args: Any, **kwargs: Any) -> Any:
            pipelines.append(1)
            return await pipelined(*args, **kwargs)

        store.batcher.pipelined = counted  # type: ignore[method-assign]
        results = await asyncio.gather(*(submit(store) for _ in range(100)))
        queued = await store.redis.llen(queue_key(store.settings.queue))
        return results, queued

    results, queued = run(redis_url, scenario)
    assert all(created for _, created, _ in results)
    assert queued == 1 + 100
    # All 100 are made in one turn of the loop, before the batcher's flush runs.
    assert len(pipelines) == 1, f"100 submits took {len(pipelines)} pipelines"


def test_a_failing_command_fails_only_its_caller(redis_url: str) -> None:
    async def scenario(store: DeliberationStore) -> Any:
        await store.redis.rpush(f"{store.keys.prefix}:a-list", "x")
        return await asyncio.gather(
            submit(store), store.batcher.batched(("HSET", f"{store.keys.prefix}:a-list", "f", "v")),
            submit(store), return_exceptions=True)

    first, wrong, second = run(redis_url, scenario)
    assert isinstance(wrong, redis.exceptions.ResponseError) and "WRONGTYPE" in str(wrong)
    assert first[1] and second[1]


def test_scripts_are_loaded_again_after_a_flush(redis_url: str) -> None:
    async def scenario(store: DeliberationStore) -> Any:
        await submit(store)
        await store.redis.script_flush()
        return await asyncio.gather(submit(store), submit(store))

    assert all(created for _, created, _ in run(redis_url, scenario))


def test_unreachable_redis_fails_every_caller_with_state_unavailable() -> None:
    url = f"redis://127.0.0.1:{servers.free_port()}/0"  # nothing listens there

    async def scenario(store: DeliberationStore) -> Any:
        return await asyncio.gather(submit(store), store.batcher.batched(("GET", "x")),
                                    return_exceptions=True)

    for outcome in run(url, scenario):
        assert isinstance(outcome, StateUnavailable), outcome


def test_idempotency_holds_within_one_pipeline(redis_url: str) -> None:
    async def scenario(store: DeliberationStore) -> Any:
        record, other = new_record("same-task"), new_record("same-task")
        return await asyncio.gather(store.submit("task:same", record, [job(record["id"])]),
                                    store.submit("task:same", other, [job(other["id"])]))

    (first_id, first_created, _), (second_id, second_created, _) = run(redis_url, scenario)
    assert (first_created, second_created) == (True, False)
    assert second_id == first_id



def test_submit_all_answers_each_submission_on_its_own(redis_url: str) -> None:
    async def scenario(store: DeliberationStore) -> Any:
        await store.redis.rpush(store.keys.idempotency("broken"), "x")  # GET on it fails
        records = [new_record("same"), new_record("same"), new_record(), new_record()]
        keys = ["task:same", "task:same", "broken", "task:other"]
        outcomes = await store.submit_all([(key, record, [job(record["id"])], None)
                                           for key, record in zip(keys, records)])
        return records, outcomes, await store.redis.llen(queue_key(store.settings.queue))

    records, (first, again, broken, other), queued = run(redis_url, scenario)
    assert first[:2] == (records[0]["id"], True)
    assert again[:2] == (records[0]["id"], False)  # same key in the same batch: the first one
    assert isinstance(broken, StateUnavailable) and "WRONGTYPE" in str(broken)
    assert other[:2] == (records[3]["id"], True)
    assert queued == 2


def test_one_group_fills_each_submission_s_own_queue_and_wakes_each(redis_url: str) -> None:
    """Routes: the submissions of one group commit go to the queues their records name (the
    rest to ``RAY_EXECUTOR_QUEUE``), with one wake-up per queue that got messages."""
    async def scenario(store: DeliberationStore) -> Any:
        tag = uuid.uuid4().hex[:8]
        records = [{**new_record(), "queue": f"a{tag}"}, {**new_record(), "queue": f"b{tag}"},
                   {**new_record(), "queue": f"a{tag}"}, new_record()]
        woken = store.redis.pubsub()
        await woken.subscribe(WAKE_CHANNEL)
        await woken.get_message(timeout=5)  # the subscription's confirmation
        outcomes = await store.submit_all([(f"task:{r['id']}", r, [job(r["id"])], None)
                                           for r in records])
        wakes = set()
        while True:
            message = await woken.get_message(ignore_subscribe_messages=True, timeout=1)
            if message is None:
                break
            wakes.add(message["data"])
        await woken.close()
        lengths = [await store.redis.llen(queue_key(queue))
                   for queue in (f"a{tag}", f"b{tag}", store.settings.queue)]
        return tag, outcomes, lengths, wakes, store.settings.queue

    tag, outcomes, lengths, wakes, default = run(redis_url, scenario)
    assert all(outcome[1] for outcome in outcomes)
    assert lengths == [2, 1, 1]
    assert wakes >= {f"a{tag}", f"b{tag}", default}


def test_a_retry_queues_the_failed_agents_on_their_route_s_queue(redis_url: str) -> None:
    """``core.retry`` requeues on the queue the record names (its route's), not on
    ``RAY_EXECUTOR_QUEUE``."""
    async def scenario(store: DeliberationStore) -> Any:
        record = {**new_record(), "queue": f"r{uuid.uuid4().hex[:8]}"}
        failed = job(record["id"])
        await store.submit(f"task:{record['id']}", record, [failed])
        await store.redis.delete(queue_key(record["queue"]))  # as a worker took it
        await store.start(failed, 0)
        await store.finish(failed, {"status": "failed", "error": "boom"})
        await store.redis.delete(store.keys.outbox)  # as the outbox published its events
        await retry_failed(store, record["id"], by="test", reason="routes")
        return [await store.redis.llen(queue_key(queue))
                for queue in (record["queue"], store.settings.queue)]

    assert run(redis_url, scenario) == [1, 0]
