"""Runners on a real Ray cluster: jobs handed over in batches, outcomes collected in batches,
each job still getting its own result, error or time limit."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, Dict, Iterator, List

import pytest

from actors.connection import RayConnection
from actors.runners import RayRunners
from cluster.kinds import KINDS
from core.contract import AgentJob
from core.errors import JobError, JobTimeout, RayLost
from tests.waiting import until_async
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
    # The hung job would answer after a minute: only its 1 s time limit explains a JobTimeout.
    outcomes = run_all(runners, [job(0, timeout=1, sleep="60"), job(1, sleep="0.5")])
    assert isinstance(outcomes[0], JobTimeout), outcomes[0]
    assert outcomes[1]["content"] == "echo: job 1"
    # That the hung job's task is cancelled on the cluster (its HTTP request closed) is shown
    # with the stand-in LLM in test_middleware.py.


def jobs_held_by(runner: Any) -> int:
    """How many jobs the runner actor is running, asked of the actor itself."""
    import ray

    return int(ray.get(runner.__ray_call__.remote(lambda actor: len(actor.tasks)), timeout=60))


def test_a_runner_that_dies_fails_its_jobs_as_ray_lost_and_is_replaced(
        runners: RayRunners) -> None:
    import ray

    async def main() -> List[Any]:
        kind = KINDS["echo_test"]
        loop = asyncio.get_running_loop()
        # Time limits of an hour: only the runner's loss can end these jobs within the test.
        running = [asyncio.ensure_future(runners.run(kind, job(i, timeout=3600, sleep="3600"),
                                                     never_cancelled)) for i in range(3)]
        # Creating the runner takes a second on a quiet machine, far longer on a busy one.
        await until_async(lambda: "echo_test" in runners.calls
                          and not runners.calls["echo_test"].batch,
                          "the runner created and the jobs handed to it", timeout=120)
        runner = runners.handles["echo_test"]

        async def all_running() -> bool:  # asked off the loop: ray.get blocks
            return await loop.run_in_executor(None, jobs_held_by, runner) == 3

        await until_async(all_running, "the three jobs running on the runner")
        ray.kill(runner)
        _, waiting = await asyncio.wait(running, timeout=120)
        assert not waiting, "jobs still waiting for a runner killed two minutes ago"
        again = await runners.run(kind, job(9), never_cancelled)  # a new runner takes it
        return [*(outcome.exception() for outcome in running), again]

    *lost, again = asyncio.run(main())
    assert all(isinstance(outcome, RayLost) for outcome in lost), lost
    assert again["content"] == "echo: job 9"


def run_streamed(runners: RayRunners, jobs: List[AgentJob]) -> List[List[str]]:
    """Run ``jobs``; for each, what its ``on_progress`` got, in order, then ``"=" + content``
    (its outcome) once ``run`` returned."""
    async def main() -> List[List[str]]:
        kind = KINDS["echo_test"]
        seen: List[List[str]] = [[] for _ in jobs]

        async def one(index: int, streamed: AgentJob) -> None:
            result = await runners.run(kind, streamed, never_cancelled, seen[index].append)
            seen[index].append("=" + result["content"])

        await asyncio.gather(*(one(i, j) for i, j in enumerate(jobs)))
        return seen
    return asyncio.run(main())


def test_partial_output_reaches_its_own_job_in_order_and_before_its_outcome(
        runners: RayRunners) -> None:
    # 40 pieces 20 ms apart take 0.8 s or more: the first goes at once, the others in
    # batches of 250 ms, so at least three calls, and well under one per piece.
    seen = run_streamed(runners, [job(i, pieces="40", piece_delay="0.02") for i in range(3)])
    for texts in seen:
        *partial, outcome = texts
        assert outcome == "=" + "".join(f"p{i} " for i in range(40))
        assert "".join(partial) == outcome[1:], texts  # every piece, in order, none twice
        assert 3 <= len(partial) < 40, texts


def test_partial_output_is_sent_at_the_first_piece_then_once_a_job_holds_enough(
        ray_address: str) -> None:
    connection = RayConnection(ray_address, namespace=f"runner-{uuid.uuid4().hex[:8]}")
    try:
        # An interval of a minute: only the first piece and the count of pieces send any
        # before the outcome.
        (texts,) = run_streamed(RayRunners(connection, progress_interval=60, progress_pieces=5),
                                [job(0, pieces="10", piece_delay="0.2")])
    finally:
        connection.disconnect()
    *partial, outcome = texts
    assert "".join(partial) == outcome[1:]
    # The first piece at once (sooner than five pieces), then five or more at a time, then
    # what is left with the outcome.
    first, *batches, _ = partial
    assert len(first.split()) < 5 and batches, texts
    assert all(len(text.split()) >= 5 for text in batches), texts


def test_an_answer_that_comes_whole_has_no_partial_output(runners: RayRunners) -> None:
    # Five pieces at once, well within one interval: they come with the outcome, and only it.
    assert run_streamed(runners, [job(0, pieces="5")]) == [["=p0 p1 p2 p3 p4 "]]


def test_no_partial_output_with_an_interval_of_zero(ray_address: str) -> None:
    connection = RayConnection(ray_address, namespace=f"runner-{uuid.uuid4().hex[:8]}")
    try:
        (texts,) = run_streamed(RayRunners(connection, progress_interval=0),
                                [job(0, pieces="5", piece_delay="0.01")])
    finally:
        connection.disconnect()
    assert texts == ["=" + "".join(f"p{i} " for i in range(5))]
