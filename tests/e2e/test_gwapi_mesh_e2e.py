"""Per-namespace routing through real Envoy sidecars of three client namespaces (shop, team,
ops) driven by one `meshline serve` (directory mode, delta xDS), issue 18 (h23):

- an HTTPRoute split 80/20 whose 20% backend does not exist: that share is answered 500
  (Gateway API), the 80% reaches the valid backend, nothing is answered 503;
- consumer routes of two namespaces for one Service plus the producer route: each client
  namespace gets its own consumer route, the others the producer route;
- one host defined by a public ServiceEntry (shop) and a private one (team): team's clients
  reach team's endpoint under their own cluster name, shop's and ops's the public one.
Backends are samples/backend.py on 127.0.23.x; every port is picked free at start."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from controlplane.localrun import free_port, start_envoy, stop, wait_http, wait_port
from tests.e2e.conftest import eventually, start_backends, started, write_config
from tests.meshgen import Backend, service_yaml

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = {"shop": "127.0.23.1", "team": "127.0.23.2", "ops": "127.0.23.3"}  # outbound bind addresses
BACKENDS = {"api-main": "127.0.23.10", "v1": "127.0.23.11", "v2": "127.0.23.12", "v3": "127.0.23.13",
            "ext-public": "127.0.23.21", "ext-team": "127.0.23.22"}
EXT = "ext.h23.example"


class Env:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.config = work / "config"
        self.config.mkdir()
        self.port = free_port(BACKENDS["v1"])
        self.xds, self.status = free_port(), free_port()
        self.admins = {ns: free_port() for ns in CLIENTS}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.client = httpx.Client(timeout=10.0)

    def files(self) -> dict[str, str]:
        p = self.port
        out = {"00-ns.yaml": "".join(f"---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n"
                                     for ns in CLIENTS)}
        out["10-services.yaml"] = "---\n".join(
            [service_yaml("api", "shop", p, [Backend(BACKENDS["api-main"], pod="api-main")])]
            + [service_yaml(n, "shop", p, [Backend(BACKENDS[n], pod=n)]) for n in ("v1", "v2", "v3")])
        out["20-entries.yaml"] = f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ext, namespace: shop}}
spec:
  hosts: [{EXT}]
  location: MESH_EXTERNAL
  ports: [{{number: {p}, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: {BACKENDS["ext-public"]}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ext-private, namespace: team}}
spec:
  hosts: [{EXT}]
  location: MESH_EXTERNAL
  ports: [{{number: {p}, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: {BACKENDS["ext-team"]}}}]
  exportTo: ["."]
"""
        return out

    def start(self) -> None:
        for name, text in self.files().items():
            write_config(self.config, name, text)
        start_backends(self.procs, *(f"{n}={ip}:{self.port}" for n, ip in BACKENDS.items()))
        log = open(self.work / "meshline.log", "wb")
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "controlplane.cli", "serve", "--config-dir", str(self.config),
             "--xds-address", f"127.0.0.1:{self.xds}", "--status-address", f"127.0.0.1:{self.status}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT))
        wait_http(f"http://127.0.0.1:{self.status}/readyz", proc=self.procs[-1])
        for ns, addr in CLIENTS.items():
            boot = subprocess.run(
                [sys.executable, "-m", "controlplane.cli", "bootstrap", "--node-id", f"client.{ns}", "--namespace", ns,
                 "--workload", "client", "--capture", "bind", "--outbound-address", addr,
                 "--xds-address", f"127.0.0.1:{self.xds}", "--admin-address", f"127.0.0.1:{self.admins[ns]}"],
                check=True, capture_output=True, text=True, cwd=ROOT).stdout
            self.procs.append(start_envoy(boot, self.work, f"envoy-{ns}", log_level="info"))
            wait_http(f"http://127.0.0.1:{self.admins[ns]}/ready", proc=self.procs[-1])
            wait_port(addr, self.port)

    def close(self) -> None:
        self.client.close()
        for p in reversed(self.procs):
            stop(p)

    def get(self, ns: str, host: str, path: str = "/") -> httpx.Response:
        return self.client.get(f"http://{CLIENTS[ns]}:{self.port}{path}", headers={"host": host})

    def backend(self, ns: str, host: str, path: str = "/") -> str:
        r = self.get(ns, host, path)
        return str(r.json()["backend"]) if r.status_code == 200 else f"status {r.status_code}"

    def clusters(self, ns: str) -> set[str]:
        out = self.client.get(f"http://127.0.0.1:{self.admins[ns]}/clusters?format=json").json()
        return {c["name"] for c in out.get("cluster_statuses", [])}

    def route_status(self, kind: str, ns: str, name: str) -> dict[str, Any]:
        routes = self.client.get(f"http://127.0.0.1:{self.status}/v1/routes").json()
        return next(r for r in routes if (r["kind"], r["namespace"], r["name"]) == (kind, ns, name))

    def errors(self) -> list[dict[str, Any]]:
        return list(self.client.get(f"http://127.0.0.1:{self.status}/v1/config/errors").json())


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with tempfile.TemporaryDirectory(prefix="meshline-h23-") as d:
        yield from started(Env(Path(d)))


