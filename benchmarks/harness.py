"""What every benchmark needs: loopback servers, our processes, and ways to watch them.

Servers (valkey, NATS with JetStream, a Ray head) are started once per run by ``Stack``; each
benchmark gets its own Dramatiq queue and key prefix (``Stack.env``) so nothing leaks between
them. Every process is started in its own session and stopped by process group. Kept as one
module past 400 lines: every benchmark shares these pieces, so each benchmark's own module
stays short.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import nats
from redis.asyncio import Redis

from core.contract import AgentJob
from core.settings import Settings
from core.store import DeliberationStore
from harness import servers

ROOT = Path(__file__).resolve().parent.parent
BRIDGE_CLI = str(Path(sys.executable).parent / "ray-executor")
CORES = os.cpu_count() or 1
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Sessions of every process this run started (each in its own session) and of this one: CPU of
# anything else on the machine (other users' work) is reported as "not ours".
SESSIONS: set[int] = {os.getsid(0)}


def worker_python() -> str:
    configured = os.environ.get("RAY_EXECUTOR_WORKER_PYTHON")
    if configured:
        return configured
    default = ROOT / ".venv-worker" / "bin" / "python"
    if default.exists():
        return str(default)
    raise SystemExit("RAY_EXECUTOR_WORKER_PYTHON must name the worker environment's python")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def tag() -> str:
    return uuid.uuid4().hex[:8]


# --- processes ------------------------------------------------------------------------------


class Proc:
    """A child process in its own session, logging to a file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        with log.open("ab") as out:
            self.process = subprocess.Popen(args, env=env, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            cwd=ROOT)
        SESSIONS.add(self.process.pid)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        with contextlib.suppress(ProcessLookupError):  # stragglers of the group
            os.killpg(self.process.pid, signal.SIGKILL)


