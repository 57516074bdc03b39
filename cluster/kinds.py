"""Job kinds: an async function that runs on the Ray cluster, and the Ray resources of its
runner.

    @job_kind("vllm_agent", num_gpus=0)
    async def vllm_agent(job: AgentJob) -> dict:
        ...  # runs on the Ray cluster; returns the agent's result

Registering a kind declares nothing else: the workers turn every registered kind into a
Dramatiq actor (``actors.jobs.declare_actors``), and Ray imports the kind's module on the
cluster to unpickle its function, so this module (and a kind's) imports no Dramatiq.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Awaitable, Callable, Dict, Optional

from core.contract import AgentJob

JobFunction = Callable[[AgentJob], Awaitable[Dict[str, Any]]]


@dataclasses.dataclass(frozen=True)
class JobKind:
    """A kind of job and the Ray resources its runner declares."""

    name: str
    function: JobFunction
    ray_options: Dict[str, Any]


KINDS: Dict[str, JobKind] = {}


def job_kind(name: str, *, num_cpus: float = 0, num_gpus: float = 0,
             accelerator_type: Optional[str] = None, resources: Optional[Dict[str, float]] = None,
             runtime_env: Optional[Dict[str, Any]] = None, max_concurrency: int = 10_000,
             ) -> Callable[[JobFunction], JobFunction]:
    """Declare a job kind whose async function runs on the Ray cluster.

    Parameters:
      name: the actor name messages carry (``AgentJob.kind``).
      num_cpus, num_gpus, accelerator_type, resources, runtime_env: Ray resources of the
        kind's runner actor.
      max_concurrency: jobs one runner holds in flight at once.
    """
    options: Dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus,
                               "max_concurrency": max_concurrency}
    if accelerator_type:
        options["accelerator_type"] = accelerator_type
    if resources:
        options["resources"] = dict(resources)
    if runtime_env:
        options["runtime_env"] = dict(runtime_env)

    def register(function: JobFunction) -> JobFunction:
        KINDS[name] = JobKind(name, function, options)
        return function

    return register
