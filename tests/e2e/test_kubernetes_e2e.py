"""Meshline in "cluster" mode against the kmock API emulator: two replicas of
`meshline serve --kubernetes`, a real Envoy fed by one of them. Objects created, changed
and deleted through the API reach Envoy's routing; exactly one replica (the leader)
writes CRD status; killing it hands leadership over within the lease duration."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import kmock
import pytest
import yaml
from kubernetes import client as k8s

from controlplane.localrun import free_port, start_envoy, stop, wait_http
from tests.e2e.conftest import ROOT, eventually
from tests.kube.emulator import KubeEnv, kube_emulator
from tests.kube.objects import endpoint_slice, namespace, pod, service

pytestmark = pytest.mark.e2e
PORT = 19480
NS = "kshop"
LEASE = 3.0


class Cluster:
    def __init__(self, kube: KubeEnv, work: Path) -> None:
        self.kube = kube
        self.work = work
        self.replicas: dict[str, tuple[subprocess.Popen[bytes], int, int]] = {}
        self.webhooks: dict[str, int] = {}
        self.envoy: subprocess.Popen[bytes] | None = None
        self.backend: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(timeout=5)

    def start_replica(self, name: str) -> None:
        xds, status, hooks = free_port(), free_port(), free_port()
        self.webhooks[name] = hooks
        log = open(self.work / f"{name}.log", "wb")
        p = subprocess.Popen(
            [sys.executable, "-m", "controlplane.cli", "serve", "--kubernetes", "--kubeconfig",
             str(self.kube.kubeconfig), "--xds-address", f"127.0.0.1:{xds}", "--status-address",
             f"127.0.0.1:{status}", "--leader-lease-seconds", str(LEASE),
             "--webhook-address", f"127.0.0.1:{hooks}", "--ca-address", "off"],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
            env={**os.environ, "POD_NAME": name, "POD_NAMESPACE": "meshline-system"})
        self.replicas[name] = (p, xds, status)

    def mesh(self, name: str) -> dict[str, Any]:
        return dict(self.http.get(f"http://127.0.0.1:{self.replicas[name][2]}/v1/mesh").json())

    def metric(self, name: str, metric: str) -> float:
        text = self.http.get(f"http://127.0.0.1:{self.replicas[name][2]}/metrics").text
        for line in text.splitlines():
            if line.startswith(metric + " "):
                return float(line.split()[1])
        return 0.0

    def get(self, host: str, path: str = "/") -> httpx.Response:
        return self.http.get(f"http://127.0.0.1:{PORT}{path}", headers={"host": host})

    def close(self) -> None:
        self.http.close()
        stop(self.envoy)
        stop(self.backend)
        for p, _, _ in self.replicas.values():
            stop(p)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with tempfile.TemporaryDirectory(prefix="meshline-k8s-") as d, kube_emulator(Path(d)) as kube:
        c = Cluster(kube, Path(d))
        try:
            kube.create(namespace("meshline-system"))
            adm = k8s.AdmissionregistrationV1Api(kube.api)
            for plural, kind in (("mutatingwebhookconfigurations", "MutatingWebhookConfiguration"),
                                 ("validatingwebhookconfigurations", "ValidatingWebhookConfiguration")):
                kube.emulator.resources[f"admissionregistration.k8s.io/v1/{plural}"] = kmock.ResourceInfo(
                    kind=kind, namespaced=False, verbs={"get", "list", "watch", "create", "update", "patch"})
            for path in sorted((ROOT / "manifests" / "webhooks").glob("*configuration.yaml")):
                for doc in yaml.safe_load_all(path.read_text()):
                    if doc and doc["kind"] == "MutatingWebhookConfiguration":
                        adm.create_mutating_webhook_configuration(doc)
                    elif doc and doc["kind"] == "ValidatingWebhookConfiguration":
                        adm.create_validating_webhook_configuration(doc)
            kube.create(namespace(NS, {"meshline.io/dataplane-mode": "sidecar"}))
            c.backend = subprocess.Popen(
                [sys.executable, str(ROOT / "samples" / "backend.py"), f"shop-v1=127.0.0.121:{PORT}",
                 f"shop-v2=127.0.0.122:{PORT}"], stdout=subprocess.PIPE, start_new_session=True)
            assert c.backend.stdout is not None and c.backend.stdout.readline().strip() == b"ready"
            c.start_replica("replica-1")
            c.start_replica("replica-2")
            for p, _, status in c.replicas.values():
                wait_http(f"http://127.0.0.1:{status}/readyz", proc=p, timeout=30)
            xds = c.replicas["replica-1"][1]
            admin = free_port()
            boot = subprocess.run(
                [sys.executable, "-m", "controlplane.cli", "bootstrap", "--node-id", "k8s-client",
                 "--namespace", NS, "--xds-address", f"127.0.0.1:{xds}", "--admin-address", f"127.0.0.1:{admin}"],
                check=True, capture_output=True, text=True, cwd=ROOT).stdout
            c.envoy = start_envoy(boot, Path(d), "envoy")
            wait_http(f"http://127.0.0.1:{admin}/ready", proc=c.envoy)
            yield c
        finally:
            c.close()


def test_api_objects_reach_envoy_routing(cluster: Cluster) -> None:
    kube = cluster.kube
    kube.create(service("shop", NS, PORT))
    for v, ip in (("v1", "127.0.0.121"), ("v2", "127.0.0.122")):
        p = pod(f"shop-{v}", ip, "shop", NS, PORT)
        p["metadata"]["labels"]["version"] = v
        kube.create(p)
    eps = endpoint_slice("shop", ["127.0.0.121", "127.0.0.122"], NS, PORT)
    for ep, v in zip(eps["endpoints"], ("v1", "v2"), strict=True):
        ep["targetRef"] = {"kind": "Pod", "name": f"shop-{v}", "namespace": NS}
    kube.create(eps)
    eventually(lambda: cluster.get("shop").status_code == 200)
    assert {cluster.get("shop").json()["backend"] for _ in range(30)} == {"shop-v1", "shop-v2"}
    # A DestinationRule + VirtualService created through the API pin traffic to v2...
    kube.create({"apiVersion": "networking.meshline.io/v1", "kind": "DestinationRule",
                 "metadata": {"name": "shop", "namespace": NS},
                 "spec": {"host": "shop", "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                                                      {"name": "v2", "labels": {"version": "v2"}}]}})
    kube.create({"apiVersion": "networking.meshline.io/v1", "kind": "VirtualService",
                 "metadata": {"name": "shop", "namespace": NS},
                 "spec": {"hosts": ["shop"], "http": [{"route": [{"destination": {"host": "shop", "subset": "v2"}}]}]}})
    eventually(lambda: {cluster.get("shop").json()["backend"] for _ in range(20)} == {"shop-v2"})
    # ...a change moves it to v1...
    kube.patch("networking.meshline.io/v1", "VirtualService", NS, "shop",
               {"spec": {"hosts": ["shop"], "http": [{"route": [{"destination": {"host": "shop", "subset": "v1"}}]}]}})
    eventually(lambda: {cluster.get("shop").json()["backend"] for _ in range(20)} == {"shop-v1"})
    # ...and deleting the Service removes the route (and, as it was the port's only service,
    # the listener: the connection is refused).
    kube.delete("networking.meshline.io/v1", "VirtualService", NS, "shop")
    kube.delete("v1", "Service", NS, "shop")

    def gone() -> bool:
        try:
            return cluster.get("shop").status_code == 404
        except httpx.ConnectError:
            return True

    eventually(gone)


def _accepted(kube: KubeEnv, name: str) -> dict[str, Any] | None:
    try:
        obj = k8s.CustomObjectsApi(kube.api).get_namespaced_custom_object(
            "networking.meshline.io", "v1", NS, "virtualservices", name)
    except k8s.ApiException:
        return None
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Accepted":
            return dict(c)
    return None


def test_only_the_leader_writes_status_and_a_follower_takes_over(cluster: Cluster) -> None:
    kube = cluster.kube
    leaders = eventually(lambda: [n for n in cluster.replicas if cluster.mesh(n)["leader"]] or None)
    assert len(leaders) == 1
    leader = leaders[0]
    follower = next(n for n in cluster.replicas if n != leader)
    kube.create({"apiVersion": "networking.meshline.io/v1", "kind": "VirtualService",
                 "metadata": {"name": "ok", "namespace": NS},
                 "spec": {"hosts": ["ok"], "http": [{"route": [{"destination": {"host": "ok"}}]}]}})
    kube.create({"apiVersion": "networking.meshline.io/v1", "kind": "VirtualService",
                 "metadata": {"name": "broken", "namespace": NS},
                 "spec": {"hosts": ["broken"], "http": [{"match": [{"uri": {"regex": "(unclosed"}}],
                                                         "route": [{"destination": {"host": "broken"}}]}]}})
    ok = eventually(lambda: _accepted(kube, "ok"))
    assert ok["status"] == "True"
    bad = eventually(lambda: _accepted(kube, "broken"))
    assert bad["status"] == "False" and "regex" in bad["message"]
    assert cluster.metric(leader, "meshline_crd_status_writes_total") >= 2
    assert cluster.metric(follower, "meshline_crd_status_writes_total") == 0
    # Nothing changes: no further writes (no hot loop).
    writes = cluster.metric(leader, "meshline_crd_status_writes_total")
    import time

    time.sleep(2.0)
    assert cluster.metric(leader, "meshline_crd_status_writes_total") == writes
    # The leader dies without releasing its Lease: the follower takes over within the lease duration.
    p = cluster.replicas[leader][0]
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(5)
    t0 = time.monotonic()
    eventually(lambda: cluster.mesh(follower)["leader"], timeout=LEASE * 20)
    # The lease's expiry plus retries (~LEASE on a quiet machine), with room for a 10x slower one.
    assert time.monotonic() - t0 <= LEASE * 10
    kube.create({"apiVersion": "networking.meshline.io/v1", "kind": "VirtualService",
                 "metadata": {"name": "late", "namespace": NS},
                 "spec": {"hosts": ["late"], "http": [{"route": [{"destination": {"host": "late", "subset": "x"}}]}]}})
    late = eventually(lambda: _accepted(kube, "late"))
    assert late["status"] in ("True", "False")
    assert cluster.metric(follower, "meshline_crd_status_writes_total") >= 1


def test_webhooks_serve_with_the_mesh_ca_and_the_leader_patches_ca_bundles(cluster: Cluster) -> None:
    import base64
    import ssl

    api = k8s.AdmissionregistrationV1Api(cluster.kube.api)

    def bundles() -> list[str] | None:
        m = api.read_mutating_webhook_configuration("meshline-sidecar-injector")
        v = api.read_validating_webhook_configuration("meshline-validator")
        got = [h.client_config.ca_bundle for h in [*m.webhooks, *v.webhooks]]
        return got if all(got) else None

    got = eventually(bundles)
    pem = base64.b64decode(got[0]).decode()
    assert "BEGIN CERTIFICATE" in pem and len(set(got)) == 1
    # Every replica's webhook answers over HTTPS with a certificate that chains to that bundle.
    for name, port in cluster.webhooks.items():
        if cluster.replicas[name][0].poll() is not None:
            continue  # killed in the HA test
        ctx = ssl.create_default_context(cadata=pem)
        ctx.check_hostname = False
        with httpx.Client(verify=ctx, timeout=5) as c:
            r = eventually(lambda p=port: c.post(f"https://127.0.0.1:{p}/validate", json={
                "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                "request": {"uid": "u1", "kind": {"group": "networking.meshline.io", "version": "v1",
                                                  "kind": "VirtualService"},
                            "operation": "CREATE", "namespace": NS, "name": "bad",
                            "object": {"apiVersion": "networking.meshline.io/v1", "kind": "VirtualService",
                                       "metadata": {"name": "bad", "namespace": NS},
                                       "spec": {"hosts": ["x"], "http": [{"route": [{"destination": {
                                           "host": "x"}}], "retries": {"attemps": 1}}]}}}}))
        review = r.json()["response"]
        assert review["uid"] == "u1" and review["allowed"] is False
        assert "attemps" in review["status"]["message"]
