"""Sidecarless (ambient) mesh end to end: two "nodes" and their "pods" as network
namespaces (tests/netns_mesh.py, addresses from 198.18.0.0/15), one node-proxy Envoy per
node running in the node's netns and owning listeners inside each ambient pod's netns, a
waypoint Envoy, a sidecar pod, and `meshline serve` (directory mode, built-in CA) on the
lab's bridge address. Every pod's traffic is captured by `meshline iptables [--ambient]`.

    node n1: a (alpha/sa a, ambient)  c (gamma/sa c, ambient)  wp (beta/sa wp: waypoint)
    node n2: b1, b2 (beta/sa b, v1/v2, ambient)  d (delta/sa d, ambient)  s (legacy/sa s, sidecar)

Needs root, ip, iptables, setpriv, curl; skipped with the reason otherwise.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.localrun import envoy_binary
from tests.netns_mesh import Node, Pod, Topology, bootstrap_file, in_netns, missing_tools, plaintext_http_seen

ROOT = Path(__file__).resolve().parents[2]
XDS_PORT = 19710
STATUS_PORT = 19711
TLS_PORT = 19712  # xDS + CA over TLS: every proxy here carries a token, so it talks to this port
TD = "cluster.local"
PROXY_UID = 1337


def _skip_reason() -> str | None:
    import os

    if os.geteuid() != 0:
        return "needs root (network namespaces, iptables)"
    return missing_tools()


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


def spiffe(ns: str, sa: str) -> str:
    return f"spiffe://{TD}/ns/{ns}/sa/{sa}"


@dataclass
class Lab:
    topo: Topology
    n1: Node
    n2: Node
    pods: dict[str, Pod]
    vips: dict[str, str]
    config: Path
    ca_dir: Path
    node_proxies: dict[str, Any]
    boot: dict[str, Path]

    def write(self, name: str, docs: list[dict[str, Any]]) -> None:
        tmp = self.config / f".{name}.tmp"
        tmp.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        tmp.rename(self.config / f"{name}.yaml")

    def curl(self, pod: str, url: str, **kw: Any) -> tuple[int, str]:
        return self.pods[pod].curl(url, **kw)

    def node_log(self, node: str) -> str:
        return "".join(p.read_text(errors="replace") for p in self.topo.workdir.glob(f"*{node}*envoy*.log"))

    def wait_log(self, node: str, text: str, timeout: float = 5.0) -> None:
        """Envoy writes access logs in batches: wait for `text` in the node proxy's log."""
        deadline = time.monotonic() + timeout
        while text not in self.node_log(node):
            assert time.monotonic() < deadline, f"{text!r} not in {node}'s log:\n{self.node_log(node)[-2000:]}"
            time.sleep(0.1)

    def wait_line(self, node: str, *parts: str, timeout: float = 5.0) -> None:
        """Wait for one line of the node proxy's log holding every one of `parts`."""
        deadline = time.monotonic() + timeout
        while not any(all(p in line for p in parts) for line in self.node_log(node).splitlines()):
            assert time.monotonic() < deadline, f"no line with {parts} in {node}'s log:\n{self.node_log(node)[-2000:]}"
            time.sleep(0.1)

    def start_node_proxy(self, node: Node) -> subprocess.Popen[bytes]:
        proc = node.run([envoy_binary(), "-c", str(self.boot[node.name]), "--disable-hot-restart",
                         "--concurrency", "1", "-l", "warning", "--file-flush-interval-msec", "100"])
        self.node_proxies[node.name] = proc
        return proc


def _ns(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}}


def _svc(name: str, ns: str, vip: str, ports: list[tuple[str, int, int]], selector: dict[str, str]
         ) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": vip, "selector": selector,
                     "ports": [{"name": n, "port": p, "targetPort": t} for n, p, t in ports]}}


def _pod(p: Pod, ns: str, sa: str, labels: dict[str, str], annotations: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": p.name, "namespace": ns, "labels": labels, "annotations": annotations},
            "spec": {"nodeName": p.node.name, "serviceAccountName": sa, "containers": [{"name": "app"}]},
            "status": {"podIP": p.ip, "phase": "Running"}}


