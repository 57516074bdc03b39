"""Static validation of the deployment files: docker/, compose/, k8s/ (issue 8).

No Docker engine or cluster runs here, so the files are checked as files:

* every kustomization renders (``kubectl kustomize``), and every rendered object and every
  plain manifest validates against the Kubernetes schemas (``kubernetes-validate``, strict,
  offline); the only kinds it cannot know are KEDA's CRDs, skipped by name (``CRD_KINDS``)
  and checked by hand;
* ``compose/compose.yaml`` validates against the Compose Specification (the schema that
  ``check-jsonschema`` vendors as ``vendor.compose-spec``);
* ``checkov`` finds nothing in the rendered manifests and the Dockerfiles, and every check it
  was told to skip carries a reason;
* drift: every variable set in compose/ and k8s/ is a setting of ``core.settings`` (or a
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
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
import tomllib

from bridge import cli
from core.settings import Settings, SettingsError, documented
from harness import servers

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
COMPOSE = ROOT / "compose" / "compose.yaml"
DOCKER = ROOT / "docker"
KUSTOMIZATIONS = ("base", "overlays/example", "overlays/keda")
TOOLS_ENV = "RAY_EXECUTOR_TOOLS_BIN"
TOOLS = ("kubectl", "kubernetes-validate", "checkov", "check-jsonschema", "python")
# Kubernetes versions the manifests must be valid for: the oldest we support and the newest
# the schemas know.
K8S_VERSIONS = ("1.30.0", "1.37.0")
# Custom resources kubernetes-validate has no schema for. Skipped there by name, and checked
# by hand in test_keda_objects_have_their_required_fields.
CRD_KINDS = {("keda.sh/v1alpha1", "ScaledObject"), ("keda.sh/v1alpha1", "TriggerAuthentication")}

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
          "RAY_EXECUTOR_NATS_EVENTS_PREFIX")
QUEUE_METRIC = "ray_executor_queue_depth"

Doc = Dict[str, Any]


# --- the tools ------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tools() -> Path:
    value = os.environ.get(TOOLS_ENV, "")
    if not value:
        pytest.fail(f"{TOOLS_ENV} is not set: it must name the bin/ folder of the validation "
                    "tools environment (`make .venv-tools/.installed` makes it; `make test` "
                    "sets the variable)")
    path = Path(value)
    missing = [tool for tool in TOOLS if not (path / tool).exists()]
    if missing:
        pytest.fail(f"{TOOLS_ENV}={value} lacks {', '.join(missing)}")
    return path


def run(args: List[str], *, input: Optional[str] = None, env: Optional[Dict[str, str]] = None,
        cwd: Optional[Path] = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], input=input, capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout, check=False)


# YAML is parsed by the tools environment's PyYAML (the test environment has no YAML parser);
# many texts go through one process.
_LOAD_YAML = """
import json, sys, yaml
texts = json.load(sys.stdin)
json.dump([[d for d in yaml.safe_load_all(t) if d is not None] for t in texts], sys.stdout)
"""


def load_yaml(tools: Path, *texts: str) -> List[List[Doc]]:
    result = run([tools / "python", "-c", _LOAD_YAML], input=json.dumps(list(texts)))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def render(tools: Path, folder: Path) -> subprocess.CompletedProcess:
    return run([tools / "kubectl", "kustomize", folder])


# kubernetes-validate's own CLI only warns (exit 0) about an apiVersion it has no schema for,
# so the test calls its API: a missing schema is an error unless the kind is a known CRD.
_VALIDATE = """
import functools, json, sys
import kubernetes_validate as kv
import kubernetes_validate.utils as utils
# Each call reads its schema files again; read each once.
utils.schema_contents = functools.lru_cache(maxsize=None)(utils.schema_contents)
request = json.load(sys.stdin)
crds = {tuple(k) for k in request["crds"]}
problems, checked, skipped = [], 0, []
for name, doc in request["docs"]:
    where = "%s %s/%s" % (name, doc.get("kind"), (doc.get("metadata") or {}).get("name"))
    if (doc.get("apiVersion"), doc.get("kind")) in crds:
        skipped.append(where)
        continue
    for version in request["versions"]:
        try:
            kv.validate(doc, version, strict=True)
        except kv.SchemaNotFoundError as exc:
            problems.append("%s (k8s %s): no schema: %s" % (where, version, exc))
        except kv.ValidationError as exc:
            problems.append("%s (k8s %s): %s" % (where, version, exc.message))
        except Exception as exc:
            problems.append("%s (k8s %s): %s: %s" % (where, version, type(exc).__name__, exc))
    checked += 1
