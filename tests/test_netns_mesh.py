"""Self-test of tests/netns_mesh.py: a real two-node, four-pod lab in network namespaces.

Checks pod-to-pod reachability across nodes by pod IP (both directions, HTTP and TCP), pods
reaching a listener bound to the host bridge address 198.18.0.1, that the capture helper sees
that cleartext HTTP (so `plaintext_http_seen` is proven on real traffic, with tcpdump and with the
Python sniffer), and that teardown - also after a failure inside the block, and with forced
firewall rules - leaves no netns, link, route or iptables rule behind. Needs root, `ip`,
`setpriv`, `curl`; skipped with the reason otherwise. No traffic leaves the lab.
"""

from __future__ import annotations

import json
import shutil
import socket
import socketserver
import subprocess
import threading
from collections.abc import Iterator

import pytest

from tests.netns_mesh import (
    HOST_IP,
    Segment,
    Topology,
    in_netns,
    missing_tools,
    plaintext_http_seen,
)

needs_root = pytest.mark.skipif(missing_tools() is not None, reason=missing_tools() or "")


class Lab:
    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.n1, self.n2 = topo.add_node("n1"), topo.add_node("n2")
        self.a1, self.b1 = self.n1.add_pod("a1"), self.n1.add_pod("b1")
        self.a2, self.b2 = self.n2.add_pod("a2"), self.n2.add_pod("b2", ip_suffix=77)
        for pod in (self.a1, self.b1, self.a2, self.b2):
            pod.serve_http(8080, f"http-{pod.name}")
        self.b2.serve_tcp(9000, "tcp-b2")


@pytest.fixture(scope="class")
def lab() -> Iterator[Lab]:
    with Topology() as topo:
        yield Lab(topo)


