"""Istio task "Request Routing" (https://istio.io/latest/docs/tasks/traffic-management/request-routing/)
through real Envoys: the Bookinfo services in namespace `default` (labelled
`istio-injection: enabled`), a `sleep` client sidecar, the task's YAML unchanged."""

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


@pytest.fixture(scope="module")
def env(make_mesh: MeshFactory) -> Iterator[tuple[Mesh, Sidecar]]:
    services, wls = bookinfo()
    mesh = make_mesh()
    mesh.start({"00-bookinfo.yaml": mesh_yaml({"default": INJECTION}, services, wls)}, backend_specs(services, wls))
    mesh.kubectl_apply(read(HERE, "destination-rule-all.yaml"))
    sleep = mesh.sidecar(next(w for w in wls if w.name == "sleep"), CLIENT_OUTBOUND)
    yield mesh, sleep


def reviews(mesh: Mesh, sc: Sidecar, user: str | None = None) -> str:
    r = mesh.http(sc, BOOKINFO_PORT, "reviews", headers={"end-user": user} if user else None)
    assert r.status_code == 200, r.text
    return str(r.json()["backend"])


def test_route_to_version_1(env: tuple[Mesh, Sidecar]) -> None:
    mesh, sleep = env
    mesh.kubectl_apply(read(HERE, "virtual-service-all-v1.yaml"))
    # Doc: "the reviews part of the page displays with no rating stars, no matter how many
    # times you refresh. This is because you configured Istio to route all traffic for the
    # reviews service to the version reviews:v1".
    converge(lambda: all(reviews(mesh, sleep) == "reviews-v1" for _ in range(20)))
    assert sample(60, lambda: reviews(mesh, sleep)) == {"reviews-v1": 60}
    for svc in ("productpage", "details", "ratings"):
        assert mesh.http(sleep, BOOKINFO_PORT, svc).json()["backend"] == f"{svc}-v1"
    assert not mesh.errors()


def test_route_based_on_user_identity(env: tuple[Mesh, Sidecar]) -> None:
    mesh, sleep = env
    mesh.kubectl_apply(read(HERE, "virtual-service-all-v1.yaml"))
    mesh.kubectl_apply(read(HERE, "virtual-service-reviews-test-v2.yaml"))
    # Doc: "all traffic from a user named Jason will be routed to the service reviews:v2"
    # (productpage adds the `end-user` header); "log in as another user ... The stars vanish.
    # This is because traffic is routed to reviews:v1 for all users except Jason."
    converge(lambda: reviews(mesh, sleep, "jason") == "reviews-v2")
    assert sample(40, lambda: reviews(mesh, sleep, "jason")) == {"reviews-v2": 40}
    assert sample(40, lambda: reviews(mesh, sleep, "alice")) == {"reviews-v1": 40}
    assert sample(20, lambda: reviews(mesh, sleep)) == {"reviews-v1": 20}
    # `exact` is case-sensitive: "Jason" is another user.
    assert sample(10, lambda: reviews(mesh, sleep, "Jason")) == {"reviews-v1": 10}
    assert not mesh.errors()
