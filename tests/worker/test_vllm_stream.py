"""The streamed vLLM call: the event-stream decoder, the chunks added up into the agent's
result, and ``call_vllm`` against the stand-in's streamed answers and mid-stream faults.

Needs aiohttp (the worker environment), neither Ray nor Redis: the stand-in (fixture ``llm``,
tests/worker/conftest.py) runs in a thread of the test process.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator, Dict, List, Optional

import aiohttp
import pytest

from cluster.completion import CompletionStream, parse_completion, stream_error
from cluster.sse import EventTooLarge, SSEDecoder
from cluster.vllm import call_vllm
from core.errors import LLMError
from harness.standin_behaviour import MARKER, REASONING
from harness.standin_llm import StandinThread
from harness.standin_stream import pieces
from tests.waiting import until, until_async
from tests.worker.test_vllm_agent import call, make_job

# --- the event-stream decoder ------------------------------------------------------------

STREAM = (b": a comment\r\n"
          b"data: {\"a\": 1}\r\n\r\n"
          b"event: ignored\nid: 7\nretry: 10\ndata:no space\ndata:  two spaces\n\n"
          b"data: caf\xc3\xa9\r\r"
          b"data: first\r\ndata: second\r\n\r\n"  # cut inside a CRLF: still one line end
          b"data\n\n"  # a field name alone: an empty value
          b"\n\n"  # blank lines without data dispatch nothing
          b"data: [DONE]\n\n"
          b"data: never ended")
EVENTS = ['{"a": 1}', "no space\n two spaces", "café", "first\nsecond", "", "[DONE]"]


def test_the_decoder_gives_each_event_whole_however_the_bytes_are_cut() -> None:
    assert SSEDecoder().feed(STREAM) == EVENTS
    for cut in range(1, len(STREAM)):  # a CRLF, a UTF-8 character, a line: any cut
        decoder = SSEDecoder()
        assert decoder.feed(STREAM[:cut]) + decoder.feed(STREAM[cut:]) == EVENTS, cut
    decoder = SSEDecoder()
    assert [event for byte in range(len(STREAM))
            for event in decoder.feed(STREAM[byte:byte + 1])] == EVENTS


def test_the_decoder_refuses_an_event_without_end() -> None:
    decoder = SSEDecoder(max_event_bytes=64)
    assert decoder.feed(b"data: " + b"x" * 50 + b"\n\n") == ["x" * 50]
    with pytest.raises(EventTooLarge):
        decoder.feed(b"data: " + b"x" * 40 + b"\ndata: " + b"y" * 40 + b"\n")
    with pytest.raises(EventTooLarge):
        SSEDecoder(max_event_bytes=64).feed(b"data: " + b"z" * 100)  # one line, no end


# --- the chunks added up -----------------------------------------------------------------


def chunk(delta: Optional[Dict[str, Any]] = None, finish_reason: Optional[str] = None,
          **fields: Any) -> str:
    """One vLLM ``chat.completion.chunk`` as the data of its event."""
    value: Dict[str, Any] = {"id": "c-1", "object": "chat.completion.chunk", "model": "m-1",
                             "choices": [] if delta is None else [
                                 {"index": 0, "delta": delta, "finish_reason": finish_reason}]}
    value.update(fields)
    return json.dumps(value)


USAGE = {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}


def streamed(events: List[str], on_delta: Any = None) -> CompletionStream:
    stream = CompletionStream("default-model", on_delta, started=0.0)
    for data in events:
        stream.event(data)
    return stream


def test_the_chunks_add_up_to_the_result_of_the_whole_answer() -> None:
    delivered: List[str] = []
    stream = streamed([
        chunk({"role": "assistant", "content": ""}),
        chunk({"reasoning_content": "think ", "reasoning": "think "}),  # one piece, 2 names
        chunk({"reasoning_content": "hard"}),
        chunk({"content": '{"score": '}), chunk({"content": ""}), chunk({"content": "0.5}"}),
        chunk({}, "stop"), chunk(None, usage=USAGE), "[DONE]",
        chunk({"content": "after the end"})], delivered.append)
    result = stream.result()
    whole = parse_completion(json.dumps({"model": "m-1", "usage": USAGE, "choices": [
        {"message": {"content": '{"score": 0.5}', "reasoning_content": "think hard"},
         "finish_reason": "stop"}]}).encode())
    assert {key: result[key] for key in whole} == whole
    assert (result["content"], result["reasoning"], result["tokens"], result["score"]) == (
        '{"score": 0.5}', "think hard", 5, 0.5)
    assert delivered == ['{"score": ', "0.5}"]  # content only, in order, none empty
    assert set(result) == set(whole) | {"ttft_ms", "tokens_per_second"}


def test_reasoning_under_its_newer_name_and_a_think_part() -> None:
    result = streamed([chunk({"reasoning": "why"}), chunk({"content": "so"}), "[DONE]"]).result()
    assert (result["reasoning"], result["content"], result["tokens"]) == ("why", "so", 0)
    assert result["model"] == "m-1" and result["usage"] == {}
    delivered: List[str] = []
    parts = ["<think>ponder", "ing</think>", "  the answer"]
    result = streamed([chunk({"content": part}) for part in parts] + ["[DONE]"],
                      delivered.append).result()
    assert (result["reasoning"], result["content"]) == ("pondering", "the answer")
    assert delivered == parts  # the raw pieces


def test_time_to_first_token_and_tokens_per_second() -> None:
    stream = streamed([chunk({"content": "a"}), chunk(None, usage=USAGE), "[DONE]"])
    stream.first, stream.ended = 0.5, 2.5  # started at 0.0
    assert (stream.result()["ttft_ms"], stream.result()["tokens_per_second"]) == (500.0, 2.5)
    stream.usage = {"completion_tokens": 1}
    assert stream.result()["tokens_per_second"] == 0.0  # one token has no rate
    stream = streamed([chunk({"role": "assistant", "content": ""}), chunk({}, "length"),
                       chunk(None, usage=USAGE), "[DONE]"])
    assert (stream.result()["ttft_ms"], stream.result()["tokens_per_second"]) == (0.0, 0.0)


@pytest.mark.parametrize("data, error_type, retryable, status", [
    ({"error": {"message": "bad", "type": "BadRequestError", "code": 400}},
     "bad_request", False, 400),
    ({"object": "error", "message": "busy", "type": "ServiceUnavailable", "code": 503},
     "unavailable", True, 503),
    ({"error": {"message": "slow down", "code": "429"}}, "rate_limited", True, 429),
    ({"error": {"message": "boom", "type": "InternalServerError", "code": "engine_dead"}},
     "server_error", True, None),
    ({"error": "plain text"}, "server_error", True, None),
], ids=["400", "object-error-503", "code-as-text", "no-status", "error-string"])
def test_an_error_chunk_is_classified_as_an_answer_of_its_code(
        data: Dict[str, Any], error_type: str, retryable: bool, status: Optional[int]) -> None:
    with pytest.raises(LLMError) as info:
        streamed([chunk({"content": "partial"}), json.dumps(data), "[DONE]"])
    error = info.value
    assert (error.error_type, error.retryable, error.status) == (error_type, retryable, status)
    message = data.get("error", data)
    assert (message if isinstance(message, str) else message["message"]) in error.message
    assert stream_error(json.loads(chunk({"content": "x"}))) is None


@pytest.mark.parametrize("data", ["<html>not json", "[1, 2]", '"text"'])
def test_a_chunk_that_is_not_a_json_object_is_an_invalid_response(data: str) -> None:
    with pytest.raises(LLMError) as info:
        streamed([chunk({"content": "partial"}), data])
    assert (info.value.error_type, info.value.retryable, info.value.status) == (
        "invalid_response", False, 200)


def test_done_without_any_choice_is_an_invalid_response() -> None:
    with pytest.raises(LLMError) as info:
        streamed([chunk(None, usage=USAGE), "[DONE]"])
    assert (info.value.error_type, info.value.retryable) == ("invalid_response", False)


class Body:
    """What ``CompletionStream.read`` reads: an aiohttp body's ``iter_any``."""

    def __init__(self, *parts: bytes) -> None:
        self.parts = parts

    async def iter_any(self) -> AsyncIterator[bytes]:
        for part in self.parts:
            yield part


