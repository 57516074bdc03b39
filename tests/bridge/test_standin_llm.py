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
from typing import Any, Dict, Iterator, Optional, Tuple

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
                           "completed": 1, "errors": 0, "cancelled": 0}


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
