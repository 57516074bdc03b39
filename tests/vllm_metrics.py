"""vLLM's own Prometheus metrics, read by the real-vLLM tests of both suites (Python 3.9,
standard library only)."""

from __future__ import annotations

import re
import urllib.request
from typing import Dict, List

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


def aborted_requests(server: Server, max_tokens: int) -> List[str]:
    """vLLM's ids of the requests asking ``max_tokens`` that its log says it aborted; the
    assertion names them when one was received but not aborted."""
    log = server.log_path.read_text(errors="replace") if server.log_path else ""
    received = re.findall(rf"Received request (\S+): params: .*max_tokens={max_tokens}\b", log)
    assert received, f"vLLM's log shows no request for max_tokens={max_tokens}"
    left = [found for found in received if f"Request {found} aborted." not in log]
    assert not left, f"received but not aborted: {left}"
    return received

