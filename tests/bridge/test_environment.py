"""The bridge environment: no Ray, every bridge module imports, generated code from a wheel."""

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

ROOT = Path(__file__).resolve().parents[2]


def test_ray_is_not_installed_here() -> None:
    with pytest.raises(ImportError):
        importlib.import_module("ray")


def test_every_bridge_module_imports_without_ray() -> None:
    names = [m.name for m in pkgutil.walk_packages(bridge.__path__, "bridge.")]
    assert "bridge.settings" in names and "bridge.contract" in names
    for name in names:
        importlib.import_module(name)
    assert "ray" not in sys.modules


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
        "import bridge.contract;"
        "r = pb.ExecuteDeliberationRequest(task_id='t', agents=[pb.Agent(id='a')]);"
        "assert pb.ExecuteDeliberationRequest.FromString(r.SerializeToString()) == r;"
        "assert rpc.RayExecutorServiceStub;"
        "print(pb.__file__)"
    )
    env = dict(os.environ, PYTHONPATH=f"{target}{os.pathsep}{sysconfig.get_paths()['purelib']}")
    out = subprocess.run([sys.executable, "-S", "-c", code], env=env, check=True,
                         capture_output=True, text=True).stdout
    assert out.strip().startswith(str(target))
    assert not list(target.glob("ray*/**/*.proto")), "the wheel ships code, not sources"
