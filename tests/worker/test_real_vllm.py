"""vLLM's own behaviour through the vLLM agent job: a real vLLM server (CPU, the tiny
random-weight model of ``tests/tiny_model.py``) answering ``cluster.vllm.call_vllm``, directly
and as a Ray job with a time limit. What vLLM says is read from vLLM itself: its ``/tokenize``,
its ``/metrics`` and its request log.

The stand-in LLM (test_vllm_agent.py) stays for what a real server does not do on demand
(429 storms, 503, hangs, resets). The tiny model never samples ``</s>`` nor blank tokens, so
an answer runs to ``max_tokens`` unless a grammar ends it.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import Any, Callable, Dict, Iterator, List, Optional

import aiohttp
import pytest

from actors.connection import RayConnection
from actors.runners import RayRunners
from cluster import agents  # noqa: F401  (registers vllm_agent)
from cluster.kinds import KINDS
from cluster.prompts import build_messages, sampling
from cluster.vllm import call_vllm
from core.contract import VLLM_AGENT, AgentJob
from core.errors import JobTimeout, LLMError
from harness.servers import Server
from tests.tiny_model import CONTEXT, SERVED_NAME
from tests.vllm_metrics import aborted_requests, counted, metrics
from tests.waiting import until, until_async

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.worker_env]

VERDICT = {"type": "object", "additionalProperties": False,
           "required": ["verdict", "score", "ready"],
           "properties": {"verdict": {"enum": ["accept", "revise", "reject"]},
                          "score": {"enum": [0.25, 0.5, 0.75]},
                          "ready": {"type": "boolean"}}}


def make_job(url: str, index: int = 0, **overrides: Any) -> AgentJob:
    fields: Dict[str, Any] = dict(
        deliberation_id="d-real", task_id="t-real", agent_id=f"agent-{index}",
        agent_index=index, num_agents=3, role="DEV", model=SERVED_NAME, prompt_template="",
        task_description="Add a cache to the orders service.", task_role="DEV",
        vllm_url=url, timeout_seconds=120, max_retries=2, metadata={"max_tokens": "24"})
    fields.update(overrides)
    return AgentJob(**fields)


def call(job: AgentJob, on_delta: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    async def run() -> Dict[str, Any]:
        async with aiohttp.ClientSession() as session:
            return await call_vllm(session, job, base_url=job.vllm_url, timeout=120,
                                   on_delta=on_delta)

    return asyncio.run(run())


def test_chat_request_and_usage(vllm_server: Server) -> None:
    job = make_job(vllm_server.url, index=1)
    before = metrics(vllm_server)
    result = call(job)
    # vLLM's own count of the prompt we sent, through the model's chat template.
    body = json.dumps({"model": SERVED_NAME, "messages": build_messages(job)}).encode()
    tokenize = urllib.request.Request(vllm_server.url + "/tokenize", data=body,
                                      headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(tokenize, timeout=30) as answer:
        prompt_tokens = json.load(answer)["count"]
    assert (result["model"], result["finish_reason"], result["temperature"]) == (
        SERVED_NAME, "length", 0.9)
    assert result["tokens"] == 24 and result["content"]
    usage = result["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (
        prompt_tokens, 24, prompt_tokens + 24)
    after = counted(vllm_server, before, "length", 1)
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == 24
    assert after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"] == \
        prompt_tokens
    assert after["vllm:request_success_total{length}"] - \
        before["vllm:request_success_total{length}"] == 1
    assert after["vllm:num_requests_running"] == 0


def test_json_schema_is_enforced_by_guided_decoding(vllm_server: Server) -> None:
    for index in range(3):  # three temperatures: 0.7, 0.9, 0.95
        job = make_job(vllm_server.url, index, metadata={
            "response_format": json.dumps(VERDICT), "max_tokens": "256"})
        result = call(job)
        answer = json.loads(result["content"])  # random weights, yet valid JSON
        assert set(answer) == {"verdict", "score", "ready"}, answer
        assert answer["verdict"] in ("accept", "revise", "reject")
        assert isinstance(answer["ready"], bool)
        assert result["score"] == answer["score"] in (0.25, 0.5, 0.75)
        assert result["finish_reason"] == "stop"  # the grammar ended it, not max_tokens
        assert result["tokens"] == result["usage"]["completion_tokens"] < 256


def test_a_streamed_answer_equals_the_unstreamed_one(vllm_server: Server) -> None:
    """At temperature 0 (a task extraction's, with its grammar) the pieces ``call_vllm``
    streams add up to what vLLM answers the same request unstreamed, posted here directly."""
    job = make_job(vllm_server.url, metadata={"task_type": "TASK_EXTRACTION",
                                              "max_tokens": "48"})
    params = sampling(job)
    assert params["temperature"] == 0.0
    body = json.dumps({"model": SERVED_NAME, "messages": build_messages(job), **params})
    unstreamed = urllib.request.Request(vllm_server.url + "/v1/chat/completions",
                                        data=body.encode(),
                                        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(unstreamed, timeout=120) as answer:
        whole = json.load(answer)
    pieces: List[str] = []
    result = call(job, on_delta=pieces.append)
    assert result["content"] == whole["choices"][0]["message"]["content"] != ""
    assert "".join(pieces) == result["content"] and len(pieces) > 1, pieces
    assert result["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert result["tokens"] == result["usage"]["completion_tokens"] == \
        whole["usage"]["completion_tokens"] > 1
    assert result["usage"]["prompt_tokens"] == whole["usage"]["prompt_tokens"]
    assert result["ttft_ms"] > 0 and result["tokens_per_second"] > 0, result


def test_cancelling_mid_stream_aborts_the_request_inside_vllm(vllm_server: Server) -> None:
    """Cancelling the call once pieces have come closes the stream, and vLLM aborts the
    request (its log says so, and it runs none) long before its 16,000 tokens."""
    job = make_job(vllm_server.url, agent_id="cancelled",
                   metadata={"max_tokens": str(CONTEXT - 301)})
    pieces: List[str] = []

    async def run() -> None:
        async with aiohttp.ClientSession() as session:
            task = asyncio.ensure_future(call_vllm(session, job, base_url=job.vllm_url,
                                                   timeout=120, on_delta=pieces.append))
            await until_async(lambda: len(pieces) >= 3 or task.done(), "three pieces")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(run())
    until(lambda: metrics(vllm_server)["vllm:num_requests_running"] == 0,
          "vLLM running no request", timeout=60, interval=0.5)
    assert len(aborted_requests(vllm_server, CONTEXT - 301)) == 1


@pytest.mark.parametrize("overrides, status, says", [
    ({"model": "no-such-model"}, 404, "does not exist"),
    ({"metadata": {"max_tokens": str(CONTEXT * 2)}}, 400, "max_model_len"),
], ids=["unknown-model", "max-tokens-beyond-context"])
def test_refusals_are_not_retryable(vllm_server: Server, overrides: Dict[str, Any],
                                    status: int, says: str) -> None:
    with pytest.raises(LLMError) as info:
        call(make_job(vllm_server.url, **overrides))
    error = info.value
    assert (error.status, error.error_type, error.retryable, error.retry_after) == (
        status, "bad_request", False, None)
    assert says in error.message.lower(), error.message  # vLLM's own reason, kept


@pytest.fixture
def runners(ray_address: str) -> Iterator[RayRunners]:
    connection = RayConnection(ray_address, namespace="real-vllm")
    connection.ensure()
    yield RayRunners(connection)
    connection.disconnect()


def test_time_limit_aborts_the_request_inside_vllm(vllm_server: Server,
                                                   runners: RayRunners) -> None:
    async def never_cancelled() -> bool:
        return False

    async def run(job: AgentJob) -> Dict[str, Any]:
        return await runners.run(KINDS[VLLM_AGENT], job, never_cancelled)

    url = vllm_server.url
    # The runner made first (seconds on a busy machine), so the time limit is the call's.
    start = metrics(vllm_server)
    assert asyncio.run(run(make_job(url, metadata={"max_tokens": "4"})))["tokens"] == 4
    before = counted(vllm_server, start, "length", 1)
    # About 16,000 tokens take this CPU 30 s or more: only the 3 s time limit ends it.
    long = make_job(url, agent_id="long", timeout_seconds=3,
                    metadata={"max_tokens": str(CONTEXT - 300)})
    # Either side of the same 3 s limit ends it: the runner's deadline (JobTimeout) or, when
    # it comes first, the call's own timeout inside the Ray task (LLMError "timeout").
    with pytest.raises((JobTimeout, LLMError)) as ended:
        asyncio.run(run(long))
    if isinstance(ended.value, LLMError):
        assert ended.value.error_type == "timeout" and "within 3s" in str(ended.value), \
            ended.value

    # vLLM counts a request its client dropped in no finished_reason (not even "abort"):
    # aborted shows as none running, none finished, fewer tokens than asked; and in its log.
    def settled() -> Dict[str, float]:
        now = metrics(vllm_server)
        return now if now["vllm:num_requests_running"] == 0 else {}

    after = until(settled, "vLLM running no request", timeout=120, interval=0.5)
    finished = [name for name in after if name.startswith("vllm:request_success_total")]
    changes = {name: after[name] - before[name] for name in finished}
    assert set(changes.values()) == {0}, changes
    generated = after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    assert 0 < generated < CONTEXT - 300, generated
    assert len(aborted_requests(vllm_server, CONTEXT - 300)) == 1
