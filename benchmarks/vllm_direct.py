"""The bare vLLM baseline: streamed chat completions from one aiohttp client, closed loop.

Runs in the worker environment (it has aiohttp, the HTTP client of our vLLM jobs; Python 3.9)::

    python -m benchmarks.vllm_direct --url http://127.0.0.1:PORT --body BODY.json \
        --count 40 --concurrency 4 --warmup 8

``BODY.json`` is the chat completion to post (``stream: true``). Prints one JSON line: each
measured request's seconds to its first content chunk (``ttft``) and to its end (``total``),
the completion tokens each usage chunk reported, and the wall time of the measured ones.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, List, Tuple

TIMEOUT = 300.0  # seconds one request may take, at most


async def closed_loop(count: int, concurrency: int,
                      one: Callable[[], Awaitable[None]]) -> float:
    """Run ``one`` ``count`` times, ``concurrency`` at a time; the wall time in seconds.

    Parameters:
      count: calls in all.
      concurrency: calls in flight at once (each caller starts the next when one ends).
      one: makes one call.
    """
    left = count

    async def caller() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await one()

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return time.perf_counter() - started


async def streamed_call(session: Any, url: str, body: Dict[str, Any]
                        ) -> Tuple[float, float, int]:
    """One streamed chat completion: (seconds to the first content, seconds to the end,
    completion tokens the usage chunk reports)."""
    started = time.perf_counter()
    first = 0.0
    tokens = 0
    async with session.post(url.rstrip("/") + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for raw in response.content:  # one SSE line at a time
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if not first and any((choice.get("delta") or {}).get("content")
                                 for choice in chunk.get("choices") or ()):
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"].get("completion_tokens", 0)
    ended = time.perf_counter()
    if not first:
        raise RuntimeError("a streamed answer without content")
    return first - started, ended - started, tokens


async def run(url: str, body: Dict[str, Any], count: int, concurrency: int, warmup: int
              ) -> Dict[str, Any]:
    import aiohttp  # here: the bridge environment imports closed_loop and has no aiohttp

    ttft: List[float] = []
    total: List[float] = []
    tokens: List[int] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session:
        async def one() -> None:
            first, whole, used = await streamed_call(session, url, body)
            ttft.append(first)
            total.append(whole)
            tokens.append(used)

        await closed_loop(warmup, concurrency, one)
        del ttft[:], total[:], tokens[:]
        wall = await closed_loop(count, concurrency, one)
    return {"ttft": ttft, "total": total, "tokens": tokens, "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="vLLM's base URL")
    parser.add_argument("--body", required=True, help="JSON file of the chat completion")
    parser.add_argument("--count", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=8)
    args = parser.parse_args()
    body = json.loads(Path(args.body).read_text())
    result = asyncio.run(run(args.url, body, args.count, args.concurrency, args.warmup))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
