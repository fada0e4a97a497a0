"""ServiceEntry hosts for sidecarless (ambient) pods (issue 18), end to end through real
node-proxy Envoys: the lab of tests/e2e/test_ambient_e2e.py (two netns "nodes", ambient
pods captured by `meshline iptables --ambient`, `meshline serve` in directory mode) plus
an "external" HTTP server on the lab's bridge address (outside every pod and node).

Pod a (alpha, on n1) dials a ServiceEntry's address:
- STATIC (endpoint: the external server) and DNS (endpoint: the name `localhost`, resolved
  by the node proxy to a server on n1's loopback) resolution, MESH_EXTERNAL: the node proxy
  forwards the connection to the entry's endpoint, not to the dialled address (owned by
  nobody);
- MESH_INTERNAL with a workloadSelector picking ambient pod d (delta, PeerAuthentication
  STRICT: plaintext is refused there): over HBONE with a's identity, which d's node proxy
  logs;
- removed again: the connection is no longer answered.

Per namespace (h26): one host, an entry private to alpha (two addresses) and a public one in
gamma with another endpoint; a (alpha) and c (gamma) share n1's node proxy, each pod reaches
the entry its namespace resolves the host to, and the other entry's address passes through
to the dialled address (owned by nobody: not answered), as Istio's ztunnel does with an
address it does not know. An entry private to beta (whose namespace uses waypoint wp), of a
host that a public entry also declares, is bound to wp for beta's pods: its VirtualService
applies there, at each of its addresses.

Needs root, ip, iptables, setpriv, curl; skipped with the reason otherwise.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import pytest

from controlplane.localrun import envoy_binary
from tests.e2e import test_ambient_e2e as amb
from tests.e2e.test_ambient_e2e import ROOT, Lab, _backend, _skip_reason, spiffe
from tests.netns_mesh import Topology

pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")

EXT_PORT = 19721
lab = amb.lab  # the ambient lab fixture (its own instance in this module)


def _entry(name: str, ns: str, host: str, address: str, resolution: str, location: str,
           **extra: Any) -> dict[str, Any]:
    return {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"hosts": [host], "addresses": [address], "location": location, "resolution": resolution,
                     "ports": [{"number": 80, "name": "http", "protocol": "HTTP", "targetPort": extra.pop("target", 0)
                                or EXT_PORT}], **extra}}


def _get(lab: Lab, url: str, want: str, timeout: float = 20.0) -> tuple[int, str]:
    """Poll until `want` answers (config reaches the node proxy asynchronously)."""
    deadline = time.monotonic() + timeout
    last: tuple[int, str] = (0, "")
    while time.monotonic() < deadline:
        last = lab.curl("a", url, timeout=2.0)
        if last[0] == 200 and _backend(last[1]) == want:
            return last
        time.sleep(0.2)
    return last


def test_ambient_pod_reaches_service_entry_hosts_through_its_node_proxy(lab: Lab) -> None:
    assert envoy_binary()
    topo: Topology = lab.topo
    ext = topo.spawn("ext-backend", [sys.executable, str(ROOT / "samples" / "backend.py"),
                                     f"ext={topo.host_ip}:{EXT_PORT}"])
    topo.wait("external backend", lambda: _can_connect(topo.host_ip, EXT_PORT), 10, ext)
    # The DNS entry's endpoint is the name `localhost`: the node proxy (in n1's netns)
    # resolves it and finds this server on n1's loopback.
    local = lab.n1.run([sys.executable, str(ROOT / "samples" / "backend.py"), f"ext-dns=127.0.0.1:{EXT_PORT}"])
    topo.wait("n1 loopback backend", lambda: lab.n1.can_connect("127.0.0.1", EXT_PORT), 10, local)
    static_vip, dns_vip, internal_vip = Topology.vip(40), Topology.vip(41), Topology.vip(42)
    # Nothing owns these addresses: without an entry the connection goes nowhere.
    status, _ = lab.curl("a", f"http://{static_vip}/", timeout=2.0)
    assert status != 200
    lab.write("entries", [
        _entry("ext-static", "alpha", "ext-static.example", static_vip, "STATIC", "MESH_EXTERNAL",
               endpoints=[{"address": topo.host_ip}]),
        _entry("ext-dns", "alpha", "ext-dns.example", dns_vip, "DNS", "MESH_EXTERNAL",
               endpoints=[{"address": "localhost"}]),
        _entry("d-internal", "delta", "d.internal", internal_vip, "STATIC", "MESH_INTERNAL",
               target=8080, workloadSelector={"labels": {"app": "d"}}),
    ])
    try:
        assert _backend(_get(lab, f"http://{static_vip}/", "ext")[1]) == "ext"
        assert _backend(_get(lab, f"http://{dns_vip}/", "ext-dns")[1]) == "ext-dns"
        status, body = _get(lab, f"http://{internal_vip}/", "d")
        assert status == 200 and _backend(body) == "d", (status, body)
        # d accepts only mTLS: it was reached over HBONE, as a's identity.
        lab.wait_line("n2", f"CONNECT {internal_vip}:80 ", f"src.identity={spiffe('alpha', 'a')}")
    finally:
        (lab.config / "entries.yaml").unlink()
    deadline = time.monotonic() + 20
    while lab.curl("a", f"http://{static_vip}/", timeout=2.0)[0] == 200:
        assert time.monotonic() < deadline, "the entry's address still answers after the entry was removed"
        time.sleep(0.2)


def _can_connect(host: str, port: int) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _vs(name: str, ns: str, host: str) -> dict[str, Any]:
    """Requests for /teapot are answered 418 by whoever applies this route (an L7 proxy)."""
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": name, "namespace": ns},
            "spec": {"hosts": [host], "http": [
                {"match": [{"uri": {"prefix": "/teapot"}}],
                 "fault": {"abort": {"httpStatus": 418, "percentage": {"value": 100}}},
                 "route": [{"destination": {"host": host}}]},
                {"route": [{"destination": {"host": host}}]}]}}


def test_service_entry_bound_to_a_waypoint_gets_its_l7_routes_there(lab: Lab) -> None:
    """Namespace beta uses waypoint wp: an entry there is bound to it (its VirtualService
    applies: /teapot -> 418), the waypoint reaching the external endpoint directly; one
    labelled `istio.io/use-waypoint: none` is not (L4 only: /teapot reaches the server)."""
    topo: Topology = lab.topo
    if not _can_connect(topo.host_ip, EXT_PORT):
        ext = topo.spawn("ext-backend", [sys.executable, str(ROOT / "samples" / "backend.py"),
                                         f"ext={topo.host_ip}:{EXT_PORT}"])
        topo.wait("external backend", lambda: _can_connect(topo.host_ip, EXT_PORT), 10, ext)
    bound_vip, bypass_vip = Topology.vip(43), Topology.vip(44)
    bypass = _entry("bypass", "beta", "bypass.example", bypass_vip, "STATIC", "MESH_EXTERNAL",
                    endpoints=[{"address": topo.host_ip}])
    bypass["metadata"]["labels"] = {"istio.io/use-waypoint": "none"}
    lab.write("wp-entries", [
        _entry("bound", "beta", "bound.example", bound_vip, "STATIC", "MESH_EXTERNAL",
               endpoints=[{"address": topo.host_ip}]),
        bypass, _vs("bound", "beta", "bound.example"), _vs("bypass", "beta", "bypass.example"),
    ])
    try:
        status, body = _get(lab, f"http://{bound_vip}/", "ext")
        assert status == 200 and _backend(body) == "ext", (status, body)
        assert lab.curl("a", f"http://{bound_vip}/teapot", timeout=3.0)[0] == 418
        status, body = _get(lab, f"http://{bypass_vip}/teapot", "ext")
        assert status == 200 and _backend(body) == "ext", (status, body)
    finally:
        (lab.config / "wp-entries.yaml").unlink()


def _get_from(lab: Lab, pod: str, url: str, want: str, timeout: float = 20.0) -> tuple[int, str]:
    deadline = time.monotonic() + timeout
    last: tuple[int, str] = (0, "")
    while time.monotonic() < deadline:
        last = lab.curl(pod, url, timeout=2.0)
        if last[0] == 200 and _backend(last[1]) == want:
            return last
        time.sleep(0.2)
    return last


def test_each_namespace_reaches_the_entry_it_resolves_a_host_to(lab: Lab) -> None:
    topo: Topology = lab.topo
    for name, port in (("ext", EXT_PORT), ("ext2", EXT_PORT + 1)):
        if not _can_connect(topo.host_ip, port):
            proc = topo.spawn(f"{name}-backend", [sys.executable, str(ROOT / "samples" / "backend.py"),
                                                  f"{name}={topo.host_ip}:{port}"])
            topo.wait(f"{name} backend", lambda p=port: _can_connect(topo.host_ip, p), 10, proc)
    private1, private2, public = Topology.vip(45), Topology.vip(46), Topology.vip(47)
    alpha = _entry("pay-alpha", "alpha", "pay.example", private1, "STATIC", "MESH_EXTERNAL",
                   endpoints=[{"address": topo.host_ip}], exportTo=["."])
    alpha["spec"]["addresses"] = [private1, private2]  # several addresses: each is routed
    gamma = _entry("pay-public", "gamma", "pay.example", public, "STATIC", "MESH_EXTERNAL",
                   target=EXT_PORT + 1, endpoints=[{"address": topo.host_ip}])
    lab.write("ns-entries", [alpha, gamma])
    try:
        for addr in (private1, private2):  # alpha's own entry, at each of its addresses
            status, body = _get_from(lab, "a", f"http://{addr}/", "ext")
            assert status == 200 and _backend(body) == "ext", (addr, status, body)
        status, body = _get_from(lab, "c", f"http://{public}/", "ext2")  # gamma: the public entry
        assert status == 200 and _backend(body) == "ext2", (status, body)
        # The other namespace's entry is not theirs: the connection passes through to the
        # dialled address, which nobody owns.
        assert lab.curl("c", f"http://{private1}/", timeout=2.0)[0] != 200
        assert lab.curl("a", f"http://{public}/", timeout=2.0)[0] != 200
    finally:
        (lab.config / "ns-entries.yaml").unlink()


def test_a_namespace_private_entry_is_bound_to_its_namespaces_waypoint(lab: Lab) -> None:
    topo: Topology = lab.topo
    for name, port in (("ext", EXT_PORT), ("ext2", EXT_PORT + 1)):
        if not _can_connect(topo.host_ip, port):
            proc = topo.spawn(f"{name}-backend", [sys.executable, str(ROOT / "samples" / "backend.py"),
                                                  f"{name}={topo.host_ip}:{port}"])
            topo.wait(f"{name} backend", lambda p=port: _can_connect(topo.host_ip, p), 10, proc)
    beta1, beta2, public = Topology.vip(48), Topology.vip(49), Topology.vip(50)
    beta = _entry("shop-beta", "beta", "shop.example", beta1, "STATIC", "MESH_EXTERNAL",
                  endpoints=[{"address": topo.host_ip}], exportTo=["."])
    beta["spec"]["addresses"] = [beta1, beta2]
    gamma = _entry("shop-public", "gamma", "shop.example", public, "STATIC", "MESH_EXTERNAL",
                   target=EXT_PORT + 1, endpoints=[{"address": topo.host_ip}])
    lab.write("wp-ns-entries", [beta, gamma, _vs("shop", "beta", "shop.example")])
    try:
        for addr in (beta1, beta2):
            status, body = _get_from(lab, "b1", f"http://{addr}/", "ext")
            assert status == 200 and _backend(body) == "ext", (addr, status, body)
            # beta's VirtualService, applied by beta's waypoint: it accepted this address.
            assert lab.curl("b1", f"http://{addr}/teapot", timeout=3.0)[0] == 418, addr
        status, body = _get_from(lab, "a", f"http://{public}/teapot", "ext2")  # alpha: the public entry, L4
        assert status == 200 and _backend(body) == "ext2", (status, body)
    finally:
        (lab.config / "wp-ns-entries.yaml").unlink()
