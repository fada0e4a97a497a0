"""Istio task "Mirroring" (https://istio.io/latest/docs/tasks/traffic-management/mirroring/)
through real Envoys: httpbin v1 and v2 in `default`, a `sleep` client sidecar, the task's YAML
unchanged. Each httpbin version counts the requests it served (its access log in the task)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conformance.conftest import MeshFactory
from tests.conformance.harness import (
    CLIENT_OUTBOUND,
    HTTPBIN_PORT,
    INJECTION,
    Mesh,
    Sidecar,
    backend_specs,
    converge,
    httpbin,
    mesh_yaml,
    read,
)

pytestmark = pytest.mark.e2e
HERE = Path(__file__).resolve().parent
V1, V2 = "127.0.4.51", "127.0.4.52"


@pytest.fixture(scope="module")
def env(make_mesh: MeshFactory) -> Iterator[tuple[Mesh, Sidecar]]:
    services, wls = httpbin(("v1", "v2"))
    mesh = make_mesh()
    mesh.start({"00-httpbin.yaml": mesh_yaml({"default": INJECTION}, services, wls)}, backend_specs(services, wls))
    sleep = mesh.sidecar(next(w for w in wls if w.name == "sleep"), CLIENT_OUTBOUND)
    yield mesh, sleep


def headers(mesh: Mesh, sc: Sidecar) -> str:
    r = mesh.http(sc, HTTPBIN_PORT, "httpbin:8000", "/headers")
    assert r.status_code == 200, r.text
    return str(r.json()["backend"])


def test_default_route_then_mirror(env: tuple[Mesh, Sidecar]) -> None:
    mesh, sleep = env
    mesh.kubectl_apply(read(HERE, "httpbin-v1.yaml"))
    # Doc: "Now all traffic goes to the httpbin:v1 service"; "You should see access log
    # entries for v1 and none for v2".
    converge(lambda: all(headers(mesh, sleep) == "httpbin-v1" for _ in range(20)))
    v2_before = mesh.count(V2, HTTPBIN_PORT)
    for _ in range(10):
        assert headers(mesh, sleep) == "httpbin-v1"
    assert mesh.count(V2, HTTPBIN_PORT) == v2_before

    mesh.kubectl_apply(read(HERE, "httpbin-mirror-v2.yaml"))
    # Doc: "This route rule sends 100% of the traffic to v1. The last stanza specifies that
    # you want to mirror (i.e., also send) 100% of the same traffic to the httpbin:v2
    # service"; "these requests are mirrored as 'fire and forget', which means that the
    # responses are discarded"; "you should see access logging for both v1 and v2".
    converge(lambda: headers(mesh, sleep) == "httpbin-v1" and mesh.count(V2, HTTPBIN_PORT) > v2_before)
    v1_before, v2_before = mesh.count(V1, HTTPBIN_PORT), mesh.count(V2, HTTPBIN_PORT)
    for _ in range(10):
        assert headers(mesh, sleep) == "httpbin-v1"  # v1 answers: the copy's answer is discarded
    assert mesh.count(V1, HTTPBIN_PORT) - v1_before == 10
    converge(lambda: mesh.count(V2, HTTPBIN_PORT) - v2_before == 10)  # every request copied
    assert not mesh.errors()
