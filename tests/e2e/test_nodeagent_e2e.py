"""Pod network-namespace discovery end to end: no pod names its netns. A real
`meshline node-agent` per node (in the host, like the DaemonSet's privileged container)
finds each ambient pod's netns by scanning /proc, bind-mounts it, applies the in-pod capture
rules and reports pod -> path to `meshline serve --node-agents` over gRPC with the node
proxy's node-bound credential; the node proxies then own listeners at those paths and pod a
(node 1) reaches service d (node 2) through both of them.

Needs root, ip, iptables, setpriv, curl; skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from controlplane.localrun import envoy_binary
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

XDS_PORT = 19720
STATUS_PORT = 19721

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
        config, ca_dir, netns_dir = work / "config", work / "ca", work / "netns"
        config.mkdir()
        netns_dir.mkdir()
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
                                         f"127.0.0.1:{STATUS_PORT}"])
        topo.wait("control plane", lambda: status_ready(STATUS_PORT), 30, cp)
        from controlplane.ca import tokens
        from controlplane.ca.identity import Identity

        key = tokens.load_or_create_token_key(ca_dir)
        xds = f"{topo.host_ip}:{XDS_PORT}"
        agents = []
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
                "--token-file", str(token)]))
            # The node proxy starts once the agent has mounted the pod's netns: `ip netns exec` gives
            # it a private copy of the mount table (a DaemonSet uses HostToContainer propagation).
            mounted = own_dir / f"{ns}_{pod.name}"
            topo.wait(f"node agent of {node.name} mounts {mounted.name}",
                      lambda m=mounted: m.exists() and os.stat(m).st_dev != os.stat(m.parent).st_dev,
                      15, agents[-1])
            boot = bootstrap_file(["--mode", "node", "--node-name", node.name, "--node-id", f"node-{node.name}",
                               "--namespace", "meshline-system", "--service-account", "meshline-node-proxy",
                               "--ca-dir", str(ca_dir), "--xds-address", xds,
                               "--admin-address", f"{node.ip}:15000"], work / f"boot-{node.name}.yaml")
            node.run([envoy, "-c", str(boot), "--disable-hot-restart", "--concurrency", "1", "-l", "warning",
                      "--file-flush-interval-msec", "100"])
        try:
            yield topo, {"a": a, "d": d, "vip": vip, "agents": agents}, netns_dir
        finally:
            for proc in agents:
                proc.terminate()
                proc.wait(10)
            for path in netns_dir.glob("*/*"):  # the agents' bind mounts keep netns alive
                subprocess.run(["umount", "-l", str(path)], capture_output=True)


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
