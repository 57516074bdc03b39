"""Static validation of the deployment files: docker/ and compose/ (issue 8). The Helm chart
in k8s/ has its own tests in tests/deploy/ (issue 22).

No Docker engine runs here, so the files are checked as files:

* ``compose/compose.yaml`` validates against the Compose Specification (the schema that
  ``check-jsonschema`` vendors as ``vendor.compose-spec``);
* ``checkov`` finds nothing in the Dockerfiles, and every check it was told to skip carries
  a reason;
* drift: every variable set in compose/ is a setting of ``core.settings`` (or a
  documented non-setting), parses, the required ones are set for each part, and ports,
  commands, images and drain times agree with the code;
* the commands written into the files (stream init, health checks) are run for real against
  local servers;
* broken copies of the files fail the same checks.

The tools live in their own environment (checkov pins packages the test environment must not
share): ``RAY_EXECUTOR_TOOLS_BIN`` names its ``bin/`` (the Makefile sets it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import pytest
import tomllib

from bridge import cli
from core.settings import Settings, SettingsError, documented
from harness import servers
from tests.deploy import tooling
from tests.deploy.tooling import load_yaml, run, tools_bin

fake_metrics = tooling.fake_metrics  # a /metrics page for the health check commands

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose" / "compose.yaml"
DOCKER = ROOT / "docker"
TOOLS_ENV = "RAY_EXECUTOR_TOOLS_BIN"
TOOLS = ("checkov", "check-jsonschema", "python")

SETTINGS = {env for env, _, _ in documented()}
# Variables set in compose/ or k8s/ that are not settings of ours, and why.
NON_SETTINGS = {
    "HF_TOKEN": "vLLM's own: the Hugging Face token for gated models (compose `vllm`).",
}
# Parts of the service, by the component label (k8s) and service name (compose).
COMPOSE_COMPONENTS = {"bridge": "bridge", "worker": "worker", "dashboard": "dashboard",
                      "nats-init": "nats-stream-init", "standin-llm": "standin-llm"}
THIRD_PARTY_SERVICES = {"redis", "nats", "vllm", "ray-head"}
REQUIRED = {
    "bridge": {"REDIS_URL", "NATS_URL"},
    "worker": {"REDIS_URL", "NATS_URL", "RAY_ADDRESS"},
    "dashboard": {"REDIS_URL"},
    "nats-stream-init": {"NATS_URL"},
}
# `ray-executor <command>` each part runs.
COMMANDS = {"bridge": "bridge", "worker": "worker", "dashboard": "dashboard"}
# Settings every part must agree on (they name the same queue, keys and streams).
SHARED = ("RAY_EXECUTOR_QUEUE", "RAY_EXECUTOR_KEY_PREFIX", "RAY_EXECUTOR_NATS_COMMANDS_STREAM",
          "RAY_EXECUTOR_NATS_RESPONSES_STREAM", "RAY_EXECUTOR_NATS_EVENTS_STREAM",
          "RAY_EXECUTOR_NATS_COMMANDS_PREFIX", "RAY_EXECUTOR_NATS_RESPONSES_PREFIX",
          "RAY_EXECUTOR_NATS_EVENTS_PREFIX", "RAY_EXECUTOR_EVENT_FORMAT",
          "RAY_EXECUTOR_NATS_STREAMING_STREAM", "RAY_EXECUTOR_NATS_STREAMING_PREFIX")

Doc = Dict[str, Any]


# --- the tools ------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tools() -> Path:
    return tools_bin(TOOLS)




def checkov(tools: Path, out: Path, *folders: Path) -> Dict[str, Any]:
    return tooling.checkov(tools, out, *folders, framework="dockerfile")


def compose_problems(tools: Path, path: Path) -> str:
    """'' when ``path`` is valid under the Compose Specification, else the validator's words."""
    result = run([tools / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", path])
    return "" if result.returncode == 0 else (result.stdout + result.stderr)


# --- the files --------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def compose(tools: Path) -> Doc:
    return load_yaml(tools, COMPOSE.read_text())[0][0]


def dockerfile(name: str) -> Dict[str, Any]:
    """The parts of a Dockerfile the tests look at: stages, ARG defaults, final instructions."""
    text = (DOCKER / name).read_text()
    logical = re.sub(r"\\\n\s*", " ", text)
    stages: List[Dict[str, Any]] = []
    args: Dict[str, str] = {}
    for line in logical.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            stages.append({"from": rest, "run": [], "user": None, "expose": [],
                           "entrypoint": None, "cmd": None, "copy": []})
        elif word == "ARG":
            key, _, value = rest.partition("=")
            if value and key not in args:
                args[key] = value
        elif stages and word == "RUN":
            stages[-1]["run"].append(rest)
        elif stages and word == "USER":
            stages[-1]["user"] = rest
        elif stages and word == "EXPOSE":
            stages[-1]["expose"] += [int(p.split("/")[0]) for p in rest.split()]
        elif stages and word in ("ENTRYPOINT", "CMD"):
            stages[-1][word.lower()] = json.loads(rest)
        elif stages and word == "COPY":
            stages[-1]["copy"].append(rest)
    return {"text": text, "stages": stages, "args": args}


# --- effective environment of each part -----------------------------------------------------

_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value: Any) -> str:
    """Compose's ``${VAR:-default}`` with nothing set in the environment."""
    return _INTERPOLATION.sub(lambda m: m.group(2) or "", str(value))


def compose_env(service: Doc) -> Dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: interpolate("" if value is None else value) for key, value in env.items()}


