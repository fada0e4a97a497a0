"""CUSTOM authorization on a waypoint, end to end (issue 16): as in Istio's ambient mode, a
CUSTOM AuthorizationPolicy attached to a Service (targetRefs) is enforced by the Service's
waypoint, which asks the provider's external authorizer through Envoy's ext_authz filter.

    node n1: a (alpha, ambient client)  b (beta, ambient, uses waypoint wp)
             wp (beta: the waypoint's Envoy)  z (authz: the external authorizer, plain pod)

Real Envoys (the node proxy, the waypoint), `meshline serve --mesh-config` with Istio's
`envoyExtAuthzHttp` provider, Istio's labels (`istio.io/dataplane-mode`, `istio.io/use-waypoint`), network namespaces (tests/netns_mesh.py) and `meshline
iptables --ambient` capture, as tests/e2e/test_ambient_e2e.py. The authorizer speaks Envoy's
HTTP ext_authz protocol: 200 when the request carries `x-ext-authz: allow`, else 403 with
`x-reason`. Needs root, ip, iptables, curl; skipped with the reason otherwise."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.localrun import envoy_binary
from tests.e2e.test_ambient_e2e import _ns, _pod, _skip_reason, _slice, _svc, status_ready
from tests.netns_mesh import Pod, Topology, bootstrap_file

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))]
XDS_PORT, STATUS_PORT, TLS_PORT = 19720, 19721, 19722
AUTHZ_PORT = 8000
PROVIDER = "sample-ext-authz-http"

AUTHORIZER = '''
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
log = open(sys.argv[2], "a", buffering=1)
class Check(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    def log_message(self, *args):
        pass
    def check(self):
        allowed = self.headers.get("x-ext-authz") == "allow"
        log.write(json.dumps([self.command, self.path]) + "\\n")
        body = b"allowed\\n" if allowed else b"denied by ext-authz\\n"
        self.send_response(200 if allowed else 403)
        if not allowed:
            self.send_header("x-reason", "no allow header")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = do_HEAD = check
ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Check).serve_forever()
'''


def mesh_config(name: str = PROVIDER) -> str:
    """Istio's ext-authz task's provider (the `mesh` key of the istio ConfigMap)."""
    return yaml.safe_dump({"extensionProviders": [{"name": name, "envoyExtAuthzHttp": {
        "service": "ext-authz.authz.svc.cluster.local", "port": AUTHZ_PORT, "pathPrefix": "/check",
        "includeRequestHeadersInCheck": ["x-ext-authz"], "headersToDownstreamOnDeny": ["x-reason"],
        "timeout": "5s"}}]})


def mesh_docs(pods: dict[str, Pod], vips: dict[str, str]) -> list[dict[str, Any]]:
    # Istio's own labels (aliases of Meshline's): the YAML is an Istio ambient user's.
    amb = {"istio.io/dataplane-mode": "ambient"}

    def netns(p: Pod) -> dict[str, str]:
        return {"meshline.io/netns": p.netns_path}

    return [
        _ns("alpha", amb), _ns("beta", dict(amb, **{"istio.io/use-waypoint": "wp"})), _ns("authz"),
        _pod(pods["a"], "alpha", "a", {"app": "a"}, netns(pods["a"])),
        _pod(pods["b"], "beta", "b", {"app": "b"}, netns(pods["b"])),
        _pod(pods["wp"], "beta", "wp", {"app": "wp", "istio.io/dataplane-mode": "none"}, {}),
        _pod(pods["z"], "authz", "z", {"app": "ext-authz"}, {}),
        _svc("b", "beta", vips["b"], [("http", 80, 8080)], {"app": "b"}),
        _svc("wp", "beta", vips["wp"], [("tunnel", 15008, 15008)], {"app": "wp"}),
        _svc("ext-authz", "authz", vips["z"], [("http", AUTHZ_PORT, AUTHZ_PORT)], {"app": "ext-authz"}),
        _slice("b", "beta", [("http", 8080)], [pods["b"]]),
        _slice("wp", "beta", [("tunnel", 15008)], [pods["wp"]]),
        _slice("ext-authz", "authz", [("http", AUTHZ_PORT)], [pods["z"]]),
        {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
         "metadata": {"name": "ext-authz", "namespace": "beta"},
         "spec": {"targetRefs": [{"kind": "Service", "group": "", "name": "b"}], "action": "CUSTOM",
                  "provider": {"name": PROVIDER}, "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]}},
    ]


@dataclass
class Lab:
    topo: Topology
    pods: dict[str, Pod]
    vips: dict[str, str]
    mesh_config: Path
    checks_log: Path

    def get(self, path: str, **headers: str) -> tuple[int, str]:
        """a's call to b's VIP (captured by a's node proxy, through b's waypoint)."""
        return self.pods["a"].curl(f"http://{self.vips['b']}{path}", headers=headers, extra=["-i"])

    def checks(self) -> list[tuple[str, str]]:
        """(method, path) of every check the authorizer answered."""
        if not self.checks_log.exists():
            return []
        return [tuple(json.loads(line)) for line in self.checks_log.read_text().splitlines() if line]


def eventually(check: Any, what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.3)
    raise AssertionError(f"{what}: still false after {timeout} s (last {last!r})")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    envoy = envoy_binary()
    with Topology() as topo:
        n1 = topo.add_node("n1")
        pods = {name: n1.add_pod(name) for name in ("a", "b", "wp", "z")}
        vips = {name: topo.vip(i + 1) for i, name in enumerate(("b", "wp", "z"))}
        work = topo.workdir
        config, ca_dir = work / "config", work / "ca"
        config.mkdir()
        (config / "mesh.yaml").write_text(yaml.safe_dump_all(mesh_docs(pods, vips), sort_keys=False))
        lab = Lab(topo, pods, vips, work / "mesh-config.yaml", work / "checks.log")
        lab.mesh_config.write_text(mesh_config())
        pods["b"].serve_http(8080, "b")
        script = work / "authorizer.py"
        script.write_text(AUTHORIZER)
        proc = pods["z"].run([sys.executable, str(script), str(AUTHZ_PORT), str(lab.checks_log)])
        topo.wait("the authorizer", lambda: pods["z"].can_connect("127.0.0.1", AUTHZ_PORT), 10, proc)
        cp = topo.spawn("controlplane", [sys.executable, "-m", "controlplane.cli", "serve", "--config-dir",
                                         str(config), "--ca-dir", str(ca_dir), "--mesh-config", str(lab.mesh_config),
                                         "--xds-address", f"{topo.host_ip}:{XDS_PORT}", "--status-address",
                                         f"127.0.0.1:{STATUS_PORT}", "--ca-address", f"{topo.host_ip}:{TLS_PORT}"])
        topo.wait("control plane", lambda: status_ready(STATUS_PORT), 30, cp)
        xds = f"{topo.host_ip}:{TLS_PORT}"
        for name in ("a", "b"):
            pods[name].exec([sys.executable, "-m", "controlplane.cli", "iptables", "--ambient"], check=True)
        nboot = bootstrap_file(["--mode", "node", "--node-name", "n1", "--node-id", "node-n1", "--namespace",
                                "meshline-system", "--service-account", "meshline-node-proxy", "--ca-dir", str(ca_dir),
                                "--xds-tls", "--xds-address", xds, "--admin-address", f"{n1.ip}:15000"],
                               work / "boot-n1.yaml")
        n1.run([envoy, "-c", str(nboot), "--disable-hot-restart", "--concurrency", "1", "-l", "warning"])
        wboot = bootstrap_file(["--mode", "waypoint", "--waypoint", "wp", "--node-id", "wp-1", "--namespace", "beta",
                                "--workload", "wp", "--service-account", "wp", "--ca-dir", str(ca_dir),
                                "--xds-tls", "--xds-address", xds, "--admin-address", "127.0.0.1:15000"],
                               work / "boot-wp.yaml")
        pods["wp"].run([envoy, "-c", str(wboot), "--disable-hot-restart", "--concurrency", "1", "-l", "warning"])
        eventually(lambda: lab.get("/public")[0] == 200, "a reaches b through the waypoint")
        yield lab


def test_requests_custom_rules_match_are_decided_by_the_authorizer(lab: Lab) -> None:
    status, text = lab.get("/admin/users", **{"x-ext-authz": "allow"})
    assert status == 200 and '"b"' in text, text
    assert ("GET", "/check/admin/users") in lab.checks()
    status, text = lab.get("/admin")
    assert status == 403, text
    assert "denied by ext-authz" in text and "x-reason: no allow header" in text.lower(), text
    assert lab.checks()[-1] == ("GET", "/check/admin")


def test_requests_no_custom_rule_matches_never_reach_the_authorizer(lab: Lab) -> None:
    before = len(lab.checks())
    for _ in range(3):
        status, text = lab.get("/public")
        assert status == 200 and '"b"' in text
    assert len(lab.checks()) == before


def test_without_the_provider_the_waypoint_fails_closed(lab: Lab) -> None:
    lab.mesh_config.write_text(mesh_config(name="renamed"))
    try:
        eventually(lambda: "RBAC: access denied" in lab.get("/admin", **{"x-ext-authz": "allow"})[1],
                   "the CUSTOM rule denies once its provider is gone")
        before = len(lab.checks())
        status, _ = lab.get("/admin", **{"x-ext-authz": "allow"})
        assert status == 403
        assert lab.get("/public")[0] == 200
        assert len(lab.checks()) == before
    finally:
        lab.mesh_config.write_text(mesh_config())
    eventually(lambda: lab.get("/admin", **{"x-ext-authz": "allow"})[0] == 200, "the provider is back")
