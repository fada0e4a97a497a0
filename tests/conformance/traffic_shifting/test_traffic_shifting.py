"""Istio task "Traffic Shifting" (https://istio.io/latest/docs/tasks/traffic-management/traffic-shifting/)
through real Envoys: Bookinfo in `default`, a `sleep` client sidecar, the task's YAML unchanged."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conformance.conftest import MeshFactory
from tests.conformance.harness import (
    BOOKINFO_PORT,
    CLIENT_OUTBOUND,
    INJECTION,
    Mesh,
    Sidecar,
    backend_specs,
    bookinfo,
    converge,
    mesh_yaml,
    read,
    sample,
)

pytestmark = pytest.mark.e2e
HERE = Path(__file__).resolve().parent
N = 100


@pytest.fixture(scope="module")
def env(make_mesh: MeshFactory) -> Iterator[tuple[Mesh, Sidecar]]:
    services, wls = bookinfo()
    mesh = make_mesh()
    mesh.start({"00-bookinfo.yaml": mesh_yaml({"default": INJECTION}, services, wls)}, backend_specs(services, wls))
    mesh.kubectl_apply(read(HERE, "destination-rule-all.yaml"))
    sleep = mesh.sidecar(next(w for w in wls if w.name == "sleep"), CLIENT_OUTBOUND)
    yield mesh, sleep


def reviews(mesh: Mesh, sc: Sidecar) -> str:
    r = mesh.http(sc, BOOKINFO_PORT, "reviews")
    assert r.status_code == 200, r.text
    return str(r.json()["backend"])


def test_all_v1_then_50_50_then_v3(env: tuple[Mesh, Sidecar]) -> None:
    mesh, sleep = env
    mesh.kubectl_apply(read(HERE, "virtual-service-all-v1.yaml"))
    # Doc: "route all traffic to the v1 version of each microservice".
    converge(lambda: all(reviews(mesh, sleep) == "reviews-v1" for _ in range(20)))
    assert sample(N, lambda: reviews(mesh, sleep)) == {"reviews-v1": N}

    mesh.kubectl_apply(read(HERE, "virtual-service-reviews-50-v3.yaml"))
    # Doc: "transfer 50% of the traffic from reviews:v1 to reviews:v3"; "you now see red
    # colored star ratings approximately 50% of the time."
    converge(lambda: reviews(mesh, sleep) == "reviews-v3")
    counts = sample(N, lambda: reviews(mesh, sleep))
    assert set(counts) == {"reviews-v1", "reviews-v3"}, counts
    for name in ("reviews-v1", "reviews-v3"):
        assert 0.25 * N <= counts[name] <= 0.75 * N, counts  # binomial sd 5: ~5 sigma each side

    mesh.kubectl_apply(read(HERE, "virtual-service-reviews-v3.yaml"))
    # Doc: "Assuming you decide that the reviews:v3 microservice is stable, you can route 100%
    # of the traffic to reviews:v3"; "you always see book reviews with red colored star ratings".
    converge(lambda: all(reviews(mesh, sleep) == "reviews-v3" for _ in range(20)))
    assert sample(N, lambda: reviews(mesh, sleep)) == {"reviews-v3": N}
    assert not mesh.errors()