def check_environment(where: str, component: str, env: Dict[str, str]) -> List[str]:
    """Every variable is a setting (or a documented non-setting), the values parse, the
    required ones are set."""
    problems = [f"{where}: {name} is not a setting of core.settings"
                for name in sorted(env) if name not in SETTINGS and name not in NON_SETTINGS]
    try:
        settings = Settings.from_env({k: v for k, v in env.items() if k in SETTINGS})
    except SettingsError as exc:
        return [*problems, f"{where}: {exc}"]
    for name in sorted(REQUIRED.get(component, ())):
        if not env.get(name, "").strip():
            problems.append(f"{where}: required setting {name} is not set")
    open_host = settings.dashboard_host not in ("127.0.0.1", "localhost")
    credentials = (settings.dashboard_user and settings.dashboard_password) \
        or settings.dashboard_token
    if component == "dashboard" and open_host and not credentials:
        problems.append(f"{where}: dashboard on {settings.dashboard_host} without "
                        "credentials (it refuses to start)")
    return problems


def compose_drift(doc: Doc) -> List[str]:
    problems: List[str] = []
    shared: Dict[str, Dict[str, str]] = {}
    parser_commands = cli_commands()
    for name, service in doc["services"].items():
        if name in THIRD_PARTY_SERVICES:
            for key in compose_env(service):
                if key not in NON_SETTINGS:
                    problems.append(f"compose {name}: {key} is neither vLLM/Redis/NATS's own "
                                    "documented variable nor ours")
            continue
        component = COMPOSE_COMPONENTS.get(name)
        if component is None:
            problems.append(f"compose {name}: unknown service (add it to the drift test)")
            continue
        env = compose_env(service)
        problems += check_environment(f"compose {name}", component, env)
        try:
            settings = Settings.from_env({k: v for k, v in env.items() if k in SETTINGS})
        except SettingsError:
            continue
        if component in COMMANDS:
            command = service.get("command")
            if command != [COMMANDS[component]] or COMMANDS[component] not in parser_commands:
                problems.append(f"compose {name}: command {command}, not "
                                f"[{COMMANDS[component]!r}]")
            for name_ in SHARED:
                shared.setdefault(name_, {})[name] = env.get(name_) or settings.as_env()[name_]
        published = {int(str(p).rsplit(":", 1)[1]) for p in service.get("ports", [])}
        expected = {"bridge": {settings.grpc_port, settings.metrics_port},
                    "dashboard": {settings.dashboard_port}}.get(component, set())
        if published != expected:
            problems.append(f"compose {name}: publishes container ports {published}, "
                            f"the settings say {expected}")
        if component == "worker":
            grace = duration_seconds(service.get("stop_grace_period", "10s"))
            if grace <= settings.worker_shutdown_timeout:
                problems.append(f"compose {name}: stop_grace_period {grace}s is not longer than "
                                f"RAY_EXECUTOR_WORKER_SHUTDOWN_TIMEOUT "
                                f"{settings.worker_shutdown_timeout}")
    for name, values in shared.items():
        if len(set(values.values())) > 1:
            problems.append(f"compose: {name} differs between services: {values}")
    return problems


