"""The stand-in vLLM: its answers, its injected faults, its concurrency and its counters.

Standard library clients only (urllib, http.client, raw asyncio streams).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

from harness.standin_behaviour import MARKER
from harness.standin_llm import ControlError, StandinThread, run_in_thread
from tests.waiting import until, until_async

ROOT = Path(__file__).resolve().parents[2]
CHAT = {"model": "qwen-test", "messages": [
    {"role": "system", "content": "You are a DEV."},
    {"role": "user", "content": "Design   a cache\nfor the orders service."},
]}


@pytest.fixture
def llm() -> Iterator[StandinThread]:
    with run_in_thread(model="standin-model") as server:
        yield server


def request(url: str, path: str, payload: Optional[Any] = None,
            timeout: float = 10) -> Tuple[int, Dict[str, str], bytes]:
    """(status, headers, body) of one request; error statuses are returned, not raised."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url + path, data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def chat(url: str, payload: Any = CHAT) -> Tuple[int, Dict[str, str], bytes]:
    return request(url, "/v1/chat/completions", payload)


def test_completion_shape(llm: StandinThread) -> None:
    status, headers, body = chat(llm.url)
    assert status == 200 and headers["Content-Type"] == "application/json"
    answer = json.loads(body)
    assert answer["id"].startswith("chatcmpl-")
    assert answer["object"] == "chat.completion"
    assert isinstance(answer["created"], int)
    assert answer["model"] == "qwen-test"  # echoes the request's model
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == (
        f"{MARKER} Echo of the last user message: Design a cache for the orders service.")
    assert "stand-in" in choice["message"]["reasoning_content"].lower()
    usage = answer["usage"]
    assert usage["prompt_tokens"] == 4 + 7
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 10
    assert llm.stats() == {"requests": 1, "in_flight": 0, "peak_in_flight": 1,
                           "serving": 0, "peak_serving": 0, "completed": 1, "errors": 0,
                           "cancelled": 0}


def test_echo_is_short_and_model_defaults(llm: StandinThread) -> None:
    long = {"messages": [{"role": "user", "content": [{"type": "text", "text": "x" * 500}]}]}
    answer = json.loads(chat(llm.url, long)[2])
    assert answer["model"] == "standin-model"
    assert answer["choices"][0]["message"]["content"].endswith(" " + "x" * 200)


def test_other_endpoints(llm: StandinThread) -> None:
    status, _, body = request(llm.url, "/v1/models")
    assert status == 200
    assert [m["id"] for m in json.loads(body)["data"]] == ["standin-model"]
    assert request(llm.url, "/health")[0] == 200
    status, _, body = request(llm.url, "/nowhere")
    assert status == 404 and json.loads(body)["error"]["code"] == 404
    assert request(llm.url, "/v1/chat/completions")[0] == 405  # GET
    status, _, body = request(llm.url, "/v1/chat/completions", {"messages": "nope"})
    assert status == 400 and json.loads(body)["error"]["type"] == "invalid_request_error"
    assert llm.stats()["requests"] == 1  # only chat requests are counted


def test_json_schema_output(llm: StandinThread) -> None:
    schema = {"type": "object", "required": ["title", "score", "count", "ok", "steps",
                                             "meta", "level"],
              "properties": {"title": {"type": "string"}, "score": {"type": "number"},
                             "count": {"type": "integer"}, "ok": {"type": "boolean"},
                             "steps": {"type": "array", "items": {"type": "string"}},
                             "meta": {"type": "object"}, "level": {"enum": ["low", "high"]},
                             "optional": {"type": "string"}}}
    payload = dict(CHAT, response_format={"type": "json_schema",
                                          "json_schema": {"name": "p", "schema": schema}})
    content = json.loads(chat(llm.url, payload)[2])["choices"][0]["message"]["content"]
    assert json.loads(content) == {"title": "stand-in", "score": 0.5, "count": 1, "ok": True,
                                   "steps": [], "meta": {}, "level": "low"}
    payload = dict(CHAT, response_format={"type": "json_object"})
    content = json.loads(chat(llm.url, payload)[2])["choices"][0]["message"]["content"]
    value = json.loads(content)
    assert value["score"] == 0.5 and "stand-in" in value["proposal"]


