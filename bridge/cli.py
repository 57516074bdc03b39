"""The ``ray-executor`` command.

Sub-commands run one part each (``bridge``, ``worker``, ``dashboard``), all of them on
loopback (``up``), or talk to a running bridge (``submit``, ``status``, ``watch``). The
worker runs in the worker environment (the cluster's Python with Ray): ``worker`` starts
Dramatiq there as a separate process, so this module never imports the Ray side.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, List, Optional

from bridge.settings import Settings, SettingsError


def _settings_command(args: argparse.Namespace, settings: Settings) -> int:
    for env, value in settings.as_env().items():
        secret = ("TOKEN" in env or "PASSWORD" in env) and value
        print(f"{env}={'***' if secret else value}")
    return 0


COMMANDS: Dict[str, Callable[[argparse.Namespace, Settings], int]] = {
    "settings": _settings_command,
}


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="ray-executor", description=__doc__.split("\n\n")[0])
    sub = root.add_subparsers(dest="command", required=True)
    sub.add_parser("settings", help="print the effective settings (secrets masked)")
    return root


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"ray-executor: bad setting: {exc}", file=sys.stderr)
        return 2
    return COMMANDS[args.command](args, settings)


if __name__ == "__main__":
    sys.exit(main())
