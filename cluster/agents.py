"""The built-in job kinds. ``vllm_agent`` is the first; a new kind is a decorated async
function (``cluster.kinds.job_kind``). Runs on the Ray cluster."""

from __future__ import annotations

import platform
import time
from typing import Any, Dict, Optional

from cluster.kinds import job_kind
from cluster.runner import progress_sink
from cluster.vllm import call_vllm, resolve_url
from core import task_types
from core.contract import VLLM_AGENT, AgentJob
from core.errors import INVALID_RESPONSE, LLMError

_session: Optional[Any] = None  # one aiohttp session per runner: connections are reused


async def _http() -> Any:
    global _session
    import aiohttp

    if _session is None or _session.closed:
        _session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    return _session


@job_kind(VLLM_AGENT)
async def vllm_agent(job: AgentJob) -> Dict[str, Any]:
    """Runs on the Ray cluster: one agent's chat completion against vLLM, its answer streamed
    piece by piece to the runner's progress sink (``cluster.runner.progress_sink``). The
    result names the Ray and Python versions it ran on."""
    import ray

    base_url = resolve_url(job.vllm_url, ray.util.get_node_ip_address())
    started = time.perf_counter()
    result = await call_vllm(await _http(), job, base_url=base_url, timeout=job.timeout_seconds,
                             on_delta=progress_sink())
    if task_types.task_type(job.metadata) == task_types.TASK_EXTRACTION:
        try:
            task_types.tasks_of(result["content"])
        except ValueError as exc:  # the same prompt at temperature 0 gets the same answer
            raise LLMError(f"task extraction answer does not match its schema: {exc}",
                           INVALID_RESPONSE, retryable=False, status=200) from None
    # Which cluster ran it, for operators of several clusters (routes, issue 19).
    return {**result, "latency_ms": int((time.perf_counter() - started) * 1000),
            "ray_version": ray.__version__, "python_version": platform.python_version()}