def _slice(svc: str, ns: str, ports: list[tuple[str, int]], pods: list[Pod]) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{svc}-1", "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
            "ports": [{"name": n, "port": p} for n, p in ports],
            "endpoints": [{"addresses": [p.ip], "targetRef": {"kind": "Pod", "name": p.name}} for p in pods]}


def mesh_docs(lab_pods: dict[str, Pod], vips: dict[str, str], waypoint: bool) -> list[dict[str, Any]]:
    P = lab_pods
    amb = {"meshline.io/dataplane-mode": "ambient"}

    def netns(p: Pod) -> dict[str, str]:
        return {"meshline.io/netns": p.netns_path}

    beta = dict(amb, **({"meshline.io/use-waypoint": "wp"} if waypoint else {}))
    return [
        _ns("alpha", amb), _ns("beta", beta), _ns("gamma", amb), _ns("delta", amb), _ns("legacy"),
        _pod(P["a"], "alpha", "a", {"app": "a"}, netns(P["a"])),
        _pod(P["c"], "gamma", "c", {"app": "c"}, netns(P["c"])),
        _pod(P["b1"], "beta", "b", {"app": "b", "version": "v1"}, netns(P["b1"])),
        _pod(P["b2"], "beta", "b", {"app": "b", "version": "v2"}, netns(P["b2"])),
        _pod(P["d"], "delta", "d", {"app": "d"}, netns(P["d"])),
        _pod(P["wp"], "beta", "wp", {"app": "wp", "meshline.io/dataplane-mode": "none"}, {}),
        _pod(P["s"], "legacy", "s", {"app": "s"}, {"meshline.io/status": "injected"}),
        _svc("a", "alpha", vips["a"], [("http", 80, 8080)], {"app": "a"}),
        _svc("b", "beta", vips["b"], [("http", 80, 8080), ("tcp", 9000, 9000)], {"app": "b"}),
        _svc("d", "delta", vips["d"], [("http", 80, 8080), ("http-alt", 90, 9090)], {"app": "d"}),
        _svc("wp", "beta", vips["wp"], [("tunnel", 15008, 15008)], {"app": "wp"}),
        _svc("s", "legacy", vips["s"], [("http", 80, 8080)], {"app": "s"}),
        _slice("a", "alpha", [("http", 8080)], [P["a"]]),
        _slice("b", "beta", [("http", 8080), ("tcp", 9000)], [P["b1"], P["b2"]]),
        _slice("d", "delta", [("http", 8080), ("http-alt", 9090)], [P["d"]]),
        _slice("wp", "beta", [("tunnel", 15008)], [P["wp"]]),
        _slice("s", "legacy", [("http", 8080)], [P["s"]]),
    ]


