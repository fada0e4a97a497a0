"""Benchmark mesh on disk: the same objects as `tests/meshgen.generated_mesh(S, E)` (one
Namespace, S Services with one HTTP port 8080, one EndpointSlice of E ready endpoints
each), but written one object per file so one service's EndpointSlice can be rewritten
on its own. Does file I/O (writes into the directory it is given)."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

NAMESPACE = "bench"
PORT = 8080


def service_name(s: int) -> str:
    return f"svc-{s:05d}"


def hostname(s: int, namespace: str = NAMESPACE) -> str:
    return f"{service_name(s)}.{namespace}.svc.cluster.local"


def default_addresses(s: int, endpoints: int) -> list[str]:
    """The addresses `generated_mesh` gives service `s` (10.x, never dialled)."""
    return [f"10.{(s >> 8) & 255}.{s & 255}.{e + 1}" for e in range(endpoints)]


def service_yaml(s: int, namespace: str = NAMESPACE, port: int = PORT) -> str:
    name = service_name(s)
    return yaml.safe_dump({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
        "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": port, "targetPort": port}]},
    })


def endpoint_slice_yaml(s: int, addresses: list[str], namespace: str = NAMESPACE, port: int = PORT) -> str:
    name = service_name(s)
    return yaml.safe_dump({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"{name}-1", "namespace": namespace, "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": port}],
        "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addresses],
    })


def endpoint_slice_path(root: Path, s: int) -> Path:
    return root / f"{service_name(s)}-endpoints.yaml"


def write_mesh(root: Path, services: int, endpoints: int) -> None:
    """Write the whole mesh under `root` (which must exist)."""
    (root / "namespace.yaml").write_text(
        yaml.safe_dump({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}))
    for s in range(services):
        (root / f"{service_name(s)}.yaml").write_text(service_yaml(s))
        endpoint_slice_path(root, s).write_text(endpoint_slice_yaml(s, default_addresses(s, endpoints)))


def rewrite_atomic(path: Path, text: str) -> None:
    """Replace `path` in one step: write a sibling temp file (a suffix the directory source
    ignores), then rename it over the target."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
    os.replace(tmp, path)
