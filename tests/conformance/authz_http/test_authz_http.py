"""Istio task "Authorization for HTTP traffic"
(https://istio.io/latest/docs/tasks/security/authorization/authz-http/) through real Envoys:
Bookinfo in `default` with sidecars (productpage, details, reviews v2, ratings, each with its
service account), the task's policies unchanged. Each hop is made the way the app makes it,
through the calling workload's own sidecar: the user (here `sleep`, the task's browser via
the ingress gateway) -> productpage -> details / reviews -> ratings. The server sidecars
enforce the policies against the caller's mTLS identity."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conformance.conftest import MeshFactory
from tests.conformance.harness import (
    BOOKINFO_PORT,
    INJECTION,
    Mesh,
    Service,
    Sidecar,
    Workload,
    backend_specs,
    converge,
    mesh_yaml,
    read,
)

pytestmark = pytest.mark.e2e
HERE = Path(__file__).resolve().parent
DENIED = "RBAC: access denied"


class World:
    def __init__(self, mesh: Mesh, sc: dict[str, Sidecar]) -> None:
        self.mesh = mesh
        self.sc = sc

    def call(self, src: str, dst: str, method: str = "GET") -> int:
        """`src`'s app calls http://<dst>:9080/ through `src`'s sidecar."""
        r = self.mesh.http(self.sc[src], BOOKINFO_PORT, dst, method=method)
        if r.status_code == 403:
            assert r.text == DENIED, r.text
        elif r.status_code == 200:
            assert r.json()["backend"].startswith(dst), r.text
        return r.status_code


@pytest.fixture(scope="module")
def world(make_mesh: MeshFactory) -> Iterator[World]:
    services = [Service(s, [("http", BOOKINFO_PORT)]) for s in ("productpage", "details", "reviews", "ratings")]
    wls = [Workload(name, name.split("-")[0], f"127.0.4.{ip}", {"version": name.split("-")[1]}, "default",
                    f"bookinfo-{name.split('-')[0]}", injected=True, app_ip=f"127.0.5.{ip}")
           for name, ip in [("productpage-v1", 41), ("details-v1", 31), ("reviews-v2", 12), ("ratings-v1", 21)]]
    wls.append(Workload("sleep", "sleep", "127.0.4.99", {}, "default", "sleep", injected=True, serves=False))
    mesh = make_mesh()
    mesh.start({"00-bookinfo.yaml": mesh_yaml({"default": INJECTION}, services, wls)}, backend_specs(services, wls))
    outbound = {"productpage-v1": "127.0.3.21", "details-v1": "127.0.3.22", "reviews-v2": "127.0.3.23",
                "ratings-v1": "127.0.3.24", "sleep": "127.0.3.1"}
    scs = mesh.start_sidecars([(w, outbound[w.name]) for w in wls])
    w = World(mesh, {sc.workload.app: sc for sc in scs})
    converge(lambda: w.call("sleep", "productpage") == 200 and w.call("productpage", "details") == 200
             and w.call("reviews", "ratings") == 200)
    yield w


def test_allow_nothing(world: World) -> None:
    world.mesh.kubectl_apply(read(HERE, "allow-nothing.yaml"))
    # Doc: 'You should see "RBAC: access denied". The error shows that the configured
    # deny-all policy is working as intended'.
    converge(lambda: world.call("sleep", "productpage") == 403)
    for src, dst in [("sleep", "productpage"), ("productpage", "details"), ("productpage", "reviews"),
                     ("reviews", "ratings"), ("sleep", "ratings")]:
        converge(lambda src=src, dst=dst: world.call(src, dst) == 403)


def test_productpage_viewer(world: World) -> None:
    world.mesh.kubectl_apply(read(HERE, "productpage-viewer.yaml"))
    # Doc: 'Now you should see the "Bookinfo Sample" page. However, you can see the following
    # errors on the page: Error fetching product details, Error fetching product reviews'.
    converge(lambda: world.call("sleep", "productpage") == 200)
    assert world.call("sleep", "productpage", "POST") == 403  # only GET is allowed
    assert world.call("productpage", "details") == 403
    assert world.call("productpage", "reviews") == 403


def test_details_and_reviews_viewer(world: World) -> None:
    world.mesh.kubectl_apply(read(HERE, "details-viewer.yaml"))
    world.mesh.kubectl_apply(read(HERE, "reviews-viewer.yaml"))
    # Doc: 'you should see the "Bookinfo Sample" page with "Book Details" ... and "Book
    # Reviews" ... However, in the "Book Reviews" section, there is an error Ratings service
    # currently unavailable.'
    converge(lambda: world.call("productpage", "details") == 200 and world.call("productpage", "reviews") == 200)
    assert world.call("reviews", "ratings") == 403
    # The rules name productpage's principal: another workload is still refused.
    assert world.call("sleep", "details") == 403
    assert world.call("sleep", "reviews") == 403
    assert world.call("productpage", "details", "POST") == 403


def test_ratings_viewer(world: World) -> None:
    world.mesh.kubectl_apply(read(HERE, "ratings-viewer.yaml"))
    # Doc: 'You should see the "black" and "red" ratings in the "Book Reviews" section.'
    converge(lambda: world.call("reviews", "ratings") == 200)
    assert world.call("sleep", "productpage") == 200
    assert world.call("productpage", "details") == 200
    assert world.call("productpage", "reviews") == 200
    assert world.call("productpage", "ratings") == 403  # ratings admits reviews' identity only
    assert not world.mesh.errors()
