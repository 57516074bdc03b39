"""The outbox against real valkey and nats-server (JetStream): publishes made together go out
as one batch, each acked one is forgotten, and one JetStream refuses keeps its entry."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, Awaitable, Callable, List

import nats

from core import contract
from core.connections import connect
from core.contract import Subjects
from core.outbox import STREAM_START, Outbox, ensure_streams
from core.settings import Settings
from core.store import DeliberationStore
from tests.bridge.test_state import submit


def run(redis_url: str, nats_url: str,
        scenario: Callable[[Outbox, Any], Awaitable[Any]]) -> Any:
    tag = uuid.uuid4().hex[:8]
    settings = Settings(redis_url=redis_url, nats_url=nats_url, queue=f"q{tag}",
                        key_prefix=f"t{tag}", nats_events_prefix=f"ev{tag}.deliberation",
                        nats_events_stream=f"EV{tag}",
                        nats_responses_prefix=f"re{tag}.response",
                        nats_responses_stream=f"RE{tag}",
                        nats_commands_prefix=f"co{tag}.cmd", nats_commands_stream=f"CO{tag}",
                        nats_streaming_prefix=f"st{tag}.vllm.streaming",
                        nats_streaming_stream=f"ST{tag}")

    async def main() -> Any:
        client = connect(redis_url)
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            outbox = Outbox(DeliberationStore(client, settings), js, Subjects(settings))
            await ensure_streams(js, outbox.subjects)
            return await scenario(outbox, js)
        finally:
            await nc.close()
            await client.close()

    return asyncio.run(main())


def test_publishes_of_one_turn_go_out_as_one_batch_and_are_forgotten(
        redis_url: str, nats_url: str) -> None:
    batches: List[int] = []

    async def scenario(outbox: Outbox, js: Any) -> Any:
        send_batch = outbox._send_batch

        async def counted(batch: Any) -> None:
            batches.append(len(batch))
            await send_batch(batch)

        outbox._send_batch = counted  # type: ignore[method-assign]
        submitted = [await submit(outbox.store) for _ in range(50)]
        ids = [contract.event_id(did, "submitted") for did, _, _ in submitted]
        outcomes = await asyncio.gather(*(
            outbox.send(event_id, outbox.subjects.deliberation("submitted"),
                        contract.deliberation_submitted(record, []), {})
            for event_id, (_, _, record) in zip(ids, submitted)))
        left = await outbox.store.redis.hmget(outbox.store.keys.outbox, ids)
        stream = await js.stream_info(outbox.store.settings.nats_events_stream)
        return outcomes, left, stream.state.messages

    outcomes, left, stored = run(redis_url, nats_url, scenario)
    assert outcomes == [True] * 50
    assert batches == [50], batches
    assert left == [None] * 50, "acked entries are forgotten"
    assert stored == 50


def test_an_event_jetstream_refuses_keeps_its_entry(redis_url: str, nats_url: str) -> None:
    async def scenario(outbox: Outbox, js: Any) -> Any:
        (did, _, record), (other, _, other_record) = [await submit(outbox.store)
                                                      for _ in range(2)]
        refused, accepted = await asyncio.gather(
            outbox.send(contract.event_id(did, "submitted"), "no.stream.here",
                        contract.deliberation_submitted(record, []), {}),
            outbox.send(contract.event_id(other, "submitted"),
                        outbox.subjects.deliberation("submitted"),
                        contract.deliberation_submitted(other_record, []), {}))
        keys = outbox.store.keys
        kept = await outbox.store.redis.hexists(keys.outbox, contract.event_id(did, "submitted"))
        gone = not await outbox.store.redis.hexists(keys.outbox,
                                                    contract.event_id(other, "submitted"))
        return refused, accepted, kept, gone

    refused, accepted, kept, gone = run(redis_url, nats_url, scenario)
    assert (refused, accepted) == (False, True)
    assert kept, "the refused event waits in the outbox for a later try"
    assert gone


def test_the_streaming_start_event_keeps_its_own_entry(redis_url: str, nats_url: str) -> None:
    """``vllm.streaming.<id>`` refused while ``submitted`` is acked: its entry stays, and a
    later flush publishes it (no longer lost with its companion's entry)."""
    async def scenario(outbox: Outbox, js: Any) -> Any:
        streaming = outbox.store.settings.nats_streaming_stream
        await js.delete_stream(streaming)  # publishes to vllm.streaming.> now find no stream
        did, _, record = await submit(outbox.store)
        submitted, started = contract.event_id(did, "submitted"), \
            contract.event_id(did, STREAM_START)
        accepted, refused = await asyncio.gather(
            outbox.send(submitted, outbox.subjects.deliberation("submitted"),
                        contract.deliberation_submitted(record, []), {}),
            outbox.send_stream_start(record))
        keys = outbox.store.keys
        kept = await outbox.store.redis.hexists(keys.outbox, started)
        gone = not await outbox.store.redis.hexists(keys.outbox, submitted)
        await ensure_streams(js, outbox.subjects)  # the stream is back
        sent = await outbox.publish([started])
        published = await js.get_last_msg(streaming, outbox.subjects.stream_start(did))
        left = await outbox.store.redis.hexists(keys.outbox, started)
        return accepted, refused, kept, gone, sent, published.headers["Nats-Msg-Id"], left

    accepted, refused, kept, gone, sent, msg_id, left = run(redis_url, nats_url, scenario)
    assert (accepted, refused) == (True, False)
    assert kept and gone, "the start event waits in its own entry, submitted's is cleared"
    assert sent == 1 and not left and msg_id.endswith(":vllm_stream_start")
