"""The ``ray-executor`` command.

Sub-commands run one part each (``bridge``, ``worker``, ``dashboard``), all of them on
loopback (``up``), or talk to a running bridge (``submit``, ``status``, ``watch``). The
worker runs in the worker environment (the cluster's Python with Ray): ``worker`` starts
Dramatiq there as a separate process, so this module never imports the Ray side.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Awaitable, Callable, Dict, List, Optional

from bridge import logs
from bridge.settings import Settings, SettingsError


def _settings_command(args: argparse.Namespace, settings: Settings) -> int:
    for env, value in settings.as_env().items():
        secret = ("TOKEN" in env or "PASSWORD" in env) and value
        print(f"{env}={'***' if secret else value}")
    return 0


def _bridge_command(args: argparse.Namespace, settings: Settings) -> int:
    from bridge import service

    return _run_until_signal(lambda stop: service.run(settings, stop))


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
}


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="ray-executor", description=__doc__.split("\n\n")[0])
    sub = root.add_subparsers(dest="command", required=True)
    sub.add_parser("settings", help="print the effective settings (secrets masked)")
    sub.add_parser("bridge", help="serve the gRPC and NATS ingress (needs REDIS_URL)")
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
