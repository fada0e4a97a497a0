"""Unsupported kinds in Kubernetes mode against a real kube-apiserver: with the CRDs of
Istio's WasmPlugin and the Gateway API's UDPRoute installed, `kubectl apply` of such an
object produces a warning naming it (API discovery finds the kinds; nothing is configured)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.kube_real.cluster import RealKube
from tests.kube_real.test_source_real_apiserver import eventually, fresh_ns, running

pytestmark = [pytest.mark.kube, pytest.mark.timeout(180)]


def crd(group: str, kind: str, plural: str) -> dict[str, Any]:
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.{group}",
                         # *.k8s.io groups are protected: the Gateway API's CRDs carry this approval
                         "annotations": {"api-approved.kubernetes.io": "https://github.com/kubernetes-sigs/gateway-api/pull/1538"}
                         if group.endswith(".k8s.io") else {}},
            "spec": {"group": group, "scope": "Namespaced",
                     "names": {"kind": kind, "plural": plural, "singular": kind.lower(), "listKind": f"{kind}List"},
                     "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                         "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]}}


def test_kubectl_apply_of_wasmplugin_and_udproute_is_reported(real_kube: RealKube) -> None:
    real_kube.kubectl_apply(crd("extensions.istio.io", "WasmPlugin", "wasmplugins"),
                            crd("gateway.networking.k8s.io", "UDPRoute", "udproutes"))
    for name in ("wasmplugins.extensions.istio.io", "udproutes.gateway.networking.k8s.io"):
        real_kube.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
    ns = fresh_ns(real_kube, "unsupported")
    real_kube.kubectl_apply(
        {"apiVersion": "extensions.istio.io/v1", "kind": "WasmPlugin", "metadata": {"name": "mesh", "namespace": ns},
         "spec": {"url": "oci://example/plugin:1"}})

    async def scenario() -> None:
        async with running(real_kube) as (rec, _src):
            def warned(kind: str, name: str) -> bool:
                return any(i.ref.display == f"{kind}/{ns}/{name}" and i.severity == "warning"
                           and "not supported" in i.message for i in rec.store.mesh().issues)
            await eventually(lambda: warned("WasmPlugin", "mesh"), what="the WasmPlugin warning")
            real_kube.kubectl_apply(
                {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "UDPRoute",
                 "metadata": {"name": f"route-{int(time.time())}", "namespace": ns},
                 "spec": {"parentRefs": [{"name": "gw"}]}})
            await eventually(lambda: any(i.ref.kind == "UDPRoute" and i.ref.namespace == ns
                                         for i in rec.store.mesh().issues), what="the UDPRoute warning")

    asyncio.run(scenario())
