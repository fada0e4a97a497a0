"""Istio task "Fault Injection" (https://istio.io/latest/docs/tasks/traffic-management/fault-injection/)
through real Envoys: Bookinfo in `default`, a `sleep` client sidecar, the task's YAML unchanged.
The task observes faults through productpage -> reviews:v2 -> ratings; here the client calls
`ratings` directly with the `end-user` header productpage and reviews propagate."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
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
    elapsed,
    mesh_yaml,
    read,
)

pytestmark = pytest.mark.e2e
HERE = Path(__file__).resolve().parent
RATINGS_APP = "127.0.4.21"


@pytest.fixture(scope="module")
def env(make_mesh: MeshFactory) -> Iterator[tuple[Mesh, Sidecar]]:
    services, wls = bookinfo()
    mesh = make_mesh()
    mesh.start({"00-bookinfo.yaml": mesh_yaml({"default": INJECTION}, services, wls)}, backend_specs(services, wls))
    mesh.kubectl_apply(read(HERE, "destination-rule-all.yaml"))
    mesh.kubectl_apply(read(HERE, "virtual-service-all-v1.yaml"))
    mesh.kubectl_apply(read(HERE, "virtual-service-reviews-test-v2.yaml"))
    sleep = mesh.sidecar(next(w for w in wls if w.name == "sleep"), CLIENT_OUTBOUND)
    # The task's starting point: reviews:v2 for jason, reviews:v1 for everyone else.
    converge(lambda: mesh.http(sleep, BOOKINFO_PORT, "reviews", headers={"end-user": "jason"}).json()["backend"]
             == "reviews-v2")
    yield mesh, sleep


def test_http_delay_for_jason(env: tuple[Mesh, Sidecar]) -> None:
    mesh, sleep = env
    mesh.kubectl_apply(read(HERE, "virtual-service-ratings-test-delay.yaml"))
    jason = {"end-user": "jason"}

    def delayed() -> bool:  # in effect once a jason request is still pending after 3 s
        try:
            with httpx.Client(timeout=3.0) as c:
                mesh.http(sleep, BOOKINFO_PORT, "ratings", headers=jason, client=c)
        except httpx.TimeoutException:
            return True
        return False

    converge(delayed)
    # Doc: "inject a 7s delay between the reviews:v2 and ratings microservices for user jason";
    # "Expected: the Bookinfo home page loads without errors in approximately 7 seconds."
    r, took = elapsed(lambda: mesh.http(sleep, BOOKINFO_PORT, "ratings", headers=jason))
    assert r.status_code == 200 and r.json()["backend"] == "ratings-v1"
    assert took >= 6.99, took  # Envoy's fault-delay timer may fire a millisecond early
    # Everyone else reaches ratings:v1 with no injected delay (well under the 7 s).
    for others in ({}, {"end-user": "alice"}):
        r, took = elapsed(lambda h=others: mesh.http(sleep, BOOKINFO_PORT, "ratings", headers=h))
        assert r.status_code == 200 and r.json()["backend"] == "ratings-v1"
        assert took < 3.5, took
    assert not mesh.errors()


def test_http_abort_for_jason(env: tuple[Mesh, Sidecar]) -> None:
    mesh, sleep = env
    mesh.kubectl_apply(read(HERE, "virtual-service-ratings-test-abort.yaml"))
    jason = {"end-user": "jason"}
    converge(lambda: mesh.http(sleep, BOOKINFO_PORT, "ratings", headers=jason).status_code == 500)
    # Doc: "introduce an HTTP abort to the ratings microservices for the test user jason";
    # "the page loads immediately and the Ratings service is currently unavailable message
    # appears" (productpage sees HTTP 500 from ratings); "If you log out from user jason ...
    # you will not see any error message."
    before = mesh.count(RATINGS_APP, BOOKINFO_PORT)
    for _ in range(10):
        r = mesh.http(sleep, BOOKINFO_PORT, "ratings", headers=jason)
        assert r.status_code == 500, r.text
        assert "fault filter abort" in r.text  # answered by the client's sidecar
    assert mesh.count(RATINGS_APP, BOOKINFO_PORT) == before  # ratings never saw them
    for _ in range(10):
        r = mesh.http(sleep, BOOKINFO_PORT, "ratings", headers={"end-user": "alice"})
        assert r.status_code == 200 and r.json()["backend"] == "ratings-v1"
    # The fault is on ratings only: jason still reaches reviews:v2.
    assert mesh.http(sleep, BOOKINFO_PORT, "reviews", headers=jason).json()["backend"] == "reviews-v2"
    assert not mesh.errors()