def duration_seconds(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text))


def cli_commands() -> set:
    for action in cli.parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    raise AssertionError("bridge.cli.parser() has no sub-commands")


def find(docs: List[Doc], kind: str, name: str) -> Doc:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


# --- 2. Compose -------------------------------------------------------------------------------

def test_compose_file_matches_the_compose_specification(tools: Path) -> None:
    assert compose_problems(tools, COMPOSE) == ""


def test_compose_stack_has_every_part_with_health_checks_and_order(compose: Doc) -> None:
    services = compose["services"]
    assert set(services) == set(COMPOSE_COMPONENTS) | THIRD_PARTY_SERVICES
    assert services["vllm"]["profiles"] == ["gpu"]
    devices = services["vllm"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert "profiles" not in services["standin-llm"]
    for name, service in services.items():
        check = service.get("healthcheck", {})
        if name == "nats-init":
            assert check == {"disable": True}
            continue
        assert check.get("test"), f"{name} has no health check"
    for name, service in services.items():
        for dependency, condition in (service.get("depends_on") or {}).items():
            expected = ("service_completed_successfully" if dependency == "nats-init"
                        else "service_healthy")
            assert condition == {"condition": expected}, (name, dependency)
    assert set(services["worker"]["depends_on"]) >= {"redis", "nats-init", "ray-head"}
    assert set(services["bridge"]["depends_on"]) >= {"redis", "nats", "nats-init"}
    assert services["ray-head"]["build"]["dockerfile"] == "docker/ray-head.Dockerfile"
    ray_client = services["worker"]["environment"]["RAY_ADDRESS"]
    assert ray_client == "ray://ray-head:10001"
    assert "--ray-client-server-port=10001" in services["ray-head"]["command"]
    # Published ports stay on loopback.
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)


# --- 3. checkov -------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def checkov_reports(tools: Path, tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    return checkov(tools, tmp_path_factory.mktemp("checkov-out"), DOCKER)


def test_checkov_finds_nothing_unexplained(checkov_reports: Dict[str, Any]) -> None:
    assert set(checkov_reports) == {"dockerfile"}
    report = checkov_reports["dockerfile"]
    failed = [(c["check_id"], c["check_name"], c["file_path"], c["resource"])
              for c in report["results"]["failed_checks"]]
    assert failed == [], "checkov dockerfile failures:\n" + "\n".join(map(str, failed))
    assert report["summary"]["parsing_errors"] == 0
    assert report["summary"]["passed"] > 0
    assert report["summary"]["resource_count"] == 3
    for check in report["results"]["skipped_checks"]:
        assert (check.get("suppress_comment") or "").strip(), check


# --- 4. drift between the files and the code ----------------------------------------------

def test_compose_environment_ports_and_commands_agree_with_the_code(compose: Doc) -> None:
    assert compose_drift(compose) == []


