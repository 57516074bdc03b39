"""The offline tools the deploy tests drive, and the chart's variants.

The tools live in their own environment (``.venv-tools``: checkov pins packages the test
environment must not share); ``RAY_EXECUTOR_TOOLS_BIN`` names its ``bin/`` (the Makefile sets
it). YAML, schema validation and PromQL parsing run in that environment's Python; the tests
themselves run in the bridge environment and never import the service's worker side.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "k8s" / "charts" / "ray-executor"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
TOOLS_ENV = "RAY_EXECUTOR_TOOLS_BIN"
TOOLS = ("helm", "kubernetes-validate", "checkov", "python")
# Every Kubernetes minor the chart must be valid for: the oldest it supports (preStop.sleep is
# GA in 1.30) to the newest the schemas know.
K8S_VERSIONS = tuple(f"1.{minor}.0" for minor in range(30, 38))
NAMESPACE = "agents"
RELEASE = "rx"
# The variants every test renders: values.yaml alone, and each ci/*-values.yaml on top of it
# (the chart-testing convention).
VARIANTS = {"default": (), "full": ("ci/full-values.yaml",), "keda": ("ci/keda-values.yaml",)}
# Custom resources and the vendored schema each validates against.
CRDS = {
    ("ray.io/v1", "RayCluster"): "ray.io/v1/raycluster.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh/v1alpha1/scaledobject.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda.sh/v1alpha1/triggerauthentication.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com/v1/servicemonitor.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com/v1/podmonitor.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"):
        "monitoring.coreos.com/v1/prometheusrule.json",
}

Doc = Dict[str, Any]


def tools_bin(needed: Sequence[str] = TOOLS) -> Path:
    """The validation tools environment's bin/ folder, holding every tool ``needed``."""
    value = os.environ.get(TOOLS_ENV, "")
    if not value:
        pytest.fail(f"{TOOLS_ENV} is not set: it must name the bin/ folder of the validation "
                    "tools environment (`make .venv-tools/.installed` makes it; `make test` "
                    "sets the variable)")
    path = Path(value)
    missing = [tool for tool in needed if not (path / tool).exists()]
    if missing:
        pytest.fail(f"{TOOLS_ENV}={value} lacks {', '.join(missing)}")
    return path


def run(args: Sequence[Any], *, input: Optional[str] = None, env: Optional[Dict[str, str]] = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], input=input, capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)


def helm(tools: Path, *args: Any, home: Path) -> subprocess.CompletedProcess:
    """Helm with its cache, config and data under ``home``: no repository, nothing fetched."""
    env = dict(os.environ, HELM_CACHE_HOME=str(home / "cache"),
               HELM_CONFIG_HOME=str(home / "config"), HELM_DATA_HOME=str(home / "data"))
    return run([tools / "helm", *args], env=env)


def template(tools: Path, home: Path, values: Iterable[str] = (), sets: Iterable[str] = (),
             chart: Path = CHART, kube_version: str = K8S_VERSIONS[0]
             ) -> subprocess.CompletedProcess:
    args: List[Any] = ["template", RELEASE, chart, "--namespace", NAMESPACE,
                       "--kube-version", kube_version]
    for path in values:
        args += ["-f", chart / path]
    for item in sets:
        args += ["--set", item]
    return helm(tools, *args, home=home)


_LOAD_YAML = """
import json, sys, yaml
texts = json.load(sys.stdin)
json.dump([[d for d in yaml.safe_load_all(t) if d is not None] for t in texts], sys.stdout)
"""


def load_yaml(tools: Path, *texts: str) -> List[List[Doc]]:
    result = run([tools / "python", "-c", _LOAD_YAML], input=json.dumps(list(texts)))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def render_docs(tools: Path, home: Path, **kwargs: Any) -> List[Doc]:
    result = template(tools, home, **kwargs)
    assert result.returncode == 0, result.stderr
    (docs,) = load_yaml(tools, result.stdout)
    return docs


