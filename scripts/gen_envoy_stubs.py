"""Typed stubs (.pyi) for the Envoy API modules Meshline imports, for `mypy --strict`.

`xds-protos` ships generated `_pb2.py` modules without stubs, so mypy saw every Envoy
message as `Any`. This script imports the `envoy`/`xds`/`udpa`/`validate` modules that
`controlplane/` and `webhook/` import, takes their file descriptors (embedded in the
modules) and those of every file they depend on, and has `mypy-protobuf`'s protoc plugin
(`protoc-gen-mypy`) write stubs for them into `build/stubs/` (ignored by git; `mypy_path`
in pyproject.toml). `google.protobuf`'s own stubs come from `types-protobuf`.
Does file and process I/O. Usage: python scripts/gen_envoy_stubs.py [OUT_DIR]
"""

from __future__ import annotations

import ast
import importlib
import shutil
import subprocess
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2
from google.protobuf.compiler import plugin_pb2
from google.protobuf.descriptor import FileDescriptor

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "controlplane", ROOT / "webhook"]
PACKAGES = ("envoy", "xds", "udpa", "validate")


def imported_modules() -> set[str]:
    """The `<package>...._pb2` modules the project's sources import."""
    found: set[str] = set()
    for root in SOURCES:
        for path in root.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                    for alias in node.names:
                        name = f"{node.module}.{alias.name}"
                        found.add(name if alias.name.endswith("_pb2") else node.module)
                elif isinstance(node, ast.Import):
                    found.update(a.name for a in node.names if a.name.split(".")[0] in PACKAGES)
    return {m for m in found if m.endswith("_pb2")}


def closure(modules: set[str]) -> list[FileDescriptor]:
    """The modules' file descriptors and all they depend on, dependencies first."""
    order: list[FileDescriptor] = []
    seen: set[str] = set()

    def visit(fd: FileDescriptor) -> None:
        if fd.name in seen:
            return
        seen.add(fd.name)
        for dep in fd.dependencies:
            visit(dep)
        order.append(fd)

    for name in sorted(modules):
        visit(importlib.import_module(name).DESCRIPTOR)
    return order


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else ROOT / "build" / "stubs"
    plugin = shutil.which("protoc-gen-mypy", path=str(Path(sys.executable).parent)) or shutil.which("protoc-gen-mypy")
    if plugin is None:
        print("gen_envoy_stubs: protoc-gen-mypy not found (pip install mypy-protobuf)", file=sys.stderr)
        return 1
    files = closure(imported_modules())
    req = plugin_pb2.CodeGeneratorRequest()
    for fd in files:
        proto = descriptor_pb2.FileDescriptorProto()
        fd.CopyToProto(proto)
        req.proto_file.append(proto)
        if not fd.name.startswith("google/protobuf/"):  # types-protobuf has those
            req.file_to_generate.append(fd.name)
    proc = subprocess.run([plugin], input=req.SerializeToString(), capture_output=True, check=False)
    if proc.returncode != 0:
        print(proc.stderr.decode(errors="replace"), file=sys.stderr)
        return 1
    resp = plugin_pb2.CodeGeneratorResponse.FromString(proc.stdout)
    if resp.error:
        print(f"gen_envoy_stubs: {resp.error}", file=sys.stderr)
        return 1
    if out.exists():
        shutil.rmtree(out)
    for f in resp.file:
        path = out / f.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f.content)
    print(f"gen_envoy_stubs: {len(resp.file)} stubs for {len(req.file_to_generate)} Envoy API files in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
