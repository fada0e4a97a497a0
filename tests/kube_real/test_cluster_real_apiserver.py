"""`meshline serve --kubernetes` against a real kube-apiserver + etcd: two replicas, a real
Envoy sidecar fed by one of them. Does I/O: processes, HTTP, the session's API server.

What a user would notice: objects created, changed and deleted through the API reach
Envoy's routing; the leader (holder of a real coordination.k8s.io Lease) writes CRD
status through the status subresource, with observedGeneration following the spec's
generation; a SIGKILLed leader is replaced within the lease; a delete made while
Meshline was down is seen when it comes back.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes import client as k8s

from controlplane.localrun import free_port, start_envoy, stop, wait_http
from tests.kube.objects import endpoint_slice, pod, service
from tests.kube_real.cluster import ROOT, RealKube, eventually
from tests.netns_mesh import Topology, missing_tools

pytestmark = [pytest.mark.kube, pytest.mark.e2e, pytest.mark.timeout(240)]
PORT = 19880
NS = "kreal"
SYSTEM = "meshline-system"
LEASE = 3.0
VS = "networking.meshline.io/v1"


class Cluster:
    def __init__(self, kube: RealKube, work: Path) -> None:
        self.kube = kube
        self.work = work
        self.replicas: dict[str, tuple[subprocess.Popen[bytes], int, int]] = {}
        self.envoy: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(timeout=5)

    def start_replica(self, name: str) -> None:
        xds, status, hooks = free_port(), free_port(), free_port()
        log = open(self.work / f"{name}.log", "ab")
        p = subprocess.Popen(
            [sys.executable, "-m", "controlplane.cli", "serve", "--kubernetes", "--kubeconfig",
             str(self.kube.kubeconfig), "--xds-address", f"127.0.0.1:{xds}", "--status-address",
             f"127.0.0.1:{status}", "--leader-lease-seconds", str(LEASE),
             "--webhook-address", f"127.0.0.1:{hooks}", "--ca-address", "off"],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
            env={**os.environ, "POD_NAME": name, "POD_NAMESPACE": SYSTEM})
        self.replicas[name] = (p, xds, status)
        wait_http(f"http://127.0.0.1:{status}/readyz", proc=p, timeout=60)

    def kill(self, name: str) -> None:
        p = self.replicas[name][0]
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(10)

    def alive(self) -> list[str]:
        return [n for n, (p, _, _) in self.replicas.items() if p.poll() is None]

    def status(self, name: str, path: str) -> Any:
        return self.http.get(f"http://127.0.0.1:{self.replicas[name][2]}{path}").json()

    def metric(self, name: str, metric: str) -> float:
        text = self.http.get(f"http://127.0.0.1:{self.replicas[name][2]}/metrics").text
        for line in text.splitlines():
            if line.startswith(metric + " "):
                return float(line.split()[1])
        return 0.0

    def leaders(self) -> list[str]:
        return [n for n in self.alive() if self.status(n, "/v1/mesh")["leader"]]

    def get(self, host: str, path: str = "/") -> httpx.Response:
        return self.http.get(f"http://127.0.0.1:{PORT}{path}", headers={"host": host})

    def close(self) -> None:
        self.http.close()
        stop(self.envoy)
        for p, _, _ in self.replicas.values():
            stop(p)


@pytest.fixture(scope="module")
def cluster(real_kube: RealKube) -> Iterator[Cluster]:
    kube = real_kube
    with tempfile.TemporaryDirectory(prefix="meshline-kreal-") as d:
        c = Cluster(kube, Path(d))
        try:
            kube.namespace(SYSTEM)
            kube.namespace(NS, {"meshline.io/dataplane-mode": "sidecar"})
            c.start_replica("replica-1")
            c.start_replica("replica-2")
            xds = c.replicas["replica-1"][1]
            admin = free_port()
            boot = subprocess.run(
                [sys.executable, "-m", "controlplane.cli", "bootstrap", "--node-id", "kreal-client",
                 "--namespace", NS, "--xds-address", f"127.0.0.1:{xds}", "--admin-address", f"127.0.0.1:{admin}"],
                check=True, capture_output=True, text=True, cwd=ROOT).stdout
            c.envoy = start_envoy(boot, Path(d), "envoy")
            wait_http(f"http://127.0.0.1:{admin}/ready", proc=c.envoy)
            yield c
        finally:
            c.close()
            for name in sorted(Path(d).glob("replica-*.log")):
                tail = name.read_text(errors="replace").splitlines()[-15:]
                print(f"--- {name.name} (last lines)\n" + "\n".join(tail))


def test_real_apiserver_objects_reach_envoy_routing(cluster: Cluster) -> None:
    """A real API server refuses loopback endpoint addresses, so the two backends run in
    network-namespace pods (198.18.x, tests/netns_mesh.py) that the host's Envoy reaches."""
    why = missing_tools()
    if why:
        pytest.skip(f"backends need network namespaces: {why}")
    with Topology() as topo:
        node = topo.add_node("kr1")
        pods = {v: node.add_pod(f"shop{v}") for v in ("v1", "v2")}
        for v, p in pods.items():
            topo.track(p.serve_http(PORT, f"shop-{v}"))
        _routing(cluster, {v: p.ip for v, p in pods.items()})


