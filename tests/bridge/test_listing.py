"""Listing deliberations (``OperationsService.ListDeliberations``, ``ray-executor list``) from a
real bridge and Redis: newest first, every one exactly once across pages (many share a
millisecond: a group commit gives them one timestamp), filters, bad input named, and an index
that keeps no more than the state TTL."""

from __future__ import annotations

import asyncio
import subprocess
from typing import Any, Callable, Dict, List, Tuple

import grpc
import redis
from google.protobuf.timestamp_pb2 import Timestamp

from bridge.client import RayExecutorClient
from ray_executor.v1 import operations_pb2 as ops
from ray_executor.v1 import operations_pb2_grpc as ops_rpc
from ray_executor.v1 import ray_executor_pb2 as pb
from ray_executor.v1 import ray_executor_pb2_grpc as rpc
from tests.bridge.conftest import CLI, BridgeProcess, request
from tests.waiting import until

STORIES = ("S-1", "S-2", "S-3")


def submit_many(bridge: BridgeProcess, count: int) -> Dict[str, Tuple[str, str]]:
    """``count`` deliberations submitted at once; deliberation id -> (task id, story id)."""
    reqs = [request(agents=1) for _ in range(count)]
    for index, req in enumerate(reqs):
        req.constraints.story_id = STORIES[index % len(STORIES)]

    async def main() -> List[str]:
        async with grpc.aio.insecure_channel(bridge.address) as channel:
            stub = rpc.RayExecutorServiceStub(channel)
            replies = await asyncio.gather(*(stub.ExecuteDeliberation(r) for r in reqs))
        return [reply.deliberation_id for reply in replies]

    ids = asyncio.run(main())
    return {did: (req.task_id, req.constraints.story_id) for did, req in zip(ids, reqs)}


def pages(bridge: BridgeProcess, page_size: int, **filters: Any
          ) -> List[ops.ListDeliberationsResponse]:
    async def main() -> List[ops.ListDeliberationsResponse]:
        found: List[ops.ListDeliberationsResponse] = []
        token = ""
        async with RayExecutorClient(bridge.address) as client:
            while True:
                page = await client.deliberations(page_size=page_size, page_token=token,
                                                  **filters)
                found.append(page)
                token = page.next_page_token
                if not token:
                    return found

    return asyncio.run(main())


def listed(responses: List[ops.ListDeliberationsResponse]) -> List[ops.DeliberationSummary]:
    return [d for page in responses for d in page.deliberations]


def test_pages_hold_every_deliberation_once_newest_first_and_filters_match(
        bridge: BridgeProcess) -> None:
    submitted = submit_many(bridge, 130)
    stub = bridge.stub()
    cancelled = sorted(submitted)[:7]
    for did in cancelled:
        stub.CancelDeliberation(pb.CancelDeliberationRequest(deliberation_id=did))

    everything = pages(bridge, 50)
    assert [len(page.deliberations) for page in everything] == [50, 50, 30]
    found = listed(everything)
    assert sorted(d.deliberation_id for d in found) == sorted(submitted)  # each once
    created = [d.created.ToMilliseconds() for d in found]
    assert created == sorted(created, reverse=True)
    assert len(set(created)) < len(created)  # some share a millisecond: the cursor's hard case
    first = found[0]
    assert (first.task_id, first.story_id) == submitted[first.deliberation_id]
    assert first.total_agents == 1 and first.model == "test-model"

    assert sorted(d.deliberation_id for d in listed(pages(bridge, 3, status="cancelled"))) \
        == cancelled
    assert {d.status for d in listed(pages(bridge, 0, status="queued"))} == {"queued"}
    story = [did for did, (_, story_id) in submitted.items() if story_id == "S-2"]
    assert sorted(d.deliberation_id for d in listed(pages(bridge, 0, story_id="S-2"))) == \
        sorted(story)
    did, (task_id, _) = next(iter(submitted.items()))
    assert [d.deliberation_id for d in listed(pages(bridge, 0, task_id=task_id))] == [did]
    # A creation window: strictly between two deliberations' times.
    after, before = Timestamp(), Timestamp()
    after.FromMilliseconds(min(created) - 1)
    before.FromMilliseconds(min(created) + 1)
    oldest = [d.deliberation_id for d in found if d.created.ToMilliseconds() == min(created)]
    page = ops_rpc.OperationsServiceStub(grpc.insecure_channel(bridge.address)).ListDeliberations(
        ops.ListDeliberationsRequest(created_after=after, created_before=before, page_size=500))
    assert sorted(d.deliberation_id for d in page.deliberations) == sorted(oldest)


def test_the_list_command_and_bad_input(bridge: BridgeProcess) -> None:
    submitted = submit_many(bridge, 3)
    for did in submitted:
        bridge.stub().CancelDeliberation(pb.CancelDeliberationRequest(deliberation_id=did))

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([CLI, "list", *args], env=bridge.env, capture_output=True,
                              text=True, timeout=60)

    first = cli("--status", "cancelled", "--limit", "2")
    lines = first.stdout.splitlines()
    assert first.returncode == 0 and len(lines) == 3 and lines[2].startswith("more: --page ")
    rest = cli("--status", "cancelled", "--page", lines[2].split()[-1])
    lines += rest.stdout.splitlines()
    assert sorted(line.split()[0] for line in lines if line.startswith("delib-")) == \
        sorted(submitted)
    assert all(" cancelled " in line and " 0/1 " in line for line in lines[:2])
    for args, message in ((("--status", "done"), "INVALID_ARGUMENT: status: one of queued"),
                          (("--page", "nope"), "INVALID_ARGUMENT: page_token: not a page token"),
                          (("--limit", "501"), "INVALID_ARGUMENT: page_size: at most 500")):
        refused = cli(*args)
        assert refused.returncode == 1 and message in refused.stderr, refused.stderr


def test_the_index_keeps_no_more_than_the_state_ttl(
        start_bridge: Callable[..., BridgeProcess], redis_url: str) -> None:
    bridge = start_bridge(RAY_EXECUTOR_STATE_TTL_SECONDS="1")
    old = submit_many(bridge, 5)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    index = f"{bridge.prefix}:index"
    assert set(client.zrange(index, 0, -1)) == set(old)

    def trimmed() -> bool:  # each submit trims what is older than the TTL
        submit_many(bridge, 1)
        return not set(client.zrange(index, 0, -1)) & set(old)

    until(trimmed, "the index to drop deliberations older than the state TTL", timeout=30,
          interval=0.5)
    assert client.zcard(index) <= 3
    client.close()


def test_an_empty_index_lists_nothing(bridge: BridgeProcess) -> None:
    assert [len(page.deliberations) for page in pages(bridge, 0)] == [0]
