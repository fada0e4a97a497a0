"""The benchmark's simulated clients (bench/simclients.py) as Istio sidecars, for the istiod
peer (bench/peers/istiod.py): each client sends an Istio sidecar node id
(`sidecar~IP~pod.ns~ns.svc.cluster.local`) and the node metadata istiod reads from a
sidecar (NAMESPACE, CLUSTER_ID, ISTIO_VERSION, LABELS, ...), and counts as holding its
config only once it also holds istiod's own clusters and listeners (BlackHoleCluster,
PassthroughCluster, InboundPassthroughCluster, virtualInbound, virtualOutbound). Run as a
program with simclients.py's arguments; the protocol with the parent is simclients.py's.
Importing it puts bench/ on sys.path (to find simclients) and nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

# Run as a program, Python puts bench/peers/ first on sys.path, where bench/peers/envoy.py
# would shadow the `envoy` protobuf package: bench/ goes there instead.
_PEERS, _BENCH = Path(__file__).resolve().parent, Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _PEERS]
if str(_BENCH) not in sys.path:
    sys.path.insert(0, str(_BENCH))

import simclients  # noqa: E402
from envoy.config.core.v3 import base_pb2  # noqa: E402
from google.protobuf import struct_pb2  # noqa: E402

CLUSTER_ID = "Kubernetes"  # istiod's --clusterID
ISTIO_VERSION = "1.31.0"  # the proxy version the sidecars claim (the istio module's VERSION is 1.31)
DOMAIN = "cluster.local"
# What istiod puts into every sidecar's config besides the mesh's own services.
EXTRA_CLUSTERS = ("BlackHoleCluster", "PassthroughCluster", "InboundPassthroughCluster")
EXTRA_LISTENERS = ("virtualInbound", "virtualOutbound")
# The API server's own `default/kubernetes` Service (port 443, no endpoints: kube.sh runs
# kube-apiserver with --endpoint-reconciler-type none) is in every cluster istiod watches.
KUBERNETES_CLUSTER = f"outbound|443||kubernetes.default.svc.{DOMAIN}"


def proxy_ip(cid: int) -> str:
    """The simulated sidecar's pod IP: 10.240.0.0/16, apart from the mesh's endpoint
    addresses (10.0-3.x.x for 1,000 services) and the changes' markers (10.250.x.x)."""
    if not 0 <= cid < 65536:
        raise ValueError(f"simulated client id {cid} is outside 0..65535 (one /16 of pod IPs)")
    return f"10.240.{cid >> 8}.{cid & 255}"


def pod_name(cid: int) -> str:
    return f"bench-proxy-{cid:05d}"


def node_id(cid: int, namespace: str) -> str:
    """Istio's sidecar node id: type~IP~pod.namespace~namespace.svc.<domain>."""
    return f"sidecar~{proxy_ip(cid)}~{pod_name(cid)}.{namespace}~{namespace}.svc.{DOMAIN}"


def node_metadata(cid: int, namespace: str, cluster_id: str = CLUSTER_ID) -> dict[str, Any]:
    """The metadata istio-agent sends for a sidecar (the fields istiod reads; the pod itself
    does not exist in the API server, so its labels and IPs come from here)."""
    return {
        "NAMESPACE": namespace,
        "CLUSTER_ID": cluster_id,
        "ISTIO_VERSION": ISTIO_VERSION,
        "NAME": pod_name(cid),
        "LABELS": {"app": "bench-proxy"},
        "INSTANCE_IPS": proxy_ip(cid),
        "INTERCEPTION_MODE": "REDIRECT",
        "MESH_ID": DOMAIN,
        "SERVICE_ACCOUNT": "default",
        "WORKLOAD_NAME": "bench-proxy",
    }


def make_node(cid: int, namespace: str) -> base_pb2.Node:
    node = base_pb2.Node(id=node_id(cid, namespace), cluster=f"bench-proxy.{namespace}")
    md = struct_pb2.Struct()
    md.update(node_metadata(cid, namespace))
    node.metadata.CopyFrom(md)
    return node


class IstioClient(simclients.Client):
    def holds_everything(self) -> bool:
        return (super().holds_everything() and all(c in self.clusters for c in EXTRA_CLUSTERS)
                and all(lst in self.listeners for lst in EXTRA_LISTENERS))


def expected_counts_problem(counts: dict[str, int], services: int) -> str | None:
    """Why a synced sidecar's resource counts are not istiod's config for `services` mesh
    services (each with an EDS cluster), plus the extras above; None when they are."""
    clusters = services + len(EXTRA_CLUSTERS) + 1  # (+ the kubernetes Service)
    endpoints = services + 1
    if counts.get("clusters") != clusters or counts.get("endpoints") != endpoints:
        return (f"expected {clusters} clusters ({services} services + {', '.join(EXTRA_CLUSTERS)}, "
                f"{KUBERNETES_CLUSTER}) and {endpoints} endpoint assignments")
    if counts.get("listeners", 0) < len(EXTRA_LISTENERS) + 1 or counts.get("routes", 0) < 1:
        return "expected istiod's virtualInbound/virtualOutbound and a listener with a route for port 8080"
    return None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True, help="istiod's plaintext xDS address host:port")
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--namespace", default="bench")
    p.add_argument("--clients-per-channel", type=int, default=1)
    p.add_argument("--mix", choices=["mixed", "delta", "sotw"], default="mixed")
    args = p.parse_args(argv)
    simclients.make_node = make_node  # (simclients.main looks both names up at call time)
    simclients.Client = IstioClient  # type: ignore[misc]
    try:
        asyncio.run(simclients.main(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