def read(*parts: bytes) -> CompletionStream:
    stream = CompletionStream("default-model", None, started=0.0)
    asyncio.run(stream.read(Body(*parts)))  # type: ignore[arg-type]
    return stream


def test_a_stream_ending_before_done_is_a_connection_error() -> None:
    events = [f"data: {chunk({'content': 'ab'})}\n\n".encode(), b"data: [DO", b"NE]\n\n"]
    assert read(*events).result()["content"] == "ab"
    for cut in (events[:1], events[:2], [events[0], b"data: [DONE]"]):  # no blank line
        with pytest.raises(LLMError) as info:
            read(*cut)
        assert (info.value.error_type, info.value.retryable) == ("connection", True)
        assert "before [DONE]" in info.value.message
    with pytest.raises(LLMError) as info:
        read(b"data: " + b"x" * (17 * 1024 * 1024))
    assert info.value.error_type == "invalid_response"


def test_a_failing_on_delta_is_dropped_and_the_call_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    calls: List[str] = []

    def sink(piece: str) -> None:
        calls.append(piece)
        raise RuntimeError("the sink broke")

    with caplog.at_level(logging.ERROR, logger="ray_executor.vllm"):
        result = streamed([chunk({"content": "a"}), chunk({"content": "b"}), "[DONE]"],
                          sink).result()
    assert result["content"] == "ab" and calls == ["a"]
    assert "partial-output callback failed" in caplog.text


