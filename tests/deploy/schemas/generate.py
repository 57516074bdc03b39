"""Write the vendored CRD schemas of KEDA and the Prometheus operator (run by hand, never by
the tests, which only read the JSON files it wrote).

Source: the typed models that the cloudcoil project generates from each operator's CRDs and
publishes on PyPI. Run it in a throwaway environment:

    python -m venv /tmp/crd && /tmp/crd/bin/pip install cloudcoil==0.6.0 \
        cloudcoil-models-keda==2.16.1.0 cloudcoil-models-prometheus-operator==0.80.1.0
    /tmp/crd/bin/python tests/deploy/schemas/generate.py

What it changes on the way: ``status`` is dropped (never written by us); every object that
lists its properties gets ``additionalProperties: false``, so a misspelt field fails as it
does under ``kubeconform -strict`` (the API server would prune it silently); ``null`` stays
allowed where the model allows it. KubeRay's RayCluster has no such package: its schema
(``ray.io/v1/raycluster.json``) is written by hand from the KubeRay API reference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cloudcoil.models.keda import v1alpha1 as keda
from cloudcoil.models.prometheus_operator import v1 as monitoring

HERE = Path(__file__).resolve().parent
MODELS = {
    "keda.sh/v1alpha1/scaledobject.json": keda.ScaledObject,
    "keda.sh/v1alpha1/triggerauthentication.json": keda.TriggerAuthentication,
    "monitoring.coreos.com/v1/servicemonitor.json": monitoring.ServiceMonitor,
    "monitoring.coreos.com/v1/podmonitor.json": monitoring.PodMonitor,
    "monitoring.coreos.com/v1/prometheusrule.json": monitoring.PrometheusRule,
}
SOURCES = {"keda.sh": "cloudcoil-models-keda==2.16.1.0",
           "monitoring.coreos.com": "cloudcoil-models-prometheus-operator==0.80.1.0"}


def strict(node: Any) -> Any:
    if isinstance(node, dict):
        node = {k: strict(v) for k, v in node.items() if k not in ("title", "default")}
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [strict(v) for v in node]
    return node


def main() -> None:
    for path, model in MODELS.items():
        schema = model.model_json_schema(by_alias=True, mode="validation")
        schema["properties"].pop("status", None)
        schema = strict(schema)
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["x-source"] = SOURCES[path.split("/")[0]] + f" ({model.__name__})"
        out = HERE / path
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
        print(out.relative_to(HERE), out.stat().st_size)


if __name__ == "__main__":
    main()
