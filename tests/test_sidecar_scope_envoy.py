"""A Sidecar-scoped proxy still reaches everything it is allowed to, and nothing else: a
real `meshline serve` on a temporary config directory, backends and two real Envoys in
bind capture on their own loopback addresses (127.0.0.200-220, service ports 19700-19720).
The `shop` Envoy is scoped by shop's default Sidecar (`./*` + `meshline-system/*`); the
`other` Envoy is unscoped and reaches every service."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from controlplane.localrun import free_port, start_envoy, stop, wait_http, wait_port
from tests.meshgen import Backend, service_yaml

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parent.parent
SHARED_PORT = 19700  # web (shop), telemetry (meshline-system) and catalog (other) share it
REVIEWS_PORT = 19701
LEGACY_PORT = 19702  # only legacy (other) uses it: a scoped shop proxy has no listener there
BACKENDS = {
    "web": ("127.0.0.201", SHARED_PORT, "shop"),
    "reviews": ("127.0.0.202", REVIEWS_PORT, "shop"),
    "telemetry": ("127.0.0.203", SHARED_PORT, "meshline-system"),
    "catalog": ("127.0.0.204", SHARED_PORT, "other"),
    "legacy": ("127.0.0.205", LEGACY_PORT, "other"),
}
SCOPED_ADDRESS = "127.0.0.210"
UNSCOPED_ADDRESS = "127.0.0.211"
ALLOWED = ("web", "reviews", "telemetry")
DISALLOWED = ("catalog", "legacy")


def sidecar_yaml(*hosts: str) -> str:
    items = ", ".join(f'"{h}"' for h in hosts)
    return (f"apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: default, namespace: shop}}\n"
            f"spec:\n  egress:\n  - hosts: [{items}]\n")


def fqdn(name: str) -> str:
    return f"{name}.{BACKENDS[name][2]}.svc.cluster.local"


@dataclass
class Env:
    work: Path
    admin: dict[str, int]
    client: httpx.Client

    def get(self, proxy: str, name: str, host: str | None = None) -> httpx.Response:
        address = SCOPED_ADDRESS if proxy == "shop" else UNSCOPED_ADDRESS
        return self.client.get(f"http://{address}:{BACKENDS[name][1]}/", headers={"host": host or fqdn(name)})

    def clusters(self, proxy: str) -> str:
        return self.client.get(f"http://127.0.0.1:{self.admin[proxy]}/clusters").text

    def write(self, name: str, text: str) -> None:
        tmp = self.work / "config" / f".{name}.tmp"
        tmp.write_text(text)
        tmp.rename(self.work / "config" / name)


def eventually(check: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (AssertionError, httpx.HTTPError):
            if time.monotonic() >= deadline:
                raise
        if time.monotonic() >= deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="meshline-scope-") as d:
        work = Path(d)
        config = work / "config"
        config.mkdir()
        (config / "00-ns.yaml").write_text("---\n".join(
            f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n" for ns in ("shop", "other", "meshline-system")))
        for name, (ip, port, ns) in BACKENDS.items():
            (config / f"10-{name}.yaml").write_text(service_yaml(name, ns, port, [Backend(ip)]))
        (config / "20-sidecar.yaml").write_text(sidecar_yaml("./*", "meshline-system/*"))
        client = httpx.Client(timeout=5.0)
        try:
            procs.append(subprocess.Popen(
                [sys.executable, str(ROOT / "samples" / "backend.py"),
                 *(f"{n}={ip}:{port}" for n, (ip, port, _) in BACKENDS.items())],
                stdout=subprocess.PIPE, start_new_session=True))
            assert procs[-1].stdout is not None and procs[-1].stdout.readline().strip() == b"ready"
            xds, status = free_port(), free_port()
            log = open(work / "meshline.log", "wb")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "controlplane.cli", "serve", "--config-dir", str(config),
                 "--xds-address", f"127.0.0.1:{xds}", "--status-address", f"127.0.0.1:{status}"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT))
            wait_http(f"http://127.0.0.1:{status}/readyz", proc=procs[-1])
            admin: dict[str, int] = {}
            for proxy, address in (("shop", SCOPED_ADDRESS), ("other", UNSCOPED_ADDRESS)):
                admin[proxy] = free_port()
                boot = subprocess.run(
                    [sys.executable, "-m", "controlplane.cli", "bootstrap", "--node-id", f"client-{proxy}",
                     "--namespace", proxy, "--workload", "client", "--labels", "app=client", "--capture", "bind",
                     "--outbound-address", address, "--xds-address", f"127.0.0.1:{xds}",
                     "--admin-address", f"127.0.0.1:{admin[proxy]}"],
                    check=True, capture_output=True, text=True, cwd=ROOT).stdout
                procs.append(start_envoy(boot, work, f"envoy-{proxy}"))
                wait_http(f"http://127.0.0.1:{admin[proxy]}/ready", proc=procs[-1])
            wait_port(SCOPED_ADDRESS, SHARED_PORT)
            wait_port(SCOPED_ADDRESS, REVIEWS_PORT)
            wait_port(UNSCOPED_ADDRESS, LEGACY_PORT)
            yield Env(work, admin, client)
        finally:
            client.close()
            for p in reversed(procs):
                stop(p)


def test_scoped_proxy_reaches_every_allowed_service(env: Env) -> None:
    for name in ALLOWED:
        r = env.get("shop", name)
        assert r.status_code == 200, (name, r.status_code, r.text)
        assert r.json()["backend"] == name
    # Short names of the proxy's own namespace work as without a Sidecar.
    assert env.get("shop", "web", host="web").json()["backend"] == "web"
    assert env.get("shop", "reviews", host=f"reviews.shop:{REVIEWS_PORT}").json()["backend"] == "reviews"


def test_scoped_proxy_has_nothing_of_the_other_services(env: Env) -> None:
    r = env.get("shop", "catalog")  # a listener exists on the shared port, but no virtual host
    assert r.status_code == 404
    with pytest.raises(httpx.ConnectError):  # no service in scope on that port: no listener at all
        env.get("shop", "legacy")
    clusters = env.clusters("shop")
    for name in ALLOWED:
        assert f"outbound|{BACKENDS[name][1]}||{fqdn(name)}::" in clusters, name
    for name in DISALLOWED:
        assert fqdn(name) not in clusters, name


def test_unscoped_proxy_reaches_everything(env: Env) -> None:
    for name in (*ALLOWED, *DISALLOWED):
        r = env.get("other", name)
        assert r.status_code == 200 and r.json()["backend"] == name, (name, r.status_code)
    clusters = env.clusters("other")
    assert all(fqdn(name) in clusters for name in BACKENDS)


def test_changing_the_sidecar_rescopes_the_proxy(env: Env) -> None:
    env.write("20-sidecar.yaml", sidecar_yaml("./*", "meshline-system/*", "other/catalog.other.svc.cluster.local"))
    eventually(lambda: env.get("shop", "catalog").status_code == 200)
    assert env.get("shop", "catalog").json()["backend"] == "catalog"
    assert fqdn("legacy") not in env.clusters("shop")
    for name in ALLOWED:
        assert env.get("shop", name).status_code == 200
    # Without a Sidecar the proxy is unscoped again.
    (env.work / "config" / "20-sidecar.yaml").unlink()
    eventually(lambda: env.get("shop", "legacy").status_code == 200)
    assert fqdn("legacy") in env.clusters("shop")
