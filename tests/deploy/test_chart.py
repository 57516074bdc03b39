"""The Helm chart k8s/charts/ray-executor, checked offline (issue 22).

Every variant (values.yaml, ci/full-values.yaml, ci/keda-values.yaml) is rendered with
`helm template`, linted with `helm lint --strict`, validated against the Kubernetes schemas of
1.30 to 1.37 and the vendored CRD schemas (tests/deploy/schemas), and scanned by checkov. The
other tests each guard one point of the issue; the last section breaks copies of the chart and
sees the same checks fail.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Set

import pytest

from tests.deploy.tooling import (
    CHART,
    CRDS,
    K8S_VERSIONS,
    NAMESPACE,
    RELEASE,
    ROOT,
    VARIANTS,
    Doc,
    checkov,
    component,
    env_of,
    find,
    helm,
    kinds,
    load_yaml,
    promql_errors,
    readme_settings,
    render_docs,
    template,
    validate,
    workloads,
)

FULLNAME = f"{RELEASE}-ray-executor"
SECRET_EXAMPLE = ROOT / "k8s" / "secret.example.yaml"
ADAPTER_VALUES = ROOT / "k8s" / "prometheus-adapter" / "values.yaml"
OPERATIONS = ROOT / "docs" / "operations.md"
DEPLOY = ROOT / "docs" / "deploy.md"
# Settings the chart sets for the routes (issue 19): the routes file, each worker's route.
ROUTE_SETTINGS = {"RAY_EXECUTOR_ROUTES_FILE", "RAY_EXECUTOR_ROUTE"}
# Settings the chart derives per route or from the default route (never in values' config).
# Settings each worker pod takes from the downward API (its own name), never from the ConfigMap.
PER_POD = {"RAY_EXECUTOR_WORKER_ID"}
DERIVED = {"RAY_ADDRESS", "RAY_EXECUTOR_QUEUE", "VLLM_URL", "RAY_EXECUTOR_DASHBOARD_BRIDGE"} \
    | ROUTE_SETTINGS | PER_POD
REQUIRED = {
    "bridge": {"REDIS_URL", "NATS_URL"},
    "worker": {"REDIS_URL", "NATS_URL", "RAY_ADDRESS", "RAY_EXECUTOR_ROUTE",
               "RAY_EXECUTOR_WORKER_ID"},
    "dashboard": {"REDIS_URL"},
    "stream-init": {"NATS_URL"},
}


def values_of(tools: Path, variant: str) -> Dict[str, Any]:
    """The merged values of a variant (values.yaml, then its ci/ files)."""
    texts = [(CHART / "values.yaml").read_text()] + [(CHART / p).read_text()
                                                   for p in VARIANTS[variant]]
    merged: Dict[str, Any] = {}
    for (doc,) in load_yaml(tools, *texts):
        merged = merge(merged, doc)
    return merged


def merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            out[key] = merge(base.get(key), value) if key in base else value
        return out
    return over


def secret_keys(tools: Path) -> Set[str]:
    ((doc,),) = load_yaml(tools, SECRET_EXAMPLE.read_text())
    return set(doc["stringData"])


def all_docs(rendered: Dict[str, List[Doc]]) -> List[Doc]:
    return [d for docs in rendered.values() for d in docs]


# --- render, lint, validate, scan ------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_helm_lint_passes(tools: Path, helm_home: Path, variant: str) -> None:
    args: List[Any] = ["lint", CHART, "--strict", "--namespace", NAMESPACE]
    for path in VARIANTS[variant]:
        args += ["-f", CHART / path]
    result = helm(tools, *args, home=helm_home)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


def test_every_variant_validates_on_kubernetes_1_30_to_1_37_and_the_crds(
        tools: Path, rendered: Dict[str, List[Doc]]) -> None:
    docs = [(f"{name}:", d) for name, ds in rendered.items() for d in ds]
    report = validate(tools, docs)
    assert report["problems"] == []
    # Each custom resource the chart can make was checked on every version.
    for api_version, kind in CRDS:
        if kind == "TriggerAuthentication":
            continue  # the chart makes none (KEDA's Prometheus scaler needs no credentials)
        assert report["checked"].get(f"{api_version}/{kind}", 0) >= len(K8S_VERSIONS), kind


def test_the_full_values_render_every_optional_part(rendered: Dict[str, List[Doc]]) -> None:
    full = {d["kind"] for d in rendered["full"]}
    assert {"RayCluster", "ServiceMonitor", "PodMonitor", "PrometheusRule",
            "HorizontalPodAutoscaler", "NetworkPolicy", "PodDisruptionBudget", "Job"} <= full
    assert "ScaledObject" in {d["kind"] for d in rendered["keda"]}
    # Without the operators, the default values make none of their objects.
    default = {d["kind"] for d in rendered["default"]}
    assert not default & {"RayCluster", "ServiceMonitor", "PodMonitor", "PrometheusRule",
                          "ScaledObject"}


def test_chart_needs_kubernetes_1_30(tools: Path, helm_home: Path) -> None:
    old = template(tools, helm_home, kube_version="1.29.9")
    assert old.returncode != 0 and "kubeVersion" in old.stderr and ">=1.30.0-0" in old.stderr
    assert template(tools, helm_home, kube_version="1.30.0").returncode == 0


@pytest.fixture(scope="session")
def checkov_reports(tools: Path, rendered_text: Dict[str, str],
                    tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    folder = tmp_path_factory.mktemp("checkov-in")
    for name, text in rendered_text.items():
        (folder / f"{name}.yaml").write_text(text)
    shutil.copy(SECRET_EXAMPLE, folder / "secret.example.yaml")
    return checkov(tools, tmp_path_factory.mktemp("checkov-out"), folder)


def test_checkov_finds_nothing_unexplained(checkov_reports: Dict[str, Any],
                                           rendered: Dict[str, List[Doc]]) -> None:
    report = checkov_reports["kubernetes"]
    failed = [(c["check_id"], c["check_name"], c["resource"])
              for c in report["results"]["failed_checks"]]
    assert failed == [], "checkov failures:\n" + "\n".join(map(str, failed))
    assert report["summary"]["parsing_errors"] == 0
    assert report["summary"]["passed"] > 0
    reasons: Dict[tuple, Dict[str, str]] = {}
    for doc in all_docs(rendered):
        for key, value in (doc["metadata"].get("annotations") or {}).items():
            if key.startswith("checkov.io/skip"):
                check, _, reason = value.partition("=")
                reasons.setdefault((doc["kind"], doc["metadata"]["name"]), {})[check] = reason
    for check in report["results"]["skipped_checks"]:
        kind, _, name = check["resource"].split(".", 2)
        reason = reasons.get((kind, name.split(".")[-1]), {}).get(check["check_id"], "")
        assert len(reason.strip()) > 20, f"{check['check_id']} skipped for {check['resource']} " \
                                         "without a reason"


# --- 1. monitoring objects ---------------------------------------------------------------------

def test_service_and_pod_monitors_scrape_the_bridge_and_every_worker(
        rendered: Dict[str, List[Doc]]) -> None:
    docs = rendered["full"]
    labels = {"release": "kube-prometheus-stack"}
    bridge_service = find(docs, "Service", f"{FULLNAME}-bridge")
    monitor = find(docs, "ServiceMonitor", f"{FULLNAME}-bridge")
    assert labels.items() <= monitor["metadata"]["labels"].items()
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= bridge_service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in bridge_service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    pods = find(docs, "PodMonitor", f"{FULLNAME}-worker")
    assert labels.items() <= pods["metadata"]["labels"].items()
    selector = pods["spec"]["selector"]["matchLabels"]
    workers = [d for d in kinds(docs, "Deployment") if component(d) == "worker"]
    assert len(workers) == 2
    for worker in workers:
        template = worker["spec"]["template"]
        assert selector.items() <= template["metadata"]["labels"].items()
        ports = {p["name"] for c in template["spec"]["containers"] for p in c["ports"]}
        (endpoint,) = pods["spec"]["podMetricsEndpoints"]
        assert endpoint["port"] in ports


def rules(docs: List[Doc]) -> List[Doc]:
    (rule,) = kinds(docs, "PrometheusRule")
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def test_alerts_are_real_rules_with_a_runbook_each(
        tools: Path, rendered: Dict[str, List[Doc]]) -> None:
    alerts = rules(rendered["full"])
    errors = promql_errors(tools, [a["expr"] for a in alerts])
    assert errors == [""] * len(alerts), dict(zip((a["alert"] for a in alerts), errors))
    text = OPERATIONS.read_text()
    documented_alerts = re.findall(r"^#### (RayExecutor\w+)$", text, flags=re.M)
    assert sorted(a["alert"] for a in alerts) == sorted(documented_alerts), \
        "docs/operations.md has one runbook section per rule"
    # Metrics the rules use are documented (or are Prometheus' own `up`).
    documented_metrics = set(re.findall(r"^\| `(\w+)` \|", text, flags=re.M))
    for alert in alerts:
        assert alert["labels"]["severity"] in {"critical", "warning", "info"}
        for key in ("summary", "description", "runbook_url"):
            assert alert["annotations"][key].strip(), (alert["alert"], key)
        anchor = alert["annotations"]["runbook_url"].rsplit("#", 1)[1]
        assert anchor == alert["alert"].lower()
        section = text.split(f"#### {alert['alert']}\n", 1)[1].split("\n#### ", 1)[0]
        assert "**Runbook**" in section, f"{alert['alert']}: no runbook line in the docs"
        names = set(re.findall(r"\b(ray_executor_\w+|dramatiq_\w+)", alert["expr"]))
        names = {re.sub(r"_(bucket|count|sum)$", "", n) for n in names}
        assert names or "up{" in alert["expr"], alert["alert"]
        assert names <= documented_metrics, (alert["alert"], names)
        assert f'namespace="{NAMESPACE}"' in alert["expr"], alert["alert"]


def test_adapter_values_add_the_rule_without_replacing_the_adapter_config(tools: Path) -> None:
    ((values,),) = load_yaml(tools, ADAPTER_VALUES.read_text())
    assert set(values) == {"rules"}, "chart values only, never a ConfigMap of its own"
    assert values["rules"]["default"] is True, "the adapter's own rules stay"
    (rule,) = values["rules"]["external"]
    assert rule["name"]["as"] == "ray_executor_route_pending_jobs"
    assert rule["seriesQuery"].startswith("ray_executor_route_pending_jobs{")
    assert rule["metricsQuery"].startswith("max(") and rule["metricsQuery"].endswith(
        "by (route)")
    assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
    docs = DEPLOY.read_text()
    assert "external.metrics.k8s.io" in docs and "external.metrics.k8s.io" in \
        ADAPTER_VALUES.read_text(), "the docs say KEDA and the adapter both claim that API"


# --- 2. readiness and drains ----------------------------------------------------------------------

def test_no_probe_depends_on_ray_and_every_pdb_lets_unhealthy_pods_go(
        rendered: Dict[str, List[Doc]]) -> None:
    for name, docs in rendered.items():
        for _doc, _, container in workloads(docs):
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                text = json.dumps(container.get(probe, {}))
                assert "ray_connected" not in text and "10001" not in text, (name, probe)
        pdbs = kinds(docs, "PodDisruptionBudget")
        assert pdbs
        for pdb in pdbs:
            assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow", pdb["metadata"]
        for worker in (d for d in kinds(docs, "Deployment") if component(d) == "worker"):
            (container,) = worker["spec"]["template"]["spec"]["containers"]
            assert "ray_executor_worker_ready" in container["readinessProbe"]["exec"]["command"][2]
            assert container["livenessProbe"]["httpGet"]["path"] == "/metrics"
            route = worker["metadata"]["labels"]["ray-executor.io/route"]
            (pdb,) = [p for p in pdbs if p["spec"]["selector"]["matchLabels"].get(
                "ray-executor.io/route") == route]
            assert pdb["spec"]["maxUnavailable"] == 1
            assert pdb["spec"]["selector"]["matchLabels"].items() <= \
                worker["spec"]["template"]["metadata"]["labels"].items()


# --- 3. the namespace is the installer's ------------------------------------------------------

def test_chart_owns_no_namespace_and_selects_only_its_own_pods(
        rendered: Dict[str, List[Doc]]) -> None:
    own = {"app.kubernetes.io/instance": RELEASE, "app.kubernetes.io/name": "ray-executor"}
    for name, docs in rendered.items():
        assert not kinds(docs, "Namespace"), name
        text = json.dumps(docs)
        assert "pod-security.kubernetes.io" not in text
        clusters = {d["metadata"]["name"] for d in kinds(docs, "RayCluster")}
        for doc in docs:
            assert doc["metadata"]["namespace"] == NAMESPACE, "the release's, from helm -n"
            assert own.items() <= doc["metadata"]["labels"].items(), doc["metadata"]["name"]
        for policy in kinds(docs, "NetworkPolicy"):
            selector = policy["spec"]["podSelector"].get("matchLabels", {})
            assert selector, f"{name}: {policy['metadata']['name']} selects every pod"
            assert own.items() <= selector.items() or selector.get("ray.io/cluster") in clusters


# --- 4. a settings change rolls the pods ------------------------------------------------------

def pod_checksums(docs: List[Doc]) -> Dict[str, str]:
    return {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["annotations"][
        "checksum/config"] for d in kinds(docs, "Deployment")}


def test_settings_and_routes_changes_roll_every_pod(tools: Path, helm_home: Path,
                                                    tmp_path: Path,
                                                    rendered: Dict[str, List[Doc]]) -> None:
    before = pod_checksums(rendered["default"])
    assert len(before) == 3
    again = pod_checksums(render_docs(tools, helm_home))
    assert again == before, "the checksum is stable"
    setting = pod_checksums(render_docs(tools, helm_home,
                                        sets=["config.RAY_EXECUTOR_LOG_LEVEL=DEBUG"]))
    values = change_default(values_of(tools, "default"), lambda v: v["routes"][0]["vllm"][
        "endpoints"][0].update(concurrency=32))
    route = pod_checksums(render_docs(tools, helm_home, values=[values_file(tmp_path, values)]))
    for name in before:
        assert setting[name] != before[name], name
        assert route[name] != before[name], name
    # Settings reach the pods only through that ConfigMap (and the Secret, key by key).
    for doc, _, container in workloads(rendered["default"]):
        if component(doc) != "stream-init":
            assert [s["configMapRef"]["name"] for s in container["envFrom"]] == \
                [f"{FULLNAME}-config"]


# --- 5. streams: a hook with limits, no fixed-name Job ------------------------------------------

def test_stream_init_is_a_helm_hook_and_sizes_the_streams(
        rendered: Dict[str, List[Doc]]) -> None:
    for _name, docs in rendered.items():
        (job,) = kinds(docs, "Job")
        notes = job["metadata"]["annotations"]
        assert notes["helm.sh/hook"] == "pre-install,pre-upgrade"
        assert set(notes["helm.sh/hook-delete-policy"].split(",")) == {
            "before-hook-creation", "hook-succeeded"}
        assert "ttlSecondsAfterFinished" not in job["spec"]
        (container,) = job["spec"]["template"]["spec"]["containers"]
        assert "envFrom" not in container, "a pre-install hook runs before the ConfigMap exists"
        args = container["args"][1:]
        assert args[0].startswith("--max-age=") and int(args[0].split("=")[1]) > 0
        assert args[1].startswith("--max-bytes=") and int(args[1].split("=")[1]) > 0
    (job,) = kinds(rendered["full"], "Job")
    assert job["spec"]["template"]["spec"]["containers"][0]["args"][1:] == [
        "--max-age=1209600", "--max-bytes=53687091200", "--replicas=3"]


# --- 6. network policies ------------------------------------------------------------------------

def egress_ports(policy: Doc) -> Set[int]:
    return {p["port"] for rule in policy["spec"].get("egress", []) for p in rule.get("ports", [])}


def test_network_policies_allow_tls_redis_any_dns_and_guard_the_ray_client_port(
        rendered: Dict[str, List[Doc]]) -> None:
    readme_ports = {int(p) for p in re.findall(r"rediss?://[\w.@:-]*?:(\d+)/",
                                               (ROOT / "README.md").read_text())}
    assert {6379, 6380} <= readme_ports
    for name, docs in rendered.items():
        for part in ("bridge", "worker", "dashboard"):
            policy = find(docs, "NetworkPolicy", f"{FULLNAME}-{part}")
            assert readme_ports <= egress_ports(policy), (name, part)
        dns = find(docs, "NetworkPolicy", f"{FULLNAME}-dns")
        (rule,) = dns["spec"]["egress"]
        assert {(p["port"], p["protocol"]) for p in rule["ports"]} == {(53, "UDP"), (53, "TCP")}
        if name == "default":
            assert "to" not in rule, "DNS to any address: NodeLocal DNSCache has no pod"
    docs = rendered["full"]
    (cluster,) = kinds(docs, "RayCluster")
    clusters_policy = find(docs, "NetworkPolicy", f"{cluster['metadata']['name']}-ray")
    assert clusters_policy["spec"]["podSelector"]["matchLabels"] == {
        "ray.io/cluster": cluster["metadata"]["name"]}
    route = cluster["metadata"]["labels"]["ray-executor.io/route"]
    worker = find(docs, "Deployment", f"{FULLNAME}-worker-{route}")
    for rule in clusters_policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        peers = rule["from"]
        if not ports:  # all ports: only the cluster's own pods
            assert peers == [{"podSelector": {"matchLabels": {
                "ray.io/cluster": cluster["metadata"]["name"]}}}]
        elif 10001 in ports:
            assert ports == {10001}
            (peer,) = peers
            assert set(peer) == {"podSelector"}, "the route's workers only, this namespace"
            assert peer["podSelector"]["matchLabels"].items() <= \
                worker["spec"]["template"]["metadata"]["labels"].items()
            assert peer["podSelector"]["matchLabels"]["ray-executor.io/route"] == route


# --- 7. KubeRay ----------------------------------------------------------------------------------

def test_raycluster_head_runs_nothing_and_gpu_nodes_advertise_the_vllm_resource(
        tools: Path, rendered: Dict[str, List[Doc]]) -> None:
    docs = rendered["full"]
    values = values_of(tools, "full")
    (cluster,) = kinds(docs, "RayCluster")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    image = values["rayClusterDefaults"]["image"]
    images = {c["image"] for c in spec["headGroupSpec"]["template"]["spec"]["containers"]}
    assert images == {f"{image['repository']}@{image['digest']}"}
    (group,) = spec["workerGroupSpecs"]
    route = next(r for r in values["routes"] if r["name"] ==
                 cluster["metadata"]["labels"]["ray-executor.io/route"])
    resources = json.loads(json.loads(group["rayStartParams"]["resources"]))
    assert resources[route["vllm"]["nodeResource"]] > 0
    containers = {c["name"]: c for c in group["template"]["spec"]["containers"]}
    assert containers["ray-worker"]["image"] == f"{image['repository']}@{image['digest']}"
    assert containers["vllm"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "--port=8000" in containers["vllm"]["args"]
    assert any(":8000" in e["url"] and "{node_ip}" in e["url"] for e in route["vllm"]["endpoints"])
    assert 0 < group["minReplicas"] <= group["maxReplicas"]
    # The route reaches that cluster's head Service on the client port.
    routes = json.loads(find(docs, "ConfigMap", f"{FULLNAME}-routes")["data"]["routes.json"])
    (entry,) = [r for r in routes["routes"] if r["name"] == route["name"]]
    assert entry["ray_address"] == (f"ray://{cluster['metadata']['name']}-head-svc."
                                    f"{NAMESPACE}.svc.cluster.local:10001")
    # The worker image of the route and the cluster image run the same Ray and Python.
    worker = find(docs, "Deployment", f"{FULLNAME}-worker-{route['name']}")
    tag = values["images"]["worker"]["tag"]
    python, ray = re.search(r"py(\d+)-ray([\d.]+)", tag).groups()  # type: ignore[union-attr]
    assert image["tag"] == f"{ray}-py{python}" and spec["rayVersion"] == ray
    assert worker["spec"]["template"]["spec"]["containers"][0]["image"].startswith(
        values["images"]["worker"]["repository"] + "@")


# --- routes: a worker Deployment and an autoscaler each ------------------------------------

@pytest.mark.parametrize("variant", ["default", "full", "keda"])
def test_each_route_has_its_workers_and_autoscaler_sized_by_its_capacity(
        tools: Path, rendered: Dict[str, List[Doc]], variant: str) -> None:
    docs = rendered[variant]
    values = values_of(tools, variant)
    config = values["config"]
    routes = json.loads(find(docs, "ConfigMap", f"{FULLNAME}-routes")["data"]["routes.json"])
    assert [r["name"] for r in routes["routes"]] == [r["name"] for r in values["routes"]]
    for route, entry in zip(values["routes"], routes["routes"]):
        assert entry["queue"] == route["queue"] and entry["match"] == route["match"]
        assert [e["url"] for e in entry["vllm"]["endpoints"]] == \
            [e["url"] for e in route["vllm"]["endpoints"]]
        worker = find(docs, "Deployment", f"{FULLNAME}-worker-{route['name']}")
        assert "replicas" not in worker["spec"], "the autoscaler owns replicas"
        (container,) = worker["spec"]["template"]["spec"]["containers"]
        env = {k: v.get("value") for k, v in env_of(container).items()}
        assert env["RAY_EXECUTOR_ROUTE"] == route["name"]
        assert env["RAY_EXECUTOR_QUEUE"] == route["queue"]
        assert env["RAY_ADDRESS"] == entry["ray_address"]
        image = merge(values["images"]["worker"],
                      merge(values["workerDefaults"]["image"],
                            (route.get("worker") or {}).get("image") or {}))
        assert container["image"] == (f"{image['repository']}@{image['digest']}"
                                       if image.get("digest") else
                                       f"{image['repository']}:{image['tag']}")
        # The arithmetic of docs/deploy.md.
        capacity = sum(e["concurrency"] for e in entry["vllm"]["endpoints"])
        processes, prefetch = int(env["RAY_EXECUTOR_WORKER_PROCESSES"]), \
            int(env["RAY_EXECUTOR_WORKER_PREFETCH"])
        threads = int(env["RAY_EXECUTOR_WORKER_THREADS"])
        assert 1 <= prefetch <= 2 * threads
        per_pod = processes * prefetch
        expected_max = max(1, math.ceil(capacity / per_pod))
        assert expected_max * processes <= 80, "within the Ray client connection budget"
        name = f"{FULLNAME}-worker-{route['name']}"
        if variant == "keda":
            scaled = find(docs, "ScaledObject", name)
            assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == \
                (1, expected_max)
            (trigger,) = scaled["spec"]["triggers"]
            assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
            assert trigger["metadata"]["threshold"] == str(per_pod)
            assert trigger["metadata"]["query"] == (
                f'max(ray_executor_route_pending_jobs{{namespace="{NAMESPACE}",'
                f'route="{route["name"]}"}})')
            assert not kinds(docs, "HorizontalPodAutoscaler")
        else:
            hpa = find(docs, "HorizontalPodAutoscaler", name)
            assert hpa["spec"]["scaleTargetRef"]["name"] == name
            assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, expected_max)
            (metric,) = hpa["spec"]["metrics"]
            assert metric["external"]["metric"] == {
                "name": "ray_executor_route_pending_jobs",
                "selector": {"matchLabels": {"route": route["name"]}}}
            assert metric["external"]["target"] == {"type": "AverageValue",
                                                    "averageValue": str(per_pod)}
            assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300
        # The drain fits in the grace period.
        grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > int(config["RAY_EXECUTOR_WORKER_SHUTDOWN_TIMEOUT"])
    # Bridge and workers read the same routes file.
    path = find(docs, "ConfigMap", f"{FULLNAME}-config")["data"]["RAY_EXECUTOR_ROUTES_FILE"]
    for doc, spec, container in workloads(docs):
        if component(doc) in ("bridge", "worker"):
            mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
            volumes = {v["name"]: v for v in spec["volumes"]}
            (volume,) = [n for n, v in volumes.items()
                         if v.get("configMap", {}).get("name") == f"{FULLNAME}-routes"]
            assert str(Path(mounts[volume]) / "routes.json") == path


def values_file(tmp_path: Path, values: Dict[str, Any]) -> str:
    path = tmp_path / f"values-{len(list(tmp_path.iterdir()))}.json"
    path.write_text(json.dumps(values))  # JSON is YAML
    return str(path)


def change_default(values: Dict[str, Any], change: Any) -> Dict[str, Any]:
    values = json.loads(json.dumps(values))
    change(values)
    return values


@pytest.mark.parametrize(("change", "expected"), [
    (lambda v: v["routes"][0]["match"].update(default=False),
     "exactly one route must have match.default"),
    (lambda v: v["config"].update(RAY_ADDRESS="ray://x:10001"),
     "config.RAY_ADDRESS: the chart derives"),
    (lambda v: v["routes"][0].update(name="Bad_Name"), "must be a DNS label"),
    (lambda v: v["routes"].append(dict(v["routes"][0], name="other", match={})),
     "queue agent_jobs is used by two routes"),
    (lambda v: (v["workerDefaults"].update(prefetch=1, processes=1),
                v["routes"][0]["vllm"]["endpoints"][0].update(concurrency=256)),
     "256 Ray client connections, over the budget of 80"),
    (lambda v: v["routes"][0].update(rayAddress=""), "set rayAddress or rayCluster.enabled"),
    (lambda v: v["autoscaling"].update(mode="vpa"), "is not hpa, keda or none"),
])
def test_bad_values_are_refused_with_the_reason(tools: Path, helm_home: Path, tmp_path: Path,
                                                change: Any, expected: str) -> None:
    values = change_default(values_of(tools, "default"), change)
    result = template(tools, helm_home, values=[values_file(tmp_path, values)])
    assert result.returncode != 0 and expected in result.stderr, result.stderr


# --- settings agree with the README and the code -----------------------------------------------

def settings_class() -> Any:
    from core.settings import Settings, SettingsError

    return Settings, SettingsError


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variable_is_a_readme_setting_that_parses(
        tools: Path, rendered: Dict[str, List[Doc]], variant: str) -> None:
    Settings, SettingsError = settings_class()
    readme = readme_settings()
    secrets = secret_keys(tools)
    docs = rendered[variant]
    config = find(docs, "ConfigMap", f"{FULLNAME}-config")["data"]
    problems = []
    for doc, _, container in workloads(docs):
        part = component(doc)
        where = f"{doc['metadata']['name']}/{container['name']}"
        env: Dict[str, str] = {}
        for source in container.get("envFrom", []):
            assert source["configMapRef"]["name"] == f"{FULLNAME}-config", where
            env.update(config)
        for name, item in env_of(container).items():
            if "value" in item:
                env[name] = item["value"]
            elif "fieldRef" in item["valueFrom"]:  # the downward API: the pod's name
                assert item["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", where
                env[name] = f"{doc['metadata']['name']}-7d9f8c6b5-x2x4q"
            else:
                key = item["valueFrom"]["secretKeyRef"]["key"]
                assert item["valueFrom"]["secretKeyRef"]["name"] == "ray-executor-secrets"
                assert key == name and key in secrets, f"{where}: secret key {key}"
                env[name] = "redis://:x@redis:6379/0" if name == "REDIS_URL" else \
                    "nats://nats:4222" if name == "NATS_URL" else "PLACEHOLDER"
        problems += [f"{where}: {n} is not in README.md's settings" for n in env
                     if n not in readme]
        problems += [f"{where}: required {n} unset" for n in REQUIRED.get(part, ())
                     if not env.get(n)]
        try:
            settings = Settings.from_env({k: v for k, v in env.items() if k in readme})
        except SettingsError as exc:
            problems.append(f"{where}: {exc}")
            continue
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        expected = {"bridge": {"grpc": settings.grpc_port, "metrics": settings.metrics_port},
                    "worker": {"metrics": settings.worker_metrics_port},
                    "dashboard": {"http": settings.dashboard_port}}.get(part, {})
        if ports != expected:
            problems.append(f"{where}: ports {ports}, the settings say {expected}")
        if container.get("args", [None])[0] not in (part, None) and part != "stream-init":
            problems.append(f"{where}: runs {container.get('args')}")
    assert problems == []
    # ConfigMap and Secret hold every setting once; the chart derives the rest.
    values = values_of(tools, variant)["config"]
    assert not set(values) & DERIVED
    assert not set(config) & secrets
    assert set(config) | secrets | {"RAY_EXECUTOR_ROUTE"} | PER_POD == set(readme)


# --- broken copies fail ---------------------------------------------------------------------------

@pytest.fixture
def chart_copy(tmp_path: Path) -> Path:
    shutil.copytree(CHART, tmp_path / "ray-executor")
    return tmp_path / "ray-executor"


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize(("file", "old", "new", "expected"), [
    ("templates/bridge.yaml", "revisionHistoryLimit: 5", "revisionHistoryLimitt: 5",
     "'revisionHistoryLimitt' was unexpected"),
    ("templates/workers.yaml", "unhealthyPodEvictionPolicy: AlwaysAllow",
     "unhealthyPodEvictionPolicy: [AlwaysAllow]", "is not of type 'string'"),
    ("templates/autoscaling.yaml", "apiVersion: autoscaling/v2", "apiVersion: autoscaling/v3",
     "no schema"),
    ("templates/raycluster.yaml", '{{ $key }}: {{ toString $value | quote }}\n      {{- end }}\n'
     '    template:', '{{ $key }}: {{ toString $value }}\n      {{- end }}\n    template:',
     "is not of type 'string'"),
    ("templates/raycluster.yaml", "enableInTreeAutoscaling: true",
     "enableInTreeAutoscalling: true", "'enableInTreeAutoscalling' was unexpected"),
    ("templates/monitoring.yaml", "podMetricsEndpoints:", "podMetricEndpoints:",
     "'podMetricEndpoints' was unexpected"),
    ("templates/monitoring.yaml", "      scrapeTimeout: 10s\n{{- end }}",
     "      scrapeTimeout: 10 seconds\n{{- end }}", "does not match"),
    ("templates/raycluster.yaml", "              - name: ray-logs\n                mountPath:",
     "              - nam: ray-logs\n                mountPath:", "'nam' was unexpected"),
])
def test_a_broken_template_fails_validation(tools: Path, helm_home: Path, chart_copy: Path,
                                            file: str, old: str, new: str,
                                            expected: str) -> None:
    edit(chart_copy / file, old, new)
    docs = render_docs(tools, helm_home, chart=chart_copy, values=VARIANTS["full"])
    problems = validate(tools, [("broken", d) for d in docs], versions=K8S_VERSIONS[:1])
    assert any(expected in p for p in problems["problems"]), problems["problems"]


def test_a_broken_template_fails_helm_lint(tools: Path, helm_home: Path,
                                           chart_copy: Path) -> None:
    edit(chart_copy / "templates" / "workers.yaml", "{{- end }}\n", "")
    result = helm(tools, "lint", chart_copy, "--strict", home=helm_home)
    assert result.returncode != 0 and "1 chart(s) failed" in result.stdout + result.stderr
    assert "workers.yaml" in result.stdout


def test_an_insecure_chart_fails_checkov(tools: Path, helm_home: Path, chart_copy: Path,
                                         tmp_path: Path) -> None:
    edit(chart_copy / "templates" / "_helpers.tpl", "allowPrivilegeEscalation: false",
         "allowPrivilegeEscalation: true")
    edit(chart_copy / "templates" / "_helpers.tpl", "readOnlyRootFilesystem: true",
         "readOnlyRootFilesystem: false")
    result = template(tools, helm_home, chart=chart_copy)
    assert result.returncode == 0, result.stderr
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.yaml").write_text(result.stdout)
    (tmp_path / "out").mkdir()
    report = checkov(tools, tmp_path / "out", tmp_path / "in")["kubernetes"]
    failed = {c["check_id"] for c in report["results"]["failed_checks"]}
    assert {"CKV_K8S_20", "CKV_K8S_22"} <= failed, failed


def test_a_broken_rule_fails_promql(tools: Path) -> None:
    assert promql_errors(tools, ["sum(rate(x[5m])) by", "max(up)"])[0] != ""
    assert promql_errors(tools, ["max(up)"]) == [""]


# --- docs ----------------------------------------------------------------------------------------

def test_the_docs_cover_what_an_operator_needs() -> None:
    text = DEPLOY.read_text()
    for needle in ("helm install", "--create-namespace", "existingSecret", "KubeRay",
                   "RayCluster", "num-cpus", "kube-prometheus-stack", "ServiceMonitor",
                   "PrometheusRule", "prometheus-adapter", "KEDA", "external.metrics.k8s.io",
                   "1.30", "preStop", "unhealthyPodEvictionPolicy", "ray_executor_worker_ready",
                   "ray_executor_route_pending_jobs", "maxReplicas", "checksum/config",
                   "pre-install", "NodeLocal DNSCache", "6380", "10001", "kustomize",
                   "RAY_EXECUTOR_ROUTES_FILE", "RAY_EXECUTOR_ROUTE", "RAY_EXECUTOR_TOOLS_BIN"):
        assert needle in text, f"docs/deploy.md does not mention {needle}"
    for path in re.findall(r"`((?:docker|compose|k8s|tests)/[\w./-]+)`", text):
        assert (ROOT / path).exists(), path
