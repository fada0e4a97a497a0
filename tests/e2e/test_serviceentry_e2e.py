"""ServiceEntry with a real Envoy sidecar (bind capture) driven by `meshline serve` (issue 18):
an "external" host with STATIC loopback endpoints, routed by a VirtualService to the
DestinationRule's subsets with a retry, and a host resolved by DNS (`localhost`). Backends
are samples/backend.py on 127.0.6.x; every port is picked free at start."""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from controlplane.localrun import free_port, stop, wait_port
from tests.e2e.conftest import eventually, start_backends, start_client_sidecar, started, write_config

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
OUTBOUND = "127.0.6.1"  # the sidecar's outbound listeners bind here (bind capture)
V1, V2, LOCAL = "127.0.6.11", "127.0.6.12", "127.0.0.1"


class Env:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.config = work / "config"
        self.config.mkdir()
        self.se_port = free_port(OUTBOUND)  # the ServiceEntry's port (the sidecar listens there)
        self.dns_port = free_port(OUTBOUND)
        self.app_port = free_port(V1)  # the external backends' port (targetPort)
        self.local_port = free_port(LOCAL)  # the backend behind `localhost`
        self.xds_port, self.status_port, self.admin_port = free_port(), free_port(), free_port()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.client = httpx.Client(timeout=10.0)

    def files(self) -> dict[str, str]:
        return {
            "00-ns.yaml": "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n",
            "10-external.yaml": f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: external-api, namespace: shop}}
spec:
  hosts: [api.external.example]
  location: MESH_EXTERNAL
  ports: [{{number: {self.se_port}, name: http, protocol: HTTP, targetPort: {self.app_port}}}]
  resolution: STATIC
  endpoints:
  - {{address: {V1}, labels: {{version: v1}}}}
  - {{address: {V2}, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: external-api, namespace: shop}}
spec:
  host: api.external.example
  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: external-api, namespace: shop}}
spec:
  hosts: [api.external.example]
  http:
  - match: [{{headers: {{x-version: {{exact: v2}}}}}}]
    route: [{{destination: {{host: api.external.example, subset: v2}}}}]
    retries: {{attempts: 0}}
  - route: [{{destination: {{host: api.external.example, subset: v1}}}}]
    retries: {{attempts: 2, retryOn: 5xx}}
""",
            "20-dns.yaml": f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: by-dns, namespace: shop}}
spec:
  hosts: [api.dns.example]
  ports: [{{number: {self.dns_port}, name: http, protocol: HTTP}}]
  resolution: DNS
  endpoints: [{{address: localhost, ports: {{http: {self.local_port}}}}}]
""",
        }

    def start(self) -> None:
        for name, text in self.files().items():
            (self.config / name).write_text(text)
        backends = [f"ext-v1={V1}:{self.app_port}", f"ext-v2={V2}:{self.app_port}", f"local={LOCAL}:{self.local_port}"]
        start_backends(self.procs, *backends)
        start_client_sidecar(self.work, self.procs, node_id="se-client", outbound=OUTBOUND, xds=self.xds_port,
                             status=self.status_port, admin=self.admin_port, labels="app=client")
        wait_port(OUTBOUND, self.se_port)
        wait_port(OUTBOUND, self.dns_port)

    def close(self) -> None:
        self.client.close()
        for p in reversed(self.procs):
            stop(p)

    def get(self, host: str, port: int, path: str = "/", headers: dict[str, str] | None = None) -> httpx.Response:
        return self.client.get(f"http://{OUTBOUND}:{port}{path}", headers={"host": host, **(headers or {})})

    def count(self, address: str, port: int) -> int:
        return int(self.client.get(f"http://{address}:{port}/__requests").json()["count"])

    def write(self, name: str, text: str) -> None:
        write_config(self.config, name, text)


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with tempfile.TemporaryDirectory(prefix="meshline-se-") as d:
        yield from started(Env(Path(d)))


def test_static_external_host_routed_to_its_subset(env: Env) -> None:
    r = env.get("api.external.example", env.se_port)
    assert r.status_code == 200 and r.json()["backend"] == "ext-v1"
    r = env.get(f"api.external.example:{env.se_port}", env.se_port, headers={"x-version": "v2"})
    assert r.status_code == 200 and r.json()["backend"] == "ext-v2"
    assert env.get("nosuch.external.example", env.se_port).status_code == 404  # not a registry host


def test_retry_hides_the_first_503(env: Env) -> None:
    key = f"k{time.monotonic_ns()}"
    before = env.count(V1, env.app_port)
    r = env.get("api.external.example", env.se_port, f"/flaky/{key}/1")
    assert r.status_code == 200 and r.json()["backend"] == "ext-v1"
    assert env.count(V1, env.app_port) - before == 2  # the 503, then the retry's 200
    # The same failure without retries (the v2 route): the client sees the 503.
    r = env.get("api.external.example", env.se_port, f"/flaky/{key}-v2/1", headers={"x-version": "v2"})
    assert r.status_code == 503


def test_dns_resolution_of_localhost(env: Env) -> None:
    r = env.get("api.dns.example", env.dns_port)
    assert r.status_code == 200 and r.json()["backend"] == "local"
    clusters = env.client.get(f"http://127.0.0.1:{env.admin_port}/clusters").text
    assert f"outbound|{env.dns_port}||api.dns.example::127.0.0.1:{env.local_port}::" in clusters


def test_round_robin_dns_and_a_removed_entry(env: Env) -> None:
    env.write("20-dns.yaml", env.files()["20-dns.yaml"].replace("resolution: DNS", "resolution: DNS_ROUND_ROBIN"))

    def logical() -> bool:
        dump = env.client.get(f"http://127.0.0.1:{env.admin_port}/config_dump?resource=dynamic_active_clusters").text
        return '"LOGICAL_DNS"' in dump and env.get("api.dns.example", env.dns_port).status_code == 200
    eventually(logical)
    (env.config / "20-dns.yaml").unlink()
    eventually(lambda: env.client.get(f"http://127.0.0.1:{env.admin_port}/listeners").text.count(
        f"{OUTBOUND}:{env.dns_port}") == 0)


def test_an_invalid_update_is_reported_and_the_last_good_entry_keeps_serving(env: Env) -> None:
    good = env.files()["10-external.yaml"]
    env.write("10-external.yaml", good.replace("resolution: STATIC", "resolution: NONE"))  # NONE with endpoints

    def reported() -> list[dict[str, object]]:
        errs = env.client.get(f"http://127.0.0.1:{env.status_port}/v1/config/errors").json()
        return [e for e in errs if "ServiceEntry/shop/external-api" in str(e) and "resolution NONE" in str(e)]
    (err,) = eventually(reported)
    assert "10-external.yaml" in str(err) and "spec.endpoints" in str(err)
    r = env.get("api.external.example", env.se_port)
    assert r.status_code == 200 and r.json()["backend"] == "ext-v1"
    env.write("10-external.yaml", good)
    eventually(lambda: not reported())