def test_status_fail_count_and_retry_after(llm: StandinThread) -> None:
    llm.control(status=429, fail_count=2, retry_after=1.5)
    for _ in range(2):
        status, headers, body = chat(llm.url)
        assert status == 429 and headers["Retry-After"] == "1.5"
        error = json.loads(body)["error"]
        assert set(error) >= {"message", "type", "code"} and error["code"] == 429
    assert chat(llm.url)[0] == 200  # used up: requests succeed again
    assert llm.stats()["errors"] == 2 and llm.stats()["completed"] == 1
    # Over HTTP, and a fault without fail_count applies to every request.
    status, _, body = request(llm.url, "/control", {"status": 503})
    assert status == 200 and json.loads(body)["fail_count"] == -1
    assert [chat(llm.url)[0] for _ in range(3)] == [503, 503, 503]
    assert "Retry-After" in chat(llm.url)[1]  # retry_after is still set
    status, _, body = request(llm.url, "/control/reset", {})
    assert status == 200 and json.loads(body)["status"] == 200
    assert chat(llm.url)[0] == 200
    assert llm.stats()["requests"] == 1  # reset zeroed the counters


def test_hold_keeps_requests_until_released(llm: StandinThread) -> None:
    """Held requests stay in flight however long the test takes; releasing answers them all,
    and requests after that are not held."""

    llm.control(hold=True)
    with ThreadPoolExecutor(5) as pool:
        answers = [pool.submit(chat, llm.url) for _ in range(5)]
        until(lambda: llm.stats()["in_flight"] == 5, "five requests held")
        assert not any(answer.done() for answer in answers)
        llm.control(hold=False)
        assert [answer.result(timeout=30)[0] for answer in answers] == [200] * 5
    assert chat(llm.url)[0] == 200
    assert llm.stats()["completed"] == 6 and llm.stats()["peak_in_flight"] == 5


def test_capacity_serves_that_many_at_once(llm: StandinThread) -> None:
    """A stand-in of capacity 2 serves two requests at a time; the others wait their turn
    and are answered all the same."""
    llm.control(capacity=2, latency=1)
    with ThreadPoolExecutor(6) as pool:
        answers = [pool.submit(chat, llm.url) for _ in range(6)]
        until(lambda: llm.stats()["in_flight"] == 6, "six requests in")
        assert [answer.result(timeout=60)[0] for answer in answers] == [200] * 6
    stats = llm.stats()
    assert (stats["peak_serving"], stats["completed"], stats["serving"]) == (2, 6, 0), stats


def test_invalid_control(llm: StandinThread) -> None:
    status, _, body = request(llm.url, "/control", {"latency": "slow"})
    assert status == 400 and "latency" in json.loads(body)["error"]["message"]
    assert request(llm.url, "/control", {"nonsense": 1})[0] == 400
    with pytest.raises(ControlError):
        llm.control(status=99)
    with pytest.raises(ControlError):
        run_in_thread(fail_count=-2)


async def _held_chats(llm: StandinThread, count: int) -> Dict[str, int]:
    """Send ``count`` chat requests on connections of their own, wait until the stand-in holds
    them all, ask one more while they wait, then close them; the stand-in's counters."""
    body = json.dumps(CHAT).encode()
    chat_bytes = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                  % (len(body), body))
    connections = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", llm.port)
                                         for _ in range(count)))
    for _, writer in connections:
        writer.write(chat_bytes)
    await asyncio.gather(*(writer.drain() for _, writer in connections))
    await until_async(lambda: llm.stats()["in_flight"] == count, f"{count} requests held")
    llm.control(latency=0)  # for requests from now on: the held ones keep their hour
    status, _, _ = chat(llm.url)
    assert status == 200, "answered while the others wait"
    for _, writer in connections:
        writer.close()
    await until_async(lambda: llm.stats()["cancelled"] == count, "the held requests cancelled")
    return llm.stats()