json.dump({"problems": problems, "checked": checked, "skipped": skipped}, sys.stdout)
"""


def validate_k8s(tools: Path, docs: List[Tuple[str, Doc]]) -> Dict[str, Any]:
    request = {"docs": docs, "versions": K8S_VERSIONS, "crds": sorted(CRD_KINDS)}
    result = run([tools / "python", "-c", _VALIDATE], input=json.dumps(request))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def checkov(tools: Path, out: Path, *folders: Path) -> Dict[str, Any]:
    """Run checkov offline on ``folders``; returns {check_type: report}."""
    env = dict(os.environ, BC_SKIP_MAPPING="TRUE", CKV_SKIP_PACKAGE_UPDATE_CHECK="true",
               CKV_PARSE_ERROR_FAIL="true", LOG_LEVEL="WARNING")
    args: List[Any] = [tools / "checkov", "--skip-download", "--compact",
                       "--framework", "kubernetes", "dockerfile",
                       "-o", "json", "--output-file-path", out]
    for folder in folders:
        args += ["-d", folder]
    result = run(args, env=env, timeout=300)
    report = out / "results_json.json"
    assert report.exists(), \
        f"checkov wrote no report:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    data = json.loads(report.read_text())
    reports = data if isinstance(data, list) else [data]
    return {r["check_type"]: r for r in reports}


def compose_problems(tools: Path, path: Path) -> str:
    """'' when ``path`` is valid under the Compose Specification, else the validator's words."""
    result = run([tools / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", path])
    return "" if result.returncode == 0 else (result.stdout + result.stderr)


# --- the files --------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def rendered(tools: Path) -> Dict[str, List[Doc]]:
    texts = {}
    for name in KUSTOMIZATIONS:
        result = render(tools, K8S / name)
        assert result.returncode == 0, f"kubectl kustomize k8s/{name} failed:\n{result.stderr}"
        texts[name] = result.stdout
    loaded = load_yaml(tools, *texts.values())
    return dict(zip(texts, loaded))


def plain_manifest_paths() -> List[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


@pytest.fixture(scope="session")
def plain(tools: Path) -> Dict[str, List[Doc]]:
    paths = plain_manifest_paths()
    loaded = load_yaml(tools, *(p.read_text() for p in paths))
    return {str(p.relative_to(ROOT)): docs for p, docs in zip(paths, loaded)}


@pytest.fixture(scope="session")
def compose(tools: Path) -> Doc:
    return load_yaml(tools, COMPOSE.read_text())[0][0]


@pytest.fixture(scope="session")
def secret_example(plain: Dict[str, List[Doc]]) -> Dict[str, str]:
    (doc,) = plain["k8s/base/secret.example.yaml"]
    assert doc["kind"] == "Secret"
    return dict(doc["stringData"])


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


def k8s_workloads(docs: List[Doc]) -> Iterator[Tuple[Doc, Doc, Doc]]:
    """(object, pod spec, container) of every workload container."""
    for doc in docs:
        if doc.get("kind") in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            spec = doc["spec"]["template"]["spec"]
            for container in spec.get("initContainers", []) + spec["containers"]:
                yield doc, spec, container


def component_of(doc: Doc) -> str:
    return doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]


def k8s_env(docs: List[Doc], container: Doc, secrets: Dict[str, str]
            ) -> Tuple[Dict[str, str], List[str]]:
    """A container's environment, ConfigMaps and Secrets resolved, and the problems found."""
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    env: Dict[str, str] = {}
    problems = []
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef") or source.get("secretRef") or {}
        if "configMapRef" in source:
            if ref["name"] not in maps:
                problems.append(f"{container['name']}: envFrom ConfigMap {ref['name']} missing")
            env.update(maps.get(ref["name"], {}))
        else:
            problems.append(f"{container['name']}: envFrom a whole Secret; reference keys")
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif "secretKeyRef" in item.get("valueFrom", {}):
            key = item["valueFrom"]["secretKeyRef"]["key"]
            if key not in secrets:
                problems.append(f"{container['name']}: secret key {key} is not in "
                                "secret.example.yaml")
            env[item["name"]] = secrets.get(key, "")
        elif "configMapKeyRef" in item.get("valueFrom", {}):
            ref = item["valueFrom"]["configMapKeyRef"]
            env[item["name"]] = maps.get(ref["name"], {}).get(ref["key"], "")
        else:
            env[item["name"]] = ""
    return env, problems


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


def k8s_drift(docs: List[Doc], secrets: Dict[str, str]) -> List[str]:
    problems: List[str] = []
    shared: Dict[str, Dict[str, str]] = {}
    for doc, spec, container in k8s_workloads(docs):
        component = component_of(doc)
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        env, found = k8s_env(docs, container, secrets)
        problems += found + check_environment(where, component, env)
        try:
            settings = Settings.from_env({k: v for k, v in env.items() if k in SETTINGS})
        except SettingsError:
            continue
        for name in SHARED:
            shared.setdefault(name, {})[where] = env.get(name, "") or settings.as_env()[name]
        wrong = container.get("args") != [COMMANDS.get(component)] or "command" in container
        if component in COMMANDS and wrong:
            problems.append(f"{where}: runs {container.get('command')} {container.get('args')}, "
                            f"not `ray-executor {COMMANDS[component]}`")
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        expected = {"bridge": {"grpc": settings.grpc_port, "metrics": settings.metrics_port},
                    "worker": {"metrics": settings.metrics_port},
                    "dashboard": {"http": settings.dashboard_port}}.get(component, {})
        if ports != expected:
            problems.append(f"{where}: container ports {ports}, the settings say {expected}")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            action = container.get(probe, {})
            port = (action.get("grpc") or action.get("httpGet") or action.get("tcpSocket")
                    or {}).get("port")
            if port is not None and ports.get(port, port) not in ports.values():
                problems.append(f"{where}: {probe} uses port {port}, not a container port")
        if component == "worker":
            grace = spec.get("terminationGracePeriodSeconds", 30)
            if grace <= settings.worker_shutdown_timeout:
                problems.append(f"{where}: terminationGracePeriodSeconds {grace} is not longer "
                                f"than RAY_EXECUTOR_WORKER_SHUTDOWN_TIMEOUT "
                                f"{settings.worker_shutdown_timeout}: scale-down kills jobs")
    for name, values in shared.items():
        if len(set(values.values())) > 1:
            problems.append(f"{name} differs between parts: {values}")
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


# --- 1. Kubernetes: render and validate -----------------------------------------------------

def test_every_kustomization_renders(rendered: Dict[str, List[Doc]]) -> None:
    for name, docs in rendered.items():
        kinds = {d["kind"] for d in docs}
        assert {"Namespace", "ConfigMap", "Deployment", "Service", "Job", "NetworkPolicy",
                "PodDisruptionBudget"} <= kinds, name
        namespaces = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
        (namespace,) = [d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"]
        assert namespaces == {namespace}, f"{name}: objects outside {namespace}: {namespaces}"
    assert "HorizontalPodAutoscaler" in {d["kind"] for d in rendered["base"]}
    assert "HorizontalPodAutoscaler" not in {d["kind"] for d in rendered["overlays/keda"]}
    assert "ScaledObject" in {d["kind"] for d in rendered["overlays/keda"]}
    assert {d["metadata"]["namespace"] for d in rendered["overlays/example"]
            if d["kind"] == "Deployment"} == {"agents"}


def test_rendered_objects_and_plain_manifests_match_the_kubernetes_schemas(
        tools: Path, rendered: Dict[str, List[Doc]], plain: Dict[str, List[Doc]]) -> None:
    docs = [(f"k8s/{name} (rendered)", d) for name, ds in rendered.items() for d in ds]
    docs += [(path, d) for path, ds in plain.items() for d in ds]
    report = validate_k8s(tools, docs)
    assert report["problems"] == []
    # Only the KEDA objects were skipped: once rendered, once as a plain file.
    assert sorted(report["skipped"]) == sorted(
        [f"k8s/overlays/keda (rendered) {k}/{n}" for k, n in
         [("ScaledObject", "ray-executor-worker"),
          ("TriggerAuthentication", "ray-executor-keda-redis")]]
        + [f"k8s/overlays/keda/scaledobject.yaml {k}/{n}" for k, n in
           [("ScaledObject", "ray-executor-worker"),
            ("TriggerAuthentication", "ray-executor-keda-redis")]])
    assert report["checked"] == len(docs) - 4


def test_keda_objects_have_their_required_fields(rendered: Dict[str, List[Doc]],
                                                 ) -> None:
    docs = rendered["overlays/keda"]
    scaled = find(docs, "ScaledObject", "ray-executor-worker")
    auth = find(docs, "TriggerAuthentication", "ray-executor-keda-redis")
    assert scaled["apiVersion"] == auth["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    target = spec["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    worker = find(docs, "Deployment", target["name"])
    assert component_of(worker) == "worker"
    assert "replicas" not in worker["spec"], "KEDA's HPA owns the worker's replicas"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "redis"
    meta = trigger["metadata"]
    queue = find(docs, "ConfigMap", "ray-executor-config")["data"]["RAY_EXECUTOR_QUEUE"]
    assert meta["listName"] == f"dramatiq:{queue}", "KEDA must count Dramatiq's ready list"
    assert int(meta["listLength"]) > 0
    assert int(meta["databaseIndex"]) >= 0
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    refs = auth["spec"]["secretTargetRef"]
    assert {r["parameter"] for r in refs} == {"address", "password"}
    assert all(r["name"] and r["key"] for r in refs)
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    hpa = find(rendered["base"], "HorizontalPodAutoscaler", "ray-executor-worker")
    assert behavior == hpa["spec"]["behavior"], "KEDA and the HPA should scale alike"
    assert meta["listLength"] == hpa["spec"]["metrics"][0]["external"]["target"]["averageValue"]


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

def skip_reasons(docs: List[Doc]) -> Dict[Tuple[str, str], Dict[str, str]]:
    """{(kind, name): {check id: reason}} from ``checkov.io/skipN: ID=reason`` annotations."""
    reasons: Dict[Tuple[str, str], Dict[str, str]] = {}
    for doc in docs:
        for key, value in (doc["metadata"].get("annotations") or {}).items():
            if key.startswith("checkov.io/skip"):
                check, _, reason = value.partition("=")
                reasons.setdefault((doc["kind"], doc["metadata"]["name"]), {})[check] = reason
    return reasons


@pytest.fixture(scope="session")
def checkov_reports(tools: Path, rendered: Dict[str, List[Doc]],
                    tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    folder = tmp_path_factory.mktemp("checkov-in")
    for name in KUSTOMIZATIONS:
        (folder / f"{name.replace('/', '-')}.yaml").write_text(render(tools, K8S / name).stdout)
    shutil.copytree(K8S / "prometheus-adapter", folder / "prometheus-adapter")
    shutil.copy(K8S / "base" / "secret.example.yaml", folder / "secret.example.yaml")
    return checkov(tools, tmp_path_factory.mktemp("checkov-out"), folder, DOCKER)


def test_checkov_finds_nothing_unexplained(checkov_reports: Dict[str, Any],
                                           rendered: Dict[str, List[Doc]]) -> None:
    assert set(checkov_reports) == {"kubernetes", "dockerfile"}
    for kind, report in checkov_reports.items():
        failed = [(c["check_id"], c["check_name"], c["file_path"], c["resource"])
                  for c in report["results"]["failed_checks"]]
        assert failed == [], f"checkov {kind} failures:\n" + "\n".join(map(str, failed))
        assert report["summary"]["parsing_errors"] == 0
        assert report["summary"]["passed"] > 0
    assert checkov_reports["dockerfile"]["summary"]["resource_count"] == 3
    reasons = skip_reasons([d for docs in rendered.values() for d in docs])
    for check in checkov_reports["kubernetes"]["results"]["skipped_checks"]:
        kind, _, name = check["resource"].split(".", 2)
        reason = reasons.get((kind, name.split(".")[-1]), {}).get(check["check_id"], "")
        assert len(reason.strip()) > 20, f"{check['check_id']} skipped for {check['resource']} " \
                                         "without a reason"
    for check in checkov_reports["dockerfile"]["results"]["skipped_checks"]:
        assert (check.get("suppress_comment") or "").strip(), check


# --- 4. drift between the files and the code ----------------------------------------------

def test_configmap_and_secret_hold_every_setting_once(
        rendered: Dict[str, List[Doc]], secret_example: Dict[str, str]) -> None:
    config = find(rendered["base"], "ConfigMap", "ray-executor-config")["data"]
    assert not set(config) & set(secret_example), "a setting is in both ConfigMap and Secret"
    assert set(config) | set(secret_example) == SETTINGS
    assert all("PLACEHOLDER" in value for value in secret_example.values())
    referenced = {item["valueFrom"]["secretKeyRef"]["key"]
                  for _, _, c in k8s_workloads(rendered["base"]) for item in c.get("env", [])
                  if "secretKeyRef" in item.get("valueFrom", {})}
    assert referenced == set(secret_example)
    # The ConfigMap holds the code's defaults except for the settings a deployment must choose.
    defaults = Settings().as_env()
    chosen = {"RAY_ADDRESS", "VLLM_URL", "RAY_EXECUTOR_NATS_CREATE_STREAMS",
              "RAY_EXECUTOR_DASHBOARD_HOST"}
    assert {k for k, v in config.items() if v != defaults[k]} == chosen


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_k8s_environment_ports_and_commands_agree_with_the_code(
        name: str, rendered: Dict[str, List[Doc]], secret_example: Dict[str, str]) -> None:
    docs = rendered[name]
    assert k8s_drift(docs, secret_example) == []
    components = {component_of(d) for d, _, _ in k8s_workloads(docs)}
    assert components == {"bridge", "worker", "dashboard", "nats-stream-init"}
    assert {"bridge", "worker", "dashboard"} <= cli_commands()


def test_compose_environment_ports_and_commands_agree_with_the_code(compose: Doc) -> None:
    assert compose_drift(compose) == []


def test_services_and_network_policies_open_the_ports_the_settings_name(
        rendered: Dict[str, List[Doc]], secret_example: Dict[str, str]) -> None:
    docs = rendered["base"]
    settings = Settings.from_env(find(docs, "ConfigMap", "ray-executor-config")["data"])
    defaults = Settings()
    # The Orchestrator calls 50056; Prometheus and the dashboard's users expect the defaults.
    assert (settings.grpc_port, settings.metrics_port, settings.dashboard_port) == \
        (defaults.grpc_port, defaults.metrics_port, defaults.dashboard_port) == (50056, 9464, 8181)
    bridge = find(docs, "Service", "ray-executor-bridge")["spec"]["ports"]
    assert {(p["name"], p["port"], p["targetPort"]) for p in bridge} == {
        ("grpc", settings.grpc_port, "grpc"), ("metrics", settings.metrics_port, "metrics")}
    dashboard = find(docs, "Service", "ray-executor-dashboard")["spec"]["ports"]
    assert [(p["port"], p["targetPort"]) for p in dashboard] == [(settings.dashboard_port, "http")]

    def ingress_ports(policy: str) -> set:
        spec = find(docs, "NetworkPolicy", policy)["spec"]
        return {p["port"] for rule in spec.get("ingress", []) for p in rule.get("ports", [])}

    def egress_ports(policy: str) -> set:
        spec = find(docs, "NetworkPolicy", policy)["spec"]
        return {p["port"] for rule in spec.get("egress", []) for p in rule.get("ports", [])}

    def port(url: str) -> int:
        return int(re.search(r":(\d+)(?:/|$)", url).group(1))  # type: ignore[union-attr]

    redis, nats = port(secret_example["REDIS_URL"]), port(secret_example["NATS_URL"])
    ray = port(settings.ray_address)
    assert find(docs, "NetworkPolicy", "default-deny")["spec"] == {
        "podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    assert ingress_ports("bridge") == {settings.grpc_port}
    assert ingress_ports("prometheus-scrape") == {settings.metrics_port}
    assert ingress_ports("dashboard") == {settings.dashboard_port}
    assert egress_ports("bridge") == {redis, nats}
    assert egress_ports("worker") == {redis, nats, ray}
    assert egress_ports("dashboard") == {redis}
    assert egress_ports("nats-stream-init") == {nats}
    assert egress_ports("allow-dns") == {53}


def test_every_pod_is_locked_down(rendered: Dict[str, List[Doc]]) -> None:
    for name, docs in rendered.items():
        for doc, spec, container in k8s_workloads(docs):
            where = f"{name} {doc['metadata']['name']}"
            assert spec["automountServiceAccountToken"] is False, where
            pod = spec["securityContext"]
            assert pod["runAsNonRoot"] and pod["runAsUser"] == 1000, where
            assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, where
            ctx = container["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False, where
            assert ctx["readOnlyRootFilesystem"] is True, where
            assert ctx["capabilities"] == {"drop": ["ALL"]}, where
            assert ctx["runAsNonRoot"] and ctx["runAsUser"] == 1000, where
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            volumes = {v["name"]: v for v in spec["volumes"]}
            assert "emptyDir" in volumes[mounts["/tmp"]], f"{where}: /tmp is not writable"
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), where
            if doc["kind"] == "Deployment":
                assert {"readinessProbe", "livenessProbe"} <= set(container), where


def test_probes_mean_something(rendered: Dict[str, List[Doc]], compose: Doc) -> None:
    docs = rendered["base"]
    bridge = find(docs, "Deployment", "ray-executor-bridge")["spec"]["template"]["spec"]
    (container,) = bridge["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": 50056}, probe
    worker = find(docs, "Deployment", "ray-executor-worker")["spec"]["template"]["spec"]
    (container,) = worker["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/metrics"
    readiness = container["readinessProbe"]["exec"]["command"]
    assert readiness[:2] == ["python", "-c"] and "ray_executor_ray_connected" in readiness[2]
    # The same check in compose and in the worker image.
    assert compose["services"]["worker"]["healthcheck"]["test"] == ["CMD", *readiness]
    assert f'CMD {json.dumps(readiness)}' in re.sub(r"\\\n\s*", "", dockerfile(
        "worker.Dockerfile")["text"])
    bridge_check = compose["services"]["bridge"]["healthcheck"]["test"]
    assert f'CMD {json.dumps(bridge_check[1:])}' in re.sub(r"\\\n\s*", "", dockerfile(
        "bridge.Dockerfile")["text"])
    dashboard = find(docs, "Deployment", "ray-executor-dashboard")["spec"]["template"]["spec"]
    assert dashboard["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/healthz"


def test_hpa_scales_workers_on_the_ready_queue_through_the_adapter_rule(
        tools: Path, rendered: Dict[str, List[Doc]], plain: Dict[str, List[Doc]]) -> None:
    docs = rendered["base"]
    hpa = find(docs, "HorizontalPodAutoscaler", "ray-executor-worker")
    assert hpa["apiVersion"] == "autoscaling/v2"
    spec = hpa["spec"]
    worker = find(docs, "Deployment", spec["scaleTargetRef"]["name"])
    assert component_of(worker) == "worker"
    assert "replicas" not in worker["spec"], "the HPA owns the worker's replicas"
    (metric,) = spec["metrics"]
    assert metric["type"] == "External"
    queue = find(docs, "ConfigMap", "ray-executor-config")["data"]["RAY_EXECUTOR_QUEUE"]
    assert metric["external"]["metric"] == {
        "name": QUEUE_METRIC, "selector": {"matchLabels": {"queue": queue, "state": "ready"}}}
    assert metric["external"]["target"]["type"] == "AverageValue"
    assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300
    assert spec["behavior"]["scaleUp"]["stabilizationWindowSeconds"] == 0
    # Each worker process holds one Ray client connection; the client server caps them
    # (RAY_CLIENT_SERVER_MAX_THREADS, 100 by default).
    processes = Settings.from_env(find(docs, "ConfigMap", "ray-executor-config")["data"])
    assert spec["maxReplicas"] * processes.worker_processes <= 50
    # The bridge exports that metric with those labels.
    source = (ROOT / "bridge" / "metrics.py").read_text()
    assert f'"{QUEUE_METRIC}"' in source and '"ready"' in source
    # The adapter rule serves it under that name, one value per queue and state.
    (adapter,) = plain["k8s/prometheus-adapter/adapter-rules.yaml"]
    (rules,) = load_yaml(tools, adapter["data"]["config.yaml"])
    (rule,) = rules[0]["externalRules"]
    assert rule["seriesQuery"].startswith(QUEUE_METRIC + "{")
    assert rule["name"]["as"] == QUEUE_METRIC
    assert rule["metricsQuery"].startswith("max(") and "by (queue, state)" in rule["metricsQuery"]
    assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}


def test_images_match_the_cluster_and_the_package() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    worker_extra = pyproject["project"]["optional-dependencies"]["worker"]
    (ray_pin,) = [r for r in worker_extra if r.startswith("ray[client]==")]
    ray_version = ray_pin.split("==")[1]
    # Each image installs its role's extra: the Ray image only the cluster code's, so Ray's own
    # grpcio and protobuf stay as Ray installed them.
    extras = {"bridge.Dockerfile": "[bridge]", "worker.Dockerfile": "[worker]",
              "ray-head.Dockerfile": "[cluster]"}
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
    assert worker["stages"][1]["expose"] == [9464]
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

def init_script(rendered: Dict[str, List[Doc]], compose: Doc) -> str:
    job = find(rendered["base"], "Job", "ray-executor-nats-stream-init")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python", "-c"]
    (script,) = container["args"]
    service = compose["services"]["nats-init"]
    assert service["entrypoint"] == ["python", "-c"]
    assert service["command"] == [script], "compose and k8s initialise NATS alike"
    return script


def test_stream_init_command_creates_the_streams(
        rendered: Dict[str, List[Doc]], compose: Doc, nats_url: str) -> None:
    from nats.aio.client import Client as NATS

    script = init_script(rendered, compose)
    config = find(rendered["base"], "ConfigMap", "ray-executor-config")["data"]
    env = dict(os.environ, **config, NATS_URL=nats_url)
    for _ in range(2):  # idempotent: a rerun of the Job finds the streams and succeeds
        result = run([sys.executable, "-c", script], env=env, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "streams ready: AGENT_COMMANDS, AGENT_RESPONSES, ORCHESTRATOR_EVENTS" in \
            result.stdout

    async def subjects() -> Dict[str, List[str]]:
        nc = NATS()
        await nc.connect(nats_url)
        try:
            js = nc.jetstream()
            return {name: (await js.stream_info(name)).config.subjects for name in
                    ("AGENT_COMMANDS", "AGENT_RESPONSES", "ORCHESTRATOR_EVENTS")}
        finally:
            await nc.close()

    assert asyncio.run(subjects()) == {"AGENT_COMMANDS": ["agent.cmd.>"],
                                       "AGENT_RESPONSES": ["agent.response.>"],
                                       "ORCHESTRATOR_EVENTS": ["orchestration.>"]}


class _Metrics(BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake_metrics() -> Iterator[Tuple[int, Callable[[str], None]]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def serve(text: str) -> None:
        _Metrics.body = text.encode()

    yield server.server_address[1], serve
    server.shutdown()


@pytest.mark.parametrize(("metrics", "ready"), [
    ("# HELP ray_executor_ray_connected 1 while ...\n# TYPE ray_executor_ray_connected gauge\n"
     "ray_executor_ray_connected 1.0\n", True),
    ("ray_executor_ray_connected 0.0\n", False),
    ("dramatiq_workers_total 2.0\n", False),  # booted, but no process reported Ray yet
])
def test_worker_readiness_probe_reads_the_ray_connection_gauge(
        rendered: Dict[str, List[Doc]], fake_metrics: Tuple[int, Callable[[str], None]],
        metrics: str, ready: bool) -> None:
    worker = find(rendered["base"], "Deployment", "ray-executor-worker")
    command = worker["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["exec"][
        "command"]
    port, serve = fake_metrics
    serve(metrics)
    env = dict(os.environ, RAY_EXECUTOR_METRICS_PORT=str(port))
    result = run([sys.executable, *command[1:]], env=env, timeout=30)
    assert (result.returncode == 0) is ready, result.stderr


def test_worker_readiness_probe_fails_when_nothing_serves_metrics(
        rendered: Dict[str, List[Doc]]) -> None:
    worker = find(rendered["base"], "Deployment", "ray-executor-worker")
    command = worker["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["exec"][
        "command"]
    env = dict(os.environ, RAY_EXECUTOR_METRICS_PORT=str(servers.free_port()))
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

@pytest.fixture
def k8s_copy(tmp_path: Path) -> Path:
    shutil.copytree(K8S, tmp_path / "k8s")
    return tmp_path / "k8s"


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize(("file", "old", "new", "expected"), [
    ("base/worker.yaml", "apiVersion: apps/v1", "apiVersion: apps/v2", "no schema"),
    ("base/bridge.yaml", "revisionHistoryLimit: 5", "revisionHistoryLimitt: 5",
     "'revisionHistoryLimitt' was unexpected"),
    ("base/hpa.yaml", "minReplicas: 1", "minReplicas: one", "is not of type 'integer'"),
    ("base/dashboard.yaml", "    - name: http\n      port: 8181\n", "    - name: http\n",
     "'port' is a required property"),
    ("base/networkpolicies.yaml", 'policyTypes: ["Ingress", "Egress"]', 'policyType: Ingress',
     "'policyType' was unexpected"),
])
def test_a_broken_manifest_fails_schema_validation(
        tools: Path, k8s_copy: Path, file: str, old: str, new: str, expected: str) -> None:
    edit(k8s_copy / file, old, new)
    result = render(tools, k8s_copy / "base")
    assert result.returncode == 0, result.stderr
    (docs,) = load_yaml(tools, result.stdout)
    problems = validate_k8s(tools, [("broken", d) for d in docs])["problems"]
    assert problems and any(expected in p for p in problems), problems


def test_a_broken_kustomization_does_not_render(tools: Path, k8s_copy: Path) -> None:
    edit(k8s_copy / "base" / "kustomization.yaml", "  - hpa.yaml", "  - hpa-missing.yaml")
    result = render(tools, k8s_copy / "overlays" / "example")
    assert result.returncode != 0 and "hpa-missing.yaml" in result.stderr


def test_a_crd_kind_not_named_is_not_skipped(tools: Path) -> None:
    doc = {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledJob", "metadata": {"name": "x"}}
    assert "no schema" in validate_k8s(tools, [("crd", doc)])["problems"][0]


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


def test_an_insecure_manifest_and_dockerfile_fail_checkov(
        tools: Path, k8s_copy: Path, tmp_path: Path) -> None:
    worker = k8s_copy / "base" / "worker.yaml"
    edit(worker, "allowPrivilegeEscalation: false", "allowPrivilegeEscalation: true")
    edit(worker, "readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "base.yaml").write_text(render(tools, k8s_copy / "base").stdout)
    dockerfile_text = (DOCKER / "bridge.Dockerfile").read_text()
    assert "USER 1000:1000\n" in dockerfile_text
    (tmp_path / "in" / "bridge.Dockerfile").write_text(
        dockerfile_text.replace("USER 1000:1000\n", "USER root\n"))
    (tmp_path / "out").mkdir()
    reports = checkov(tools, tmp_path / "out", tmp_path / "in")
    failed = {c["check_id"] for r in reports.values() for c in r["results"]["failed_checks"]}
    assert {"CKV_K8S_20", "CKV_K8S_22", "CKV_DOCKER_8"} <= failed, failed


@pytest.mark.parametrize(("change", "expected"), [
    (lambda c: c.update(RAY_EXECUTOR_QUEUE_NAME="x"), "RAY_EXECUTOR_QUEUE_NAME is not a setting"),
    (lambda c: c.update(RAY_EXECUTOR_GRPC_PORT="fifty"), "expected an integer"),
    (lambda c: c.update(RAY_EXECUTOR_GRPC_PORT="50057"), "container ports"),
    (lambda c: c.update(RAY_EXECUTOR_WORKER_SHUTDOWN_TIMEOUT="900"), "scale-down kills jobs"),
    (lambda c: c.update(RAY_ADDRESS=""), "required setting RAY_ADDRESS"),
])
def test_k8s_drift_is_caught(rendered: Dict[str, List[Doc]], secret_example: Dict[str, str],
                             change: Callable[[Dict[str, str]], None], expected: str) -> None:
    docs = json.loads(json.dumps(rendered["base"]))
    change(find(docs, "ConfigMap", "ray-executor-config")["data"])
    problems = k8s_drift(docs, secret_example)
    assert any(expected in p for p in problems), problems


def test_k8s_drift_catches_a_wrong_command_and_a_missing_secret_key(
        rendered: Dict[str, List[Doc]], secret_example: Dict[str, str]) -> None:
    docs = json.loads(json.dumps(rendered["base"]))
    dashboard = find(docs, "Deployment", "ray-executor-dashboard")
    dashboard["spec"]["template"]["spec"]["containers"][0]["args"] = ["dashbord"]
    secrets = {k: v for k, v in secret_example.items() if k != "RAY_EXECUTOR_GRPC_TOKEN"}
    problems = "\n".join(k8s_drift(docs, secrets))
    assert "not `ray-executor dashboard`" in problems
    assert "secret key RAY_EXECUTOR_GRPC_TOKEN is not in secret.example.yaml" in problems


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
                   "runtime_env", "stabilizationWindowSeconds", "terminationGracePeriodSeconds",
                   "RAY_EXECUTOR_WORKER_SHUTDOWN_TIMEOUT", QUEUE_METRIC, "readOnlyRootFilesystem",
                   "NetworkPolicy", "ray_executor_ray_connected", "KEDA", TOOLS_ENV):
        assert needle in text, f"docs/deploy.md does not mention {needle}"
    # Every file it points at exists.
    for path in re.findall(r"`((?:docker|compose|k8s|tests)/[\w./-]+)`", text):
        assert (ROOT / path).exists(), path

