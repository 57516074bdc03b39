"""Hatch build hook: generate the protobuf and gRPC modules from ``protos/`` at build time.

The generated packages (``ray_executor.v1``; ``fleet.ray_executor.v1``, upstream's newest
generation) are never committed. A wheel carries each at its top level; an editable install
finds them in ``build/generated`` (see ``dev-mode-dirs``).
"""

from __future__ import annotations

import pathlib

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class ProtobufBuildHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict) -> None:
        if self.target_name != "wheel":
            return
        root = pathlib.Path(self.root)
        protos = root / "protos"
        out = root / "build" / "generated"
        out.mkdir(parents=True, exist_ok=True)
        sources = sorted(str(p.relative_to(protos)) for p in protos.rglob("*.proto"))

        import grpc_tools
        from grpc_tools import protoc

        well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
        args = [
            "protoc",
            f"-I{protos}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *sources,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed for {sources}")
        # Every folder of the generated tree is a regular package (protoc writes none).
        for folder in [p for p in out.rglob("*") if p.is_dir()]:
            (folder / "__init__.py").touch()
        if version != "editable":
            # One top-level package per proto root folder (ray_executor/, fleet/).
            for package in sorted({pathlib.Path(source).parts[0] for source in sources}):
                build_data["force_include"][str(out / package)] = package
