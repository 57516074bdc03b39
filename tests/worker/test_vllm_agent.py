"""The vLLM agent job against the stand-in LLM: prompt, sampling, parsing, error classes.

Needs aiohttp (the worker environment), neither Ray nor Redis: the stand-in (fixture ``llm``,
tests/worker/conftest.py) runs in a thread of the test process.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import pickle
import re
import time
from typing import Any, Callable, Dict, Optional

import aiohttp
import pytest

from cluster.completion import extract_score
from cluster.prompts import DIVERSITY_INSTRUCTION, PERSONAS, build_messages, sampling
from cluster.vllm import call_vllm, chat_url, parse_retry_after, resolve_url
from core import task_types
from core.contract import AgentJob
from core.errors import LLMError
from harness.servers import free_port
from harness.standin_behaviour import MARKER
from harness.standin_llm import StandinThread
from tests.waiting import until, until_async


def make_job(index: int = 0, **overrides: Any) -> AgentJob:
    fields: Dict[str, Any] = dict(
        deliberation_id="d-1", task_id="t-1", agent_id=f"agent-{index}", agent_index=index,
        num_agents=3, role="DEV", model="qwen-test", prompt_template="",
        task_description="Add a cache to the orders service.", task_role="DEV",
        vllm_url="", timeout_seconds=30, max_retries=2)
    fields.update(overrides)
    return AgentJob(**fields)


def call(url: str, job: AgentJob, timeout: float = 10.0,
         on_delta: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    async def run() -> Dict[str, Any]:
        async with aiohttp.ClientSession() as session:
            return await call_vllm(session, job, base_url=url, timeout=timeout,
                                   on_delta=on_delta)

    return asyncio.run(run())


def failure(url: str, job: AgentJob, timeout: float = 10.0) -> LLMError:
    with pytest.raises(LLMError) as info:
        call(url, job, timeout)
    return info.value


def test_success(llm: StandinThread) -> None:
    result = call(llm.url, make_job())
    assert set(result) == {"content", "reasoning", "model", "tokens", "usage", "temperature",
                           "score", "finish_reason", "ttft_ms", "tokens_per_second"}
    assert result["content"].startswith(MARKER)
    assert "Add a cache to the orders service." in result["content"]
    assert "stand-in" in result["reasoning"].lower()
    assert result["model"] == "qwen-test"
    assert result["tokens"] == result["usage"]["completion_tokens"] > 0
    assert result["usage"]["total_tokens"] > result["tokens"]
    assert result["temperature"] == 0.7
    assert result["score"] == 0.0  # not JSON
    assert result["finish_reason"] == "stop"


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/"])
def test_base_url_forms(llm: StandinThread, suffix: str) -> None:
    assert call(llm.url + suffix, make_job())["finish_reason"] == "stop"


def test_json_schema(llm: StandinThread) -> None:
    schema = {"type": "object", "required": ["proposal", "score", "risks"],
              "properties": {"proposal": {"type": "string"}, "score": {"type": "number"},
                             "risks": {"type": "array"}}}
    job = make_job(metadata={"response_format": json.dumps(schema), "max_tokens": "256"})
    params = sampling(job)
    assert params["max_tokens"] == 256
    assert params["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "proposal", "schema": schema}}
    result = call(llm.url, job)
    assert json.loads(result["content"]) == {"proposal": "stand-in", "score": 0.5, "risks": []}
    assert result["score"] == 0.5


def test_a_task_extraction_asks_for_its_own_schema_at_temperature_zero() -> None:
    """Even a later agent (which explores at 0.9 and up) and a caller's own schema: the
    consumer needs exactly this shape, the same each time."""
    job = make_job(index=2, metadata={"task_type": " TASK_EXTRACTION ",
                                      "response_format": '{"type": "object"}'})
    params = sampling(job)
    assert params["temperature"] == 0.0
    assert params["response_format"] == task_types.response_format()
    assert sampling(make_job(index=2))["temperature"] > 0.0


@pytest.mark.parametrize(("answer", "field"), [
    ("not json", "answer is not JSON"),
    ('{"tasks": {}}', "tasks: expected a list"),
    ('{"tasks": []}', "tasks: expected at least one task"),
    ('{"tasks": [{"title": " "}]}', "tasks[0].title"),
    ('{"tasks": [{"title": "a", "estimated_hours": -1}]}', "tasks[0].estimated_hours"),
    ('{"tasks": [{"title": "a", "deliberation_indices": ["x"]}]}',
     "tasks[0].deliberation_indices"),
])
def test_a_task_extraction_answer_out_of_schema_names_the_field(answer: str, field: str) -> None:
    with pytest.raises(ValueError, match=re.escape(field)):
        task_types.tasks_of(answer)


def test_invalid_response_format() -> None:
    with pytest.raises(LLMError) as error:
        sampling(make_job(metadata={"response_format": "{bad"}))
    assert error.value.error_type == "invalid_request" and not error.value.retryable
    with pytest.raises(LLMError) as error:
        sampling(make_job(metadata={"max_tokens": "many"}))
    assert error.value.error_type == "invalid_request"
    assert sampling(make_job())["max_tokens"] == 1024
    assert "response_format" not in sampling(make_job())


def test_rate_limited_with_retry_after(llm: StandinThread) -> None:
    llm.control(status=429, retry_after=2.5, fail_count=1)
    error = failure(llm.url, make_job())
    assert (error.error_type, error.retryable, error.status, error.retry_after) == (
        "rate_limited", True, 429, 2.5)
    assert "429" in str(error)
    assert call(llm.url, make_job())["finish_reason"] == "stop"  # fail_count used up


@pytest.mark.parametrize("status, error_type, retryable", [
    (503, "unavailable", True),
    (500, "server_error", True),
    (502, "server_error", True),
    (400, "bad_request", False),
    (422, "bad_request", False),
    (404, "bad_request", False),
])
def test_status_classes(llm: StandinThread, status: int, error_type: str,
                        retryable: bool) -> None:
    llm.control(status=status)
    error = failure(llm.url, make_job())
    assert (error.error_type, error.retryable, error.status, error.retry_after) == (
        error_type, retryable, status, None)
    assert "injected" in error.message  # the server's error message is kept


def test_garbage_is_invalid_response(llm: StandinThread) -> None:
    llm.control(garbage=True)
    error = failure(llm.url, make_job())
    assert (error.error_type, error.retryable, error.status) == ("invalid_response", False, 200)


def test_reset_is_connection(llm: StandinThread) -> None:
    llm.control(reset=True)
    error = failure(llm.url, make_job())
    assert (error.error_type, error.retryable) == ("connection", True)


def test_hang_times_out_and_closes_the_request(llm: StandinThread) -> None:
    llm.control(hang=True)  # never answers: only the call's own timeout ends it

    async def hung_call() -> Dict[str, Any]:
        async with aiohttp.ClientSession() as session:
            # The test's generous deadline: a TimeoutError here means the 0.5 s was ignored.
            return await asyncio.wait_for(
                call_vllm(session, make_job(), base_url=llm.url, timeout=0.5), 60)

    with pytest.raises(LLMError) as info:
        asyncio.run(hung_call())
    assert (info.value.error_type, info.value.retryable) == ("timeout", True)
    until(lambda: llm.stats()["cancelled"] == 1, "the stand-in seeing the request go away")
    assert llm.stats()["completed"] == 0


def test_cancelling_the_task_closes_the_request(llm: StandinThread) -> None:
    llm.control(hang=True)

    async def run() -> None:
        async with aiohttp.ClientSession() as session:
            task = asyncio.ensure_future(
                call_vllm(session, make_job(), base_url=llm.url, timeout=60))
            await until_async(lambda: llm.stats()["in_flight"] == 1, "the request in flight")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(run())
    until(lambda: llm.stats()["cancelled"] == 1, "the stand-in seeing the request go away")


def test_connection_refused() -> None:
    error = failure(f"http://127.0.0.1:{free_port()}", make_job())
    assert (error.error_type, error.retryable, error.status) == ("connection", True, None)


def test_no_url_is_invalid_request() -> None:
    error = failure("", make_job())
    assert (error.error_type, error.retryable) == ("invalid_request", False)


def test_personas_and_messages() -> None:
    assert set(PERSONAS) == {"DEV", "QA", "ARCHITECT", "DEVOPS", "DATA"}
    job = make_job(role="qa", story_id="s-7", plan_id="p-9", metadata={
        "rubric": "correctness first", "requirements": "no new services",
        "idempotency_key": "k-1", "traceparent": "00-abc-def-01", "team": "orders"})
    system, user = build_messages(job)
    assert system == {"role": "system", "content": PERSONAS["QA"]}
    text = user["content"]
    assert user["role"] == "user"
    for expected in ("Add a cache to the orders service.", "correctness first",
                     "no new services", "s-7", "p-9", "- team: orders"):
        assert expected in text
    assert "k-1" not in text and "00-abc" not in text
    assert DIVERSITY_INSTRUCTION not in text
    system = build_messages(make_job(role="SECURITY"))[0]["content"]
    assert "SECURITY" in system


def test_prompt_template() -> None:
    job = make_job(prompt_template="As {role}, solve: {task} ({rubric}) {{literal}}",
                   metadata={"rubric": "be brief"})
    system = build_messages(job)[0]["content"]
    assert system == "As DEV, solve: Add a cache to the orders service. (be brief) {literal}"


@pytest.mark.parametrize("template", ["Hello {name}", "Broken {task", "Stray } brace",
                                      "{task.__class__}", "{0}", "{}", "{task!r}",
                                      "{task:>10}", '{"json": true}'])
def test_invalid_prompt_template(template: str) -> None:
    with pytest.raises(LLMError) as info:
        build_messages(make_job(prompt_template=template))
    assert (info.value.error_type, info.value.retryable) == ("invalid_prompt_template", False)


def test_invalid_prompt_template_is_not_sent(llm: StandinThread) -> None:
    error = failure(llm.url, make_job(prompt_template="{oops}"))
    assert error.error_type == "invalid_prompt_template"
    assert llm.stats()["requests"] == 0


def test_diversity(llm: StandinThread) -> None:
    first, second = make_job(0), make_job(1)
    assert DIVERSITY_INSTRUCTION not in build_messages(first)[1]["content"]
    assert DIVERSITY_INSTRUCTION in build_messages(second)[1]["content"]
    assert sampling(first)["temperature"] == 0.7
    assert sampling(second)["temperature"] == 0.9
    assert sampling(make_job(3))["temperature"] == 1.0
    assert sampling(make_job(50))["temperature"] == 1.2
    assert call(llm.url, second)["temperature"] == 0.9


def test_llm_error_pickles() -> None:
    error = LLMError("vLLM answered HTTP 429: slow down", "rate_limited", status=429,
                     retry_after=1.5)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is LLMError and str(copy) == str(error)
    assert (copy.error_type, copy.retryable, copy.status, copy.retry_after) == (
        "rate_limited", True, 429, 1.5)
    copy = pickle.loads(pickle.dumps(LLMError(error_type="invalid_prompt_template",
                                              retryable=False)))
    assert (copy.error_type, copy.retryable, copy.status) == ("invalid_prompt_template",
                                                              False, None)


def test_helpers() -> None:
    assert resolve_url("http://{node_ip}:8000/", "10.0.0.5") == "http://10.0.0.5:8000"
    assert resolve_url("http://vllm:8000/v1/", "10.0.0.5") == "http://vllm:8000/v1"
    assert chat_url("http://h:1/v1") == "http://h:1/v1/chat/completions"
    assert chat_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert parse_retry_after("3") == 3.0 and parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    later = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert 50 < (parse_retry_after(later) or 0) <= 60
    assert extract_score('{"score": 0.8}') == 0.8
    assert extract_score('```json\n{"score": 1}\n```') == 1.0
    assert extract_score('{"score": 3}') == 0.0 and extract_score('{"score": true}') == 0.0
    assert extract_score("[0.5]") == 0.0