def test_images_match_the_cluster_and_the_package() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    worker_extra = pyproject["project"]["optional-dependencies"]["worker"]
    (ray_pin,) = [r for r in worker_extra if r.startswith("ray[client]==")]
    ray_version = ray_pin.split("==")[1]
    # Each image installs its role's extra (with the tracing SDK where we make spans): the Ray
    # image only the cluster code's, so Ray's own grpcio and protobuf stay as Ray installed them.
    # The worker image lists its extra's parts and takes Ray from RAY_VERSION, so one
    # Dockerfile builds the worker of either cluster version (worker and worker-next).
    for name in ("worker", "worker-next"):
        assert [r for r in pyproject["project"]["optional-dependencies"][name]
                if not r.startswith("ray[client]==")] == ["ray-executor[core,cluster]"], name
    extras = {"bridge.Dockerfile": "[bridge,tracing]",
              "worker.Dockerfile": "[core,cluster,tracing]", "ray-head.Dockerfile": "[cluster]"}
    for name, extra in extras.items():
        info = dockerfile(name)
        stages = info["stages"]
        assert len(stages) == 2, f"{name}: a builder stage and a runtime stage"
        builder, final = stages
        assert builder["from"].endswith(" AS builder")
        assert any(run.startswith("pip wheel --no-deps") for run in builder["run"]), name
        for stage in stages:
            image = stage["from"].split()[0]
            assert ":" in image and not image.endswith(":latest"), f"{name}: {image} unpinned"
        install = " ".join(final["run"])
        for tool in ("pip wheel", "apt-get", "gcc", "build-essential", "grpcio-tools"):
            assert tool not in install, f"{name}: {tool} in the final stage"
        assert f'.whl){extra}"' in install and final["user"] in ("1000", "1000:1000"), name
        assert [e for e in extras.values() if e in install] == [extra], name
        assert "--mount=type=bind,from=builder" in install, name
        if name != "bridge.Dockerfile":
            assert info["args"]["RAY_VERSION"] == ray_version, name
        if name == "worker.Dockerfile":
            assert '"ray[client]==${RAY_VERSION}"' in install, name
        if name != "ray-head.Dockerfile":
            assert final["entrypoint"] == ["ray-executor"], name
            assert final["cmd"][0] in cli_commands(), name
            assert "groupadd --gid 1000" in install and "useradd --uid 1000" in install
    bridge, worker, ray_head = (dockerfile(n) for n in
                                ("bridge.Dockerfile", "worker.Dockerfile", "ray-head.Dockerfile"))
    assert bridge["stages"][1]["from"] == "python:${PYTHON_VERSION}-slim"
    assert bridge["args"]["PYTHON_VERSION"] == "3.13"
    assert worker["stages"][1]["from"] == "python:${PYTHON_VERSION}-slim"
    assert worker["args"]["PYTHON_VERSION"] == "3.9"
    assert set(bridge["stages"][1]["expose"]) == {50056, 9464, 8181, 8000}
    assert worker["stages"][1]["expose"] == [Settings().worker_metrics_port]
    assert ray_head["stages"][1]["from"] == "rayproject/ray:${RAY_VERSION}-${RAY_PYTHON_TAG}"
    assert ray_head["args"]["RAY_PYTHON_TAG"] == "py" + worker["args"]["PYTHON_VERSION"].replace(
        ".", "")


def test_compose_builds_worker_and_ray_head_for_one_python_and_ray(compose: Doc) -> None:
    worker = dockerfile("worker.Dockerfile")["args"]
    args = compose["services"]["worker"]["build"]["args"]
    assert args == {"PYTHON_VERSION": worker["PYTHON_VERSION"],
                    "RAY_VERSION": worker["RAY_VERSION"]}
    head = compose["services"]["ray-head"]["build"]["args"]
    assert head == {"RAY_VERSION": args["RAY_VERSION"],
                    "RAY_PYTHON_TAG": "py" + args["PYTHON_VERSION"].replace(".", "")}


def test_dockerignore_lets_in_exactly_what_the_builds_copy() -> None:
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "**", "everything is excluded first, then what the build needs"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = set()
    for name in ("bridge.Dockerfile", "worker.Dockerfile", "ray-head.Dockerfile"):
        for copy in dockerfile(name)["stages"][0]["copy"]:
            copied |= {source.rstrip("/") for source in copy.split()[:-1]}
    assert copied == allowed
    assert all((ROOT / path).exists() for path in copied)


# --- 5. the commands in the files, run for real --------------------------------------------

