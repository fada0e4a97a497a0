"""Every kind Meshline does not translate in Istio's groups, the Gateway API's and SIG-Network's
experimental `*.x-k8s.io` groups gets a warning naming it, in directory mode (`meshline
analyze`, the store's issues) and in Kubernetes mode (API discovery watches those groups and
reports each object), issue 16. Kubernetes mode runs against kmock."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.model.convert import REPORTED_API_GROUPS, convert, is_mesh_group
from controlplane.model.raw import RawObject
from controlplane.sources.kube_informer import MESH_GROUPS, Resource, discover, plan_resources
from tests.kube import KubeEnv
from tests.kube.emulator import create_custom as create
from tests.kube.emulator import emulator_serving
from tests.test_kubernetes_source_kmock import running, settled

ROOT = Path(__file__).resolve().parent.parent

# (kind, apiVersion): SIG-Network's experimental kinds, the Gateway API's first (v1alpha1) group
# whose kind names collide with translated kinds (Gateway, HTTPRoute), the Inference Extension,
# and Istio kinds Meshline has never heard of.
UNSUPPORTED = [
    ("XListenerSet", "gateway.networking.x-k8s.io/v1alpha1"),
    ("XBackendTrafficPolicy", "gateway.networking.x-k8s.io/v1alpha1"),
    ("XMesh", "gateway.networking.x-k8s.io/v1alpha1"),
    ("Gateway", "networking.x-k8s.io/v1alpha1"),
    ("HTTPRoute", "networking.x-k8s.io/v1alpha1"),
    ("InferencePool", "inference.networking.x-k8s.io/v1alpha2"),
    ("WasmPlugin", "extensions.istio.io/v1alpha1"),
    ("FutureThing", "networking.istio.io/v1"),
    ("FutureThing", "security.istio.io/v1"),
]


def raw(kind: str, api: str) -> RawObject:
    return RawObject(kind=kind, api_version=api, namespace="default", name="x",
                     body={"apiVersion": api, "kind": kind, "metadata": {"name": "x", "namespace": "default"},
                           "spec": {}})


@pytest.mark.parametrize(("kind", "api"), UNSUPPORTED)
def test_each_unsupported_kind_is_a_warning_naming_it(kind: str, api: str) -> None:
    value, issues = convert(raw(kind, api))
    assert value is None
    assert [(i.severity, i.field) for i in issues] == [("warning", "kind")]
    assert issues[0].message.startswith(f"{kind} ({api}) is not supported by Meshline and is ignored: ")


def test_every_reported_group_counts_as_mesh_configuration() -> None:
    assert all(is_mesh_group(g) for g in REPORTED_API_GROUPS)
    assert {"gateway.networking.x-k8s.io", "networking.x-k8s.io", "inference.networking.x-k8s.io",
            "gateway.networking.k8s.io"} <= set(MESH_GROUPS)
    assert not is_mesh_group("apps") and not is_mesh_group("networking.k8s.io")


def test_analyze_names_each_kind_and_still_exits_0(tmp_path: Path) -> None:
    docs = [f"apiVersion: {api}\nkind: {kind}\nmetadata:\n  name: o{i}\n  namespace: default\nspec: {{}}\n"
            for i, (kind, api) in enumerate(UNSUPPORTED)]
    docs.append("apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: d\n  namespace: default\nspec: {}\n")
    path = tmp_path / "kinds.yaml"
    path.write_text("---\n".join(docs))
    r = subprocess.run([sys.executable, "-m", "controlplane.cli", "analyze", str(path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    for i, (kind, api) in enumerate(UNSUPPORTED):
        assert any(f"{kind}/default/o{i}:" in ln and f"{kind} ({api}) is not supported" in ln for ln in lines), lines
    assert not any("Deployment" in ln for ln in lines)


# --------------------------------------------------------------------------- Kubernetes mode

SERVED = (
    Resource("XListenerSet", "gateway.networking.x-k8s.io", "v1alpha1", "xlistenersets"),
    Resource("XBackendTrafficPolicy", "gateway.networking.x-k8s.io", "v1alpha1", "xbackendtrafficpolicies"),
    Resource("HTTPRoute", "networking.x-k8s.io", "v1alpha1", "httproutes"),
    Resource("InferencePool", "inference.networking.x-k8s.io", "v1alpha2", "inferencepools"),
)


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[KubeEnv]:
    with emulator_serving(tmp_path, SERVED) as env:
        yield env


def test_kubernetes_mode_discovers_and_reports_x_k8s_kinds(kube: KubeEnv) -> None:
    found = {(r.kind, r.group) for r in discover(kube.api)}
    assert {(r.kind, r.group) for r in SERVED} <= found
    _, _, unsupported = plan_resources(discover(kube.api), istio_api=None)
    assert {(r.kind, r.group) for r in SERVED} <= {(r.kind, r.group) for r in unsupported}
    for i, r in enumerate(SERVED):
        create(kube, r, f"obj{i}")

    async def scenario() -> None:
        async with running(kube) as (rec, src):
            await settled(rec, src, kube)
            by_object = {i.ref.display: i for i in rec.store.mesh().issues if i.field == "kind"}
            for i, r in enumerate(SERVED):
                issue = by_object.get(f"{r.kind}/default/obj{i}")
                assert issue is not None, (r, sorted(by_object))
                assert issue.severity == "warning"
                assert issue.message.startswith(f"{r.kind} ({r.group}/{r.version}) is not supported"), issue.message

    asyncio.run(scenario())