@pytest.mark.parametrize("count", [200, 1000])
def test_requests_in_their_latency_are_held_concurrently(count: int) -> None:
    """The latency (an hour) outlasts the test: only requests waiting side by side explain
    ``count`` of them in flight at once."""
    with run_in_thread(latency=3600) as llm:
        stats = asyncio.run(_held_chats(llm, count))
    assert stats["peak_in_flight"] == count + 1, stats
    assert stats["in_flight"] == 0 and stats["completed"] == 1, stats


def _send_chat(sock: socket.socket) -> None:
    body = json.dumps(CHAT).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


def test_hang_until_client_disconnects(llm: StandinThread) -> None:
    llm.control(hang=True)
    sock = socket.create_connection(("127.0.0.1", llm.port))
    _send_chat(sock)
    until(lambda: llm.stats()["in_flight"] == 1, "the request in flight")
    sock.settimeout(0.5)
    with pytest.raises(socket.timeout):
        sock.recv(1)  # no answer
    sock.close()
    until(lambda: llm.stats()["cancelled"] == 1, "the request cancelled")
    assert llm.stats()["in_flight"] == 0 and llm.stats()["completed"] == 0


def test_disconnect_during_latency_is_cancelled(llm: StandinThread) -> None:
    llm.control(latency=30)
    with socket.create_connection(("127.0.0.1", llm.port)) as sock:
        _send_chat(sock)
        until(lambda: llm.stats()["in_flight"] == 1, "the request in flight")
    until(lambda: llm.stats()["cancelled"] == 1, "the request cancelled")


def test_stop_ends_hanging_requests() -> None:
    llm = run_in_thread(hang=True)
    with socket.create_connection(("127.0.0.1", llm.port)) as sock:
        _send_chat(sock)
        until(lambda: llm.stats()["in_flight"] == 1, "the request in flight")
        llm.stop()
        # The loop has stopped: its counters are read directly. A request left hanging would
        # still be counted in flight.
        assert llm.server.stats()["in_flight"] == 0
        sock.settimeout(5)
        assert sock.recv(1) == b""  # closed without an answer


def test_garbage(llm: StandinThread) -> None:
    llm.control(garbage=True, fail_count=1)
    status, _, body = chat(llm.url)
    assert status == 200
    with pytest.raises(ValueError):
        json.loads(body)
    assert chat(llm.url)[0] == 200 and json.loads(chat(llm.url)[2])["choices"]
    assert llm.stats()["errors"] == 1


def test_reset(llm: StandinThread) -> None:
    llm.control(reset=True)
    with pytest.raises((ConnectionError, http.client.HTTPException, urllib.error.URLError)):
        chat(llm.url)
    assert llm.stats()["errors"] == 1 and llm.stats()["in_flight"] == 0


