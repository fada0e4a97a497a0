"""One node proxy, many identities (issue 15): 50 ambient pods of 50 service accounts on node
n1 share one scope listener, one `ambient_connect` and one service cluster per destination,
yet each pod's connections present that pod's own certificate, and a destination presenting
any other identity is refused, per service and per pod IP. Real Envoys, real netns
(tests/netns_mesh.py), `meshline serve` with its CA, capture by `meshline iptables --ambient`.

    node n1: c00 .. c49 (namespace many, service accounts c00 .. c49, ambient)
    node n2: d (dest/sa d, ambient, Service d)
             r: its own Envoy terminating HBONE on 15008 with a *valid mesh certificate for
                another identity* (evil/evil); the mesh says the pod at r's address is
                victim-1 (dest/sa victim) of Service victim, on a node without a node proxy

Needs root, ip, iptables, setpriv, curl; skipped with the reason otherwise.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from controlplane.localrun import envoy_binary
from tests.netns_mesh import Node, Pod, Topology, bootstrap_file, missing_tools

XDS_PORT, STATUS_PORT, TLS_PORT = 19730, 19731, 19732
TD = "cluster.local"
PODS = 50
AMBIENT = {"meshline.io/dataplane-mode": "ambient"}


def _skip_reason() -> str | None:
    import os

    if os.geteuid() != 0:
        return "needs root (network namespaces, iptables)"
    return missing_tools()


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


def spiffe(ns: str, sa: str) -> str:
    return f"spiffe://{TD}/ns/{ns}/sa/{sa}"


def _pod(name: str, ns: str, sa: str, ip: str, node: str, labels: dict[str, str], netns: str | None
         ) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels,
                         "annotations": {"meshline.io/netns": netns} if netns else {}},
            "spec": {"nodeName": node, "serviceAccountName": sa, "containers": [{"name": "app"}]},
            "status": {"podIP": ip, "phase": "Running"}}


def _service(name: str, vip: str, selector: dict[str, str]) -> list[dict[str, Any]]:
    return [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "dest"},
             "spec": {"clusterIP": vip, "selector": selector,
                      "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}]


def _slice(name: str, members: list[tuple[str, str]]) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-1", "namespace": "dest", "labels": {"kubernetes.io/service-name": name}},
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": [ip], "targetRef": {"kind": "Pod", "name": p}} for p, ip in members]}


def rogue_envoy_config(cert: str, key: str, bundle: str) -> dict[str, Any]:
    """HBONE termination as a node proxy does it, but with a certificate of another identity."""
    def t(name: str, **kw: Any) -> dict[str, Any]:
        return {"@type": "type.googleapis.com/" + name, **kw}

    hcm = t("envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            stat_prefix="rogue", codec_type="HTTP2", http2_protocol_options={"allow_connect": True},
            upgrade_configs=[{"upgrade_type": "CONNECT"}],
            route_config={"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
                {"match": {"connect_matcher": {}},
                 "route": {"cluster": "app", "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}]}}]}]},
            http_filters=[{"name": "envoy.filters.http.router",
                           "typed_config": t("envoy.extensions.filters.http.router.v3.Router")}])
    tls = t("envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext", require_client_certificate=True,
            common_tls_context={"alpn_protocols": ["h2"],
                                "tls_certificates": [{"certificate_chain": {"inline_string": cert},
                                                      "private_key": {"inline_string": key}}],
                                "validation_context": {"trusted_ca": {"inline_string": bundle}}})
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 15000}}},
            "static_resources": {
                "listeners": [{"name": "rogue", "address": {"socket_address": {"address": "0.0.0.0", "port_value": 15008}},
                               "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                               "typed_config": hcm}],
                                                  "transport_socket": {"name": "envoy.transport_sockets.tls",
                                                                       "typed_config": tls}}]}],
                "clusters": [{"name": "app", "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
                    "cluster_name": "app", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                        "socket_address": {"address": "127.0.0.1", "port_value": 8080}}}}]}]}}]}}


class Lab:
    def __init__(self, topo: Topology, n1: Node, n2: Node, clients: list[Pod], d: Pod, r: Pod,
                 vips: dict[str, str]) -> None:
        self.topo, self.n1, self.n2, self.clients, self.d, self.r, self.vips = topo, n1, n2, clients, d, r, vips

    def log(self, node: Node) -> str:
        return "".join(p.read_text(errors="replace") for p in self.topo.workdir.glob(f"{node.netns}-envoy*.log"))

    def identities_seen(self, node: Node) -> set[str]:
        return set(re.findall(r"src\.identity=(spiffe://\S+)", self.log(node)))

    def stat(self, node: Node, fragment: str) -> int:
        with urllib.request.urlopen(f"http://{node.ip}:15000/stats?filter={fragment}", timeout=3) as resp:
            text = resp.read().decode()
        return sum(int(v) for v in re.findall(r": (\d+)$", text, re.M))


def _status_ready() -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{STATUS_PORT}/readyz", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from controlplane.ca.core import CertificateAuthority

    envoy = envoy_binary()
    with Topology() as topo:
        n1, n2 = topo.add_node("n1"), topo.add_node("n2")
        clients = [n1.add_pod(f"c{i:02d}") for i in range(PODS)]
        d, r = n2.add_pod("d"), n2.add_pod("r")
        vips = {"d": topo.vip(1), "victim": topo.vip(2)}
        work = topo.workdir
        config, ca_dir = work / "config", work / "ca"
        config.mkdir()
        docs: list[dict[str, Any]] = [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": AMBIENT}}
            for ns in ("many", "dest")]
        docs += [_pod(p.name, "many", p.name, p.ip, "n1", {"app": "client"}, p.netns_path) for p in clients]
        docs += [_pod("d", "dest", "d", d.ip, "n2", {"app": "d"}, d.netns_path),
                 _pod("victim-1", "dest", "victim", r.ip, "n9", {"app": "victim"}, None)]
        docs += [*_service("d", vips["d"], {"app": "d"}), _slice("d", [("d", d.ip)]),
                 *_service("victim", vips["victim"], {"app": "victim"}), _slice("victim", [("victim-1", r.ip)])]
        (config / "mesh.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
        d.serve_http(8080, "d")
        r.serve_http(8080, "victim")
        cp = topo.spawn("controlplane", [sys.executable, "-m", "controlplane.cli", "serve", "--config-dir",
                                         str(config), "--ca-dir", str(ca_dir), "--xds-address",
                                         f"{topo.host_ip}:{XDS_PORT}", "--status-address", f"127.0.0.1:{STATUS_PORT}",
                                         "--ca-address", f"{topo.host_ip}:{TLS_PORT}"])
        topo.wait("control plane", _status_ready, 30, cp)
        # The rogue: a certificate the mesh CA really issued, for another identity.
        ca = CertificateAuthority.load_or_create(ca_dir)
        key = ec.generate_private_key(ec.SECP256R1())
        chain = ca.issue_workload(("evil", "evil"), key.public_key())
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
        rogue = work / "rogue.json"
        rogue.write_text(json.dumps(rogue_envoy_config(chain, key_pem, ca.trust_bundle())))
        r.run([envoy, "-c", str(rogue), "--disable-hot-restart", "--concurrency", "1", "-l", "warning"])
        topo.wait("rogue envoy", lambda: r.can_connect("127.0.0.1", 15008), 15)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:  # capture in every ambient pod
            list(pool.map(lambda p: p.exec([sys.executable, "-m", "controlplane.cli", "iptables", "--ambient"],
                                           check=True, timeout=60), [*clients, d]))
        for node in (n1, n2):
            boot = bootstrap_file(
                ["--mode", "node", "--node-name", node.name, "--node-id", f"node-{node.name}", "--namespace",
                 "meshline-system", "--service-account", "meshline-node-proxy", "--ca-dir", str(ca_dir),
                 "--xds-tls", "--xds-address", f"{topo.host_ip}:{TLS_PORT}", "--admin-address", f"{node.ip}:15000"],
                work / f"boot-{node.name}.yaml")
            node.run([envoy, "-c", str(boot), "--disable-hot-restart", "--concurrency", "1", "-l", "warning",
                      "--file-flush-interval-msec", "50"])
        lab = Lab(topo, n1, n2, clients, d, r, vips)
        deadline = time.monotonic() + 60
        while clients[-1].curl(f"http://{vips['d']}/", timeout=2)[0] != 200:
            assert time.monotonic() < deadline, f"the mesh never came up\n{topo.logs()}"
            time.sleep(0.3)
        yield lab


def _wait(cond: Any, what: Any, timeout: float = 15.0) -> None:
    """Poll `cond` until true; fail with `what` (a string, or a callable giving one then)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what() if callable(what) else what
        time.sleep(0.05)


