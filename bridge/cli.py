"""The ``ray-executor`` command.

Sub-commands run one part each (``bridge``, ``worker``, ``dashboard``), all of them on
loopback (``up``), or talk to a running bridge (``submit``, ``status``, ``watch``,
``list``, ``routes``, ``cancel``, ``retry``, ``dlq``). The worker runs in the worker
environment (the cluster's Python with Ray): ``worker`` starts Dramatiq there as a separate
process, so this module never imports the Ray side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Awaitable, Callable, Dict, List, Optional

from core import logs
from core.settings import Settings, SettingsError

if TYPE_CHECKING:
    from bridge.client import RayExecutorClient


def _settings_command(args: argparse.Namespace, settings: Settings) -> int:
    for env, value in settings.as_env().items():
        secret = ("TOKEN" in env or "PASSWORD" in env) and value
        print(f"{env}={'***' if secret else value}")
    return 0


def _bridge_command(args: argparse.Namespace, settings: Settings) -> int:
    from bridge import service

    return _run_until_signal(lambda stop: service.run(settings, stop))


def _dashboard_command(args: argparse.Namespace, settings: Settings) -> int:
    from bridge import dashboard

    return dashboard.main(settings)


def _up_command(args: argparse.Namespace, settings: Settings) -> int:
    from harness.up import LocalVLLM, up

    vllm = None
    if args.vllm_model:
        if not args.vllm_python:
            print("ray-executor up: --vllm-model needs --vllm-python (an environment with "
                  "vLLM: make .venv-vllm/.installed)", file=sys.stderr)
            return 2
        vllm = LocalVLLM(args.vllm_python, args.vllm_model)
    return up(settings, args.worker_python or sys.executable, Path(args.data_dir), vllm)


def _worker_command(args: argparse.Namespace, settings: Settings) -> int:
    # The worker side lives in the worker environment (the cluster's Python with Ray):
    # hand over to it as a new program rather than importing it here.
    python = args.worker_python or sys.executable
    if args.route:
        os.environ["RAY_EXECUTOR_ROUTE"] = args.route
    os.execv(python, [python, "-m", "actors"])
    return 0  # not reached


def _client(args: argparse.Namespace, settings: Settings) -> RayExecutorClient:
    from bridge.client import RayExecutorClient

    return RayExecutorClient(args.target or f"127.0.0.1:{settings.grpc_port}",
                             token=settings.grpc_token, tls_ca=args.tls_ca)


def _submit_command(args: argparse.Namespace, settings: Settings) -> int:
    roles = [r.strip().upper() for r in args.roles.split(",") if r.strip()]

    async def submit() -> int:
        async with _client(args, settings) as client:
            reply = await client.execute_deliberation(
                task_id=args.task_id or f"cli-{uuid.uuid4().hex[:12]}",
                task_description=args.description, role=roles[0] if roles else "",
                agents=[(f"agent-{i + 1}-{role.lower()}", role) for i, role in enumerate(roles)],
                constraints={"timeout_seconds": args.timeout} if args.timeout else None)
            print(f"{reply.status}: {reply.deliberation_id} ({reply.message})")
            if args.watch:
                return await _watch(client, reply.deliberation_id)
            return 0

    return _calling(submit())


async def _watch(client: RayExecutorClient, deliberation_id: str) -> int:
    async for event in client.watch(deliberation_id):
        who = f" {event.agent_id}" if event.agent_id else ""
        said = ""
        if event.event == "agent_progress":  # a streamed answer, as it is written
            said = ": " + json.loads(event.data_json).get("text", "").replace("\n", " ")
        print(f"{event.time.ToDatetime():%H:%M:%S} {event.event}{who}{said}", flush=True)
    final = await client.status(deliberation_id)
    print(f"{final.status}: {final.completed_agents}/{final.total_agents} agents completed")
    if final.result.agent_id:
        print(f"best ({final.result.agent_id}): {final.result.proposal[:500]}")
    return 0 if final.status == "completed" else 1


def _watch_command(args: argparse.Namespace, settings: Settings) -> int:
    async def watch() -> int:
        async with _client(args, settings) as client:
            return await _watch(client, args.deliberation_id)

    return _calling(watch())


def _status_command(args: argparse.Namespace, settings: Settings) -> int:
    from google.protobuf.json_format import MessageToJson

    async def status() -> int:
        async with _client(args, settings) as client:
            if args.deliberation_id:
                found = await client.status(args.deliberation_id)
                print(MessageToJson(found))
                return 1 if found.status == "not_found" else 0
            else:
                print(MessageToJson(await client.service_status()))
            return 0

    return _calling(status())


def _cancel_command(args: argparse.Namespace, settings: Settings) -> int:
    async def cancel() -> int:
        async with _client(args, settings) as client:
            reply = await client.cancel(args.deliberation_id, args.reason)
        print(f"{reply.message}: {reply.deliberation_id}")
        return 0 if reply.status == "cancelled" else 1

    return _calling(cancel())


def _retry_command(args: argparse.Namespace, settings: Settings) -> int:
    async def retry() -> int:
        async with _client(args, settings) as client:
            reply = await client.retry(args.deliberation_id, by=args.by, reason=args.reason)
        print(f"{args.deliberation_id}: {reply.message}")
        return 0

    return _calling(retry())


def _list_command(args: argparse.Namespace, settings: Settings) -> int:
    async def listing() -> int:
        filters = {name: value for name, value in (
            ("status", args.status), ("task_id", args.task_id), ("story_id", args.story_id),
            ("model", args.model), ("route", args.route)) if value}
        async with _client(args, settings) as client:
            page = await client.deliberations(page_size=args.limit, page_token=args.page,
                                              **filters)
        for found in page.deliberations:
            print(f"{found.deliberation_id} {found.status:<9} "
                  f"{found.created.ToDatetime():%Y-%m-%d %H:%M:%S} "
                  f"{found.completed_agents}/{found.total_agents} {found.task_id} "
                  f"route={found.route or '-'}")
        if page.next_page_token:
            print(f"more: --page {page.next_page_token}")
        return 0

    return _calling(listing())


def _routes_command(args: argparse.Namespace, settings: Settings) -> int:
    async def routes() -> int:
        async with _client(args, settings) as client:
            found = await client.routes()
        for route in found.routes:
            print(f"route {route.name} (queue {route.queue}): {route.workers} workers, "
                  f"{route.ready} ready, {route.delayed} delayed, {route.dead} dead, "
                  f"{route.running} running")
            for endpoint in route.endpoints:
                circuit = (f"open for {endpoint.open_for_seconds:.0f} s"
                           if endpoint.circuit == "open" else endpoint.circuit)
                print(f"  {endpoint.url}: {endpoint.in_use}/{endpoint.concurrency} slots, "
                      f"circuit {circuit} ({endpoint.failures} failures)")
        return 0

    return _calling(routes())


def _dlq_command(args: argparse.Namespace, settings: Settings) -> int:
    from google.protobuf.json_format import MessageToJson

    async def dlq() -> int:
        async with _client(args, settings) as client:
            if args.action == "show":
                print(MessageToJson(await client.dead_letter(args.sequence)))
            elif args.action == "replay":
                reply = await client.replay_dead_letter(args.sequence, by=args.by,
                                                        reason=args.reason)
                print(f"{args.sequence}: {reply.message}")
            else:
                page = await client.dead_letters(args.after, args.limit)
                for letter in page.dead_letters:
                    replayed = (f" [replayed as {letter.replayed.sequence} by "
                                f"{letter.replayed.by}]" if letter.HasField("replayed") else "")
                    print(f"{letter.sequence} {letter.time} {letter.field}: "
                          f"{' '.join(letter.reason.split())}{replayed}")
                if page.next_after_sequence:
                    print(f"more: --after {page.next_after_sequence}")
        return 0

    return _calling(dlq())


def _calling(call: Awaitable[int]) -> int:
    """Run a client call; a refused one prints its status and message (exit 1)."""
    import grpc

    async def run() -> int:
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            print(f"ray-executor: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1

    return asyncio.run(run())


def _run_until_signal(main: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """Run ``main(stop)`` on a new event loop; SIGINT/SIGTERM set ``stop`` (graceful)."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    asyncio.run(runner())
    return 0


