"""Outbound clusters of ServiceEntry hosts (services whose `entry` is set). Pure, no I/O.

Cluster type by resolution, as Istio maps it:
- STATIC (and endpoints picked by a workloadSelector): EDS, like a Kubernetes service;
- DNS: STRICT_DNS (every address each endpoint name resolves to is a host);
- DNS_ROUND_ROBIN: LOGICAL_DNS (one connection target at a time, the first address of the
  name; with other than exactly one endpoint, which Envoy requires, STRICT_DNS);
- NONE: ORIGINAL_DST (connections go where the client dialled) for intercepting sidecars.
  In bind capture the client dials the sidecar itself, so there a NONE host's cluster
  resolves the host by DNS (LOGICAL_DNS), and a wildcard host, which has no name to
  resolve, gets a cluster without endpoints (connections are refused).
DNS clusters carry their endpoints inline (no EDS) and look up IPv4 first
(`V4_PREFERRED`). The DestinationRule policy and TLS apply to every type as to a
Kubernetes service's cluster; MESH_EXTERNAL endpoints never get automatic mesh mTLS (the
model marks them), so TLS to them is plain or what a DestinationRule `tls` originates.

`entry_visible`: a ServiceEntry host reaches only the namespaces its `exportTo` names.
"""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2

from controlplane.model.ir import CaptureMode, PortProtocol, Service, SourceRef
from controlplane.model.mesh import visible_to
from controlplane.translate.clusters import (
    ClusterPolicy,
    build_blackhole_cluster,
    build_original_dst_cluster,
    build_outbound_cluster,
)
from controlplane.translate.endpoints import LbEndpoint, build_cla
from controlplane.translate.plan import CLUSTER, ENDPOINT, ResourceSpec
from controlplane.translate.security import UpstreamTls

ClusterKind = str  # "eds" | "dns" | "logical_dns" | "original_dst" | "blackhole"


def entry_visible(svc: Service, client_namespace: str) -> bool:
    """Whether clients in `client_namespace` see `svc` (ServiceEntry exportTo; Kubernetes
    Services are visible everywhere)."""
    return svc.entry is None or visible_to(svc.entry.export_to, svc.namespace, client_namespace)


def entry_listener_addresses(svc: Service) -> tuple[str, ...]:
    """The addresses intercepting sidecars capture a ServiceEntry's TCP ports on: each of its
    IP `addresses` (a CIDR, or none: `0.0.0.0`, every address on that port); () for a
    Kubernetes Service."""
    if svc.entry is None:
        return ()
    ips = tuple(a for a in svc.entry.addresses if "/" not in a)
    if not ips or len(ips) < len(svc.entry.addresses):
        return (*ips, "0.0.0.0")
    return ips


def cluster_kind(svc: Service, capture: CaptureMode) -> ClusterKind:
    entry = svc.entry
    if entry is None or entry.resolution == "STATIC":
        return "eds"
    if entry.resolution == "DNS":
        return "dns"
    if entry.resolution == "DNS_ROUND_ROBIN":
        return "logical_dns"
    if capture == "intercept":
        return "original_dst"
    return "blackhole" if svc.hostname.startswith("*") else "logical_dns"


def build_dns_cluster(name: str, protocol: PortProtocol, policy: ClusterPolicy, tls: UpstreamTls | None,
                      cla_args: tuple[object, ...], logical: bool) -> cluster_pb2.Cluster:
    """A STRICT_DNS (or, with `logical` and one endpoint, LOGICAL_DNS) cluster over the
    endpoints (names or IPs) of `cla_args` (`build_cla`'s arguments after the name: the
    endpoints, and their locality plan when locality load balancing applies), with the
    merged DestinationRule policy and `tls`."""
    c = build_outbound_cluster(name, protocol, policy, tls)
    c.ClearField("eds_cluster_config")
    cla = build_cla(name, *cla_args)  # type: ignore[arg-type]
    single = sum(len(group.lb_endpoints) for group in cla.endpoints) == 1
    c.type = cluster_pb2.Cluster.LOGICAL_DNS if logical and single else cluster_pb2.Cluster.STRICT_DNS
    c.dns_lookup_family = cluster_pb2.Cluster.V4_PREFERRED
    c.load_assignment.CopyFrom(cla)
    return c


def entry_cluster_specs(kind: ClusterKind, svc: Service, port: int, name: str, protocol: PortProtocol,
                        policy: ClusterPolicy, tls: UpstreamTls | None, eps: tuple[LbEndpoint, ...],
                        cla_args: tuple[object, ...], src: tuple[SourceRef, ...]) -> list[ResourceSpec]:
    """The cluster (and, for EDS, load assignment) specs of one ServiceEntry host port or subset.
    `eps`: its endpoints (for a bind-capture NONE host: none; the host itself is resolved)."""
    if kind == "eds":
        return [ResourceSpec(CLUSTER, name, build_outbound_cluster, (name, protocol, policy, tls), src),
                ResourceSpec(ENDPOINT, name, build_cla, (name, *cla_args), src)]
    if kind == "original_dst":
        return [ResourceSpec(CLUSTER, name, build_original_dst_cluster, (name, protocol, policy, tls), src)]
    if kind == "blackhole":
        return [ResourceSpec(CLUSTER, name, build_blackhole_cluster, (name,), src)]
    if not eps and svc.entry is not None and svc.entry.resolution == "NONE":
        cla_args = ((LbEndpoint(str(svc.hostname), port),),)
    args = (name, protocol, policy, tls, cla_args, kind == "logical_dns")
    return [ResourceSpec(CLUSTER, name, build_dns_cluster, args, src)]
