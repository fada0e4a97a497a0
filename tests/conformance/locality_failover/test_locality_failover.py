"""Istio task "Locality failover"
(https://istio.io/latest/docs/tasks/traffic-management/locality-load-balancing/failover/)
through real Envoys: helloworld in namespace `sample` in four localities (region1/zone1,
region1/zone2, region2/zone3, region3/zone4), `sleep` in region1/zone1, the task's
DestinationRule unchanged.

ADAPTED: the task spreads the localities over several clusters whose Nodes carry the
topology labels; here one directory mesh holds all of them and each Pod carries
`topology.kubernetes.io/region` / `zone` itself (Meshline reads a Pod's locality from its
labels). The task fails a locality by draining its helloworld sidecar's listeners; here that
locality's helloworld process is stopped, so connections to it fail the same way. The failover
itself is checked while the dead endpoint is still in the mesh (outlier detection ejects it:
"the first call will fail, which triggers the failover"). Afterwards, as Kubernetes does once
the drained sidecar's readiness probe fails, its EndpointSlice entry turns `ready: false` and
the endpoint leaves EDS; that ends its ejection, so the next locality's failure is again the
first ejection (with 4 hosts and the task's default maxEjectionPercent, 10%, only the first
ejection is allowed, in Envoy as in the Envoy versions Istio's task was written for)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.localrun import stop
from tests.conformance.conftest import MeshFactory
from tests.conformance.harness import (
    CLIENT_OUTBOUND,
    INJECTION,
    ROOT,
    Mesh,
    Service,
    Sidecar,
    Workload,
    converge,
    mesh_yaml,
    read,
)

pytestmark = pytest.mark.e2e
HERE = Path(__file__).resolve().parent
PORT = 5000
LOCALITIES = [("region1", "zone1"), ("region1", "zone2"), ("region2", "zone3"), ("region3", "zone4")]


def topology(region: str, zone: str) -> dict[str, str]:
    return {"topology.kubernetes.io/region": region, "topology.kubernetes.io/zone": zone}


CLUSTER = "outbound|5000||helloworld.sample.svc.cluster.local"


class World:
    def __init__(self, mesh: Mesh, sleep: Sidecar, apps: dict[str, subprocess.Popen[bytes]],
                 services: list[Service], workloads: list[Workload]) -> None:
        self.mesh = mesh
        self.sleep = sleep
        self.apps = apps
        self.services = services
        self.workloads = workloads

    def hello(self) -> str:
        r = self.mesh.http(self.sleep, PORT, "helloworld.sample:5000", "/hello")
        return str(r.json()["backend"]) if r.status_code == 200 else f"HTTP {r.status_code}"

    def always(self, name: str, n: int = 10) -> bool:
        return all(self.hello() == name for _ in range(n))

    def fail(self, locality: str) -> None:
        stop(self.apps.pop(locality))

    def unready(self, locality: str) -> None:
        """What Kubernetes does once the failed pod's readiness probe fails."""
        for w in self.workloads:
            if w.name == f"helloworld-{locality}":
                w.ready = False
        self.mesh.apply("00-sample.yaml", mesh_yaml({"sample": INJECTION}, self.services, self.workloads))
        converge(lambda: self.healthy_hosts() == len(self.apps))

    def healthy_hosts(self) -> int:
        text = self.mesh.client.get(f"http://127.0.0.1:{self.sleep.admin}/clusters").text
        return sum(1 for line in text.splitlines()
                   if line.startswith(f"{CLUSTER}::") and line.endswith("::health_flags::healthy"))

    def ejections(self) -> int:
        return self.mesh.stat(self.sleep, f"cluster.{CLUSTER}.outlier_detection.ejections_enforced_total")


@pytest.fixture(scope="module")
def world(make_mesh: MeshFactory) -> Iterator[World]:
    services = [Service("helloworld", [("http", PORT)], "sample")]
    wls = [Workload(f"helloworld-{r}.{z}", "helloworld", f"127.0.4.{111 + i}", {"version": f"{r}.{z}", **topology(r, z)},
                    "sample", "default") for i, (r, z) in enumerate(LOCALITIES)]
    sleep = Workload("sleep", "sleep", "127.0.4.99", topology("region1", "zone1"), "sample", "sleep", serves=False)
    mesh = make_mesh()
    # One helloworld process per locality, so that one locality can fail alone.
    argvs = [[sys.executable, str(ROOT / "samples" / "backend.py"), f"{w.name}={w.ip}:{PORT}"] for w in wls]
    mesh.start({"00-sample.yaml": mesh_yaml({"sample": INJECTION}, services, [*wls, sleep])}, (), argvs)
    apps = {w.name.removeprefix("helloworld-"): p for w, p in zip(wls, mesh.procs[:len(wls)], strict=True)}
    sc = mesh.sidecar(sleep, CLIENT_OUTBOUND)
    world = World(mesh, sc, apps, services, [*wls, sleep])
    converge(lambda: world.hello().startswith("helloworld-"))
    yield world


def test_failover_by_locality(world: World) -> None:
    world.mesh.kubectl_apply(read(HERE, "destination-rule-helloworld.yaml"))
    # Doc ("Verify traffic stays in region1.zone1"): "The response from helloworld should be
    # returned from region1.zone1".
    converge(lambda: world.always("helloworld-region1.zone1"))
    # Doc ("Failover to region1.zone2"): after draining region1.zone1, "The first call will
    # fail, which triggers the failover. Repeat the command several more times and verify
    # that the response" comes from region1.zone2.
    world.fail("region1.zone1")
    converge(lambda: world.always("helloworld-region1.zone2"), timeout=30)  # ejection interval is 1 s
    assert world.ejections() >= 1, "failover without an outlier ejection"
    world.unready("region1.zone1")
    # Doc ("Failover to region2.zone3"): "Now trigger a failover to region2.zone3" (the
    # failover rule sends region1's traffic to region2 next, before region3).
    world.fail("region1.zone2")
    converge(lambda: world.always("helloworld-region2.zone3"), timeout=30)
    assert world.ejections() >= 2
    world.unready("region1.zone2")
    # Doc ("Failover to region3.zone4"): "Now trigger a failover to region3.zone4".
    world.fail("region2.zone3")
    converge(lambda: world.always("helloworld-region3.zone4"), timeout=30)
    assert world.ejections() >= 3
    assert not world.mesh.errors()