POLICIES = [
    # d: ALLOW a by principal and anything from namespace legacy; DENY a on target port 9090.
    {"apiVersion": "security.meshline.io/v1", "kind": "AuthorizationPolicy",
     "metadata": {"name": "d-allow", "namespace": "delta"},
     "spec": {"selector": {"matchLabels": {"app": "d"}}, "action": "ALLOW", "rules": [
         {"from": [{"source": {"principals": [f"{TD}/ns/alpha/sa/a"]}}]},
         {"from": [{"source": {"namespaces": ["legacy"]}}]}]}},
    {"apiVersion": "security.meshline.io/v1", "kind": "AuthorizationPolicy",
     "metadata": {"name": "d-deny-alt", "namespace": "delta"},
     "spec": {"selector": {"matchLabels": {"app": "d"}}, "action": "DENY", "rules": [
         {"from": [{"source": {"principals": [f"{TD}/ns/alpha/sa/a"]}}], "to": [{"operation": {"ports": ["9090"]}}]}]}},
    # delta accepts only mTLS (HBONE); beta keeps the default, PERMISSIVE.
    {"apiVersion": "security.meshline.io/v1", "kind": "PeerAuthentication",
     "metadata": {"name": "strict", "namespace": "delta"}, "spec": {"mtls": {"mode": "STRICT"}}},
    # b: an L7 policy attached to the Service (its waypoint enforces it).
    {"apiVersion": "security.meshline.io/v1", "kind": "AuthorizationPolicy",
     "metadata": {"name": "b-no-private", "namespace": "beta"},
     "spec": {"targetRefs": [{"kind": "Service", "group": "", "name": "b"}], "action": "DENY", "rules": [
         {"to": [{"operation": {"paths": ["/private*"], "ports": ["8080"]}}]}]}},
    {"apiVersion": "networking.meshline.io/v1", "kind": "VirtualService",
     "metadata": {"name": "b", "namespace": "beta"},
     "spec": {"hosts": ["b.beta.svc.cluster.local"], "http": [
         {"match": [{"headers": {"x-canary": {"exact": "1"}}}],
          "route": [{"destination": {"host": "b.beta.svc.cluster.local", "subset": "v2"}}]},
         {"route": [{"destination": {"host": "b.beta.svc.cluster.local", "subset": "v1"}, "weight": 50},
                    {"destination": {"host": "b.beta.svc.cluster.local", "subset": "v2"}, "weight": 50}]}]}},
    {"apiVersion": "networking.meshline.io/v1", "kind": "DestinationRule",
     "metadata": {"name": "b", "namespace": "beta"},
     "spec": {"host": "b.beta.svc.cluster.local", "subsets": [
         {"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]}},
]


def _wait_http(pod: Pod, url: str, want: str, timeout: float = 20.0, **kw: Any) -> None:
    deadline = time.monotonic() + timeout
    last: tuple[int, str] = (0, "")
    while time.monotonic() < deadline:
        last = pod.curl(url, timeout=2.0, **kw)
        if last[0] == 200 and want in last[1]:
            return
        time.sleep(0.2)
    raise AssertionError(f"{pod.name} -> {url}: wanted 200 with {want!r}, last {last}")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    envoy = envoy_binary()
    with Topology() as topo:
        n1, n2 = topo.add_node("n1"), topo.add_node("n2")
        pods = {name: n1.add_pod(name) for name in ("a", "c", "wp", "spare")}  # spare: joins the mesh later
        pods.update({name: n2.add_pod(name) for name in ("b1", "b2", "d", "s")})
        vips = {name: topo.vip(i + 1) for i, name in enumerate(("a", "b", "d", "wp", "s"))}
        work = topo.workdir
        config, ca_dir = work / "config", work / "ca"
        config.mkdir()
        lab = Lab(topo, n1, n2, pods, vips, config, ca_dir, {}, {})
        lab.write("mesh", mesh_docs(pods, vips, waypoint=True))
        lab.write("policies", POLICIES)
        # Apps.
        pods["a"].serve_http(8080, "a")
        for name in ("b1", "b2"):
            pods[name].serve_http(8080, name)
            pods[name].serve_tcp(9000, f"{name}-tcp")
        pods["d"].serve_http(8080, "d")
        pods["d"].serve_http(9090, "d-alt")
        pods["s"].serve_http(8080, "s")
        # Control plane on the lab's bridge address.
        cp = topo.spawn("controlplane", [sys.executable, "-m", "controlplane.cli", "serve", "--config-dir",
                                         str(config), "--ca-dir", str(ca_dir), "--xds-address",
                                         f"{topo.host_ip}:{XDS_PORT}", "--status-address",
                                         f"127.0.0.1:{STATUS_PORT}", "--ca-address", f"{topo.host_ip}:{TLS_PORT}"])
        topo.wait("control plane", lambda: status_ready(STATUS_PORT), 30, cp)
        xds = f"{topo.host_ip}:{TLS_PORT}"
        bundle = work / "root-cert.pem"  # readable by the sidecar's own uid
        bundle.write_text((ca_dir / "root-cert.pem").read_text())
        bundle.chmod(0o644)
        # Ambient pods: capture towards the node proxy's in-pod listeners.
        for name in ("a", "c", "b1", "b2", "d"):
            pods[name].exec([sys.executable, "-m", "controlplane.cli", "iptables", "--ambient"], check=True)
        # Node proxies, in their node's netns.
        for node in (n1, n2):
            lab.boot[node.name] = bootstrap_file(
                ["--mode", "node", "--node-name", node.name, "--node-id", f"node-{node.name}", "--namespace",
                 "meshline-system", "--service-account", "meshline-node-proxy", "--ca-dir", str(ca_dir),
                 "--xds-tls", "--xds-address", xds, "--admin-address", f"{node.ip}:15000"],
                work / f"boot-{node.name}.yaml")
            lab.start_node_proxy(node)
        # The waypoint of namespace beta, in its own pod.
        wpboot = bootstrap_file(["--mode", "waypoint", "--waypoint", "wp", "--node-id", "wp-1", "--namespace", "beta",
                             "--workload", "wp", "--service-account", "wp", "--ca-dir", str(ca_dir),
                             "--xds-tls", "--xds-address", xds, "--admin-address", "127.0.0.1:15000"],
                             work / "boot-wp.yaml")
        pods["wp"].run([envoy, "-c", str(wpboot), "--disable-hot-restart", "--concurrency", "1", "-l", "warning"])
        # The sidecar pod: intercept capture, Envoy under its own uid.
        pods["s"].exec([sys.executable, "-m", "controlplane.cli", "iptables", "--proxy-uid", str(PROXY_UID)],
                       check=True)
        s_token = work / "s.token"  # the sidecar's uid must read its token (as a projected token's fsGroup)
        sboot = bootstrap_file(["--node-id", "s-1", "--namespace", "legacy", "--workload", "s", "--service-account",
                            "s", "--capture", "intercept", "--ca-dir", str(ca_dir), "--token-out", str(s_token),
                            "--xds-tls", "--ca-bundle", str(bundle), "--xds-address", xds,
                            "--admin-address", "127.0.0.1:15000"], work / "boot-s.yaml")
        os.chown(s_token, PROXY_UID, PROXY_UID)
        pods["s"].run([envoy, "-c", str(sboot), "--disable-hot-restart", "--concurrency", "1", "-l", "warning"],
                      user=PROXY_UID)
        _wait_http(pods["a"], f"http://{vips['d']}/", '"d"', timeout=30)
        yield lab


def status_ready(port: int) -> bool:
    """Whether the control plane's /readyz on 127.0.0.1:`port` answers 200."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _backend(body: str) -> str:
    try:
        return str(json.loads(body).get("backend") or json.loads(body).get("name"))
    except (ValueError, AttributeError):
        return ""


def _tcp(pod: Pod, host: str, port: int) -> str:
    """What a TCP backend greets with, through the pod's capture ('' when refused/reset)."""
    code = ("import socket,sys\n"
            "try:\n s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=3)\n"
            " s.sendall(b'hi\\n'); print(s.recv(100).decode(errors='replace'), end='')\n"
            "except OSError as e:\n print('', end='')\n")
    return pod.exec([sys.executable, "-c", code, host, str(port)]).stdout


# --------------------------------------------------------------------------- tests


def test_pod_to_service_on_other_node_through_both_node_proxies(lab: Lab) -> None:
    """a (n1) -> d (n2): d's node proxy sees a's SPIFFE identity; between the nodes only TLS
    to 15008 is on the wire."""
    with lab.topo.capture() as cap:
        status, body = lab.curl("a", f"http://{lab.vips['d']}/hello")
    assert status == 200 and '"d"' in body
    lab.wait_log("n2", f"src.identity={spiffe('alpha', 'a')}")
    nodes = {lab.n1.ip, lab.n2.ip}
    pods_n2 = {p.ip for p in lab.n2.pods}
    inter = [s for s in cap.segments if (s.src in nodes | {lab.pods["a"].ip} and s.dst in pods_n2 | nodes)
             or (s.dst in nodes | {lab.pods["a"].ip} and s.src in pods_n2 | nodes)]
    assert inter, "no traffic between the nodes was captured"
    assert all(15008 in (s.sport, s.dport) for s in inter), {(s.src, s.sport, s.dst, s.dport) for s in inter}
    assert not plaintext_http_seen(inter)
    assert any(s.payload[:1] in (b"\x16", b"\x17") for s in inter)


def test_direct_pod_ip_calls_tunnel_to_that_pod_with_its_identity_checked(lab: Lab) -> None:
    """a -> d's pod IP (no VIP): the node proxy tunnels to d's 15008 naming the pod address,
    and d's node proxy sees a's identity. b1's pod IP on 9000, a port b's VIP also serves,
    still reaches b1 (not the passthrough), as its own TCP greeting shows."""
    d_ip, b1_ip = lab.pods["d"].ip, lab.pods["b1"].ip
    status, body = lab.curl("a", f"http://{d_ip}:8080/direct")
    assert status == 200 and '"d"' in body
    lab.wait_line("n2", f"CONNECT {d_ip}:8080 ", f"src.identity={spiffe('alpha', 'a')}")
    assert _tcp(lab.pods["a"], b1_ip, 9000).startswith("b1-tcp")
    lab.wait_line("n2", f"CONNECT {b1_ip}:9000 ", f"src.identity={spiffe('alpha', 'a')}")


def test_destinations_outside_the_mesh_pass_through(lab: Lab) -> None:
    """An address no Service and no mesh pod has (the control plane's plaintext port on the
    lab bridge) is reached as is, from the node."""
    assert lab.pods["a"].can_connect(lab.topo.host_ip, XDS_PORT)


def test_l4_authorization_at_the_destination(lab: Lab) -> None:
    d = lab.vips["d"]
    assert lab.curl("a", f"http://{d}/")[0] == 200  # ALLOW by principal
    status, body = lab.curl("a", f"http://{d}:90/")  # DENY by principal on target port 9090
    assert status != 200 and "d-alt" not in body
    status, body = lab.curl("c", f"http://{d}/")  # gamma is not allowed
    assert status != 200 and '"d"' not in body
    _wait_http(lab.pods["s"], f"http://{d}/", '"d"')  # ALLOW by namespace (legacy), from a sidecar


def test_plaintext_callers_follow_peer_authentication(lab: Lab) -> None:
    """A caller outside the mesh (node n2 itself, no capture) reaches a PERMISSIVE ambient pod
    in plaintext through its 15006, and is refused by a STRICT one."""
    status, body = lab.n2.curl(f"http://{lab.pods['b1'].ip}:8080/")
    assert status == 200 and '"b1"' in body
    status, body = lab.n2.curl(f"http://{lab.pods['d'].ip}:8080/", timeout=3)
    assert status != 200 and '"d"' not in body


def test_ambient_to_sidecar_and_back(lab: Lab) -> None:
    _wait_http(lab.pods["a"], f"http://{lab.vips['s']}/", '"s"')
    stats = lab.pods["s"].exec(["curl", "-s", "http://127.0.0.1:15000/stats?filter=inbound_hbone.*downstream_rq_total"])
    assert any(int(line.rsplit(" ", 1)[1]) > 0 for line in stats.stdout.splitlines() if line.strip()), stats.stdout
    _wait_http(lab.pods["s"], f"http://{lab.vips['a']}/", '"a"')
    lab.wait_log("n1", f"src.identity={spiffe('legacy', 's')}")


def _s_stat(lab: Lab, name: str) -> int:
    """A counter of the sidecar Envoy in pod s (its admin on the pod's loopback)."""
    out = lab.pods["s"].exec(["curl", "-s", f"http://127.0.0.1:15000/stats?filter=^{name}$"]).stdout
    return sum(int(line.rsplit(": ", 1)[1]) for line in out.splitlines() if line.startswith(name + ": "))


def test_policy_change_reaches_the_next_tunnel_on_a_pooled_hbone_connection(lab: Lab) -> None:
    """a (ambient, n1) -> s (sidecar): n1 multiplexes a's tunnels on one HTTP/2 connection to
    s's 15008. A DENY for namespace alpha applies to the next tunnel on that same connection,
    and lifting it lets the next one through, with no new HBONE connection either time (the
    sidecar's CONNECT routes and policies come by RDS: its 15008 listener does not change)."""
    url = f"http://{lab.vips['s']}/"
    _wait_http(lab.pods["a"], url, '"s"')
    conns = _s_stat(lab, "http.inbound_hbone.downstream_cx_total")
    denied = _s_stat(lab, "http.inbound_hbone.rbac.denied")
    assert conns > 0
    lab.write("s-deny", [{"apiVersion": "security.meshline.io/v1", "kind": "AuthorizationPolicy",
                          "metadata": {"name": "s-deny-alpha", "namespace": "legacy"},
                          "spec": {"selector": {"matchLabels": {"app": "s"}}, "action": "DENY",
                                   "rules": [{"from": [{"source": {"namespaces": ["alpha"]}}]}]}}])
    try:
        deadline = time.monotonic() + 30
        while lab.curl("a", url, timeout=2)[0] == 200:
            assert time.monotonic() < deadline, "the DENY never reached s's tunnels"
            time.sleep(0.2)
        assert _s_stat(lab, "http.inbound_hbone.rbac.denied") > denied  # refused at the CONNECT, by s
    finally:
        (lab.config / "s-deny.yaml").unlink(missing_ok=True)
    _wait_http(lab.pods["a"], url, '"s"', timeout=30)
    assert _s_stat(lab, "http.inbound_hbone.downstream_cx_total") == conns


def test_waypoint_routes_and_enforces_l7_then_fails_closed_without_it(lab: Lab) -> None:
    b = lab.vips["b"]
    _wait_http(lab.pods["a"], f"http://{b}/", '"b')
    seen = {_backend(lab.curl("a", f"http://{b}/", headers={"host": "b.beta"})[1]) for _ in range(30)}
    assert seen == {"b1", "b2"}, seen
    canary = {_backend(lab.curl("a", f"http://{b}/", headers={"host": "b.beta", "x-canary": "1"})[1])
              for _ in range(10)}
    assert canary == {"b2"}
    assert lab.curl("a", f"http://{b}/private/x", headers={"host": "b.beta"})[0] == 403
    assert lab.curl("a", f"http://{b}/public", headers={"host": "b.beta"})[0] == 200
    # A sidecar caller goes through the waypoint too: its L7 policy holds for it as well.
    _wait_http(lab.pods["s"], f"http://{b}/public", '"b', headers={"host": "b.beta"})
    assert lab.pods["s"].curl(f"http://{b}/private/x", headers={"host": "b.beta"})[0] == 403
    lab.wait_log("n2", "src.identity=" + spiffe("beta", "wp"))
    # Remove the waypoint: L4 (TCP 9000) still flows, the L7 policy fails closed on 8080.
    lab.write("mesh", mesh_docs(lab.pods, lab.vips, waypoint=False))
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and lab.curl("a", f"http://{b}/public", timeout=2)[0] == 200:
        time.sleep(0.2)
    assert lab.curl("a", f"http://{b}/public", timeout=2)[0] != 200
    greet = _tcp(lab.pods["a"], b, 9000)
    assert greet.startswith("b1-tcp") or greet.startswith("b2-tcp"), greet
    lab.write("mesh", mesh_docs(lab.pods, lab.vips, waypoint=True))
    _wait_http(lab.pods["a"], f"http://{b}/public", '"b')


def _n1_stat(lab: Lab, name: str) -> int:
    with urllib.request.urlopen(f"http://{lab.n1.ip}:15000/stats?filter=^{name}$", timeout=3) as r:
        text = r.read().decode()
    return sum(int(line.rsplit(": ", 1)[1]) for line in text.splitlines() if line.startswith(name + ": "))


def _n1_dump(lab: Lab) -> str:
    with urllib.request.urlopen(f"http://{lab.n1.ip}:15000/config_dump", timeout=5) as r:
        return str(r.read().decode())


def test_changes_elsewhere_drain_no_connection_of_the_node(lab: Lab) -> None:
    """Connections a (n1) holds open, one to a service VIP and one straight to a pod IP, are
    untouched while the mesh grows: a new Service, a new pod of a new identity in the address
    block those pods share, a new ambient pod on n1 itself. n1 applies every change in place
    and drains no listener and no filter chain."""
    a = lab.pods["a"]
    direct = in_netns(a.netns_path, lambda: socket.create_connection((lab.pods["b1"].ip, 9000), timeout=5))
    via_vip = in_netns(a.netns_path, lambda: socket.create_connection((lab.vips["d"], 80), timeout=5))

    def http_get(sock: socket.socket) -> bytes:
        """One request on the held keep-alive connection: its whole response."""
        sock.sendall(b"GET /held HTTP/1.1\r\nHost: d\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            assert chunk, data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(next(ln.split(b":", 1)[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")))
        while len(body) < length:
            chunk = sock.recv(4096)
            assert chunk, data
            body += chunk
        return head

    def echo(sock: socket.socket, word: bytes) -> bytes:
        sock.sendall(word)
        return sock.recv(100)

    try:
        assert direct.recv(100).startswith(b"b1-tcp") and echo(direct, b"one\n") == b"one\n"
        assert http_get(via_vip).startswith(b"HTTP/1.1 200")
        in_place, draining = _n1_stat(lab, "listener_manager.listener_in_place_updated"), (
            _n1_stat(lab, "listener_manager.total_filter_chains_draining"),
            _n1_stat(lab, "listener_manager.total_listeners_draining"))
        ghost_ip = lab.pods["b1"].ip.rsplit(".", 1)[0] + ".200"  # n2's block, nobody's netns
        spare = lab.pods["spare"]
        lab.write("growth", [
            _svc("extra", "alpha", lab.topo.vip(20), [("http", 80, 8080)], {"app": "extra"}),
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "ghost", "namespace": "beta",
                                                             "labels": {"app": "ghost"}},
             "spec": {"nodeName": "n9", "serviceAccountName": "ghost", "containers": [{"name": "app"}]},
             "status": {"podIP": ghost_ip, "phase": "Running"}},
            _pod(spare, "gamma", "spare", {"app": "spare"}, {"meshline.io/netns": spare.netns_path}),
        ])
        deadline = time.monotonic() + 20
        while not all(x in _n1_dump(lab) for x in (ghost_ip, "ambient_outbound_gamma_spare", lab.topo.vip(20))):
            assert time.monotonic() < deadline, "n1 never got the growth"
            time.sleep(0.2)
        assert echo(direct, b"two\n") == b"two\n"
        assert http_get(via_vip).startswith(b"HTTP/1.1 200")
        assert _n1_stat(lab, "listener_manager.listener_in_place_updated") > in_place
        # (Earlier tests' changes, e.g. a waypoint unbound, may still drain their own chains.)
        assert (_n1_stat(lab, "listener_manager.total_filter_chains_draining"),
                _n1_stat(lab, "listener_manager.total_listeners_draining")) == draining
    finally:
        direct.close()
        via_vip.close()
        (lab.config / "growth.yaml").unlink(missing_ok=True)