def http_route(name: str, ns: str, rules: str) -> str:
    return f"""apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: {ns}}}
spec:
  parentRefs: [{{group: "", kind: Service, name: api, namespace: shop}}]
  rules:
{rules}"""


def to(backend: str, port: int, extra: str = "") -> str:
    return f"  - backendRefs: [{{name: {backend}, namespace: shop, port: {port}}}]\n{extra}"


GRANT = """apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: consumers, namespace: shop}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: team},
         {group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: ops}]
  to: [{group: "", kind: Service}]
"""


def test_the_invalid_share_of_a_split_is_answered_500_and_the_rest_reaches_the_valid_backend(env: Env) -> None:
    p = env.port
    split = f"""  - matches: [{{path: {{type: PathPrefix, value: /split}}}}]
    backendRefs:
    - {{name: v1, port: {p}, weight: 80}}
    - {{name: nosuch, port: {p}, weight: 20}}
""" + to("api-main", p)
    write_config(env.config, "30-producer.yaml", http_route("producer", "shop", split))
    eventually(lambda: env.backend("shop", "api.shop.svc.cluster.local", "/split/x") in ("v1", "status 500"))
    n = 200
    codes = Counter()
    backends = Counter()
    for i in range(n):
        r = env.get("shop", "api.shop.svc.cluster.local", f"/split/{i}")
        codes[r.status_code] += 1
        if r.status_code == 200:
            backends[r.json()["backend"]] += 1
    assert set(codes) == {200, 500}, codes  # never 503 (Envoy's default for a missing cluster)
    # 20% of 200: 40 expected, std-dev ~5.7; 10..80 is far outside any chance deviation
    assert 0.05 * n <= codes[500] <= 0.40 * n, codes
    assert backends == Counter({"v1": codes[200]}), backends
    conds = {c["type"]: c for c in eventually(lambda: env.route_status("HTTPRoute", "shop", "producer"))["parents"][0]
             ["conditions"]}
    assert (conds["ResolvedRefs"]["status"], conds["ResolvedRefs"]["reason"]) == ("False", "BackendNotFound")
    assert "nosuch" in conds["ResolvedRefs"]["message"]


def test_each_namespace_gets_its_own_consumer_route_and_the_others_the_producer_route(env: Env) -> None:
    p = env.port
    write_config(env.config, "30-producer.yaml", http_route("producer", "shop", to("v1", p)))
    write_config(env.config, "31-grant.yaml", GRANT)
    write_config(env.config, "32-team.yaml", http_route("mine", "team", to("v2", p)))
    write_config(env.config, "33-ops.yaml", http_route("mine", "ops", to("v3", p)))
    host = "api.shop.svc.cluster.local"
    eventually(lambda: (env.backend("shop", host), env.backend("team", host), env.backend("ops", host))
               == ("v1", "v2", "v3"))
    for _ in range(20):  # stable, not a split
        assert (env.backend("shop", host), env.backend("team", host), env.backend("ops", host)) == ("v1", "v2", "v3")
    for ns in ("team", "ops"):
        st = env.route_status("HTTPRoute", ns, "mine")["parents"][0]["conditions"]
        assert {(c["type"], c["status"]) for c in st} == {("Accepted", "True"), ("ResolvedRefs", "True")}
    # ops's consumer route gone: ops's clients fall back to the producer route; team keeps its own
    (env.config / "33-ops.yaml").unlink()
    eventually(lambda: env.backend("ops", host) == "v1")
    assert env.backend("team", host) == "v2" and env.backend("shop", host) == "v1"


def test_a_private_service_entry_serves_its_namespace_and_the_public_one_the_others(env: Env) -> None:
    eventually(lambda: env.backend("team", EXT) == "ext-team")
    for _ in range(10):
        assert env.backend("team", EXT) == "ext-team"
        assert env.backend("shop", EXT) == "ext-public"
        assert env.backend("ops", EXT) == "ext-public"
    own = f"outbound|{env.port}||{EXT}~team/ext-private"
    public = f"outbound|{env.port}||{EXT}"
    assert own in env.clusters("team") and public not in env.clusters("team")
    assert public in env.clusters("ops") and own not in env.clusters("ops")
    assert any(e["kind"] == "ServiceEntry" and e["name"] == "ext" and "team/ext-private" in e["message"]
               for e in env.errors()), env.errors()