class Stack:
    """valkey, NATS (JetStream) and, when asked for, a Ray head; plus every process started."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.redis = self._own(servers.valkey(self._dir("valkey")).start())
        self.nats = self._own(servers.nats(self._dir("nats")).start())
        self._ray: servers.Server | None = None
        self.procs: list[Proc] = []

    @staticmethod
    def _own(server: servers.Server) -> servers.Server:
        if server.process is not None:
            SESSIONS.add(server.process.pid)
        return server

    def _dir(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def ray_address(self) -> str:
        if self._ray is None:
            binary = str(Path(worker_python()).parent / "ray")
            self._ray = self._own(servers.ray_head(self._dir("ray"), binary).start(timeout=120))
        return self._ray.url

    def env(self, **overrides: str) -> dict[str, str]:
        """Environment of a bridge or worker: our servers, its own queue and key prefix."""
        name = tag()
        env = dict(os.environ, REDIS_URL=self.redis.url, NATS_URL=self.nats.url,
                   RAY_EXECUTOR_QUEUE=f"bench{name}", RAY_EXECUTOR_KEY_PREFIX=f"b{name}",
                   RAY_EXECUTOR_GRPC_HOST="127.0.0.1",
                   RAY_EXECUTOR_GRPC_PORT=str(servers.free_port()),
                   RAY_EXECUTOR_METRICS_PORT=str(servers.free_port()),
                   RAY_EXECUTOR_NATS_INGRESS="false")
        env.pop("VIRTUAL_ENV", None)
        env.update(overrides)
        return env

    def start(self, name: str, args: list[str], env: dict[str, str]) -> Proc:
        proc = Proc(name, args, env, self.workdir / f"{name}-{len(self.procs)}.log")
        self.procs.append(proc)
        return proc

    def bridge(self, env: dict[str, str]) -> Bridge:
        proc = self.start("bridge", [BRIDGE_CLI, "bridge"], env)
        port = int(env["RAY_EXECUTOR_GRPC_PORT"])
        servers.wait_for_port(port, 30, proc.process)
        return Bridge(proc, f"127.0.0.1:{port}", env)

    def workers(self, env: dict[str, str], processes: int, threads: int,
                concurrency: int | None = None, metrics_port: int = 0) -> Proc:
        """A worker group (``python -m actors``); ``metrics_port``: where it serves its
        Prometheus metrics (a free port when 0)."""
        env = dict(env, RAY_ADDRESS=self.ray_address,
                   RAY_EXECUTOR_WORKER_PROCESSES=str(processes),
                   RAY_EXECUTOR_WORKER_THREADS=str(threads),
                   RAY_EXECUTOR_WORKER_METRICS_PORT=str(metrics_port or servers.free_port()))
        if concurrency is not None:
            env["RAY_EXECUTOR_VLLM_CONCURRENCY"] = str(concurrency)
        return self.start("workers", [worker_python(), "-m", "actors"], env)

    def standin(self, latency: float) -> Standin:
        port = servers.free_port()
        proc = self.start("standin", [sys.executable, "-m", "harness.standin_llm", "--port",
                                      str(port), "--latency", str(latency),
                                      "--model", "standin-model", "--log-level", "WARNING"],
                          dict(os.environ))
        servers.wait_for_port(port, 30, proc.process)
        return Standin(proc, f"http://127.0.0.1:{port}")

    def worker_script(self, module: str, *args: str, timeout: float = 600) -> dict[str, Any]:
        """Run ``python -m module args`` in the worker environment; its last stdout line is
        JSON."""
        env = dict(os.environ, RAY_ADDRESS=self.ray_address)
        env.pop("VIRTUAL_ENV", None)
        log = self.workdir / f"{module.rsplit('.', 1)[-1]}-{tag()}.log"
        with log.open("wb") as err:
            done = subprocess.run([worker_python(), "-m", module, *args], env=env, cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=err, timeout=timeout,
                                  check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{module} failed ({done.returncode}); see {log}")
        return json.loads(done.stdout.decode().strip().splitlines()[-1])

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        for server in (self._ray, self.nats, self.redis):
            if server is not None:
                server.stop()


@dataclass
class Bridge:
    proc: Proc
    address: str
    env: dict[str, str]

    @property
    def settings(self) -> Settings:
        return Settings.from_env(self.env)


@dataclass
class Standin:
    proc: Proc
    url: str

    def stats(self) -> dict[str, int]:
        with urllib.request.urlopen(f"{self.url}/stats", timeout=10) as reply:
            return json.loads(reply.read())  # type: ignore[no-any-return]

    def reset(self) -> None:
        self._post("/control/reset", {})

    def control(self, **behaviour: Any) -> None:
        """Change its behaviour (``harness.standin_behaviour.Behaviour``'s fields)."""
        self._post("/control", behaviour)

    def _post(self, path: str, body: dict[str, Any]) -> None:
        request = urllib.request.Request(f"{self.url}{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=10).close()


# --- submitting and watching work ----------------------------------------------------------


def agent_job(deliberation_id: str, url: str, *, timeout: int = 120) -> AgentJob:
    return AgentJob(deliberation_id=deliberation_id, task_id=f"task-{deliberation_id}",
                    agent_id="a0", agent_index=0, num_agents=1, role="DEV",
                    model="standin-model", prompt_template="",
                    task_description="Design a rate limiter for the GPU queue",
                    task_role="DEV", vllm_url=url, timeout_seconds=timeout, max_retries=2)


class Store:
    """``DeliberationStore`` of a bridge/worker environment, for submitting directly."""

    def __init__(self, env: dict[str, str]) -> None:
        self.settings = Settings.from_env(env)
        self.redis = Redis.from_url(self.settings.redis_url, decode_responses=True)
        self.store = DeliberationStore(self.redis, self.settings)

    async def submit(self, count: int, url: str, submitted: dict[str, float],
                     concurrency: int = 64, **fields: Any) -> list[str]:
        """Submit ``count`` single-agent deliberations; ``submitted[id]`` = perf_counter;
        ``fields`` replace the agent job's (e.g. its ``route``)."""
        ids = [f"delib-{uuid.uuid4().hex}" for _ in range(count)]
        gate = asyncio.Semaphore(concurrency)

        async def one(did: str) -> None:
            async with gate:
                submitted[did] = time.perf_counter()
                await self.store.submit(did, {"id": did, "task_id": f"task-{did}"},
                                        [replace(agent_job(did, url), **fields)])

        await asyncio.gather(*(one(did) for did in ids))
        return ids

    async def close(self) -> None:
        await self.redis.close()


class Completions:
    """Arrival times of ``agent.response.completed|failed`` by deliberation id (core NATS)."""

    def __init__(self) -> None:
        self.done: dict[str, float] = {}
        self.failed: set[str] = set()
        self._nc: Any = None
        self._changed = asyncio.Event()

    async def start(self, url: str, subjects: Iterable[str] = ("agent.response.completed",
                                                               "agent.response.failed")
                    ) -> Completions:
        self._nc = await nats.connect(url)
        for subject in subjects:
            await self._nc.subscribe(subject, cb=self._on_message, pending_msgs_limit=-1,
                                     pending_bytes_limit=-1)
        await self._nc.flush()
        return self

    async def _on_message(self, msg: Any) -> None:
        now = time.perf_counter()
        body = json.loads(msg.data)
        did = body.get("deliberation_id")
        if did and did not in self.done:
            self.done[did] = now
            if msg.subject.endswith("failed"):
                self.failed.add(did)
            self._changed.set()

    async def wait(self, ids: Iterable[str], timeout: float) -> None:
        wanted = set(ids)
        deadline = time.monotonic() + timeout
        while not wanted <= self.done.keys():
            left = deadline - time.monotonic()
            if left <= 0:
                missing = len(wanted - self.done.keys())
                raise TimeoutError(f"{missing} of {len(wanted)} results missing after "
                                   f"{timeout:.0f}s")
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 1.0))

    async def close(self) -> None:
        if self._nc is not None:
            await self._nc.close()


