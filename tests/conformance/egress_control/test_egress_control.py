"""Istio task "Accessing External Services" (https://istio.io/latest/docs/tasks/traffic-management/egress/egress-control/),
sections "Access an external HTTP service" and "Manage traffic to external services", through
a real Envoy sidecar (bind capture): `sleep` calls `httpbin.org` (a local httpbin stand-in on
127.0.4.71:80, see httpbin-ext.yaml) by name through its sidecar. Adapted: the stand-in's
`/delay/<ms>` takes milliseconds, so the task's `/delay/5` is `/delay/5000`. The
REGISTRY_ONLY sections need intercept capture: tests/e2e/test_serviceentry_netns_e2e.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conformance.conftest import MeshFactory
from tests.conformance.harness import (
    CLIENT_OUTBOUND,
    INJECTION,
    Mesh,
    Sidecar,
    Workload,
    converge,
    elapsed,
    mesh_yaml,
    read,
)

pytestmark = pytest.mark.e2e
HERE = Path(__file__).resolve().parent
PORT = 80


@pytest.fixture(scope="module")
def env(make_mesh: MeshFactory) -> Iterator[tuple[Mesh, Sidecar]]:
    sleep = Workload("sleep", "sleep", "127.0.4.99", {}, "default", "sleep", serves=False)
    mesh = make_mesh()
    mesh.start({"00-sleep.yaml": mesh_yaml({"default": INJECTION}, [], [sleep])}, ["httpbin=127.0.4.71:80"])
    yield mesh, mesh.sidecar(sleep, CLIENT_OUTBOUND)


def test_external_http_service_and_its_timeout(env: tuple[Mesh, Sidecar]) -> None:
    mesh, sleep = env

    def call(path: str) -> httpx.Response:
        return mesh.http(sleep, PORT, "httpbin.org", path)

    mesh.kubectl_apply(read(HERE, "httpbin-ext.yaml"))
    # Doc: "Make a request to the external HTTP service from SOURCE_POD" (curl http://httpbin.org/headers).
    converge(lambda: call("/headers").status_code == 200)
    assert call("/headers").json()["backend"] == "httpbin"
    # Doc: "the request should return 200 (OK) in approximately 5 seconds" (no timeout yet).
    r, took = elapsed(lambda: call("/delay/5000"))
    assert r.status_code == 200 and took >= 5.0

    mesh.kubectl_apply(read(HERE, "httpbin-ext-timeout.yaml"))
    # Doc: "This time a 504 (Gateway Timeout) appears after 3 seconds."
    converge(lambda: call("/delay/5000").status_code == 504)
    r, took = elapsed(lambda: call("/delay/5000"))
    assert r.status_code == 504 and took >= 2.99, took  # cut by the 3 s timeout (Envoy's timer may fire a millisecond early); the backend would answer 200
    assert not mesh.errors()
