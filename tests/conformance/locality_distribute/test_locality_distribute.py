"""Istio task "Locality weighted distribution"
(https://istio.io/latest/docs/tasks/traffic-management/locality-load-balancing/distribute/)
through real Envoys: helloworld in namespace `sample` in four localities (region1/zone1,
region1/zone2, region2/zone3, region3/zone4), `sleep` in region1/zone1, the task's
DestinationRule unchanged.

ADAPTED as tests/conformance/locality_failover: one directory mesh, each Pod carrying
`topology.kubernetes.io/region` / `zone` itself."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conformance.conftest import MeshFactory
from tests.conformance.harness import (
    INJECTION,
    Mesh,
    Service,
    Sidecar,
    Workload,
    backend_specs,
    converge,
    mesh_yaml,
    read,
    sample,
)

pytestmark = pytest.mark.e2e
HERE = Path(__file__).resolve().parent
PORT = 5000
N = 200
LOCALITIES = [("region1", "zone1"), ("region1", "zone2"), ("region2", "zone3"), ("region3", "zone4")]


def topology(region: str, zone: str) -> dict[str, str]:
    return {"topology.kubernetes.io/region": region, "topology.kubernetes.io/zone": zone}


@pytest.fixture(scope="module")
def env(make_mesh: MeshFactory) -> Iterator[tuple[Mesh, Sidecar]]:
    services = [Service("helloworld", [("http", PORT)], "sample")]
    wls = [Workload(f"helloworld-{r}.{z}", "helloworld", f"127.0.4.{121 + i}", {"version": f"{r}.{z}", **topology(r, z)},
                    "sample", "default") for i, (r, z) in enumerate(LOCALITIES)]
    sleep = Workload("sleep", "sleep", "127.0.4.129", topology("region1", "zone1"), "sample", "sleep", serves=False)
    mesh = make_mesh()
    mesh.start({"00-sample.yaml": mesh_yaml({"sample": INJECTION}, services, [*wls, sleep])},
               backend_specs(services, wls))
    sc = mesh.sidecar(sleep, "127.0.3.51")
    yield mesh, sc


def hello(mesh: Mesh, sc: Sidecar) -> str:
    r = mesh.http(sc, PORT, "helloworld.sample:5000", "/hello")
    return str(r.json()["backend"]) if r.status_code == 200 else f"HTTP {r.status_code}"


def test_weighted_distribution(env: tuple[Mesh, Sidecar]) -> None:
    mesh, sleep = env
    converge(lambda: len(sample(40, lambda: hello(mesh, sleep))) == 4)  # before: every locality answers
    mesh.kubectl_apply(read(HERE, "destination-rule-helloworld.yaml"))
    # Doc: region1/zone1 70%, region1/zone2 20%, region2/zone3 0%, region3/zone4 10%: "verify
    # that the number of replies for each pod match the expected percentage".
    converge(lambda: "helloworld-region2.zone3" not in sample(40, lambda: hello(mesh, sleep)))
    counts = sample(N, lambda: hello(mesh, sleep))
    assert set(counts) <= {"helloworld-region1.zone1", "helloworld-region1.zone2", "helloworld-region3.zone4"}, counts
    # Bounds: about 4.5 binomial standard deviations (6.5, 5.7, 4.2 of 200) around 140, 40, 20.
    assert 110 <= counts.get("helloworld-region1.zone1", 0) <= 170, counts
    assert 15 <= counts.get("helloworld-region1.zone2", 0) <= 65, counts
    assert 3 <= counts.get("helloworld-region3.zone4", 0) <= 40, counts
    assert not mesh.errors()
