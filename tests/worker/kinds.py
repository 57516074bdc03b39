"""A test-only job kind: adding a kind takes a decorated async function."""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any, Dict

from cluster.kinds import job_kind
from core.contract import AgentJob


class Unpicklable(Exception):
    pass


@job_kind("echo_test", num_cpus=0)
async def echo_test(job: AgentJob) -> Dict[str, Any]:
    """Echo the task back after ``metadata['sleep']`` seconds, from the Ray node."""
    await asyncio.sleep(float(job.metadata.get("sleep", "0")))
    if job.metadata.get("fail") == "permanent":
        raise ValueError("asked to fail")
    if job.metadata.get("fail") == "unpicklable":  # an error that cannot travel back as is
        raise Unpicklable(threading.Lock())
    return {"content": f"echo: {job.task_description}", "model": "echo",
            "score": float(job.metadata.get("score", "0")), "pid": os.getpid()}