COMMANDS: Dict[str, Callable[[argparse.Namespace, Settings], int]] = {
    "settings": _settings_command,
    "bridge": _bridge_command,
    "worker": _worker_command,
    "up": _up_command,
    "dashboard": _dashboard_command,
    "submit": _submit_command,
    "status": _status_command,
    "watch": _watch_command,
    "cancel": _cancel_command,
    "retry": _retry_command,
    "list": _list_command,
    "routes": _routes_command,
    "dlq": _dlq_command,
}


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="ray-executor", description=__doc__.split("\n\n")[0])
    sub = root.add_subparsers(dest="command", required=True)
    sub.add_parser("settings", help="print the effective settings (secrets masked)")
    sub.add_parser("bridge", help="serve the gRPC and NATS ingress (needs REDIS_URL)")
    worker = sub.add_parser("worker", help="run Dramatiq workers that execute jobs on Ray")
    worker.add_argument("--worker-python", default="",
                        help="python of the worker environment (default: this one)")
    worker.add_argument("--route", default="",
                        help="the route to serve (default: RAY_EXECUTOR_ROUTE, else the "
                             "default route)")
    sub.add_parser("dashboard", help="serve dramatiq-dashboard for our queue (needs "
                   "REDIS_URL; auth: RAY_EXECUTOR_DASHBOARD_*)")
    up = sub.add_parser("up", help="run everything on loopback (embedded servers where no URL)")
    up.add_argument("--worker-python", default="",
                    help="python of the worker environment (Python 3.9 with Ray)")
    up.add_argument("--data-dir", default=".run", help="where embedded servers keep data")
    up.add_argument("--vllm-model", default="",
                    help="run a real vLLM (CPU) serving this model instead of the stand-in: "
                         "a local folder, or a Hugging Face name when online")
    up.add_argument("--vllm-python", default="",
                    help="python of an environment with vLLM (.venv-vllm/bin/python)")
    for name, help_text in [("submit", "submit a deliberation to a running bridge"),
                            ("status", "show a deliberation's status, or the service's"),
                            ("watch", "follow a deliberation's events until it ends"),
                            ("list", "deliberations newest first, filtered and paged"),
                            ("routes", "each route's queue, workers, endpoints and circuits"),
                            ("cancel", "cancel a deliberation (its running jobs stop)"),
                            ("retry", "run the failed agents of a finished deliberation "
                                      "again (recorded)"),
                            ("dlq", "the NATS ingress's dead letters: list, show, replay")]:
        command = sub.add_parser(name, help=help_text)
        command.add_argument("--target", default="", help="bridge host:port")
        command.add_argument("--tls-ca", default="", help="CA of the bridge's certificate")
        if name == "dlq":
            _dlq_arguments(command)
        elif name == "list":
            for option in ("status", "task-id", "story-id", "model", "route"):
                command.add_argument(f"--{option}", default="", help="exact match")
            command.add_argument("--limit", type=int, default=0, help="page size (default 50)")
            command.add_argument("--page", default="", help="the token `more:` printed")
        elif name == "cancel":
            command.add_argument("deliberation_id")
            command.add_argument("--reason", default="", help="recorded and published")
        elif name == "retry":
            command.add_argument("deliberation_id")
            _recorded_arguments(command, "why: what was fixed")
        elif name == "submit":
            command.add_argument("description", help="the task to deliberate on")
            command.add_argument("--roles", default="DEV,QA,ARCHITECT",
                                 help="comma-separated roles, one agent each")
            command.add_argument("--task-id", default="")
            command.add_argument("--timeout", type=int, default=0, help="seconds per agent")
            command.add_argument("--watch", action="store_true", help="then follow it")
        elif name != "routes":
            command.add_argument("deliberation_id", nargs="?" if name == "status" else None,
                                 default="")
    return root


def _dlq_arguments(command: argparse.ArgumentParser) -> None:
    actions = command.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="dead letters, oldest first")
    listing.add_argument("--after", type=int, default=0, help="from after this sequence")
    listing.add_argument("--limit", type=int, default=0, help="at most this many (default 50)")
    actions.add_parser("show", help="one dead letter with its payload").add_argument(
        "sequence", type=int)
    replay = actions.add_parser("replay", help="publish its request again (once; recorded)")
    replay.add_argument("sequence", type=int)
    _recorded_arguments(replay, "why: what was fixed")


def _recorded_arguments(command: argparse.ArgumentParser, why: str) -> None:
    """``--reason`` and ``--by`` of an action the bridge records (who and why)."""
    command.add_argument("--reason", required=True, help=why)
    command.add_argument("--by", default=os.environ.get("USER") or "operator",
                         help="who (default: $USER)")


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"ray-executor: bad setting: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    return COMMANDS[args.command](args, settings)


if __name__ == "__main__":
    sys.exit(main())
