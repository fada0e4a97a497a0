"""`meshline iptables` in a real network namespace with a real Envoy sidecar.

Two fresh network namespaces joined by a veth pair, on 198.18.<x>.0/24 (the benchmarking
range, never a real network): `pod` (198.18.x.2) plays the injected pod, `host`
(198.18.x.3) a service host that also runs `meshline serve`. In `pod`: the app (an HTTP
server on :9080), `meshline iptables`, and Envoy from `meshline bootstrap --capture
intercept` under uid 1337 (setpriv), exactly the layout the injector builds. Then:

- a plain HTTP call from the pod (as root, not the proxy's uid) to the Service address
  198.18.x.3:8080 is transparently captured: Envoy's `outbound|8080||backend...` cluster
  counts it and the VirtualService's response header is set;
- Envoy's own xDS connection to 198.18.x.3 is not captured (uid exemption), or nothing works;
- a call from `host` to the pod IP :9080 reaches the app through virtualInbound (15006);
- an excluded outbound port bypasses the proxy;
- applying twice leaves one set of rules; `--cleanup` restores direct traffic (Envoy's
  counters stop moving, the header disappears) and is idempotent.

Needs root, `ip`, `iptables` and `setpriv`; skipped with the reason otherwise. No traffic
leaves the two namespaces.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.iptables import CHAINS
from controlplane.localrun import envoy_binary, stop
from tests.netns_mesh import sh

ROOT = Path(__file__).resolve().parent.parent
PROXY_UID = 1337
NS = "shop"
BACKEND_HOST = "backend.shop.svc.cluster.local"


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces and iptables)"
    for tool in ("ip", "iptables", "iptables-save", "iptables-restore", "setpriv", "curl"):
        if shutil.which(tool) is None:
            return f"needs {tool} on PATH (apt-get install -y iproute2 iptables util-linux curl)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


class Lab:
    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.pod = f"ml-pod-{tag}"
        self.host = f"ml-host-{tag}"
        x = secrets.randbelow(254) + 1
        self.pod_ip = f"198.18.{x}.2"
        self.host_ip = f"198.18.{x}.3"
        self.work = Path(tempfile.mkdtemp(prefix="meshline-netns-"))
        os.chmod(self.work, 0o755)  # Envoy runs as uid 1337
        self.procs: list[subprocess.Popen[bytes]] = []
        self.envoy: subprocess.Popen[bytes] | None = None
        self.netns: list[str] = []

    # ------------------------------------------------------------------ plumbing
    def exec_argv(self, ns: str, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv]

    def run_in(self, ns: str, *argv: str, check: bool = True, timeout: float = 20.0) -> str:
        return sh(*self.exec_argv(ns, *argv), check=check, timeout=timeout)

    def spawn(self, ns: str, name: str, *argv: str) -> subprocess.Popen[bytes]:
        log = open(self.work / f"{name}.log", "wb")
        proc = subprocess.Popen(self.exec_argv(ns, *argv), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=ROOT)
        self.procs.append(proc)
        return proc

    def meshline(self, ns: str, *args: str, check: bool = True) -> str:
        return self.run_in(ns, sys.executable, "-m", "controlplane.cli", *args, check=check)

    def curl(self, ns: str, url: str, *extra: str) -> tuple[int, dict[str, str], str]:
        out = self.run_in(ns, "curl", "-sS", "-m", "5", "-D", "-", url, *extra)
        head, _, body = out.replace("\r\n", "\n").partition("\n\n")
        status_line, *lines = head.splitlines()
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
        return int(status_line.split()[1]), headers, body

    def admin_stat(self, name: str) -> int:
        """One Envoy counter/gauge via the admin API (127.0.0.1:15000 inside the pod)."""
        out = self.run_in(self.pod, "curl", "-sS", "-m", "5", "http://127.0.0.1:15000/stats?format=json")
        for s in json.loads(out)["stats"]:
            if s.get("name") == name:
                return int(s.get("value", 0))
        return 0

    def wait(self, what: str, check: Any, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise AssertionError(f"a process exited while waiting for {what}:\n{self.logs()}")
            try:
                if check():
                    return
            except (AssertionError, RuntimeError, subprocess.SubprocessError, ValueError) as exc:
                last = exc
            time.sleep(0.1)
        raise AssertionError(f"{what} not ready after {timeout}s ({last})\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(
            self.work.glob("*.log")))

    # ------------------------------------------------------------------ lifecycle
    def setup_network(self) -> None:
        for ns in (self.pod, self.host):
            sh("ip", "netns", "add", ns)
            self.netns.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", self.pod, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", self.host)
        for ns, ip in ((self.pod, self.pod_ip), (self.host, self.host_ip)):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")

    def write_mesh(self) -> Path:
        cfg = self.work / "config"
        cfg.mkdir()
        docs: list[dict[str, Any]] = [
            {"apiVersion": "v1", "kind": "Namespace",
             "metadata": {"name": NS, "labels": {"meshline.io/dataplane-mode": "sidecar"}}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "backend", "namespace": NS},
             "spec": {"clusterIP": self.host_ip, "selector": {"app": "backend"},
                      "ports": [{"name": "http", "port": 8080, "targetPort": 8080}]}},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
             "metadata": {"name": "backend-1", "namespace": NS, "labels": {"kubernetes.io/service-name": "backend"}},
             "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
             "endpoints": [{"addresses": [self.host_ip], "conditions": {"ready": True}}]},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "app", "namespace": NS},
             "spec": {"selector": {"app": "app"}, "ports": [{"name": "http", "port": 9080, "targetPort": 9080}]}},
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "app-0", "namespace": NS, "labels": {"app": "app"}},
             "spec": {"containers": [{"name": "app", "image": "app", "ports": [{"containerPort": 9080}]}]},
             "status": {"podIP": self.pod_ip}},
            {"apiVersion": "networking.meshline.io/v1", "kind": "VirtualService",
             "metadata": {"name": "backend", "namespace": NS},
             "spec": {"hosts": ["backend"], "http": [{
                 "headers": {"response": {"set": {"x-meshline-captured": "yes"}}},
                 "route": [{"destination": {"host": "backend"}}]}]}},
        ]
        (cfg / "mesh.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
        return cfg

    def start(self) -> None:
        self.setup_network()
        cfg = self.write_mesh()
        backend = str(ROOT / "samples" / "backend.py")
        self.spawn(self.host, "backends", sys.executable, backend, f"backend={self.host_ip}:8080",
                   f"other={self.host_ip}:8081")
        self.spawn(self.pod, "app", sys.executable, backend, "app=0.0.0.0:9080")
        self.spawn(self.host, "meshline", sys.executable, "-m", "controlplane.cli", "serve", "--config-dir", str(cfg),
                   "--xds-address", f"{self.host_ip}:15010", "--status-address", "127.0.0.1:15014")
        self.wait("meshline serve", lambda: self.run_in(self.host, "curl", "-sf", "-m", "2",
                                                          "http://127.0.0.1:15014/readyz", check=False))
        self.apply_capture()
        boot = self.meshline(self.pod, "bootstrap", "--mode", "sidecar", "--capture", "intercept",
                             "--node-id", f"app-0.{NS}", "--namespace", NS, "--workload", "app-0",
                             "--labels", "app=app", "--xds-address", f"{self.host_ip}:15010",
                             "--admin-address", "127.0.0.1:15000")
        config = self.work / "envoy.yaml"
        config.write_text(boot)
        config.chmod(0o644)
        self.envoy = self.spawn(
            self.pod, "envoy", "setpriv", "--reuid", str(PROXY_UID), "--regid", str(PROXY_UID), "--clear-groups",
            envoy_binary(), "-c", str(config), "--disable-hot-restart", "--concurrency", "1", "-l", "info")
        # 15021 answers only once Envoy has its xDS config (what the injected startup probe checks).
        self.wait("Envoy readiness on 15021", lambda: self.run_in(
            self.pod, "curl", "-sf", "-m", "2", "http://127.0.0.1:15021/healthz/ready", check=False))
        self.wait("Envoy's outbound listener", lambda: "0.0.0.0_8080" in self.run_in(
            self.pod, "curl", "-sf", "-m", "2", "http://127.0.0.1:15000/listeners", check=False))

    def apply_capture(self, *extra: str) -> None:
        self.meshline(self.pod, "iptables", "--proxy-uid", str(PROXY_UID), "--exclude-outbound-ports", "8081",
                      *extra)

    def close(self) -> None:
        for p in reversed(self.procs):
            stop(p)
        for ns in self.netns:
            sh("ip", "netns", "del", ns, check=False)
        shutil.rmtree(self.work, ignore_errors=True)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    env = Lab()
    try:
        env.start()
        yield env
    finally:
        env.close()


OUTBOUND = f"cluster.outbound|8080||{BACKEND_HOST}.upstream_rq_total"
INBOUND = "cluster.inbound|9080||.upstream_rq_total"
PASSTHROUGH = "cluster.PassthroughCluster.upstream_cx_total"


def test_outbound_call_to_the_service_address_is_captured_by_envoy(lab: Lab) -> None:
    before = lab.admin_stat(OUTBOUND)
    status, headers, body = lab.curl(lab.pod, f"http://{lab.host_ip}:8080/hello")
    assert status == 200, body
    assert json.loads(body)["backend"] == "backend"
    assert headers.get("x-meshline-captured") == "yes"  # set by the VirtualService, i.e. by Envoy
    assert lab.admin_stat(OUTBOUND) == before + 1


def test_inbound_call_reaches_the_app_through_15006(lab: Lab) -> None:
    before = lab.admin_stat(INBOUND)
    status, _, body = lab.curl(lab.host, f"http://{lab.pod_ip}:9080/in")
    assert status == 200, body
    assert json.loads(body)["backend"] == "app"
    assert lab.admin_stat(INBOUND) == before + 1
    assert lab.admin_stat("listener.0.0.0.0_15006.downstream_cx_total") >= 1


def test_excluded_outbound_port_bypasses_the_proxy(lab: Lab) -> None:
    before = (lab.admin_stat(PASSTHROUGH), lab.admin_stat("listener.0.0.0.0_15001.downstream_cx_total"))
    status, _, body = lab.curl(lab.pod, f"http://{lab.host_ip}:8081/")
    assert status == 200 and json.loads(body)["backend"] == "other"
    assert (lab.admin_stat(PASSTHROUGH), lab.admin_stat("listener.0.0.0.0_15001.downstream_cx_total")) == before


def _nat(lab: Lab) -> list[str]:
    return [ln for ln in lab.run_in(lab.pod, "iptables-save", "-t", "nat").splitlines()
            if ln.startswith(("-A", ":MESHLINE"))]


def test_applying_again_replaces_the_rules(lab: Lab) -> None:
    first = _nat(lab)
    lab.apply_capture()
    assert _nat(lab) == first
    assert sum(ln.startswith("-A OUTPUT") and "MESHLINE_OUTPUT" in ln for ln in first) == 1
    status, headers, _ = lab.curl(lab.pod, f"http://{lab.host_ip}:8080/")
    assert status == 200 and headers.get("x-meshline-captured") == "yes"


def test_cleanup_restores_direct_traffic(lab: Lab) -> None:
    lab.meshline(lab.pod, "iptables", "--cleanup")
    assert not [ln for ln in _nat(lab) if "MESHLINE" in ln]
    lab.meshline(lab.pod, "iptables", "--cleanup")  # idempotent
    before = (lab.admin_stat(OUTBOUND), lab.admin_stat(INBOUND),
              lab.admin_stat("listener.0.0.0.0_15001.downstream_cx_total"),
              lab.admin_stat("listener.0.0.0.0_15006.downstream_cx_total"))
    status, headers, body = lab.curl(lab.pod, f"http://{lab.host_ip}:8080/")
    assert status == 200 and json.loads(body)["backend"] == "backend"
    assert "x-meshline-captured" not in headers
    status, _, body = lab.curl(lab.host, f"http://{lab.pod_ip}:9080/")
    assert status == 200 and json.loads(body)["backend"] == "app"
    after = (lab.admin_stat(OUTBOUND), lab.admin_stat(INBOUND),
             lab.admin_stat("listener.0.0.0.0_15001.downstream_cx_total"),
             lab.admin_stat("listener.0.0.0.0_15006.downstream_cx_total"))
    assert after == before


def test_chains_are_named_as_documented() -> None:
    assert set(CHAINS) == {"MESHLINE_OUTPUT", "MESHLINE_REDIRECT", "MESHLINE_INBOUND", "MESHLINE_IN_REDIRECT"}
