"""Runners on a real Ray cluster: jobs handed over in batches, outcomes collected in batches,
each job still getting its own result, error or time limit."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, Dict, Iterator, List, Tuple

import pytest

from actors.connection import RayConnection
from actors.runners import RayRunners
from cluster.kinds import KINDS
from core.contract import AgentJob
from core.errors import JobError, JobTimeout, RayLost
from tests.worker import kinds  # noqa: F401  (registers echo_test)

pytestmark = pytest.mark.worker_env


@pytest.fixture
def runners(ray_address: str) -> Iterator[RayRunners]:
    connection = RayConnection(ray_address, namespace=f"runner-{uuid.uuid4().hex[:8]}")
    connection.ensure()
    yield RayRunners(connection)
    connection.disconnect()


def job(index: int, timeout: int = 30, **metadata: str) -> AgentJob:
    return AgentJob(deliberation_id="delib-runner", task_id="task-runner", agent_id=f"a{index}",
                    agent_index=index, num_agents=1, role="DEV", model="echo",
                    prompt_template="", task_description=f"job {index}", task_role="DEV",
                    vllm_url="", timeout_seconds=timeout, max_retries=0,
                    metadata=dict(metadata), kind="echo_test")


async def never_cancelled() -> bool:
    return False


def run_all(runners: RayRunners, jobs: List[AgentJob]) -> List[Any]:
    async def main() -> List[Any]:
        kind = KINDS["echo_test"]
        return await asyncio.gather(*(runners.run(kind, j, never_cancelled) for j in jobs),
                                    return_exceptions=True)
    return asyncio.run(main())


def test_jobs_handed_over_together_each_get_their_own_result(runners: RayRunners) -> None:
    outcomes = run_all(runners, [job(i, sleep=str(0.01 * (i % 7))) for i in range(200)])
    assert [o["content"] for o in outcomes] == [f"echo: job {i}" for i in range(200)]
    calls = runners.calls["echo_test"]
    assert not calls.waiting and not calls.batch  # nothing left behind


def test_errors_reach_their_own_job_and_no_other(runners: RayRunners) -> None:
    plain: Dict[str, str] = {}
    outcomes = run_all(runners, [job(0, **plain), job(1, fail="permanent"),
                                 job(2, fail="unpicklable"), job(3, **plain)])
    assert outcomes[0]["content"] == "echo: job 0" and outcomes[3]["content"] == "echo: job 3"
    assert isinstance(outcomes[1], JobError) and "ValueError: asked to fail" in str(outcomes[1])
    # An error that cannot be pickled comes back named, instead of failing the whole batch.
    assert isinstance(outcomes[2], JobError) and "Unpicklable" in str(outcomes[2])


def test_a_job_past_its_time_limit_is_cancelled_while_the_others_finish(
        runners: RayRunners) -> None:
    started = time.monotonic()
    outcomes = run_all(runners, [job(0, timeout=1, sleep="60"), job(1, sleep="0.5")])
    assert isinstance(outcomes[0], JobTimeout)
    assert outcomes[1]["content"] == "echo: job 1"
    assert time.monotonic() - started < 10
    # That the hung job's task is cancelled on the cluster (its HTTP request closed) is shown
    # with the stand-in LLM in test_middleware.py.


def test_a_runner_that_dies_fails_its_jobs_as_ray_lost_and_is_replaced(
        runners: RayRunners) -> None:
    import ray

    async def main() -> Tuple[List[Any], float]:
        kind = KINDS["echo_test"]
        running = [asyncio.ensure_future(runners.run(kind, job(i, sleep="30"),
                                                     never_cancelled)) for i in range(3)]
        # Creating the runner takes a second on a quiet machine, far longer on a busy one.
        deadline = time.monotonic() + 120
        while "echo_test" not in runners.calls or runners.calls["echo_test"].batch:
            assert time.monotonic() < deadline, "the runner was not created"
            await asyncio.sleep(0.1)
        await asyncio.sleep(1)  # the jobs reach the cluster and start
        killed = time.monotonic()
        ray.kill(runners.handles["echo_test"])
        lost = await asyncio.gather(*running, return_exceptions=True)
        again = await runners.run(kind, job(9), never_cancelled)  # a new runner takes it
        return [*lost, again], time.monotonic() - killed

    outcomes, seconds = asyncio.run(main())
    *lost, again = outcomes
    assert all(isinstance(outcome, RayLost) for outcome in lost), lost
    assert again["content"] == "echo: job 9"
    assert seconds < 30  # not left waiting for the jobs' time limits
