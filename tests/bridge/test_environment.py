"""The environments: the bridge's has no Ray and imports every ingress, core and harness
module; for each cluster version (``tests.clusters``), the cluster's (what the Ray image holds)
is Ray's own packages plus the cluster extra and imports every cluster module, and the
workers' is that cluster's Python and Ray; generated code comes from a wheel."""

from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import bridge
import core
import harness
from tests.clusters import VERSIONS, ClusterVersion

ROOT = Path(__file__).resolve().parents[2]


def test_ray_is_not_installed_here() -> None:
    with pytest.raises(ImportError):
        importlib.import_module("ray")


def test_every_bridge_core_and_harness_module_imports_without_ray() -> None:
    names = [m.name for package in (bridge, core, harness)
             for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    assert {"bridge.grpc_server", "core.settings", "core.store", "harness.up"} <= set(names)
    for name in names:
        importlib.import_module(name)
    assert "ray" not in sys.modules


def freeze(version: ClusterVersion, name: str) -> dict:
    lines = (Path(version.cluster_python()).parents[1] / name).read_text().split()
    return dict(line.split("==", 1) for line in lines if "==" in line)


each_version = pytest.mark.parametrize("version", VERSIONS, ids=str)


@each_version
def test_the_cluster_extra_leaves_rays_packages_as_ray_installed_them(
        version: ClusterVersion) -> None:
    ray_only = freeze(version, "ray-freeze.txt")
    with_extra = freeze(version, "cluster-freeze.txt")
    assert {"ray", "grpcio", "protobuf"} <= set(ray_only)
    assert ray_only["ray"] == version.ray
    assert {name: with_extra.get(name) for name in ray_only} == ray_only, \
        "installing the cluster extra changed a package Ray installed"
    added = {name.lower().replace("_", "-") for name in set(with_extra) - set(ray_only)}
    assert {"aiohttp", "opentelemetry-api"} <= added
    assert not added & {"dramatiq", "redis", "nats-py", "hiredis", "grpcio-health-checking",
                        "dramatiq-dashboard", "prometheus-client"}, added


@each_version
def test_every_cluster_module_imports_in_the_cluster_environment(
        version: ClusterVersion) -> None:
    """The modules Ray unpickles on the cluster import with Ray and the cluster extra alone,
    and load no Dramatiq, Redis, NATS or worker code doing it."""
    code = (
        "import importlib, pkgutil, sys, cluster\n"
        "names = [m.name for m in pkgutil.walk_packages(cluster.__path__, 'cluster.')]\n"
        "for name in names: importlib.import_module(name)\n"
        "from cluster.runner import _classified\n"
        "assert type(_classified(ValueError('x'))).__name__ == 'JobError'\n"
        "loaded = {m.split('.')[0] for m in sys.modules}\n"
        "print(sorted(names))\n"
        "print(sorted(loaded & {'dramatiq', 'redis', 'nats', 'actors', 'bridge', 'grpc_health',"
        " 'dramatiq_dashboard', 'prometheus_client'}))\n"
        "import ray; print(ray.__version__, sys.version_info[:2])\n"
    )
    out = subprocess.run([version.cluster_python(), "-c", code], check=True,
                         capture_output=True, text=True, cwd=ROOT).stdout.splitlines()
    assert "cluster.runner" in out[0] and "cluster.vllm" in out[0]
    assert out[1] == "[]", f"cluster code loaded {out[1]}"
    assert out[2] == f"{version.ray} {version.python}"


@each_version
def test_the_worker_environment_is_its_clusters_python_and_ray(version: ClusterVersion) -> None:
    """Ray client connects only when the worker runs its cluster's Python minor and Ray, so
    each cluster version's worker environment is built on that Python with that Ray, and runs
    the worker's code there (Dramatiq included: core.dramatiq_internals checks its release)."""
    code = ("import sys, ray, actors.worker, core.dramatiq_internals\n"
            "print(ray.__version__, tuple(sys.version_info[:2]))\n")
    out = subprocess.run([version.worker_python(), "-c", code], check=True, capture_output=True,
                         text=True, cwd=ROOT).stdout.splitlines()
    assert out[-1] == f"{version.ray} {version.python}"


def test_generated_protobuf_imports_from_an_installed_wheel(tmp_path: Path) -> None:
    """Build a real (non-editable) wheel, install it alone and import the gRPC modules."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(wheels),
         str(ROOT)],
        check=True,
    )
    (wheel,) = wheels.glob("ray_executor-*.whl")
    target = tmp_path / "installed"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target",
         str(target), str(wheel)],
        check=True,
    )
    # -S: no site processing, so neither the editable .pth nor build/generated is on the path;
    # grpcio and protobuf come from this environment's site-packages, the package from the wheel.
    code = (
        "from ray_executor.v1 import ray_executor_pb2 as pb, ray_executor_pb2_grpc as rpc;"
        "import core.contract;"
        "r = pb.ExecuteDeliberationRequest(task_id='t', agents=[pb.Agent(id='a')]);"
        "assert pb.ExecuteDeliberationRequest.FromString(r.SerializeToString()) == r;"
        "assert rpc.RayExecutorServiceStub;"
        "from fleet.ray_executor.v1 import ray_executor_pb2 as fleet;"
        "from fleet.ray_executor.v1 import ray_executor_pb2_grpc as frpc;"
        "c = fleet.BacklogReviewTaskConstraints(story_id='s', timeout_seconds=2);"
        "assert fleet.BacklogReviewTaskConstraints.FromString(c.SerializeToString()) == c;"
        "assert frpc.RayExecutorServiceStub;"
        "print(pb.__file__); print(fleet.__file__)"
    )
    env = dict(os.environ, PYTHONPATH=f"{target}{os.pathsep}{sysconfig.get_paths()['purelib']}")
    out = subprocess.run([sys.executable, "-S", "-c", code], env=env, check=True,
                         capture_output=True, text=True).stdout
    assert all(line.startswith(str(target)) for line in out.splitlines()), out
    assert not list(target.glob("**/*.proto")), "the wheel ships code, not sources"
