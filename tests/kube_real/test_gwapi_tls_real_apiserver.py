"""Gateway API TLS against a real kube-apiserver (issue 18, h24): with minimal CRDs of the
Gateway API's Gateway, GatewayClass, ReferenceGrant and TLSRoute installed (its own YAML is
not vendored; these keep its group, versions and status subresources), `meshline serve
--kubernetes` finds TLSRoute by discovery and watches it, reads the TLS Secrets of every
namespace, and its leader writes:
- the TLSRoute's `status.parents` through `tlsroutes/status` (controllerName
  meshline.io/gateway-controller, Accepted and ResolvedRefs);
- the Gateway's listener status: a certificateRef to another namespace's Secret resolved under
  a ReferenceGrant, one without a grant `ResolvedRefs=False/RefNotPermitted`, the TLS
  Passthrough listener with its TLSRoute attached (`supportedKinds` TLSRoute)."""

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
from tests.e2e.test_gateway_e2e import issue, make_ca
from tests.kube.objects import service
from tests.kube_real.cluster import ROOT, RealKube, eventually
from tests.kube_real.test_gatewayapi_real_apiserver import crd

pytestmark = [pytest.mark.kube, pytest.mark.e2e, pytest.mark.timeout(240)]
NS, CERTS, VAULT = "gwtls-real", "gwtls-certs", "gwtls-vault"
SYSTEM = "meshline-system"
V1 = "gateway.networking.k8s.io/v1"


def tls_secret(name: str, ns: str, host: str, ca: Any) -> dict[str, Any]:
    pem = issue(ca, host, client=False)
    return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": name, "namespace": ns}, "stringData": {"tls.crt": pem.cert, "tls.key": pem.key}}


@pytest.fixture(scope="module")
def meshline(real_kube: RealKube) -> Iterator[RealKube]:
    kube = real_kube
    kube.kubectl_apply(crd("TLSRoute", "tlsroutes", ["v1alpha2"], True),
                       crd("ReferenceGrant", "referencegrants", ["v1beta1"], False),
                       crd("Gateway", "gateways", ["v1", "v1beta1"], True),
                       crd("GatewayClass", "gatewayclasses", ["v1", "v1beta1"], True, scope="Cluster"))
    for name in ("tlsroutes", "referencegrants", "gateways", "gatewayclasses"):
        kube.kubectl("wait", "--for=condition=Established", f"crd/{name}.gateway.networking.k8s.io", "--timeout=60s")
    for ns in (SYSTEM, NS, CERTS, VAULT):
        kube.namespace(ns)
    with tempfile.TemporaryDirectory(prefix="meshline-gwtls-real-") as d:
        status = free_port()
        log = open(Path(d) / "serve.log", "ab")
        p = subprocess.Popen(
            [sys.executable, "-m", "controlplane.cli", "serve", "--kubernetes", "--kubeconfig", str(kube.kubeconfig),
             "--xds-address", f"127.0.0.1:{free_port()}", "--status-address", f"127.0.0.1:{status}",
             "--leader-lease-seconds", "3", "--ca-address", "off"],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
            env={**os.environ, "POD_NAME": "gwtls-1", "POD_NAMESPACE": SYSTEM})
        try:
            wait_http(f"http://127.0.0.1:{status}/readyz", proc=p, timeout=60)
            yield kube
        finally:
            stop(p)
            print("--- serve.log (last lines)\n" + "\n".join(
                (Path(d) / "serve.log").read_text(errors="replace").splitlines()[-20:]))


def test_tlsroute_and_cross_namespace_certificate_status(meshline: RealKube) -> None:
    kube = meshline
    ca = make_ca("gwtls-real-ca")
    kube.kubectl_apply(service("vault", NS, 8443), tls_secret("partner-cert", CERTS, "partner.example.com", ca),
                       tls_secret("vault-cert", VAULT, "vault.example.com", ca))
    kube.apply({"apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant",
                "metadata": {"name": "edge-gateways", "namespace": CERTS},
                "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "namespace": NS}],
                         "to": [{"group": "", "kind": "Secret", "name": "partner-cert"}]}})
    kube.apply({"apiVersion": V1, "kind": "GatewayClass", "metadata": {"name": "meshline"},
                "spec": {"controllerName": "meshline.io/gateway-controller"}})
    kube.apply({"apiVersion": V1, "kind": "Gateway", "metadata": {"name": "edge", "namespace": NS},
                "spec": {"gatewayClassName": "meshline", "listeners": [
                    {"name": "granted", "port": 8443, "protocol": "HTTPS", "hostname": "partner.example.com",
                     "tls": {"certificateRefs": [{"name": "partner-cert", "namespace": CERTS}]}},
                    {"name": "refused", "port": 8444, "protocol": "HTTPS", "hostname": "vault.example.com",
                     "tls": {"certificateRefs": [{"name": "vault-cert", "namespace": VAULT}]}},
                    {"name": "tls", "port": 9443, "protocol": "TLS", "hostname": "*.db.example.com",
                     "tls": {"mode": "Passthrough"}}]}})
    kube.apply({"apiVersion": "gateway.networking.k8s.io/v1alpha2", "kind": "TLSRoute",
                "metadata": {"name": "pg", "namespace": NS},
                "spec": {"parentRefs": [{"name": "edge", "sectionName": "tls"}], "hostnames": ["pg.db.example.com"],
                         "rules": [{"backendRefs": [{"name": "vault", "port": 8443}]}]}})

    def route_entry() -> dict[str, Any] | None:
        obj = kube.get("gateway.networking.k8s.io/v1alpha2", "TLSRoute", "pg", NS)
        return next((p for p in ((obj or {}).get("status") or {}).get("parents") or []
                     if p.get("controllerName") == "meshline.io/gateway-controller"), None)

    entry = eventually(route_entry)
    assert entry["parentRef"] == {"name": "edge", "sectionName": "tls"}
    assert {c["type"]: (c["status"], c["reason"]) for c in entry["conditions"]} == {
        "Accepted": ("True", "Accepted"), "ResolvedRefs": ("True", "ResolvedRefs")}

    def listeners() -> dict[str, Any] | None:
        st = (kube.get(V1, "Gateway", "edge", NS) or {}).get("status") or {}
        by_name = {ls["name"]: ls for ls in st.get("listeners") or []}
        return by_name if by_name.get("tls", {}).get("attachedRoutes") == 1 else None

    by_name = eventually(listeners)
    conds = {n: {c["type"]: (c["status"], c["reason"]) for c in ls["conditions"]} for n, ls in by_name.items()}
    assert conds["granted"]["ResolvedRefs"] == ("True", "ResolvedRefs")
    assert conds["refused"]["ResolvedRefs"] == ("False", "RefNotPermitted")
    assert conds["refused"]["Programmed"] == ("False", "Invalid")
    assert [k["kind"] for k in by_name["tls"]["supportedKinds"]] == ["TLSRoute"]
