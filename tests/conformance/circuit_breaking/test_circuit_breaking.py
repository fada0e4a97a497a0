"""Istio task "Circuit Breaking" (https://istio.io/latest/docs/tasks/traffic-management/circuit-breaking/)
through real Envoys: httpbin in `default`, a `sleep` client sidecar (the task's fortio client),
the task's DestinationRule unchanged."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
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
CLUSTER = f"outbound|{HTTPBIN_PORT}||httpbin.default.svc.cluster.local"


@pytest.fixture(scope="module")
def env(make_mesh: MeshFactory) -> Iterator[tuple[Mesh, Sidecar]]:
    services, wls = httpbin()
    mesh = make_mesh()
    mesh.start({"00-httpbin.yaml": mesh_yaml({"default": INJECTION}, services, wls)}, backend_specs(services, wls))
    sleep = mesh.sidecar(next(w for w in wls if w.name == "sleep"), CLIENT_OUTBOUND)
    yield mesh, sleep


def test_concurrent_requests_trip_the_breaker(env: tuple[Mesh, Sidecar]) -> None:
    mesh, sleep = env
    mesh.kubectl_apply(read(HERE, "destination-rule-httpbin.yaml"))
    converge(lambda: mesh.client.get(f"http://127.0.0.1:{sleep.admin}/clusters").text.count(
        f"{CLUSTER}::default_priority::max_pending_requests::1") == 1)
    # Doc: "Call the service with one connection and send 20 requests" ... "All requests
    # succeeded": one request at a time never overflows.
    for _ in range(10):
        assert mesh.http(sleep, HTTPBIN_PORT, "httpbin", "/get").status_code == 200

    # Doc: "Bring the number of concurrent connections up to 3" ... "Now you start to see the
    # expected circuit breaking behavior ... the rest were trapped by circuit breaking"
    # (Code 503), and "upstream_rq_pending_overflow" counts them. Six requests that each hold
    # httpbin for 5 s: one connection and one pending request are allowed, the rest overflow.
    results: list[httpx.Response] = []
    lock = threading.Lock()

    def one() -> None:
        with httpx.Client(timeout=60) as c:
            r = mesh.http(sleep, HTTPBIN_PORT, "httpbin", "/delay/5000", client=c)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in results)
    assert 200 in codes and 503 in codes, codes
    overflowed = [r for r in results if r.status_code == 503]
    assert all(r.headers.get("x-envoy-overloaded") == "true" for r in overflowed), [r.headers for r in overflowed]
    assert codes.count(200) <= 2, codes  # at most the one connection plus the one pending request
    assert mesh.stat(sleep, f"cluster.{CLUSTER}.upstream_rq_pending_overflow") >= len(overflowed)
    assert not mesh.errors()