def test_keep_alive_and_pipelining(llm: StandinThread) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", llm.port, timeout=10)
    try:
        for _ in range(3):
            conn.request("POST", "/v1/chat/completions", json.dumps(CHAT),
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200 and json.loads(resp.read())["choices"]
    finally:
        conn.close()
    llm.control(latency=0.2)  # two requests sent at once on one connection, while waiting
    with socket.create_connection(("127.0.0.1", llm.port), timeout=10) as sock:
        _send_chat(sock)
        _send_chat(sock)
        received = b""
        while received.count(b"HTTP/1.1 200") < 2 or not received.endswith(b"}}"):
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
    assert llm.stats()["completed"] == 5 and llm.stats()["cancelled"] == 0


def test_command_line() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "harness.standin_llm", "--port", "0", "--status", "500",
         "--fail-count", "1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert "not a real model" in line, line
        url = line.split()[-1]
        assert chat(url)[0] == 500
        assert chat(url)[0] == 200
    finally:
        process.terminate()
        assert process.wait(10) == 0


STREAM = dict(CHAT, stream=True, stream_options={"include_usage": True})


def events(body: bytes) -> List[Any]:
    """The data of each server-sent event of a streamed answer: JSON values, and "[DONE]"."""
    data = [event[len("data: "):] for event in body.decode().split("\n\n") if event]
    return [item if item == "[DONE]" else json.loads(item) for item in data]


def test_a_streamed_answer_is_the_whole_answer_in_pieces(llm: StandinThread) -> None:
    whole = json.loads(chat(llm.url)[2])
    llm.control(piece_chars=7)
    conn = http.client.HTTPConnection("127.0.0.1", llm.port, timeout=10)
    try:  # chunked, on a connection kept open for the next request
        conn.request("POST", "/v1/chat/completions", json.dumps(STREAM),
                     {"Content-Type": "application/json"})
        answer = conn.getresponse()
        assert answer.status == 200 and answer.getheader("Transfer-Encoding") == "chunked"
        assert answer.getheader("Content-Type").startswith("text/event-stream")
        chunks = events(answer.read())
        conn.request("POST", "/v1/chat/completions", json.dumps(dict(STREAM, stream=False)),
                     {"Content-Type": "application/json"})
        assert json.loads(conn.getresponse().read())["choices"]
    finally:
        conn.close()
    assert chunks[-1] == "[DONE]" and chunks[-2]["choices"] == []
    assert chunks[-2]["usage"] == whole["usage"]
    deltas = [c["choices"][0]["delta"] for c in chunks[:-2]]
    assert deltas[0] == {"role": "assistant", "content": ""} and deltas[-1] == {}
    assert chunks[-3]["choices"][0]["finish_reason"] == "stop"
    assert {c["object"] for c in chunks[:-1]} == {"chat.completion.chunk"}
    assert {c["model"] for c in chunks[:-1]} == {"qwen-test"}
    message = whole["choices"][0]["message"]
    content = [d["content"] for d in deltas[1:-1] if "content" in d]
    reasoning = [d["reasoning_content"] for d in deltas[1:-1] if "reasoning_content" in d]
    assert "".join(content) == message["content"] and len(content) > 3
    assert "".join(reasoning) == message["reasoning_content"]
    assert {len(piece) for piece in content[:-1]} == {7}
    assert llm.stats()["completed"] == 3 and llm.sampling()[1]["stream"] is True
    # Without include_usage, no usage chunk; with stream off, the whole answer.
    plain = events(chat(llm.url, dict(CHAT, stream=True))[2])
    assert plain[-1] == "[DONE]" and all(c["choices"] for c in plain[:-1])
    llm.control(stream=False)
    assert json.loads(chat(llm.url, STREAM)[2])["choices"][0]["message"] == message


def test_a_stream_broken_mid_way(llm: StandinThread) -> None:
    llm.control(break_after=2, fail_count=1, piece_chars=5)
    conn = http.client.HTTPConnection("127.0.0.1", llm.port, timeout=10)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(STREAM),
                     {"Content-Type": "application/json"})
        answer = conn.getresponse()
        assert answer.status == 200
        with pytest.raises(http.client.IncompleteRead) as cut:
            answer.read()
    finally:
        conn.close()
    received = events(cut.value.partial)
    assert [c["choices"][0]["delta"].get("content") for c in received][-2:] == [
        MARKER[:5], MARKER[5:10]]  # two pieces, then nothing: no end, no [DONE]
    assert llm.stats()["errors"] == 1
    assert events(chat(llm.url, STREAM)[2])[-1] == "[DONE]"  # fail_count used up


def test_an_error_chunk_mid_stream_and_garbage(llm: StandinThread) -> None:
    llm.control(error_after=1, fail_count=1)
    received = events(chat(llm.url, STREAM)[2])
    assert received[-1] == "[DONE]"  # vLLM ends the stream after its error chunk
    assert received[-2]["error"]["code"] == 500 and "injected" in received[-2]["error"][
        "message"]
    assert [c["choices"][0]["delta"].get("content") for c in received[1:-2]
            if "content" in c["choices"][0]["delta"]] == [MARKER[:8]]
    llm.control(garbage=True, fail_count=1)
    status, headers, body = chat(llm.url, STREAM)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert body.startswith(b"data: <html>") and body.endswith(b"data: [DONE]\n\n")
    llm.control(status=429, fail_count=1)  # a status fault answers before any chunk
    assert chat(llm.url, STREAM)[0] == 429
    assert llm.stats()["errors"] == 3
    for invalid in ({"piece_chars": 0}, {"piece_delay": -1}, {"break_after": -1},
                    {"stream": "yes"}):
        with pytest.raises(ControlError):
            llm.control(**invalid)