@needs_root
class TestTwoNodes:
    """One lab for these tests; torn down before the teardown tests below (they need the lock)."""

    def test_address_plan(self, lab: Lab) -> None:
        assert (lab.n1.ip, lab.n2.ip) == ("198.18.0.11", "198.18.0.12")
        assert (lab.a1.ip, lab.b1.ip, lab.a2.ip, lab.b2.ip) == ("198.18.11.2", "198.18.11.3", "198.18.12.2",
                                                                "198.18.12.77")
        assert lab.topo.vip(5) == "198.19.0.5"
        assert lab.a1.netns_path == f"/var/run/netns/{lab.a1.netns}"
        routes = lab.a1.exec(["ip", "route"]).stdout
        assert "default via 198.18.11.1 dev eth0 onlink" in routes
        assert "198.18.12.0/24 via 198.18.0.12 dev eth0" in lab.n1.exec(["ip", "route"]).stdout

    @pytest.mark.parametrize(("src", "dst"), [("a1", "b2"), ("b2", "a1"), ("a1", "b1"), ("b1", "a2")])
    def test_pods_reach_each_other_by_pod_ip(self, lab: Lab, src: str, dst: str) -> None:
        s, d = getattr(lab, src), getattr(lab, dst)
        status, body = s.curl(f"http://{d.ip}:8080/hi", headers={"x-probe": src})
        assert status == 200, body
        reply = json.loads(body)
        assert reply["backend"] == f"http-{dst}" and reply["headers"]["x-probe"] == src

    def test_tcp_backend_across_nodes(self, lab: Lab) -> None:
        def talk() -> bytes:
            with socket.create_connection((lab.b2.ip, 9000), timeout=3) as c:
                c.sendall(b"ping\n")
                data = b""
                while data.count(b"\n") < 2:
                    data += c.recv(100)
                return data
        assert in_netns(lab.a1.netns_path, talk) == b"tcp-b2\nping\n"

    def test_vip_has_no_owner(self, lab: Lab) -> None:
        status, err = lab.a1.curl(f"http://{lab.topo.vip(1)}:80/", timeout=2)
        assert status == 0 and err

    def test_pods_reach_the_host_bridge_address(self, lab: Lab) -> None:
        class Hello(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                self.wfile.write(f"host sees {self.client_address[0]}\n".encode())

        srv = socketserver.ThreadingTCPServer((HOST_IP, 0), Hello)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        try:
            port = srv.server_address[1]
            for pod in (lab.a1, lab.b2):
                out = pod.exec(["curl", "-sS", "-m", "3", f"telnet://{HOST_IP}:{port}"], timeout=10)
                assert out.stdout == f"host sees {pod.ip}\n", out.stderr
                assert pod.can_connect(HOST_IP, port)
            assert lab.n2.can_connect(HOST_IP, port)
        finally:
            srv.shutdown()
            srv.server_close()

    @pytest.mark.parametrize("tool", ["tcpdump", "python"])
    def test_capture_sees_cleartext_http_between_nodes(self, lab: Lab, tool: str) -> None:
        if tool == "tcpdump" and shutil.which("tcpdump") is None:
            pytest.skip("tcpdump not installed")
        with lab.topo.capture(filter="tcp port 8080", tool=tool) as cap:
            status, _ = lab.a1.curl(f"http://{lab.a2.ip}:8080/captured", headers={"x-secret": "visible"})
        assert status == 200
        between = [s for s in cap.segments if {s.src, s.dst} == {lab.a1.ip, lab.a2.ip}]
        assert between and all(8080 in (s.sport, s.dport) for s in between)
        assert plaintext_http_seen(between)
        assert any(b"GET /captured HTTP/1.1\r\n" in s.payload and b"x-secret: visible" in s.payload
                   for s in between)
        assert any(s.payload.startswith(b"HTTP/1.") for s in between)  # server -> client

    def test_a_second_topology_waits_for_the_machine_wide_lock(self, lab: Lab) -> None:
        other = Topology(lock_timeout=0.5)
        with pytest.raises(TimeoutError, match="held by another run"), other:
            pass
        assert lab.a1.curl(f"http://{lab.b2.ip}:8080/")[0] == 200  # the live lab is untouched


def test_plaintext_http_seen_on_synthetic_payloads() -> None:
    def seg(p: bytes) -> Segment:
        return Segment("198.18.11.2", 40000, "198.18.12.2", 15008, p)

    assert plaintext_http_seen([seg(b"POST /x HTTP/1.1\r\nhost: a\r\n\r\n")])
    assert plaintext_http_seen([seg(b"HTTP/1.0 503 Service Unavailable\r\n")])
    assert plaintext_http_seen([seg(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")])
    assert not plaintext_http_seen([seg(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
                                    seg(b"\x17\x03\x03\x00\x45" + bytes(range(69))), seg(b"")])


def _snapshot(sfx: str) -> dict[str, list[str]]:
    """Host state that is ours (names carry `sfx`; routes and addresses name our bridge)."""
    def out(*argv: str) -> list[str]:
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.splitlines()
    return {
        "netns": [ln for ln in out("ip", "netns", "list") if sfx in ln],
        "links": [ln for ln in out("ip", "-o", "link") if sfx in ln],
        "addrs": [ln for ln in out("ip", "-o", "addr") if sfx in ln],
        "routes": [ln for ln in out("ip", "route") if sfx in ln],
        # all of it (an emptied but created filter table counts), minus other runs' rules
        "iptables": [ln for ln in out("iptables-save") if not ln.startswith("#")
                     and ("meshline-netns-" not in ln or sfx in ln)] if shutil.which("iptables-save") else [],
        "ip_forward": out("sysctl", "-n", "net.ipv4.ip_forward"),
    }


@needs_root
@pytest.mark.parametrize("firewall", [None, True], ids=["auto-firewall", "forced-rules"])
def test_teardown_is_complete(firewall: bool | None) -> None:
    topo = Topology(open_firewall=firewall)
    topo.lock()  # so that no other run of the harness is live while we take the "before" picture
    before = _snapshot(topo.sfx)
    with pytest.raises(RuntimeError, match="boom"), topo:
        n1, n2 = topo.add_node("x1"), topo.add_node("x2")
        p1, p2 = n1.add_pod("p1"), n2.add_pod("p2")
        p2.serve_http(8080, "x")
        assert p1.curl(f"http://{p2.ip}:8080/")[0] == 200
        sleeper = p1.run(["sleep", "600"], user=65534)
        topo.wait("sleep", lambda: open(f"/proc/{sleeper.pid}/comm").read() == "sleep\n")
        uid_line = next(ln for ln in open(f"/proc/{sleeper.pid}/status") if ln.startswith("Uid:"))
        assert uid_line.split()[1:] == ["65534"] * 4
        during = _snapshot(topo.sfx)
        assert len(during["netns"]) == 4 and len(during["links"]) == 3  # bridge + 2 node veths
        assert any("198.18.12.0/24 via 198.18.0.12" in ln for ln in during["routes"])
        assert (any(topo.sfx in ln for ln in during["iptables"]) if firewall
                else during["iptables"] == before["iptables"])
        raise RuntimeError("boom")
    assert _snapshot(topo.sfx) == before
    assert not topo.workdir.exists()
    assert all(p.poll() is not None for p in topo.procs)
