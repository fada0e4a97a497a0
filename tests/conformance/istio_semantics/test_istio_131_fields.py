"""Istio 1.31 fields through real Envoys (issue 16): `outlierDetectionHttpErrorCodes` decides
which responses count toward consecutive5xxErrors, `trustDomains` admits peers by the trust
domain of their certificate, and a redirect's `prefixRewrite` replaces the matched prefix. Expected results from Istio's reference docs (quoted in
the YAML files and next to each assertion)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conformance.conftest import MeshFactory
from tests.conformance.harness import (
    INJECTION,
    ROOT,
    Mesh,
    Service,
    Sidecar,
    Workload,
    backend_specs,
    converge,
    mesh_yaml,
    read,
    sample,
)

pytestmark = pytest.mark.e2e
HERE = Path(__file__).resolve().parent
HELLO_PORT = 5000
HTTPBIN_PORT = 8000
N = 20


@pytest.fixture(scope="module")
def env(make_mesh: MeshFactory) -> Iterator[tuple[Mesh, Sidecar, Sidecar]]:
    services = [Service("helloworld", [("http", HELLO_PORT)]), Service("httpbin", [("http", HTTPBIN_PORT)])]
    hello = [Workload(f"helloworld-{v}", "helloworld", f"127.0.4.{231 + i}", {"version": v})
             for i, v in enumerate(("v1", "v2"))]
    httpbin = Workload("httpbin-v1", "httpbin", "127.0.4.235", {"version": "v1"}, sa="httpbin", injected=True,
                       app_ip="127.0.5.235")
    sleep = Workload("sleep", "sleep", "127.0.4.239", {}, sa="sleep", serves=False)
    wls = [*hello, httpbin, sleep]
    mesh = make_mesh()
    argvs = [[sys.executable, str(ROOT / "samples" / "backend.py"), f"{w.name}={w.ip}:{HELLO_PORT}"] for w in hello]
    mesh.start({"00-mesh.yaml": mesh_yaml({"default": INJECTION}, services, wls)},
               backend_specs(services, [httpbin]), argvs)
    sc_sleep, sc_httpbin = mesh.start_sidecars([(sleep, "127.0.3.91"), (httpbin, "127.0.3.92")])
    yield mesh, sc_sleep, sc_httpbin


def hello(mesh: Mesh, sc: Sidecar, path: str = "/hello") -> str:
    r = mesh.http(sc, HELLO_PORT, "helloworld.default.svc.cluster.local", path)
    return str(r.json()["backend"]) if r.status_code == 200 else f"HTTP {r.status_code}"


def test_only_the_listed_status_codes_eject(env: tuple[Mesh, Sidecar, Sidecar]) -> None:
    mesh, sleep, _ = env
    mesh.kubectl_apply(read(HERE, "destination-rule-http-error-codes.yaml"))
    converge(lambda: mesh.stat(sleep, "cluster.outbound|5000||helloworld.default.svc.cluster.local."
                                      "outlier_detection.ejections_active") == 0
             and set(sample(N, lambda: hello(mesh, sleep))) == {"helloworld-v1", "helloworld-v2"}
             and mesh.http(sleep, HELLO_PORT, "helloworld.default.svc.cluster.local", "/status/418").status_code == 418)
    # "only responses with one of these status codes will be treated as errors": 503s are not.
    for _ in range(10):
        mesh.http(sleep, HELLO_PORT, "helloworld.default.svc.cluster.local", "/status/503")
    assert set(sample(N, lambda: hello(mesh, sleep))) == {"helloworld-v1", "helloworld-v2"}
    # 418 is listed: two in a row on a pod (consecutive5xxErrors: 2) eject it (at most 50%).
    for _ in range(6):
        mesh.http(sleep, HELLO_PORT, "helloworld.default.svc.cluster.local", "/status/418")
    converge(lambda: len(sample(N, lambda: hello(mesh, sleep))) == 1, timeout=30)
    assert not mesh.errors()


def test_trust_domains_admit_peers_by_certificate(env: tuple[Mesh, Sidecar, Sidecar]) -> None:
    mesh, sleep, _ = env

    def status() -> int:
        return mesh.http(sleep, HTTPBIN_PORT, "httpbin.default.svc.cluster.local", "/headers").status_code

    converge(lambda: status() == 200)
    policy = read(HERE, "authorization-policy-trust-domains.yaml")
    mesh.kubectl_apply(policy)
    # sleep's certificate is of trust domain cluster.local, not partner.example: denied.
    converge(lambda: status() == 403)
    # "Can be exact, prefix, suffix and presence": cluster.local, cluster.*, *.local and * admit it.
    for value in ("cluster.local", "cluster.*", "*.local", "*"):
        mesh.kubectl_apply(policy.replace("trustDomains: [partner.example]", f'trustDomains: ["{value}"]'))
        converge(lambda: status() == 200)
        mesh.kubectl_apply(policy)
        converge(lambda: status() == 403)
    assert not mesh.errors()


def test_redirect_prefix_rewrite_replaces_the_matched_prefix(env: tuple[Mesh, Sidecar, Sidecar]) -> None:
    mesh, sleep, _ = env
    host = "helloworld.default.svc.cluster.local"
    mesh.kubectl_apply(read(HERE, "virtual-service-redirect-prefix-rewrite.yaml"))
    converge(lambda: mesh.http(sleep, HELLO_PORT, host, "/foo/baz").status_code == 301)
    # "/foo/baz becomes /bar/baz" (the query string is kept)
    r = mesh.http(sleep, HELLO_PORT, host, "/foo/baz?q=1")
    assert r.status_code == 301 and r.headers["location"] == f"http://{host}/bar/baz?q=1", r.headers
    # other paths are routed as before
    assert mesh.http(sleep, HELLO_PORT, host, "/hello").status_code == 200
    assert not mesh.errors()
