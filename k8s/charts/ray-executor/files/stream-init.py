"""Create or resize ray-executor's JetStream streams, then exit 0 (the chart's hook Job).

Self-contained: only the standard library and nats-py (both in the bridge image), so it does
not depend on where the project keeps its own stream code. It reads the same settings as the
service (NATS_URL, RAY_EXECUTOR_NATS_TLS_CA, the stream names and subject prefixes) and gives
each stream the subjects the service publishes on, the service's duplicate window and the
retention limits passed as arguments. Idempotent: an existing stream keeps its data and gets
the subjects and limits of this run. tests/deploy runs it against a real nats-server and
compares the result with the service's own stream table.
"""

import argparse
import asyncio
import os
import ssl
import sys

import nats
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

# Seconds during which JetStream drops a publish whose Nats-Msg-Id it has seen: the service's
# own window (longer than any outage an outbox entry may wait out).
DUPLICATE_WINDOW_SECONDS = 600.0


def env(name, default):
    return os.environ.get(name, "") or default


def streams():
    """{stream name: [subjects]}, as the service derives them from its settings."""
    commands = env("RAY_EXECUTOR_NATS_COMMANDS_PREFIX", "agent.cmd")
    responses = env("RAY_EXECUTOR_NATS_RESPONSES_PREFIX", "agent.response")
    events = env("RAY_EXECUTOR_NATS_EVENTS_PREFIX", "orchestration.deliberation")
    return {
        env("RAY_EXECUTOR_NATS_COMMANDS_STREAM", "AGENT_COMMANDS"): [commands + ".>"],
        env("RAY_EXECUTOR_NATS_RESPONSES_STREAM", "AGENT_RESPONSES"): [responses + ".>"],
        env("RAY_EXECUTOR_NATS_EVENTS_STREAM", "ORCHESTRATOR_EVENTS"):
            [events.split(".")[0] + ".>"],
        env("RAY_EXECUTOR_NATS_STREAMING_STREAM", "VLLM_STREAMING"):
            [env("RAY_EXECUTOR_NATS_STREAMING_PREFIX", "vllm.streaming") + ".>"],
    }


async def main(args):
    servers = [s.strip() for s in env("NATS_URL", "").split(",") if s.strip()]
    if not servers:
        print("NATS_URL is not set", file=sys.stderr)
        return 2
    ca = env("RAY_EXECUTOR_NATS_TLS_CA", "")
    tls = ssl.create_default_context(cafile=ca) if ca else None
    nc = await nats.connect(servers=servers, name="ray-executor-stream-init", tls=tls,
                            connect_timeout=5, max_reconnect_attempts=3)
    try:
        js = nc.jetstream()
        for name, subjects in streams().items():
            limits = dict(
                subjects=subjects, duplicate_window=DUPLICATE_WINDOW_SECONDS,
                max_age=float(args.max_age) if args.max_age > 0 else None,
                max_bytes=args.max_bytes if args.max_bytes > 0 else -1,
                discard=DiscardPolicy.OLD,
            )
            try:
                config = (await js.stream_info(name)).config
            except NotFoundError:
                await js.add_stream(StreamConfig(
                    name=name, retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
                    num_replicas=args.replicas, **limits))
                print("created", name, subjects, flush=True)
                continue
            for key, value in limits.items():
                setattr(config, key, value)
            config.num_replicas = args.replicas
            await js.update_stream(config)
            print("updated", name, subjects, flush=True)
    finally:
        await nc.close()
    print("streams ready:", ", ".join(sorted(streams())), flush=True)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-age", type=int, default=-1, help="seconds; -1: no limit")
    parser.add_argument("--max-bytes", type=int, default=-1, help="bytes; -1: no limit")
    parser.add_argument("--replicas", type=int, default=1)
    sys.exit(asyncio.run(main(parser.parse_args())))