def test_each_pod_presents_its_own_certificate(lab: Lab) -> None:
    """Pod by pod, the destination's node proxy sees exactly the identities of the pods that
    called so far: each call brought its pod's identity, and no other."""
    first = spiffe("many", lab.clients[-1].name)  # the readiness probe's caller
    for i, pod in enumerate(lab.clients):
        status, body = pod.curl(f"http://{lab.vips['d']}/")
        assert status == 200 and '"d"' in body, (pod.name, status, body)
        want = {spiffe("many", p.name) for p in lab.clients[: i + 1]} | {first}
        _wait(lambda want=want: lab.identities_seen(lab.n2) >= want,
              lambda want=want, pod=pod: f"{pod.name}'s identity never reached d: "
              f"{sorted(want - lab.identities_seen(lab.n2))} missing\n{lab.log(lab.n2)[-3000:]}")
        assert lab.identities_seen(lab.n2) == want, lab.identities_seen(lab.n2) - want
    # 50 identities share the node's shared listeners: one tunnel cluster each, and no more.
    with urllib.request.urlopen(f"http://{lab.n1.ip}:15000/clusters?format=json", timeout=5) as resp:
        names = [c["name"] for c in json.load(resp)["cluster_statuses"]]
    assert sum(n.startswith("ambient_src|") for n in names) == PODS


def test_a_destination_presenting_another_identity_is_refused(lab: Lab) -> None:
    before = lab.stat(lab.n1, "ssl.fail_verify_san")
    ca_errors = lab.stat(lab.n1, "ssl.fail_verify_error")
    # Through the Service: its endpoint must be victim, the pod there answers as evil.
    status, body = lab.clients[0].curl(f"http://{lab.vips['victim']}/", timeout=3)
    assert status != 200 and "victim" not in body, (status, body)
    # By pod IP: the same address, the same refusal.
    status, body = lab.clients[1].curl(f"http://{lab.r.ip}:8080/", timeout=3)
    assert status != 200 and "victim" not in body, (status, body)
    _wait(lambda: lab.stat(lab.n1, "ssl.fail_verify_san") >= before + 2, "no SAN verification failure counted")
    assert lab.stat(lab.n1, "ssl.fail_verify_error") == ca_errors  # a valid mesh certificate, the wrong identity
    # The rogue's app really is reachable (a plain call from its own netns), so only identity stopped it.
    assert lab.r.curl("http://127.0.0.1:8080/")[0] == 200
