"""vLLM's own Prometheus metrics, read by the real-vLLM tests of both suites (Python 3.9,
standard library only)."""

from __future__ import annotations

import re
import urllib.request
from typing import Dict

from harness.servers import Server
from tests.waiting import until


def metrics(server: Server) -> Dict[str, float]:
    """vLLM's own Prometheus samples by name; a sample with a ``finished_reason`` label as
    ``name{reason}``. Other labels are dropped: the server serves one model on one engine."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as answer:
        text = answer.read().decode()
    samples = {}
    for line in text.splitlines():
        match = re.match(r"^(vllm:[a-z_]+)(\{[^}]*\})? ([-0-9.e+]+)$", line)
        if match:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            name = match.group(1) + ("{" + labels["finished_reason"] + "}"
                                     if "finished_reason" in labels else "")
            samples[name] = float(match.group(3))
    return samples


def counted(server: Server, before: Dict[str, float], reason: str, count: int
            ) -> Dict[str, float]:
    """vLLM's metrics once ``count`` more requests finished for ``reason`` than in ``before``:
    vLLM records a finished request in its metrics a moment after answering it."""
    name = "vllm:request_success_total{" + reason + "}"

    def check() -> Dict[str, float]:
        now = metrics(server)
        return now if now[name] - before[name] >= count else {}

    return until(check, f"vLLM counting {count} more requests finished by {reason}",
                 interval=0.2)
