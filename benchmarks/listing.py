"""7. Listing: ``ListDeliberations`` (``ray-executor list``) over 100,000 finished
deliberations held in Redis, page by page, against the bare Redis reads one page needs (a
``ZREVRANGEBYSCORE`` of the index and one pipeline of ``HMGET``s, from a client in this
process). The records are written straight into Redis as the scripts leave them once a
deliberation has ended; 1 in 100 failed."""

from __future__ import annotations

import statistics
import time
import uuid
from typing import Any, Callable

import grpc
import redis

from benchmarks.harness import Stack
from benchmarks.report import row
from bridge.listing import SUMMARY_FIELDS
from core.keys import Keys
from ray_executor.v1 import operations_pb2 as ops
from ray_executor.v1 import operations_pb2_grpc as ops_rpc

NAME = "listing"
TITLE = "7. Listing 100,000 deliberations"
PAGE = 50
CALLS = 20


def fill(redis_url: str, prefix: str, count: int, ttl: int) -> None:
    client = redis.Redis.from_url(redis_url)
    keys = Keys(prefix)
    start = int(time.time() * 1000) - count
    pipe = client.pipeline(transaction=False)
    for n in range(count):
        did = f"delib-{uuid.uuid4().hex}"
        failed = n % 100 == 0
        pipe.hset(keys.deliberation(did), mapping={
            "id": did, "task_id": f"task-{n}", "story_id": f"S-{n % 50}", "model": "m",
            "status": "failed" if failed else "completed", "created_ms": start + n,
            "finished_ms": start + n + 500, "num_agents": 3, "completed": 0 if failed else 3,
            "failed": 3 if failed else 0})
        pipe.expire(keys.deliberation(did), ttl)
        pipe.zadd(keys.index, {did: start + n})
        if n % 5000 == 4999:
            pipe.execute()
    pipe.execute()
    client.close()


def median_ms(call: Callable[[], Any]) -> float:
    times = []
    for _ in range(CALLS):
        began = time.perf_counter()
        call()
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


def run(stack: Stack, quick: bool, **_: Any) -> dict[str, Any]:
    count = 20_000 if quick else 100_000
    bridge = stack.bridge(stack.env())
    settings = bridge.settings
    fill(settings.redis_url, settings.key_prefix, count, settings.state_ttl_seconds)
    stub = ops_rpc.OperationsServiceStub(grpc.insecure_channel(bridge.address))
    client = redis.Redis.from_url(settings.redis_url)
    keys = Keys(settings.key_prefix)

    def bare_page() -> None:
        ids = client.zrevrangebyscore(keys.index, "+inf", "-inf", start=0, num=PAGE)
        pipe = client.pipeline(transaction=False)
        for did in ids:
            pipe.hmget(keys.deliberation(did.decode()), SUMMARY_FIELDS)
        pipe.execute()

    def page(**fields: Any) -> ops.ListDeliberationsResponse:
        return stub.ListDeliberations(ops.ListDeliberationsRequest(page_size=PAGE, **fields))

    first = page()
    assert len(first.deliberations) == PAGE
    token = ""
    for _ in range(count // 2 // 500):  # walk to the middle, as an operator paging would
        token = stub.ListDeliberations(
            ops.ListDeliberationsRequest(page_size=500, page_token=token)).next_page_token
    failed = page(status="failed")
    assert len(failed.deliberations) == PAGE, "1 in 100 failed: a page needs 5,000 scanned"
    bare = median_ms(bare_page)
    figures = {
        "first page": median_ms(page),
        f"a page {count // 2:,} deep": median_ms(lambda: page(page_token=token)),
        "a page of failed ones (1 in 100)": median_ms(lambda: page(status="failed")),
        "one task_id (one call scans up to 20,000)": median_ms(lambda: page(task_id="task-7")),
    }
    client.close()
    rows = [row(f"{name}, {PAGE} per page, median of {CALLS}", "ms", ms, bare,
                "bare Redis reads of one page", ratio_of="ours/bare", at_most=1000,
                absolute=True)
            for name, ms in figures.items()]
    return {"rows": rows, "what": f"{count:,} finished deliberations in the listing index; "
            "the bridge answers over gRPC on loopback, the bare reads come from this process. "
            "Target: each page well under a second."}
