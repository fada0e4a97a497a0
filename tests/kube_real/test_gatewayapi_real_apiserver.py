"""Gateway API route status against a real kube-apiserver: with HTTPRoute and ReferenceGrant
CRDs installed (minimal ones: the Gateway API's own YAML is not vendored; these keep its
group, versions and status subresource), `meshline serve --kubernetes` finds the kinds by
discovery, applies an HTTPRoute attached to a Service, and its leader writes
`status.parents` through the status subresource: Meshline's entry (controllerName
meshline.io/mesh-controller, Accepted, ResolvedRefs, observedGeneration following the
spec) next to another controller's entry, which it keeps; for a Gateway of class meshline,
the Gateway's conditions and listeners and the GatewayClass's Accepted condition."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.localrun import free_port, stop, wait_http
from tests.kube.objects import service
from tests.kube_real.cluster import ROOT, RealKube, eventually

pytestmark = [pytest.mark.kube, pytest.mark.e2e, pytest.mark.timeout(240)]
NS = "gamma-real"
SYSTEM = "meshline-system"
ROUTE = "gateway.networking.k8s.io/v1"
APPROVAL = {"api-approved.kubernetes.io": "https://github.com/kubernetes-sigs/gateway-api/pull/1538"}


def crd(kind: str, plural: str, versions: list[str], status: bool, scope: str = "Namespaced") -> dict[str, Any]:
    schema = {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.gateway.networking.k8s.io", "annotations": APPROVAL},
            "spec": {"group": "gateway.networking.k8s.io", "scope": scope,
                     "names": {"kind": kind, "plural": plural, "singular": kind.lower(), "listKind": f"{kind}List"},
                     "versions": [{"name": v, "served": True, "storage": i == 0, "schema": schema,
                                   **({"subresources": {"status": {}}} if status else {})}
                                  for i, v in enumerate(versions)]}}


@pytest.fixture(scope="module")
def meshline(real_kube: RealKube) -> Iterator[RealKube]:
    kube = real_kube
    kube.kubectl_apply(crd("HTTPRoute", "httproutes", ["v1", "v1beta1"], True),
                       crd("ReferenceGrant", "referencegrants", ["v1beta1"], False),
                       crd("Gateway", "gateways", ["v1", "v1beta1"], True),
                       crd("GatewayClass", "gatewayclasses", ["v1", "v1beta1"], True, scope="Cluster"))
    for name in ("httproutes", "referencegrants", "gateways", "gatewayclasses"):
        kube.kubectl("wait", "--for=condition=Established", f"crd/{name}.gateway.networking.k8s.io", "--timeout=60s")
    kube.namespace(SYSTEM)
    kube.namespace(NS)
    with tempfile.TemporaryDirectory(prefix="meshline-gamma-real-") as d:
        status = free_port()
        log = open(Path(d) / "serve.log", "ab")
        p = subprocess.Popen(
            [sys.executable, "-m", "controlplane.cli", "serve", "--kubernetes", "--kubeconfig", str(kube.kubeconfig),
             "--xds-address", f"127.0.0.1:{free_port()}", "--status-address", f"127.0.0.1:{status}",
             "--leader-lease-seconds", "3", "--ca-address", "off"],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
            env={**os.environ, "POD_NAME": "gamma-1", "POD_NAMESPACE": SYSTEM})
        try:
            wait_http(f"http://127.0.0.1:{status}/readyz", proc=p, timeout=60)
            yield kube
        finally:
            stop(p)
            print("--- serve.log (last lines)\n" + "\n".join(
                (Path(d) / "serve.log").read_text(errors="replace").splitlines()[-20:]))


def _ours(kube: RealKube, name: str) -> dict[str, Any] | None:
    obj = kube.get(ROUTE, "HTTPRoute", name, NS)
    for p in ((obj or {}).get("status") or {}).get("parents") or []:
        if p.get("controllerName") == "meshline.io/mesh-controller":
            return dict(p)
    return None


def _conds(entry: dict[str, Any]) -> dict[str, tuple[str, str, int]]:
    return {c["type"]: (c["status"], c["reason"], c.get("observedGeneration")) for c in entry["conditions"]}


def test_route_status_is_written_through_the_status_subresource(meshline: RealKube) -> None:
    kube = meshline
    kube.kubectl_apply(service("reviews", NS, 9080), service("reviews-v1", NS, 9080))
    route = {"apiVersion": ROUTE, "kind": "HTTPRoute", "metadata": {"name": "split", "namespace": NS},
             "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "reviews", "port": 9080}],
                      "rules": [{"backendRefs": [{"name": "reviews-v1", "port": 9080, "weight": 90},
                                                 {"name": "reviews-v9", "port": 9080, "weight": 10}]}]}}
    kube.apply(route)
    entry = eventually(lambda: _ours(kube, "split"))
    assert entry["parentRef"] == {"group": "", "kind": "Service", "name": "reviews", "port": 9080}
    assert _conds(entry) == {"Accepted": ("True", "Accepted", 1), "ResolvedRefs": ("False", "BackendNotFound", 1)}
    assert all(c.get("lastTransitionTime") for c in entry["conditions"])
    obj = kube.get(ROUTE, "HTTPRoute", "split", NS)
    assert obj is not None and obj["metadata"]["generation"] == 1  # a status write is not a spec change
    assert any(m.get("subresource") == "status" for m in obj["metadata"]["managedFields"])
    # Another controller's entry (say, an ingress that also serves this route) is kept.
    other = {"parentRef": {"name": "edge"}, "controllerName": "example.com/gateway",
             "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
                             "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1}]}
    kube.patch(ROUTE, "HTTPRoute", "split", {"status": {"parents": [other, entry]}}, NS, subresource="status")
    # Fixing the backend bumps the generation; the status follows it.
    route["spec"]["rules"][0]["backendRefs"][1]["name"] = "reviews-v1"
    kube.apply(route)
    fixed = eventually(lambda: (e := _ours(kube, "split")) is not None
                       and _conds(e)["ResolvedRefs"] == ("True", "ResolvedRefs", 2) and e)
    assert _conds(fixed)["Accepted"] == ("True", "Accepted", 2)
    parents = (kube.get(ROUTE, "HTTPRoute", "split", NS) or {})["status"]["parents"]
    assert [p["controllerName"] for p in parents] == ["example.com/gateway", "meshline.io/mesh-controller"]


def test_a_route_to_a_missing_service_is_not_accepted(meshline: RealKube) -> None:
    kube = meshline
    kube.apply({"apiVersion": ROUTE, "kind": "HTTPRoute", "metadata": {"name": "orphan", "namespace": NS},
                "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "nope"}],
                         "rules": [{"backendRefs": [{"name": "reviews-v1", "port": 9080}]}]}})
    entry = eventually(lambda: _ours(kube, "orphan"))
    assert _conds(entry)["Accepted"] == ("False", "NoMatchingParent", 1)


def test_gateway_and_gateway_class_status(meshline: RealKube) -> None:
    kube = meshline
    kube.apply({"apiVersion": ROUTE, "kind": "GatewayClass", "metadata": {"name": "meshline"},
                "spec": {"controllerName": "meshline.io/gateway-controller"}})
    kube.apply({"apiVersion": ROUTE, "kind": "Gateway", "metadata": {"name": "edge", "namespace": NS},
                "spec": {"gatewayClassName": "meshline", "listeners": [
                    {"name": "http", "port": 8080, "protocol": "HTTP"},
                    {"name": "udp", "port": 5353, "protocol": "UDP"}]}})
    kube.apply({"apiVersion": ROUTE, "kind": "HTTPRoute", "metadata": {"name": "edge-web", "namespace": NS},
                "spec": {"parentRefs": [{"name": "edge"}],
                         "rules": [{"backendRefs": [{"name": "reviews-v1", "port": 9080}]}]}})

    def cls() -> dict[str, Any] | None:
        obj = kube.get(ROUTE, "GatewayClass", "meshline")
        conds = ((obj or {}).get("status") or {}).get("conditions") or []
        return next((c for c in conds if c["type"] == "Accepted"), None)

    assert eventually(cls)["status"] == "True"

    def gateway() -> dict[str, Any] | None:
        obj = kube.get(ROUTE, "Gateway", "edge", NS)
        st = (obj or {}).get("status") or {}
        listeners = {ls["name"]: ls for ls in st.get("listeners") or []}
        return st if listeners.get("http", {}).get("attachedRoutes") == 1 else None

    st = eventually(gateway)
    assert {c["type"]: (c["status"], c["reason"]) for c in st["conditions"]} == {
        "Accepted": ("True", "ListenersNotValid"), "Programmed": ("True", "Programmed")}
    udp = next(ls for ls in st["listeners"] if ls["name"] == "udp")
    assert {c["type"]: c["reason"] for c in udp["conditions"]}["Accepted"] == "UnsupportedProtocol"
    parent = eventually(lambda: next((p for p in ((kube.get(ROUTE, "HTTPRoute", "edge-web", NS) or {}).get("status")
                                                  or {}).get("parents") or []
                                      if p["controllerName"] == "meshline.io/gateway-controller"), None))
    assert _conds(parent)["Accepted"] == ("True", "Accepted", 1)
