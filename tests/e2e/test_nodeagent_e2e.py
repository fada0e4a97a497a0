"""Pod network-namespace discovery end to end: no pod names its netns. A real
`meshline node-agent` per node (in the host, like the DaemonSet's privileged container)
finds each ambient pod's netns by scanning /proc, bind-mounts it, applies the in-pod capture
rules and reports pod -> path to `meshline serve --node-agents` over gRPC with the node
proxy's node-bound credential; the node proxies then own listeners at those paths and pod a
(node 1) reaches service d (node 2) through both of them. Another node's agent credential
can neither speak for node 1, take its pod nor point a pod at a path outside the netns
directory, and the pod keeps working meanwhile.

The agents mount under /var/run/meshline/netns/<run>/<node>: the control plane accepts
netns paths only inside the node agents' directory (/var/run/meshline/netns).

Needs root, ip, iptables, setpriv, curl; skipped with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml

from controlplane.localrun import envoy_binary
from controlplane.nodeagent.gen import nodeagent_pb2
from controlplane.nodeagent.registry import DEFAULT_NETNS_DIR, SERVICE
from tests.e2e.test_ambient_e2e import (
    _ns,
    _pod,
    _skip_reason,
    _slice,
    _svc,
    _wait_http,
    spiffe,
    status_ready,
)
from tests.netns_mesh import Topology, bootstrap_file

XDS_PORT = 19720  # plain: configuration only (reports and tokens go to TLS_PORT)
STATUS_PORT = 19721
TLS_PORT = 19722  # xDS + CA over TLS: the node proxies carry tokens

pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


def _listener_netns(node_id: str) -> set[str]:
    url = f"http://127.0.0.1:{STATUS_PORT}/v1/proxies/{node_id}/config?type=listeners"
    with urllib.request.urlopen(url, timeout=2) as r:
        text = r.read().decode()
    found: set[str] = set()

    def walk(x: object) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                if k in ("networkNamespaceFilepath", "network_namespace_filepath") and isinstance(v, str):
                    found.add(v)
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(json.loads(text))
    return found


@pytest.fixture(scope="module")
def lab() -> Iterator[tuple[Topology, dict[str, object], Path]]:
    envoy = envoy_binary()
    with Topology() as topo:
        n1, n2 = topo.add_node("n1"), topo.add_node("n2")
        a, d = n1.add_pod("a"), n2.add_pod("d")
        work = topo.workdir
        config, ca_dir = work / "config", work / "ca"
        netns_dir = Path(DEFAULT_NETNS_DIR) / f"e2e-{secrets.token_hex(4)}"
        made = [p for p in (netns_dir, *netns_dir.parents) if not p.exists()]  # removed again, when empty
        config.mkdir()
        netns_dir.mkdir(parents=True)
        agents: list[subprocess.Popen[bytes]] = []
        try:
            amb = {"meshline.io/dataplane-mode": "ambient"}
            vip = topo.vip(3)
            docs = [
                _ns("alpha", amb), _ns("delta", amb),
                _pod(a, "alpha", "a", {"app": "a"}, {}), _pod(d, "delta", "d", {"app": "d"}, {}),
                _svc("d", "delta", vip, [("http", 80, 8080)], {"app": "d"}),
                _slice("d", "delta", [("http", 8080)], [d]),
            ]
            (config / "mesh.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
            d.serve_http(8080, "d")
            a.serve_http(8080, "a")  # a process in a's netns: what the agent's /proc scan finds
            cp = topo.spawn("controlplane", [sys.executable, "-m", "controlplane.cli", "serve", "--config-dir",
                                             str(config), "--ca-dir", str(ca_dir), "--node-agents", "--xds-address",
                                             f"{topo.host_ip}:{XDS_PORT}", "--status-address",
                                             f"127.0.0.1:{STATUS_PORT}", "--ca-address", f"{topo.host_ip}:{TLS_PORT}"])
            topo.wait("control plane", lambda: status_ready(STATUS_PORT), 30, cp)
            from controlplane.ca import tokens
            from controlplane.ca.identity import Identity

            key = tokens.load_or_create_token_key(ca_dir)
            xds = f"{topo.host_ip}:{TLS_PORT}"  # the agents' reports carry tokens: TLS only
            for node, pod, ns in ((n1, a, "alpha"), (n2, d, "delta")):
                token = work / f"token-{node.name}"
                token.write_text(tokens.mint(key, Identity("meshline-system", "meshline-node-proxy"), node=node.name))
                pods = work / f"pods-{node.name}.yaml"
                pods.write_text(yaml.safe_dump([{"namespace": ns, "name": pod.name, "ips": [pod.ip]}]))
                own_dir = netns_dir / node.name  # each node (host) has its own
                own_dir.mkdir()
                agents.append(topo.spawn(f"agent-{node.name}", [
                    sys.executable, "-m", "controlplane.cli", "node-agent", "--node", node.name, "--xds-address", xds,
                    "--pods-file", str(pods), "--netns-dir", str(own_dir), "--interval", "0.5",
                    "--token-file", str(token), "--ca-bundle", str(ca_dir / "root-cert.pem")]))
                # The node proxy starts once the agent has mounted the pod's netns: `ip netns exec` gives
                # it a private copy of the mount table (a DaemonSet uses HostToContainer propagation).
                mounted = own_dir / f"{ns}_{pod.name}"
                topo.wait(f"node agent of {node.name} mounts {mounted.name}",
                          lambda m=mounted: m.exists() and os.stat(m).st_dev != os.stat(m.parent).st_dev,
                          15, agents[-1])
                boot = bootstrap_file(["--mode", "node", "--node-name", node.name, "--node-id", f"node-{node.name}",
                                   "--namespace", "meshline-system", "--service-account", "meshline-node-proxy",
                                   "--ca-dir", str(ca_dir), "--xds-tls", "--xds-address", f"{topo.host_ip}:{TLS_PORT}",
                                   "--admin-address", f"{node.ip}:15000"], work / f"boot-{node.name}.yaml")
                node.run([envoy, "-c", str(boot), "--disable-hot-restart", "--concurrency", "1", "-l", "warning",
                          "--file-flush-interval-msec", "100"])
            yield topo, {"a": a, "d": d, "vip": vip, "agents": agents}, netns_dir
        finally:
            for proc in agents:  # also when the setup failed half way
                proc.terminate()
                proc.wait(10)
            for path in netns_dir.glob("*/*"):  # the agents' bind mounts keep netns alive
                subprocess.run(["umount", "-l", str(path)], capture_output=True)
            shutil.rmtree(netns_dir, ignore_errors=True)
            for made_dir in made[1:]:
                with contextlib.suppress(OSError):
                    made_dir.rmdir()


def test_node_agents_discover_pod_netns_and_node_proxies_use_them(
        lab: tuple[Topology, dict[str, object], Path]) -> None:
    topo, objs, netns_dir = lab
    a, d, vip = objs["a"], objs["d"], objs["vip"]
    assert isinstance(vip, str)
    _wait_http(a, f"http://{vip}/", '"d"', timeout=30)  # type: ignore[arg-type]
    # The paths the node proxies listen at are the agents' bind mounts of the pods' netns.
    assert _listener_netns("node-n1") == {str(netns_dir / "n1" / "alpha_a")}
    assert _listener_netns("node-n2") == {str(netns_dir / "n2" / "delta_d")}
    for name, pod in (("n1/alpha_a", a), ("n2/delta_d", d)):
        assert os.stat(netns_dir / name).st_ino == os.stat(pod.netns_path).st_ino  # type: ignore[attr-defined]
    # ...and the tunnel between them carries a's identity.
    deadline = time.monotonic() + 5
    want = f"src.identity={spiffe('alpha', 'a')}"
    while want not in topo.logs(20000):
        assert time.monotonic() < deadline, topo.logs()
        time.sleep(0.1)


def _report(xds: str, token: Path, request: object) -> object:
    """One report over TLS (as the agents send them), verified against the mesh bundle."""
    roots = (token.parent / "ca" / "root-cert.pem").read_bytes()
    with grpc.secure_channel(xds, grpc.ssl_channel_credentials(roots),
                             options=[("grpc.ssl_target_name_override", "localhost")]) as channel:
        call = channel.unary_unary(f"/{SERVICE}/Report",
                                   request_serializer=nodeagent_pb2.ReportRequest.SerializeToString,
                                   response_deserializer=nodeagent_pb2.ReportResponse.FromString)
        return call(request, metadata=[("authorization", f"Bearer {token.read_text().strip()}")], timeout=5)


def test_another_nodes_agent_cannot_take_redirect_or_speak_for_a_pod(
        lab: tuple[Topology, dict[str, object], Path]) -> None:
    topo, objs, netns_dir = lab
    a, vip = objs["a"], objs["vip"]
    assert isinstance(vip, str)
    _wait_http(a, f"http://{vip}/", '"d"', timeout=30)  # type: ignore[arg-type]
    xds, n2_token = f"{topo.host_ip}:{TLS_PORT}", topo.workdir / "token-n2"

    def pod(ns: str, name: str, path: str) -> object:
        return nodeagent_pb2.PodNetns(namespace=ns, name=name, netns_path=path)

    own = pod("delta", "d", str(netns_dir / "n2" / "delta_d"))
    # n2's credential claims n1's pod a as its own (its own pod d kept): a refused, d kept.
    resp = _report(xds, n2_token, nodeagent_pb2.ReportRequest(node="n2", pods=[
        pod("alpha", "a", str(netns_dir / "n2" / "alpha_a")), own]))
    assert resp.accepted == 1  # type: ignore[attr-defined]
    assert [e.split(":")[0] for e in resp.errors] == ["pod alpha/a"]  # type: ignore[attr-defined]
    # ... points d at the host's netns: INVALID_ARGUMENT, nothing changes.
    for path in ("/proc/1/ns/net", f"{netns_dir}/../../../../proc/1/ns/net"):
        with pytest.raises(grpc.RpcError) as err:
            _report(xds, n2_token, nodeagent_pb2.ReportRequest(node="n2", pods=[pod("delta", "d", path)]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    # ... on the plaintext port, nothing of the NodeAgent API is served beyond loopback.
    with pytest.raises(grpc.RpcError) as err, grpc.insecure_channel(f"{topo.host_ip}:{XDS_PORT}") as plain:
        plain.unary_unary(f"/{SERVICE}/Report", request_serializer=nodeagent_pb2.ReportRequest.SerializeToString,
                          response_deserializer=nodeagent_pb2.ReportResponse.FromString)(
            nodeagent_pb2.ReportRequest(node="n2"), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]
    # ... reports for n1 (an empty node): PERMISSION_DENIED.
    with pytest.raises(grpc.RpcError) as err:
        _report(xds, n2_token, nodeagent_pb2.ReportRequest(node="n1"))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]

    # Node 1's proxy still listens in a's netns, node 2's in d's, and a still reaches d.
    assert _listener_netns("node-n1") == {str(netns_dir / "n1" / "alpha_a")}
    assert _listener_netns("node-n2") == {str(netns_dir / "n2" / "delta_d")}
    _wait_http(a, f"http://{vip}/", '"d"', timeout=10)  # type: ignore[arg-type]