# One process validates everything: the Kubernetes kinds against kubernetes-validate's strict
# schemas of each version, the custom resources against the vendored CRD schemas, whose core
# types (pod templates, metadata) resolve to the same version's Kubernetes definitions. A kind
# with no schema is a problem, never a skip.
_VALIDATE = r"""
import json, re, sys
from pathlib import Path
import jsonschema, kubernetes_validate
from referencing import Registry, Resource

request = json.load(sys.stdin)
base = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
crds = {tuple(k.split("|")): v for k, v in request["crds"].items()}
problems, checked = [], {}
for version in request["versions"]:
    folder = base / ("v%s-local-strict" % version)
    definitions = json.loads((folder / "_definitions.json").read_text())
    registry = Resource.from_contents(definitions) @ Registry()
    validators = {}
    for where, doc in request["docs"]:
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key not in validators:
            if key in crds:
                schema = json.loads(Path(crds[key]).read_text())
            else:
                group = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", key[0] or "")
                path = folder / ("%s-%s.json" % ((key[1] or "").lower(), group))
                schema = json.loads(path.read_text()) if path.exists() else None
            if schema is None:
                validators[key] = None
            else:
                validators[key] = jsonschema.validators.Draft202012Validator(
                    schema, registry=registry)
        validator = validators[key]
        name = "%s %s/%s" % (where, key[1], (doc.get("metadata") or {}).get("name"))
        if validator is None:
            problems.append("%s (k8s %s): no schema for %s" % (name, version, key[0]))
            continue
        for error in sorted(validator.iter_errors(doc), key=lambda e: list(e.path))[:3]:
            best = jsonschema.exceptions.best_match([error])
            problems.append("%s (k8s %s) at %s: %s" % (
                name, version, "/".join(map(str, best.absolute_path)), best.message))
        checked["%s/%s" % key] = checked.get("%s/%s" % key, 0) + 1
json.dump({"problems": problems, "checked": checked}, sys.stdout)
"""


def validate(tools: Path, docs: List[Tuple[str, Doc]],
             versions: Sequence[str] = K8S_VERSIONS) -> Dict[str, Any]:
    request = {"docs": docs, "versions": list(versions),
               "crds": {f"{a}|{k}": str(SCHEMAS / p) for (a, k), p in CRDS.items()}}
    result = run([tools / "python", "-c", _VALIDATE], input=json.dumps(request))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def checkov(tools: Path, out: Path, *folders: Path, framework: str = "kubernetes"
            ) -> Dict[str, Any]:
    """Run checkov offline on ``folders`` with ``framework``; returns {check_type: report}."""
    env = dict(os.environ, BC_SKIP_MAPPING="TRUE", CKV_SKIP_PACKAGE_UPDATE_CHECK="true",
               CKV_PARSE_ERROR_FAIL="true", LOG_LEVEL="WARNING")
    args: List[Any] = [tools / "checkov", "--skip-download", "--compact",
                       "--framework", framework, "-o", "json", "--output-file-path", out]
    for folder in folders:
        args += ["-d", folder]
    result = run(args, env=env)
    report = out / "results_json.json"
    assert report.exists(), \
        f"checkov wrote no report:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    data = json.loads(report.read_text())
    reports = data if isinstance(data, list) else [data]
    return {r["check_type"]: r for r in reports}


_PROMQL = """
import json, sys
import promql_parser
out = []
for expr in json.load(sys.stdin):
    try:
        promql_parser.parse(expr)
        out.append("")
    except Exception as exc:
        out.append(str(exc) or type(exc).__name__)
json.dump(out, sys.stdout)
"""


def promql_errors(tools: Path, exprs: List[str]) -> List[str]:
    result = run([tools / "python", "-c", _PROMQL], input=json.dumps(exprs))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# --- reading rendered objects ---------------------------------------------------------------

def find(docs: List[Doc], kind: str, name: str) -> Doc:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def kinds(docs: List[Doc], kind: str) -> List[Doc]:
    return [d for d in docs if d["kind"] == kind]


def workloads(docs: List[Doc]) -> Iterable[Tuple[Doc, Doc, Doc]]:
    """(object, pod spec, container) of every container of the chart's own workloads."""
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            spec = doc["spec"]["template"]["spec"]
            for container in spec.get("initContainers", []) + spec["containers"]:
                yield doc, spec, container


def component(doc: Doc) -> str:
    return doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]


def env_of(container: Doc) -> Dict[str, Any]:
    return {item["name"]: item for item in container.get("env", [])}


def readme_settings() -> Dict[str, str]:
    """{variable: default} of README.md's settings table: the names operators set."""
    text = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \| (.*?) \|", text, flags=re.M)
    return {name: default.strip("`") if default != "(empty)" else "" for name, default in rows}


# --- a /metrics page for the probe commands -----------------------------------------------

class MetricsPage(BaseHTTPRequestHandler):
    """Serves ``body`` on every GET: a stand-in for a /metrics page a probe command reads."""

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
    server = ThreadingHTTPServer(("127.0.0.1", 0), MetricsPage)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def serve(text: str) -> None:
        MetricsPage.body = text.encode()

    yield server.server_address[1], serve
    server.shutdown()