def test_node_proxy_gets_no_certificate_for_a_pod_on_another_node(lab: Lab) -> None:
    from controlplane.ca import tokens
    from controlplane.ca.identity import Identity
    from controlplane.translate.plan import SECRET
    from tests.xdsharness import AdsClient

    key = tokens.load_or_create_token_key(lab.ca_dir)

    async def secrets_for(token: str, names: list[str], namespace: str = "meshline-system") -> set[str] | None:
        """The certificates the stream gets (None: the stream was refused)."""
        import grpc

        creds = grpc.ssl_channel_credentials((lab.ca_dir / "root-cert.pem").read_bytes())
        channel = grpc.aio.secure_channel(f"{lab.topo.host_ip}:{TLS_PORT}", creds,
                                          options=[("grpc.ssl_target_name_override", "localhost")])
        client = AdsClient(f"{lab.topo.host_ip}:{TLS_PORT}", "sotw", "rogue-n1",
                           {"mode": "node", "node": "n1", "namespace": namespace,
                            "service_account": "meshline-node-proxy"},
                           metadata=[("authorization", f"Bearer {token}")], channel=channel)
        try:
            client.send(SECRET, names)
            got: set[str] = set()
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                try:
                    resp = await client.recv(timeout=max(0.1, deadline - time.monotonic()))
                except TimeoutError:
                    break
                except AssertionError:  # the stream ended: refused
                    return None
                from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

                for res in resp.resources:
                    s = secret_pb2.Secret()
                    res.Unpack(s)
                    if s.HasField("tls_certificate"):
                        got.add(s.name)
                client.send(SECRET, names, version=resp.version_info, nonce=resp.nonce)
            return got
        finally:
            await client.close()

    ident = Identity("meshline-system", "meshline-node-proxy")
    local, foreign = spiffe("alpha", "a"), spiffe("delta", "d")
    got = asyncio.run(secrets_for(tokens.mint(key, ident, node="n1"), [local, foreign]))
    assert got == {local}
    # A credential for node n2 claiming to be n1's proxy is refused.
    assert asyncio.run(secrets_for(tokens.mint(key, ident, node="n2"), [local, foreign])) is None
    # So is a workload's own credential (bound to its node, as a Kubernetes token is) posing as one.
    workload = tokens.mint(key, Identity("alpha", "a"), node="n1")
    assert asyncio.run(secrets_for(workload, [local, foreign], namespace="alpha")) is None