def _routing(cluster: Cluster, ips: dict[str, str]) -> None:
    """The objects are created, changed and deleted with kubectl, as a user would."""
    kube = cluster.kube
    kube.kubectl_apply(service("shop", NS, PORT))
    for v, ip in ips.items():
        p = pod(f"shop-{v}", ip, "shop", NS, PORT)
        p["metadata"]["labels"]["version"] = v
        kube.pod(p, ip)  # with its status, as a kubelet would
    eps = endpoint_slice("shop", list(ips.values()), NS, PORT)
    for ep, v in zip(eps["endpoints"], ips, strict=True):
        ep["targetRef"] = {"kind": "Pod", "name": f"shop-{v}", "namespace": NS}
    kube.kubectl_apply(eps)  # as the EndpointSlice controller would
    eventually(lambda: cluster.get("shop").status_code == 200)
    assert {cluster.get("shop").json()["backend"] for _ in range(30)} == {"shop-v1", "shop-v2"}
    kube.kubectl_apply(
        {"apiVersion": VS, "kind": "DestinationRule", "metadata": {"name": "shop", "namespace": NS},
         "spec": {"host": "shop", "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                                              {"name": "v2", "labels": {"version": "v2"}}]}},
        {"apiVersion": VS, "kind": "VirtualService", "metadata": {"name": "shop", "namespace": NS},
         "spec": {"hosts": ["shop"], "http": [{"route": [{"destination": {"host": "shop", "subset": "v2"}}]}]}})
    eventually(lambda: {cluster.get("shop").json()["backend"] for _ in range(20)} == {"shop-v2"})
    kube.kubectl("-n", NS, "patch", "virtualservice", "shop", "--type=merge", "-p",
                 '{"spec":{"http":[{"route":[{"destination":{"host":"shop","subset":"v1"}}]}]}}')
    eventually(lambda: {cluster.get("shop").json()["backend"] for _ in range(20)} == {"shop-v1"})
    kube.kubectl("-n", NS, "delete", "virtualservice", "shop")
    eventually(lambda: {cluster.get("shop").json()["backend"] for _ in range(30)} == {"shop-v1", "shop-v2"},
               timeout=20)
    kube.kubectl("-n", NS, "delete", "service", "shop")

    def gone() -> bool:
        try:
            return cluster.get("shop").status_code == 404
        except httpx.ConnectError:
            return True

    eventually(gone)


def _accepted(kube: RealKube, name: str) -> dict[str, Any] | None:
    obj = kube.get(VS, "VirtualService", name, NS)
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == "Accepted":
            return dict(c)
    return None


def test_real_crd_status_through_the_status_subresource_follows_generation(cluster: Cluster) -> None:
    kube = cluster.kube
    leader = eventually(lambda: cluster.leaders() or None)
    assert len(leader) == 1
    kube.apply({"apiVersion": VS, "kind": "VirtualService", "metadata": {"name": "ok", "namespace": NS},
                "spec": {"hosts": ["ok"], "http": [{"route": [{"destination": {"host": "ok"}}]}]}})
    kube.apply({"apiVersion": VS, "kind": "VirtualService", "metadata": {"name": "broken", "namespace": NS},
                "spec": {"hosts": ["broken"], "http": [{"match": [{"uri": {"regex": "(unclosed"}}],
                                                        "route": [{"destination": {"host": "broken"}}]}]}})
    ok = eventually(lambda: _accepted(kube, "ok"))
    assert ok["status"] == "True" and ok["observedGeneration"] == 1
    bad = eventually(lambda: _accepted(kube, "broken"))
    assert bad["status"] == "False" and "regex" in bad["message"]
    obj = kube.get(VS, "VirtualService", "broken", NS)
    assert obj is not None
    # A status write is not a spec change: the generation stays, and the server recorded
    # the write as one to the status subresource.
    assert obj["metadata"]["generation"] == 1
    status_writers = [m for m in obj["metadata"]["managedFields"] if m.get("subresource") == "status"]
    assert status_writers and all("f:status" in (m.get("fieldsV1") or {}) for m in status_writers)
    # Fixing the spec bumps the generation; the condition follows it.
    kube.apply({"apiVersion": VS, "kind": "VirtualService", "metadata": {"name": "broken", "namespace": NS},
                "spec": {"hosts": ["broken"], "http": [{"match": [{"uri": {"regex": "/fixed/.*"}}],
                                                        "route": [{"destination": {"host": "broken"}}]}]}})
    fixed = eventually(lambda: (c := _accepted(kube, "broken")) and c["status"] == "True" and c)
    assert fixed["observedGeneration"] == 2
    follower = next(n for n in cluster.alive() if n != leader[0])
    assert cluster.metric(leader[0], "meshline_crd_status_writes_total") >= 3
    assert cluster.metric(follower, "meshline_crd_status_writes_total") == 0
    writes = cluster.metric(leader[0], "meshline_crd_status_writes_total")
    time.sleep(2.0)  # nothing changes: no further writes (no hot loop on our own status events)
    assert cluster.metric(leader[0], "meshline_crd_status_writes_total") == writes


def test_real_lease_leader_sigkilled_follower_takes_over(cluster: Cluster) -> None:
    kube = cluster.kube
    coord = k8s.CoordinationV1Api(kube.api)
    leaders = eventually(lambda: cluster.leaders() or None)
    assert len(leaders) == 1
    leader = leaders[0]
    follower = next(n for n in cluster.alive() if n != leader)
    leases = [le for le in coord.list_namespaced_lease(SYSTEM).items if le.spec.holder_identity == leader]
    assert len(leases) == 1, [le.metadata.name for le in coord.list_namespaced_lease(SYSTEM).items]
    lease = leases[0]
    assert lease.spec.lease_duration_seconds == round(LEASE)
    rv_before = lease.metadata.resource_version
    # The leader renews: the Lease's resourceVersion moves while it lives.
    eventually(lambda: coord.read_namespaced_lease(lease.metadata.name, SYSTEM).metadata.resource_version
               != rv_before, timeout=LEASE * 20)
    cluster.kill(leader)  # SIGKILL: no release of the Lease
    t0 = time.monotonic()
    eventually(lambda: cluster.status(follower, "/v1/mesh")["leader"], timeout=LEASE * 20)
    took = time.monotonic() - t0
    assert took <= LEASE * 10, took  # the lease's expiry plus retries (~LEASE), room for a 10x slower machine
    now = coord.read_namespaced_lease(lease.metadata.name, SYSTEM)
    assert now.spec.holder_identity == follower
    # The new leader writes status: a VirtualService created now gets its condition.
    kube.apply({"apiVersion": VS, "kind": "VirtualService", "metadata": {"name": "late", "namespace": NS},
                "spec": {"hosts": ["late"], "http": [{"route": [{"destination": {"host": "late"}}]}]}})
    late = eventually(lambda: _accepted(kube, "late"))
    assert late["status"] in ("True", "False")
    assert cluster.metric(follower, "meshline_crd_status_writes_total") >= 1
    # The killed replica comes back as a follower.
    cluster.start_replica(leader)
    time.sleep(LEASE)
    assert cluster.leaders() == [follower]


def test_real_delete_made_while_meshline_was_down_is_seen_when_it_comes_back(cluster: Cluster) -> None:
    kube = cluster.kube
    kube.apply(service("gone-while-down", NS, 19881))
    kube.apply(service("stays", NS, 19882))
    names = cluster.alive()
    for n in names:
        eventually(lambda n=n: {"gone-while-down", "stays"} <= {
            s["name"] for s in cluster.status(n, f"/v1/services?namespace={NS}")})
    for n in names:
        cluster.kill(n)
    kube.delete("v1", "Service", "gone-while-down", NS)
    kube.apply(service("added-while-down", NS, 19883))
    cluster.start_replica(names[0])
    got = {s["name"] for s in cluster.status(names[0], f"/v1/services?namespace={NS}")}
    assert "gone-while-down" not in got and {"stays", "added-while-down"} <= got