# --- call_vllm against the stand-in's streams --------------------------------------------


def test_a_streamed_answer_equals_the_whole_one(llm: StandinThread) -> None:
    llm.control(piece_chars=5)
    delivered: List[str] = []
    result = call(llm.url, make_job(), on_delta=delivered.append)
    assert llm.sampling()[-1]["stream"] is True  # it did ask for a stream
    llm.control(stream=False)  # the stand-in answers whole, as a server that cannot stream
    whole = call(llm.url, make_job(), on_delta=delivered.append)
    assert {key: result[key] for key in whole if key not in ("ttft_ms", "tokens_per_second")} \
        == {key: whole[key] for key in whole if key not in ("ttft_ms", "tokens_per_second")}
    assert result["content"].startswith(MARKER) and result["reasoning"] == REASONING
    assert result["tokens"] == result["usage"]["completion_tokens"] > 2
    assert delivered == pieces(result["content"], 5)  # the whole answer gave none
    assert result["ttft_ms"] > 0 and whole["tokens_per_second"] == 0.0


def test_time_to_first_token_and_rate_follow_the_pieces(llm: StandinThread) -> None:
    delay = 0.05
    llm.control(piece_chars=40, piece_delay=delay)
    result = call(llm.url, make_job())
    count = len(pieces(REASONING, 40)) + len(pieces(result["content"], 40))
    # The first piece comes one delay after the role chunk, the rest one delay apart.
    assert result["ttft_ms"] >= delay * 1000 * 0.9
    assert 0 < result["tokens_per_second"] <= result["tokens"] / (count * delay * 0.9)


def test_a_stream_cut_mid_way_is_a_connection_error(llm: StandinThread) -> None:
    llm.control(break_after=2, fail_count=1, piece_chars=4)
    delivered: List[str] = []
    with pytest.raises(LLMError) as info:
        call(llm.url, make_job(), on_delta=delivered.append)
    assert (info.value.error_type, info.value.retryable) == ("connection", True)
    assert "broke after" in info.value.message
    assert len(delivered) == 2 and llm.stats()["errors"] == 1
    assert call(llm.url, make_job())["finish_reason"] == "stop"  # fail_count used up


def test_an_error_chunk_mid_stream_fails_the_call(llm: StandinThread) -> None:
    llm.control(error_after=1)
    delivered: List[str] = []
    with pytest.raises(LLMError) as info:
        call(llm.url, make_job(), on_delta=delivered.append)
    error = info.value
    assert (error.error_type, error.retryable, error.status) == ("server_error", True, 500)
    assert "injected error in the middle of the stream" in error.message
    assert len(delivered) == 1


def test_the_time_limit_bounds_the_whole_stream(llm: StandinThread) -> None:
    llm.control(piece_delay=30)  # the head and the first chunk come at once, then nothing
    with pytest.raises(LLMError) as info:
        call(llm.url, make_job(), timeout=0.5)
    assert (info.value.error_type, info.value.retryable) == ("timeout", True)
    until(lambda: llm.stats()["cancelled"] == 1, "the stand-in seeing the request go away")


def test_cancelling_mid_stream_closes_the_request(llm: StandinThread) -> None:
    llm.control(piece_delay=1, piece_chars=2000)  # reasoning, then content, a second apart
    delivered: List[str] = []

    async def run() -> None:
        async with aiohttp.ClientSession() as session:
            task = asyncio.ensure_future(call_vllm(session, make_job(), base_url=llm.url,
                                                   timeout=60, on_delta=delivered.append))
            await until_async(lambda: delivered, "the first piece of content")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(run())
    until(lambda: llm.stats()["cancelled"] == 1, "the stand-in seeing the request go away")
    assert llm.stats()["completed"] == 0
