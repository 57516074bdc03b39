"""The ``ray-executor`` command.

Sub-commands run one part each (``bridge``, ``worker``, ``dashboard``), all of them on
loopback (``up``), or talk to a running bridge (``submit``, ``status``, ``watch``). The
worker runs in the worker environment (the cluster's Python with Ray): ``worker`` starts
Dramatiq there as a separate process, so this module never imports the Ray side.
"""

from __future__ import annotations

import argparse
import asyncio
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
    from harness.up import up

    return up(settings, args.worker_python or sys.executable, Path(args.data_dir))


def _worker_command(args: argparse.Namespace, settings: Settings) -> int:
    # The worker side lives in the worker environment (the cluster's Python with Ray):
    # hand over to it as a new program rather than importing it here.
    python = args.worker_python or sys.executable
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

    return asyncio.run(submit())


async def _watch(client: RayExecutorClient, deliberation_id: str) -> int:
    async for event in client.watch(deliberation_id):
        who = f" {event.agent_id}" if event.agent_id else ""
        print(f"{event.time.ToDatetime():%H:%M:%S} {event.event}{who}", flush=True)
    final = await client.status(deliberation_id)
    print(f"{final.status}: {final.completed_agents}/{final.total_agents} agents completed")
    if final.result.agent_id:
        print(f"best ({final.result.agent_id}): {final.result.proposal[:500]}")
    return 0 if final.status == "completed" else 1


def _watch_command(args: argparse.Namespace, settings: Settings) -> int:
    async def watch() -> int:
        async with _client(args, settings) as client:
            return await _watch(client, args.deliberation_id)

    return asyncio.run(watch())


def _status_command(args: argparse.Namespace, settings: Settings) -> int:
    from google.protobuf.json_format import MessageToJson

    async def status() -> int:
        async with _client(args, settings) as client:
            if args.deliberation_id:
                print(MessageToJson(await client.status(args.deliberation_id)))
            else:
                print(MessageToJson(await client.service_status()))
            return 0

    return asyncio.run(status())


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
}


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="ray-executor", description=__doc__.split("\n\n")[0])
    sub = root.add_subparsers(dest="command", required=True)
    sub.add_parser("settings", help="print the effective settings (secrets masked)")
    sub.add_parser("bridge", help="serve the gRPC and NATS ingress (needs REDIS_URL)")
    worker = sub.add_parser("worker", help="run Dramatiq workers that execute jobs on Ray")
    worker.add_argument("--worker-python", default="",
                        help="python of the worker environment (default: this one)")
    sub.add_parser("dashboard", help="serve dramatiq-dashboard for our queue (needs "
                   "REDIS_URL; auth: RAY_EXECUTOR_DASHBOARD_*)")
    up = sub.add_parser("up", help="run everything on loopback (embedded servers where no URL)")
    up.add_argument("--worker-python", default="",
                    help="python of the worker environment (Python 3.9 with Ray)")
    up.add_argument("--data-dir", default=".run", help="where embedded servers keep data")
    for name, help_text in [("submit", "submit a deliberation to a running bridge"),
                            ("status", "show a deliberation's status, or the service's"),
                            ("watch", "follow a deliberation's events until it ends")]:
        command = sub.add_parser(name, help=help_text)
        command.add_argument("--target", default="", help="bridge host:port")
        command.add_argument("--tls-ca", default="", help="CA of the bridge's certificate")
        if name == "submit":
            command.add_argument("description", help="the task to deliberate on")
            command.add_argument("--roles", default="DEV,QA,ARCHITECT",
                                 help="comma-separated roles, one agent each")
            command.add_argument("--task-id", default="")
            command.add_argument("--timeout", type=int, default=0, help="seconds per agent")
            command.add_argument("--watch", action="store_true", help="then follow it")
        else:
            command.add_argument("deliberation_id", nargs="?" if name == "status" else None,
                                 default="")
    return root


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
