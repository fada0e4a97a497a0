"""Istio task "Mutual TLS Migration"
(https://istio.io/latest/docs/tasks/security/authentication/mtls-migration/) through real
Envoys: httpbin (port 8000) and sleep with sidecars in `foo` and `bar`, sleep without one in
`legacy`. Sidecar clients call `httpbin.<ns>:8000` through their sidecar (automatic mTLS); the
legacy client connects in plaintext to the httpbin pod, where its sidecar takes inbound
traffic. Meshline runs with `--root-namespace istio-system`, Istio's default (meshConfig
`rootNamespace`), as the task's cluster has it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conformance.conftest import MeshFactory
from tests.conformance.harness import (
    HTTPBIN_PORT,
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
HTTPBIN_IP = {"foo": "127.0.4.71", "bar": "127.0.4.72"}


class World:
    def __init__(self, mesh: Mesh, sleeps: dict[str, Sidecar]) -> None:
        self.mesh = mesh
        self.sleeps = sleeps

    def curl(self, src: str, dst: str) -> int:
        """`curl http://httpbin.<dst>:8000/ip` from sleep.<src>: the HTTP code, 0 ("000") when
        the connection fails."""
        try:
            with httpx.Client(timeout=10) as c:
                if src == "legacy":
                    r = c.get(f"http://{HTTPBIN_IP[dst]}:{HTTPBIN_PORT}/ip", headers={"host": f"httpbin.{dst}:8000"})
                else:
                    r = self.mesh.http(self.sleeps[src], HTTPBIN_PORT, f"httpbin.{dst}:8000", "/ip", client=c)
            return r.status_code
        except httpx.HTTPError:
            return 0

    def matrix(self) -> dict[str, int]:
        return {f"sleep.{s} to httpbin.{d}": self.curl(s, d) for s in ("foo", "bar", "legacy") for d in ("foo", "bar")}


@pytest.fixture(scope="module")
def world(make_mesh: MeshFactory) -> Iterator[World]:
    namespaces = {"foo": INJECTION, "bar": INJECTION, "legacy": {}, "istio-system": {}}
    services = [Service("httpbin", [("http", HTTPBIN_PORT)], ns) for ns in ("foo", "bar")]
    wls = []
    for i, ns in enumerate(("foo", "bar")):
        wls.append(Workload("httpbin", "httpbin", HTTPBIN_IP[ns], {"version": "v1"}, ns, "httpbin",
                            injected=True, app_ip=f"127.0.5.{71 + i}"))
        wls.append(Workload("sleep", "sleep", f"127.0.4.{81 + i}", {}, ns, "sleep", injected=True, serves=False))
    wls.append(Workload("sleep", "sleep", "127.0.4.83", {}, "legacy", "sleep", serves=False))  # no sidecar
    mesh = make_mesh(root_namespace="istio-system")
    mesh.start({"00-mesh.yaml": mesh_yaml(namespaces, services, wls)}, backend_specs(services, wls))
    by = {(w.namespace, w.app): w for w in wls}
    scs = mesh.start_sidecars([(by[("foo", "httpbin")], "127.0.3.11"), (by[("bar", "httpbin")], "127.0.3.12"),
                               (by[("foo", "sleep")], "127.0.3.1"), (by[("bar", "sleep")], "127.0.3.2")])
    yield World(mesh, {"foo": scs[2], "bar": scs[3]})


ALL_OK = {f"sleep.{s} to httpbin.{d}": 200 for s in ("foo", "bar", "legacy") for d in ("foo", "bar")}


def test_permissive_by_default(world: World) -> None:
    # Doc: "By default, Istio configures the destination workloads using PERMISSIVE mode";
    # "All requests should success with HTTP code 200."
    converge(lambda: world.matrix() == ALL_OK)
    # Sidecar clients already use mutual TLS (auto mTLS): httpbin's sidecar forwards the
    # client's SPIFFE identity (the task's httpbin /headers shows X-Forwarded-Client-Cert).
    r = world.mesh.http(world.sleeps["foo"], HTTPBIN_PORT, "httpbin.bar:8000", "/headers")
    assert "URI=spiffe://cluster.local/ns/foo/sa/sleep" in r.json()["headers"]["x-forwarded-client-cert"]
    assert "By=spiffe://cluster.local/ns/bar/sa/httpbin" in r.json()["headers"]["x-forwarded-client-cert"]


def test_lock_down_by_namespace(world: World) -> None:
    world.mesh.kubectl_apply(read(HERE, "peer-authentication-foo-strict.yaml"))
    # Doc: "Now, you should see the request from sleep.legacy to httpbin.foo failing."
    expected = {**ALL_OK, "sleep.legacy to httpbin.foo": 0}
    converge(lambda: world.matrix() == expected)
    assert world.matrix() == expected
    assert not world.mesh.errors()


def test_lock_down_the_entire_mesh(world: World) -> None:
    world.mesh.kubectl_apply(read(HERE, "peer-authentication-mesh-strict.yaml"))
    # Doc: "Now, both the foo and bar namespaces enforce mutual TLS only traffic, so you
    # should see requests from sleep.legacy failing for both."
    expected = {**ALL_OK, "sleep.legacy to httpbin.foo": 0, "sleep.legacy to httpbin.bar": 0}
    converge(lambda: world.matrix() == expected)
    assert world.matrix() == expected
    # Removing the namespace policy leaves foo STRICT through the mesh-wide one.
    world.mesh.kubectl_delete(read(HERE, "peer-authentication-foo-strict.yaml"))
    converge(lambda: world.matrix() == expected and world.matrix() == expected)
    # Clean up (doc: delete the policies): plaintext is accepted again.
    world.mesh.kubectl_delete(read(HERE, "peer-authentication-mesh-strict.yaml"))
    converge(lambda: world.matrix() == ALL_OK)
    assert not world.mesh.errors()
