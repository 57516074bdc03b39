"""Fixtures of the worker-side tests that call the stand-in LLM in a thread of the test
process (test_vllm_agent.py, test_vllm_stream.py)."""

from __future__ import annotations

from typing import Iterator

import pytest

from harness.standin_llm import StandinThread, run_in_thread


@pytest.fixture(scope="module")
def llm() -> Iterator[StandinThread]:
    """A stand-in LLM for the module's tests, back to its first behaviour before each."""
    with run_in_thread(model="standin-model") as server:
        yield server


@pytest.fixture(autouse=True)
def _clean(request: pytest.FixtureRequest) -> None:
    if "llm" in request.fixturenames:
        request.getfixturevalue("llm").reset()
