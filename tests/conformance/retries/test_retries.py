"""Istio retries (https://istio.io/latest/docs/concepts/traffic-management/#retries) through
real Envoys: Bookinfo's ratings in `default`, a `sleep` client sidecar. ratings answers 503 to
the first N requests of a key (`/flaky/<key>/<N>`), then 200: the client sees what its
sidecar's retries made of it, and ratings' own request count shows the attempts."""

from __future__ import annotations

import itertools
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
)

pytestmark = pytest.mark.e2e
HERE = Path(__file__).resolve().parent
RATINGS_APP = "127.0.4.21"
_keys = itertools.count()


@pytest.fixture(scope="module")
def env(make_mesh: MeshFactory) -> Iterator[tuple[Mesh, Sidecar]]:
    services, wls = bookinfo()
    mesh = make_mesh()
    mesh.start({"00-bookinfo.yaml": mesh_yaml({"default": INJECTION}, services, wls)}, backend_specs(services, wls))
    mesh.kubectl_apply(read(HERE, "destination-rule-all.yaml"))
    sleep = mesh.sidecar(next(w for w in wls if w.name == "sleep"), CLIENT_OUTBOUND)
    converge(lambda: mesh.http(sleep, BOOKINFO_PORT, "ratings").status_code == 200)
    yield mesh, sleep


def flaky(mesh: Mesh, sc: Sidecar, failures: int) -> tuple[int, int]:
    """(status the client saw, attempts ratings served) for a key failing `failures` times."""
    before = mesh.count(RATINGS_APP, BOOKINFO_PORT)
    r = mesh.http(sc, BOOKINFO_PORT, "ratings", f"/flaky/k{next(_keys)}/{failures}")
    return r.status_code, mesh.count(RATINGS_APP, BOOKINFO_PORT) - before


def test_default_retries_twice(env: tuple[Mesh, Sidecar]) -> None:
    mesh, sleep = env
    # Doc: "The default retry behavior for HTTP requests is to retry twice before returning
    # the error." (Istio's default retry_on includes retriable status code 503.)
    assert flaky(mesh, sleep, 2) == (200, 3)
    assert flaky(mesh, sleep, 3) == (503, 3)


def test_virtual_service_retries(env: tuple[Mesh, Sidecar]) -> None:
    mesh, sleep = env
    mesh.kubectl_apply(read(HERE, "ratings-retries.yaml"))
    # Doc: "The following example configures a maximum of 3 retries to connect to this
    # service subset after an initial call failure, each with a 2 second timeout."
    converge(lambda: flaky(mesh, sleep, 3) == (200, 4))
    assert flaky(mesh, sleep, 3) == (200, 4)
    assert flaky(mesh, sleep, 4) == (503, 4)
    assert not mesh.errors()
    mesh.kubectl_delete(read(HERE, "ratings-retries.yaml"))
