"""A test-only job kind: adding a kind takes a decorated async function."""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any, Dict

from cluster.kinds import job_kind
from cluster.runner import progress_sink
from core.contract import AgentJob


class Unpicklable(Exception):
    pass


@job_kind("echo_test", num_cpus=0)
async def echo_test(job: AgentJob) -> Dict[str, Any]:
    """Echo the task back after ``metadata['sleep']`` seconds, from the Ray node; with
    ``metadata['pieces']`` (n), the answer is n pieces given to the runner's progress sink
    ``metadata['piece_delay']`` seconds apart."""
    await asyncio.sleep(float(job.metadata.get("sleep", "0")))
    if job.metadata.get("pieces"):
        sink = progress_sink()
        pieces = [f"p{i} " for i in range(int(job.metadata["pieces"]))]
        delay = float(job.metadata.get("piece_delay", "0"))
        for piece in pieces:
            if sink is not None:
                sink(piece)
            if delay:  # else all at once, as a stream read whole in one go
                await asyncio.sleep(delay)
        return {"content": "".join(pieces), "model": "echo", "streamed": sink is not None}
    if job.metadata.get("fail") == "permanent":
        raise ValueError("asked to fail")
    if job.metadata.get("fail") == "unpicklable":  # an error that cannot travel back as is
        raise Unpicklable(threading.Lock())
    return {"content": f"echo: {job.task_description}", "model": "echo",
            "score": float(job.metadata.get("score", "0")), "pid": os.getpid()}
