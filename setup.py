"""Build hook: compiles the project's own .proto files (protos/) with grpcio-tools into
Python modules before setuptools collects the packages, for wheels and editable installs
alike. Everything else about the package is declared in pyproject.toml."""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# proto directory -> the Python package directory its modules are generated into
PROTO_PACKAGES = {
    Path("protos/meshline/ca/v1"): Path("controlplane/ca/gen"),
    Path("protos/meshline/nodeagent/v1"): Path("controlplane/nodeagent/gen"),
}


def compile_protos() -> None:
    import importlib.resources

    from grpc_tools import protoc

    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    for proto_dir, package_dir in PROTO_PACKAGES.items():
        for proto in sorted((ROOT / proto_dir).glob("*.proto")):
            # The virtual include path makes protoc name the modules after the target package,
            # so the generated _grpc module imports `controlplane.ca.gen.ca_pb2`.
            args = [
                "grpc_tools.protoc",
                f"-I{package_dir.as_posix()}={(ROOT / proto_dir).as_posix()}",
                f"-I{well_known}",
                f"--python_out={ROOT}",
                f"--pyi_out={ROOT}",
                f"--grpc_python_out={ROOT}",
                str(proto),
            ]
            if protoc.main(args) != 0:
                raise SystemExit(f"protoc failed on {proto.relative_to(ROOT)}")


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        compile_protos()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
