"""The mesh API kinds of issue 18 (ServiceEntry, WorkloadEntry, Istio Gateway,
RequestAuthentication, Telemetry) from a real kube-apiserver: created with kubectl, as a user
would, they are accepted by `meshline serve --kubernetes`; each invalid one is refused with a
message naming the field, on the object itself (the leader's `Accepted` condition, written
through the status subresource) and in the status API; a ServiceEntry's host and endpoints
show as a service of the mesh, and deleting the entry removes them."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from controlplane.localrun import free_port, stop, wait_http
from tests.kube_real.cluster import ROOT, RealKube, eventually

pytestmark = [pytest.mark.kube, pytest.mark.e2e, pytest.mark.timeout(240)]
NS = "meshapi-real"
SYSTEM = "meshline-system"
NET, SEC, TEL = "networking.meshline.io/v1", "security.meshline.io/v1", "telemetry.meshline.io/v1"


def obj(api: str, kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": api, "kind": kind, "metadata": {"name": name, "namespace": NS}, "spec": spec}


HTTP_PORT = {"number": 80, "name": "http", "protocol": "HTTP"}
GOOD = [
    obj(NET, "ServiceEntry", "ext-good", {
        "hosts": ["api.example.com"], "addresses": ["240.0.0.10"], "location": "MESH_EXTERNAL",
        "resolution": "STATIC", "ports": [HTTP_PORT], "endpoints": [{"address": "198.18.0.99"}]}),
    obj(NET, "WorkloadEntry", "vm-good", {"address": "198.18.0.98", "labels": {"app": "vm"}}),
    obj(NET, "Gateway", "gw-good", {
        "selector": {"istio": "ingressgateway"},
        "servers": [{"port": {"number": 8080, "name": "http", "protocol": "HTTP"}, "hosts": ["*"]}]}),
    obj(SEC, "RequestAuthentication", "jwt-good", {
        "jwtRules": [{"issuer": "https://issuer.example", "jwksUri": "https://issuer.example/jwks"}]}),
    obj(TEL, "Telemetry", "logs-good", {"accessLogging": [{"providers": [{"name": "envoy"}]}]}),
]
# Each passes the CRD schema (the API server stores it) and fails Meshline's validation.
BAD = {
    ("ServiceEntry", "ext-bad"): (obj(NET, "ServiceEntry", "ext-bad", {
        "hosts": ["bad.example.com"], "location": "MESH_EXTERNAL", "resolution": "STATIC", "ports": [HTTP_PORT],
        "endpoints": [{"address": "not-an-ip"}]}), "spec.endpoints[0].address"),
    ("WorkloadEntry", "vm-bad"): (obj(NET, "WorkloadEntry", "vm-bad", {"address": "", "labels": {"app": "vm"}}),
                                  "spec.address"),
    ("Gateway", "gw-bad"): (obj(NET, "Gateway", "gw-bad", {
        "selector": {"istio": "ingressgateway"},
        "servers": [{"port": {"number": 8443, "name": "https", "protocol": "HTTPS"}, "hosts": ["*"],
                     "tls": {"mode": "SIMPLE"}}]}), "spec.servers[0].tls"),
    ("RequestAuthentication", "jwt-bad"): (obj(SEC, "RequestAuthentication", "jwt-bad", {
        "jwtRules": [{"issuer": "https://issuer.example", "jwksUri": "not a uri"}]}), "spec.jwtRules[0].jwksUri"),
}


class Serve:
    def __init__(self, kube: RealKube, work: Path) -> None:
        self.status = free_port()
        self.log = work / "serve.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "controlplane.cli", "serve", "--kubernetes", "--kubeconfig", str(kube.kubeconfig),
             "--xds-address", f"127.0.0.1:{free_port()}", "--status-address", f"127.0.0.1:{self.status}",
             "--webhook-address", f"127.0.0.1:{free_port()}", "--ca-address", "off", "--leader-lease-seconds", "3"],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
            env={**os.environ, "POD_NAME": "meshapi-1", "POD_NAMESPACE": SYSTEM})
        self.http = httpx.Client(timeout=5)
        wait_http(f"http://127.0.0.1:{self.status}/readyz", proc=self.proc, timeout=60)

    def get(self, path: str) -> Any:
        return self.http.get(f"http://127.0.0.1:{self.status}{path}").json()

    def close(self) -> None:
        self.http.close()
        stop(self.proc)


@pytest.fixture(scope="module")
def serve(real_kube: RealKube) -> Iterator[Serve]:
    real_kube.namespace(SYSTEM)
    real_kube.namespace(NS, {"meshline.io/dataplane-mode": "sidecar"})
    with tempfile.TemporaryDirectory(prefix="meshline-meshapi-") as d:
        s = Serve(real_kube, Path(d))
        try:
            yield s
        finally:
            s.close()
            print("--- serve.log (last lines)\n" + "\n".join(s.log.read_text(errors="replace").splitlines()[-15:]))


def accepted(kube: RealKube, api: str, kind: str, name: str) -> dict[str, Any] | None:
    o = kube.get(api, kind, name, NS)
    for c in ((o or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == "Accepted":
            return dict(c)
    return None


def test_mesh_api_kinds_applied_with_kubectl_are_accepted_or_refused_by_field(serve: Serve,
                                                                               real_kube: RealKube) -> None:
    real_kube.kubectl_apply(*GOOD, *(doc for doc, _ in BAD.values()))
    for doc in GOOD:
        c = eventually(lambda d=doc: accepted(real_kube, d["apiVersion"], d["kind"], d["metadata"]["name"]))
        assert c["status"] == "True", (doc["kind"], c)
        assert c["observedGeneration"] == 1
    for (kind, _name), (doc, field) in BAD.items():
        c = eventually(lambda d=doc: accepted(real_kube, d["apiVersion"], d["kind"], d["metadata"]["name"]))
        assert c["status"] == "False" and c["reason"] == "Invalid", (kind, c)
        assert field in c["message"], (kind, c["message"])
    errors = serve.get("/v1/config/errors?severity=error")
    reported = {(e["kind"], e["name"]): e["field"] for e in errors if e["namespace"] == NS}
    assert {k: f for k, (_, f) in BAD.items()}.items() <= {
        k: f for k, f in reported.items() if k in BAD}.items(), reported
    assert not any(k in reported for k in ((d["kind"], d["metadata"]["name"]) for d in GOOD))


def test_a_service_entry_from_the_api_server_is_a_service_of_the_mesh_until_deleted(serve: Serve,
                                                                                   real_kube: RealKube) -> None:
    real_kube.kubectl_apply(GOOD[0])

    def entry() -> dict[str, Any] | None:
        return next((s for s in serve.get(f"/v1/services?namespace={NS}") if s["hostname"] == "api.example.com"),
                    None)

    svc = eventually(entry)
    assert svc["cluster_ip"] == "240.0.0.10"
    assert [p["port"] for p in svc["ports"]] == [80]
    assert svc["endpoints"]["ready"] == 1
    real_kube.kubectl("-n", NS, "delete", "serviceentries.networking.meshline.io", "ext-good")
    eventually(lambda: entry() is None)