def test_stream_init_command_creates_the_streams(compose: Doc, nats_url: str) -> None:
    from nats.aio.client import Client as NATS

    service = compose["services"]["nats-init"]
    assert service["entrypoint"] == ["python", "-c"]
    (script,) = service["command"]
    env = {**os.environ, **compose_env(service), "NATS_URL": nats_url}
    for _ in range(2):  # idempotent: a rerun of the Job finds the streams and succeeds
        result = run([sys.executable, "-c", script], env=env, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "streams ready: AGENT_COMMANDS, AGENT_RESPONSES, ORCHESTRATOR_EVENTS, " \
            "VLLM_STREAMING" in result.stdout

    async def subjects() -> Dict[str, List[str]]:
        nc = NATS()
        await nc.connect(nats_url)
        try:
            js = nc.jetstream()
            return {name: (await js.stream_info(name)).config.subjects for name in
                    ("AGENT_COMMANDS", "AGENT_RESPONSES", "ORCHESTRATOR_EVENTS",
                     "VLLM_STREAMING")}
        finally:
            await nc.close()

    assert asyncio.run(subjects()) == {"AGENT_COMMANDS": ["agent.cmd.>"],
                                       "AGENT_RESPONSES": ["agent.response.>"],
                                       "ORCHESTRATOR_EVENTS": ["orchestration.>"],
                                       "VLLM_STREAMING": ["vllm.streaming.>"]}




def worker_check(compose: Doc) -> List[str]:
    """The compose worker's health check: the same command as the worker image's HEALTHCHECK.
    (The chart's readiness probe is another one: tests/deploy/test_commands.py.)"""
    check = compose["services"]["worker"]["healthcheck"]["test"]
    assert check[:3] == ["CMD", "python", "-c"]
    assert f'CMD {json.dumps(check[1:])}' in re.sub(r"\\\n\s*", "", dockerfile(
        "worker.Dockerfile")["text"])
    return check[1:]


@pytest.mark.parametrize(("metrics", "ready"), [
    ("# HELP ray_executor_worker_ready 1 while ...\n# TYPE ray_executor_worker_ready gauge\n"
     "ray_executor_worker_ready 1.0\nray_executor_ray_connected 0.0\n", True),  # Ray out: ready
    ("ray_executor_worker_ready 0.0\nray_executor_ray_connected 1.0\n", False),  # broker broken
    ("dramatiq_workers_total 2.0\n", False),  # no process has booted yet
])
def test_worker_health_check_reads_the_worker_ready_gauge(
        compose: Doc, fake_metrics: Tuple[int, Callable[[str], None]],
        metrics: str, ready: bool) -> None:
    command = worker_check(compose)
    port, serve = fake_metrics
    serve(metrics)
    env = dict(os.environ, RAY_EXECUTOR_WORKER_METRICS_PORT=str(port))
    result = run([sys.executable, *command[1:]], env=env, timeout=30)
    assert (result.returncode == 0) is ready, result.stderr


def test_worker_health_check_fails_when_nothing_serves_metrics(compose: Doc) -> None:
    command = worker_check(compose)
    env = dict(os.environ, RAY_EXECUTOR_WORKER_METRICS_PORT=str(servers.free_port()))
    assert run([sys.executable, *command[1:]], env=env, timeout=30).returncode != 0


def test_bridge_health_check_command_asks_grpc_health(
        compose: Doc, start_bridge: Callable[..., Any]) -> None:
    check = compose["services"]["bridge"]["healthcheck"]["test"]
    assert check[:3] == ["CMD", "python", "-c"]
    bridge = start_bridge(RAY_EXECUTOR_GRPC_TOKEN="s3cret")  # health needs no token
    env = dict(os.environ, RAY_EXECUTOR_GRPC_PORT=str(bridge.port))
    result = run([sys.executable, *check[2:]], env=env, timeout=30)
    assert result.returncode == 0, result.stderr
    bridge.stop()
    assert run([sys.executable, *check[2:]], env=env, timeout=30).returncode != 0


def test_standin_llm_service_command_serves(compose: Doc) -> None:
    service = compose["services"]["standin-llm"]
    assert service["entrypoint"] == ["python", "-m", "harness.standin_llm"]
    args = [interpolate(arg) for arg in service["command"]]
    port = servers.free_port()
    args[args.index("--host") + 1] = "127.0.0.1"
    args[args.index("--port") + 1] = str(port)
    process = subprocess.Popen([sys.executable, "-m", "harness.standin_llm", *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        servers.wait_for_port(port, 20, process)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as answer:
            models = json.load(answer)
        model = compose["services"]["bridge"]["environment"]["VLLM_MODEL"]
        assert [m["id"] for m in models["data"]] == [interpolate(model)]
    finally:
        process.terminate()
        process.wait(10)


# --- 6. broken copies fail -----------------------------------------------------------------


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("condition: service_completed_successfully", "condition: service_done", "service_done"),
    ("    stop_grace_period: 75s", "    stop_grace_periods: 75s", "stop_grace_periods"),
    ("    shm_size: 2gb", "    shm_size: [2gb]", "is not of type 'integer', 'string'"),
])
def test_a_broken_compose_file_fails_the_specification(
        tools: Path, tmp_path: Path, old: str, new: str, expected: str) -> None:
    broken = tmp_path / "compose.yaml"
    shutil.copy(COMPOSE, broken)
    edit(broken, old, new)
    problems = compose_problems(tools, broken)
    assert problems and expected in problems, problems


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_an_insecure_dockerfile_fails_checkov(tools: Path, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    dockerfile_text = (DOCKER / "bridge.Dockerfile").read_text()
    assert "USER 1000:1000\n" in dockerfile_text
    (tmp_path / "in" / "bridge.Dockerfile").write_text(
        dockerfile_text.replace("USER 1000:1000\n", "USER root\n"))
    (tmp_path / "out").mkdir()
    reports = checkov(tools, tmp_path / "out", tmp_path / "in")
    failed = {c["check_id"] for r in reports.values() for c in r["results"]["failed_checks"]}
    assert "CKV_DOCKER_8" in failed, failed


@pytest.mark.parametrize(("service", "key", "value", "expected"), [
    ("worker", "RAY_EXECUTOR_WORKERS", "2", "RAY_EXECUTOR_WORKERS is not a setting"),
    ("worker", "RAY_EXECUTOR_WORKER_SHUTDOWN_TIMEOUT", "120", "stop_grace_period"),
    ("bridge", "RAY_EXECUTOR_QUEUE", "other", "RAY_EXECUTOR_QUEUE differs"),
    ("dashboard", "RAY_EXECUTOR_DASHBOARD_PASSWORD", "", "without credentials"),
    ("bridge", "RAY_EXECUTOR_GRPC_PORT", "6000", "publishes container ports"),
])
def test_compose_drift_is_caught(compose: Doc, service: str, key: str, value: str,
                                 expected: str) -> None:
    doc = json.loads(json.dumps(compose))
    doc["services"][service]["environment"][key] = value
    problems = compose_drift(doc)
    assert any(expected in p for p in problems), problems


def test_compose_drift_catches_a_missing_required_setting(compose: Doc) -> None:
    doc = json.loads(json.dumps(compose))
    del doc["services"]["worker"]["environment"]["RAY_ADDRESS"]
    assert any("required setting RAY_ADDRESS" in p for p in compose_drift(doc))


def test_the_docs_cover_what_an_operator_needs() -> None:
    text = (ROOT / "docs" / "deploy.md").read_text()
    for needle in ("KubeRay", "PYTHON_VERSION", "RAY_VERSION", "Version mismatch",
                   "runtime_env", "terminationGracePeriodSeconds",
                   "RAY_EXECUTOR_WORKER_SHUTDOWN_TIMEOUT", "readOnlyRootFilesystem",
                   "docker compose", TOOLS_ENV):
        assert needle in text, f"docs/deploy.md does not mention {needle}"
    # Every file it points at exists.
    for path in re.findall(r"`((?:docker|compose|k8s|tests)/[\w./-]+)`", text):
        assert (ROOT / path).exists(), path

