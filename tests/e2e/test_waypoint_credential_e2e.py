"""DestinationRule `credentialName` on a waypoint, end to end (issue 18): an ambient client
calls a ServiceEntry host bound to a waypoint (`istio.io/use-waypoint`); the waypoint
originates mutual TLS to the external server with the client certificate of the Secret its
DestinationRule names (from the waypoint's namespace, over SDS).

    node n1: a (alpha, ambient client)  wp (beta: the waypoint's Envoy)
    host:    an HTTPS server (the "external" host) that requires a client certificate of
             the test CA and answers with the certificate's common name

Real Envoys (the node proxy, the waypoint), network namespaces (tests/netns_mesh.py) and
`meshline iptables --ambient` capture, as tests/e2e/test_waypoint_ext_authz_e2e.py. The
Secret deleted: the waypoint gets stand-ins, the server refuses their certificate (503),
and nothing goes out in plaintext. Needs root, ip, iptables, curl; skipped otherwise."""

from __future__ import annotations

import base64
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.localrun import envoy_binary
from tests.e2e.test_ambient_e2e import _ns, _pod, _skip_reason, _slice, _svc, status_ready
from tests.e2e.test_locality_mutual_e2e import Pki, TlsServer
from tests.e2e.test_waypoint_ext_authz_e2e import eventually
from tests.netns_mesh import Pod, Topology, bootstrap_file

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))]
XDS_PORT, STATUS_PORT, TLS_PORT, SERVER_PORT = 19730, 19731, 19732, 19733
HOST = "secure.example"  # the name on the server's certificate (tests/e2e/test_locality_mutual_e2e.Pki)


def secret_doc(pki: Pki) -> dict[str, Any]:
    b64 = {k: base64.b64encode(v.encode()).decode() for k, v in
           (("tls.crt", pki.client_pem), ("tls.key", pki.client_key), ("ca.crt", pki.ca_pem))}
    return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": "cred", "namespace": "beta"}, "data": b64}


def mesh_docs(pods: dict[str, Pod], vips: dict[str, str], server_ip: str) -> list[dict[str, Any]]:
    amb = {"istio.io/dataplane-mode": "ambient"}
    return [
        _ns("alpha", amb), _ns("beta", amb),
        _pod(pods["a"], "alpha", "a", {"app": "a"}, {"meshline.io/netns": pods["a"].netns_path}),
        _pod(pods["wp"], "beta", "wp", {"app": "wp", "istio.io/dataplane-mode": "none"}, {}),
        _svc("wp", "beta", vips["wp"], [("tunnel", 15008, 15008)], {"app": "wp"}),
        _slice("wp", "beta", [("tunnel", 15008)], [pods["wp"]]),
        {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
         "metadata": {"name": "secure", "namespace": "beta", "labels": {"istio.io/use-waypoint": "wp"}},
         "spec": {"hosts": [HOST], "addresses": [vips["ext"]], "location": "MESH_EXTERNAL", "resolution": "STATIC",
                  "ports": [{"number": 80, "name": "http", "protocol": "HTTP", "targetPort": SERVER_PORT}],
                  "endpoints": [{"address": server_ip}]}},
        {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
         "metadata": {"name": "secure", "namespace": "beta"},
         "spec": {"host": HOST, "trafficPolicy": {"tls": {"mode": "MUTUAL", "credentialName": "cred", "sni": HOST}}}},
    ]


@dataclass
class Lab:
    pods: dict[str, Pod]
    vips: dict[str, str]
    server: TlsServer
    secret_file: Path
    pki: Pki

    def get(self) -> tuple[int, str]:
        """a's call to the entry's address (a's node proxy, then the waypoint)."""
        return self.pods["a"].curl(f"http://{self.vips['ext']}/", extra=["-i"])


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    envoy = envoy_binary()
    pki = Pki(tmp_path_factory.mktemp("pki"))
    with Topology() as topo:
        n1 = topo.add_node("n1")
        pods = {name: n1.add_pod(name) for name in ("a", "wp")}
        vips = {"wp": topo.vip(1), "ext": topo.vip(2)}
        # A new handshake per request: each call shows the certificate the waypoint holds now.
        server = TlsServer(pki, topo.host_ip, SERVER_PORT, one_request_per_connection=True)
        work = topo.workdir
        config, ca_dir = work / "config", work / "ca"
        config.mkdir()
        (config / "mesh.yaml").write_text(yaml.safe_dump_all(mesh_docs(pods, vips, topo.host_ip), sort_keys=False))
        lab = Lab(pods, vips, server, config / "secret.yaml", pki)
        lab.secret_file.write_text(yaml.safe_dump(secret_doc(pki)))
        try:
            cp = topo.spawn("controlplane", [sys.executable, "-m", "controlplane.cli", "serve", "--config-dir",
                                             str(config), "--ca-dir", str(ca_dir), "--xds-address",
                                             f"{topo.host_ip}:{XDS_PORT}", "--status-address",
                                             f"127.0.0.1:{STATUS_PORT}", "--ca-address", f"{topo.host_ip}:{TLS_PORT}"])
            topo.wait("control plane", lambda: status_ready(STATUS_PORT), 30, cp)
            xds = f"{topo.host_ip}:{TLS_PORT}"
            pods["a"].exec([sys.executable, "-m", "controlplane.cli", "iptables", "--ambient"], check=True)
            nboot = bootstrap_file(["--mode", "node", "--node-name", "n1", "--node-id", "node-n1", "--namespace",
                                    "meshline-system", "--service-account", "meshline-node-proxy", "--ca-dir",
                                    str(ca_dir), "--xds-tls", "--xds-address", xds, "--admin-address",
                                    f"{n1.ip}:15000"], work / "boot-n1.yaml")
            n1.run([envoy, "-c", str(nboot), "--disable-hot-restart", "--concurrency", "1", "-l", "warning"])
            wboot = bootstrap_file(["--mode", "waypoint", "--waypoint", "wp", "--node-id", "wp-1", "--namespace",
                                    "beta", "--workload", "wp", "--service-account", "wp", "--ca-dir", str(ca_dir),
                                    "--xds-tls", "--xds-address", xds, "--admin-address", "127.0.0.1:15000"],
                                   work / "boot-wp.yaml")
            pods["wp"].run([envoy, "-c", str(wboot), "--disable-hot-restart", "--concurrency", "1", "-l", "warning"])
            eventually(lambda: lab.get()[0] == 200, "a reaches the external host through the waypoint")
            yield lab
        finally:
            server.close()


def test_the_waypoint_presents_the_secrets_client_certificate(lab: Lab) -> None:
    status, text = lab.get()
    assert status == 200 and "secure-ok client=client" in text, text
    assert lab.server.served >= 1


def test_without_the_secret_the_waypoint_fails_closed_and_never_sends_plaintext(lab: Lab) -> None:
    lab.secret_file.unlink()
    try:
        # The stand-in certificate (no CA vouches for it) is refused at the handshake; a cluster
        # that fell back to plaintext would show as HTTP_REQUEST refusals and 400s instead.
        eventually(lambda: lab.get()[0] == 503, "the waypoint's call fails once the Secret is gone", timeout=60)
        served, refused = lab.server.served, lab.server.refused
        assert [lab.get()[0] for _ in range(3)] == [503] * 3
        assert lab.server.served == served and lab.server.refused > refused
        assert "HTTP_REQUEST" not in lab.server.refusals, lab.server.refusals
    finally:
        lab.secret_file.write_text(yaml.safe_dump(secret_doc(lab.pki)))
    eventually(lambda: lab.get()[0] == 200, "the Secret is back: the call succeeds again")