# --- memory and CPU ------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    """Resident memory (VmRSS) of a process, in MB; 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def threads_of(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            found += [int(p) for p in task.read_text().split()]
    return found


def worker_processes(group_pid: int, min_threads: int = 8) -> list[int]:
    """The Dramatiq worker processes of a ``python -m actors`` group (the master's children
    with a thread pool; the Prometheus exposition fork has a couple of threads only)."""
    return [pid for pid in children(group_pid) if threads_of(pid) >= min_threads]


@dataclass
class RssSampler:
    """Samples the RSS of some processes in a thread; keeps each one's peak."""

    pids: dict[str, list[int]]
    interval: float = 0.1
    peak: dict[str, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, pids in self.pids.items():
                value = max((rss_mb(pid) for pid in pids), default=0.0)
                self.peak[name] = max(self.peak.get(name, 0.0), value)
            self._stop.wait(self.interval)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


GROUPS = (("workers", ("dramatiq", "-m actors")), ("bridge", ("ray-executor bridge",)),
          ("echo-server", ("benchmarks.echo_server",)), ("grpc-client", ("benchmarks.grpc_load",)),
          ("standin", ("harness.standin_llm",)), ("ray-direct", ("benchmarks.ray_direct",)),
          ("vllm", ("vllm.entrypoints", "VLLM::")), ("vllm-direct", ("benchmarks.vllm_direct",)),
          ("bench-client", ("benchmarks",)), ("valkey", ("valkey-server",)),
          ("nats", ("nats-server",)), ("ray", ("ray", "raylet", "gcs_server")))


def _group(cmdline: str) -> str:
    for name, needles in GROUPS:
        if any(needle in cmdline for needle in needles):
            return name
    return "other of ours"


def _stat_fields(stat: str) -> list[str]:
    """The fields of a ``/proc/<pid>/stat`` line after the command name (state first)."""
    return stat[stat.rfind(")") + 2:].split()


def cpu_seconds(pid: int) -> float:
    """CPU seconds a process has used so far, every thread of it (user and system)."""
    fields = _stat_fields(Path(f"/proc/{pid}/stat").read_text())
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _cpu_by_pid() -> dict[int, tuple[str, float]]:
    """(group, CPU seconds so far) of every live process."""
    found: dict[int, tuple[str, float]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = _stat_fields(stat)
        if fields[0] == "Z":  # a zombie's CPU was counted while it lived
            continue
        seconds = (int(fields[11]) + int(fields[12])) / CLK_TCK
        if int(fields[3]) not in SESSIONS:
            group = "not ours (other work on the machine)"
        else:
            group = _group(cmdline or stat[stat.find("(") + 1:stat.rfind(")")])
        found[int(proc.name)] = (group, seconds)
    return found


def _machine_busy() -> tuple[float, float]:
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


class CpuMeter:
    """CPU used during a phase: the machine's busy share and each process group's share of
    the machine (100% = every core busy)."""

    def __enter__(self) -> CpuMeter:
        self._start = time.perf_counter()
        self._pids = _cpu_by_pid()
        self._busy = _machine_busy()
        return self

    def __exit__(self, *exc: Any) -> None:
        elapsed = time.perf_counter() - self._start
        busy, total = _machine_busy()
        self.machine_pct = 100 * (busy - self._busy[0]) / max(1, total - self._busy[1])
        used: dict[str, float] = {}  # per process: CPU since the start (or since it started)
        for pid, (group, seconds) in _cpu_by_pid().items():
            before = self._pids.get(pid)
            label = before[0] if before else group
            used[label] = used.get(label, 0.0) + seconds - (before[1] if before else 0.0)
        capacity = elapsed * CORES
        self.groups_pct = {name: round(100 * value / capacity, 1)
                           for name, value in used.items() if value > 0.01 * capacity}

    def summary(self) -> dict[str, Any]:
        return {"machine_busy_pct": round(self.machine_pct, 1),
                "by_process_pct": dict(sorted(self.groups_pct.items(),
                                              key=lambda item: -item[1]))}
