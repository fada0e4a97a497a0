"""Istio task "Request Timeouts" (https://istio.io/latest/docs/tasks/traffic-management/request-timeouts/)
through real Envoys: Bookinfo in `default`, a `sleep` client sidecar, the task's YAML unchanged.
reviews v2 is an app that calls ratings for every request (as Bookinfo's does) through the
client's sidecar listener, so the 2 s ratings delay and the 0.5 s reviews timeout combine as
in the task."""

from __future__ import annotations

import sys
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


@pytest.fixture(scope="module")
def env(make_mesh: MeshFactory) -> Iterator[tuple[Mesh, Sidecar]]:
    services, wls = bookinfo()
    mesh = make_mesh()
    v2 = next(w for w in wls if w.name == "reviews-v2")
    chain = [sys.executable, str(HERE.parent / "chain_app.py"), f"reviews-v2={v2.ip}:{BOOKINFO_PORT}",
             "ratings", f"{CLIENT_OUTBOUND}:{BOOKINFO_PORT}"]
    mesh.start({"00-bookinfo.yaml": mesh_yaml({"default": INJECTION}, services, wls)},
               [s for s in backend_specs(services, wls) if not s.startswith("reviews-v2=")], [chain])
    mesh.kubectl_apply(read(HERE, "destination-rule-all.yaml"))
    mesh.kubectl_apply(read(HERE, "virtual-service-all-v1.yaml"))
    sleep = mesh.sidecar(next(w for w in wls if w.name == "sleep"), CLIENT_OUTBOUND)
    yield mesh, sleep


def test_timeout_cuts_a_slow_call(env: tuple[Mesh, Sidecar]) -> None:
    mesh, sleep = env

    def call() -> httpx.Response:
        return mesh.http(sleep, BOOKINFO_PORT, "reviews")

    mesh.kubectl_apply(read(HERE, "reviews-v2.yaml"))
    converge(lambda: call().json().get("backend") == "reviews-v2")
    r = call()
    assert r.json()["upstream_status"] == 200

    mesh.kubectl_apply(read(HERE, "ratings-delay-2s.yaml"))
    # Doc: "You should see the Bookinfo application working normally (with ratings stars
    # displayed), but there is a 2 second delay whenever you refresh the page."
    converge(lambda: elapsed(call)[1] >= 2.0)
    r, took = elapsed(call)
    assert r.status_code == 200 and r.json() == {
        "backend": "reviews-v2", "upstream": "ratings", "upstream_status": 200}
    assert took >= 1.99  # the 2 s fault delay; Envoy's timer may fire a millisecond early

    mesh.kubectl_apply(read(HERE, "reviews-v2-timeout.yaml"))
    # Doc: "Now add a half second request timeout for calls to the reviews service"; "it
    # returns in about 1 second, instead of 2, and the reviews are unavailable" (productpage
    # calls reviews twice). The caller gets Envoy's timeout answer, not reviews' 200.
    converge(lambda: call().status_code == 504)
    for _ in range(3):
        r, took = elapsed(call)
        assert r.status_code == 504, r.text
        assert r.text == "upstream request timeout"
        # Envoy arms the 0.5 s timer when it starts the upstream request, and its timers may
        # fire up to a millisecond early (seen: 0.4998 s end to end); the 504 text above is the
        # proof that the route timeout cut the call.
        assert took >= 0.49
    assert not mesh.errors()