def test_node_proxy_restart_leaves_pods_running_and_measures_the_gap(lab: Lab) -> None:
    """Upgrading the node proxy restarts no app: the apps keep their PIDs; traffic from a
    pod on that node resumes once the new proxy has its config (the gap is printed)."""
    before = {p.pid for p in lab.topo.procs if p.poll() is None}
    url = f"http://{lab.vips['d']}/"
    proc = lab.node_proxies["n1"]
    proc.terminate()
    proc.wait(10)
    t0 = time.monotonic()
    lab.start_node_proxy(lab.n1)
    _wait_http(lab.pods["a"], url, '"d"', timeout=30)
    gap = time.monotonic() - t0
    print(f"\nnode proxy restart: traffic back {gap * 1000:.0f} ms after the old proxy exited")
    alive = {p.pid for p in lab.topo.procs if p.poll() is None}
    assert before - {proc.pid} <= alive
    assert gap < 30


def test_waypoint_applies_an_http_route_attached_to_the_service(lab: Lab) -> None:
    """GAMMA through the waypoint (issue 18): an HTTPRoute on Service b splitting 80/20
    between Services b-v1 and b-v2 (b's pods by version) replaces b's VirtualService for a
    (ambient) caller; removing it brings the VirtualService back."""
    b, topo = lab.vips["b"], lab.topo
    route = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
             "metadata": {"name": "b-split", "namespace": "beta"},
             "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "b", "port": 80}],
                      "rules": [{"filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {
                                     "set": [{"name": "x-gamma", "value": "waypoint"}]}}],
                                 "backendRefs": [{"name": "b-v1", "port": 80, "weight": 80},
                                                  {"name": "b-v2", "port": 80, "weight": 20}]}]}}
    lab.write("gamma", [
        _svc("b-v1", "beta", topo.vip(20), [("http", 80, 8080)], {"app": "b", "version": "v1"}),
        _svc("b-v2", "beta", topo.vip(21), [("http", 80, 8080)], {"app": "b", "version": "v2"}),
        _slice("b-v1", "beta", [("http", 8080)], [lab.pods["b1"]]),
        _slice("b-v2", "beta", [("http", 8080)], [lab.pods["b2"]]),
        route])
    try:
        _wait_http(lab.pods["a"], f"http://{b}/", '"x-gamma": "waypoint"', headers={"host": "b.beta"})
        n = 200
        bodies = [lab.curl("a", f"http://{b}/", headers={"host": "b.beta", "x-canary": "1"})[1] for _ in range(n)]
        counts = Counter(_backend(body) for body in bodies)
        assert set(counts) == {"b1", "b2"}, counts  # x-canary no longer pins b2: the VirtualService is out
        assert abs(counts["b1"] - 0.8 * n) <= 30, counts  # std-dev ~5.7 requests: > 5 sigma
        assert all('"x-gamma": "waypoint"' in body for body in bodies)
    finally:
        (lab.config / "gamma.yaml").unlink()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if {_backend(lab.curl("a", f"http://{b}/", headers={"host": "b.beta", "x-canary": "1"})[1])
                for _ in range(5)} == {"b2"}:
            break
        time.sleep(0.2)
    assert {_backend(lab.curl("a", f"http://{b}/", headers={"host": "b.beta", "x-canary": "1"})[1])
            for _ in range(10)} == {"b2"}


def _unused(*_: object) -> None:  # keep imports used by helpers above
    socket.gethostname()
