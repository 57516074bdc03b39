"""``ray-executor up``: the whole service on loopback, with embedded servers where no URL is set.

Starts what the environment does not name: valkey for ``REDIS_URL``, nats-server with
JetStream for ``NATS_URL``, a Ray head (from the worker environment) for ``RAY_ADDRESS``, for
``VLLM_URL`` a real vLLM on the CPU when ``--vllm-model`` names a model (``LocalVLLM``), else
the stand-in LLM; then the bridge, the workers and the dashboard as child
processes. Prints where each listens, prefixes their logs with their names, and stops all of
them on Ctrl-C (SIGINT) or SIGTERM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

from core import logs
from core.settings import Settings
from harness import servers


class LocalVLLM(NamedTuple):
    """A real vLLM for ``up`` to run: ``python`` of an environment with vLLM, ``model`` a
    local folder (served offline, under the folder's name) or a Hugging Face name."""

    python: str
    model: str

    @property
    def served_name(self) -> str:
        return Path(self.model).name if Path(self.model).is_dir() else self.model


class Child:
    """A child process whose output is echoed with a name prefix."""

    def __init__(self, name: str, args: List[str], env: Dict[str, str]) -> None:
        self.name = name
        self.process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        threading.Thread(target=self._echo, daemon=True).start()

    def _echo(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            sys.stdout.write(f"{self.name:>9} | {line.decode(errors='replace')}")
            sys.stdout.flush()

    def stop(self, timeout: float) -> None:
        if self.process.poll() is None:
            # The leader only: Dramatiq's main process passes SIGTERM on to its workers, and a
            # second SIGTERM makes a worker exit at once instead of finishing its jobs.
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def up(settings: Settings, worker_python: str, data_dir: Path,
       vllm: Optional[LocalVLLM] = None) -> int:
    """Run everything until interrupted; returns the exit code."""
    data_dir.mkdir(parents=True, exist_ok=True)
    logs.configure(settings.log_level, os.environ.get("RAY_EXECUTOR_LOG_FORMAT", "text"))
    started: List[servers.Server] = []
    children: List[Child] = []
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    # Loopback and readable logs, unless the environment says otherwise.
    env = dict(os.environ)
    env.setdefault("RAY_EXECUTOR_LOG_FORMAT", "text")
    env.setdefault("RAY_EXECUTOR_GRPC_HOST", "127.0.0.1")
    standin = None
    try:
        if not settings.redis_url:
            started.append(servers.valkey(_folder(data_dir / "valkey"), appendonly=True).start())
            env["REDIS_URL"] = started[-1].url
        if not settings.nats_url:
            started.append(servers.nats(_folder(data_dir / "nats")).start())
            env["NATS_URL"] = started[-1].url
        if not settings.ray_address:
            ray_binary = str(Path(worker_python).parent / "ray")
            print("starting a local Ray head (about 10 s)...", flush=True)
            started.append(servers.ray_head(_folder(data_dir / "ray"), ray_binary).start(120))
            env["RAY_ADDRESS"] = started[-1].url
        llm = "stand-in: --vllm-model for a real vLLM, or set VLLM_URL"
        if not settings.vllm_url and vllm is not None:
            print(f"starting vLLM serving {vllm.model} (a minute or more)...", flush=True)
            started.append(servers.vllm(_folder(data_dir / "vllm"), vllm.python, vllm.model,
                                        vllm.served_name,
                                        offline=Path(vllm.model).is_dir()).start(600))
            env.update(VLLM_URL=started[-1].url, VLLM_MODEL=vllm.served_name)
            llm = f"vLLM {servers.vllm_version(started[-1].url)}, model {vllm.served_name}"
        elif not settings.vllm_url:
            from harness.standin_llm import run_in_thread

            standin = run_in_thread(latency=0.5)
            env["VLLM_URL"] = standin.url
        else:
            llm = "VLLM_URL"
        cli = str(Path(sys.executable).parent / "ray-executor")
        children.append(Child("bridge", [cli, "bridge"], env))
        servers.wait_for_port(settings.grpc_port, 30, children[-1].process)
        children.append(Child("worker", [worker_python, "-m", "actors"], env))
        # The deliberation browser calls this bridge, wherever its port was set.
        env.setdefault("RAY_EXECUTOR_DASHBOARD_BRIDGE", f"127.0.0.1:{settings.grpc_port}")
        children.append(Child("dashboard", [cli, "dashboard"], env))
        _announce(settings, env, llm)
        while not stop.wait(0.5):
            for child in children:
                if child.process.poll() is not None:
                    print(f"{child.name} exited with {child.process.returncode}; stopping")
                    return 1
        return 0
    finally:
        print("stopping...", flush=True)
        for child in reversed(children):
            child.stop(settings.worker_shutdown_timeout if child.name == "worker" else 15)
        if standin is not None:
            standin.stop()
        for server in reversed(started):
            server.stop()
        print("stopped.", flush=True)


def _announce(settings: Settings, env: Dict[str, str], llm: str) -> None:
    rows = [
        ("gRPC (RayExecutorService)", f"{env['RAY_EXECUTOR_GRPC_HOST']}:{settings.grpc_port}"),
        ("dashboard", f"http://{settings.dashboard_host}:{settings.dashboard_port}/"),
        ("deliberations",
         f"http://{settings.dashboard_host}:{settings.dashboard_port}/deliberations"),
        ("bridge metrics", f"http://127.0.0.1:{settings.metrics_port}/metrics"),
        ("worker metrics", f"http://127.0.0.1:{settings.worker_metrics_port}/metrics"),
        ("Redis", env["REDIS_URL"]),
        ("NATS JetStream", env["NATS_URL"]),
        ("Ray client", env["RAY_ADDRESS"]),
        (f"LLM ({llm})", env["VLLM_URL"]),
    ]
    print("\nray-executor is up:", flush=True)
    for name, where in rows:
        print(f"  {name:<52} {where}", flush=True)
    print("\nTry: ray-executor submit 'Design a cache' --watch   (Ctrl-C stops everything)\n",
          flush=True)


def _folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path

