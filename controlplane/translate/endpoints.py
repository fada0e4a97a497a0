"""ClusterLoadAssignments (EDS) for outbound sidecar clusters. Pure functions, no I/O.

`select_endpoints` picks, from a service's EndpointSets, the addresses serving one service
port (and, for a subset, only those whose Pod carries the subset's labels);
`build_cla` is the cache's builder.

Endpoints whose Pod runs a Meshline sidecar carry the transport-socket-match metadata
(`envoy.transport_socket_match: {tlsMode: meshline}`) that makes a cluster in automatic mTLS
mode use mesh mTLS for them (see `controlplane.translate.security`).

Not-ready endpoints are left out rather than sent as UNHEALTHY, as Istio does by default:
with Envoy's panic threshold, a cluster whose hosts are mostly unhealthy would otherwise
spread traffic over the unready ones too.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import groupby

from envoy.config.endpoint.v3 import endpoint_pb2

from controlplane.model.ambient import runs_sidecar
from controlplane.model.ir import EndpointSet, Labels, ServicePort, Workload, labels_match
from controlplane.translate.security import mesh_endpoint_metadata


@dataclass(frozen=True, slots=True)
class LbEndpoint:
    address: str
    port: int
    zone: str = ""
    mtls: bool = False  # its Pod runs a Meshline sidecar


def _address_key(address: str) -> tuple[int, bytes, str]:
    """Numeric address order (IPv4, then IPv6, then names), via the C parser: sorting every
    endpoint on every rebuild made `ipaddress` the top cost of a change."""
    try:
        return (4, socket.inet_pton(socket.AF_INET, address), address)
    except OSError:
        pass
    try:
        return (6, socket.inet_pton(socket.AF_INET6, address), address)
    except OSError:
        return (9, b"", address)


def _sort_key(ep: LbEndpoint) -> tuple[str, tuple[int, bytes, str], int]:
    return (ep.zone, _address_key(ep.address), ep.port)


def endpoint_set_port(eps: EndpointSet, sp: ServicePort, single_port_service: bool) -> int | None:
    """The port of `eps` that serves service port `sp`: the one with the same name, else
    the set's only port when the service port is unnamed or the service has one port."""
    for p in eps.ports:
        if p.name == sp.name:
            return p.port
    if (not sp.name or single_port_service) and len(eps.ports) == 1:
        return eps.ports[0].port
    return None


def select_endpoints(
    sets: Sequence[EndpointSet],
    sp: ServicePort,
    single_port_service: bool,
    workloads: Mapping[tuple[str, str], Workload],
    subset_labels: Labels | None = None,
) -> tuple[LbEndpoint, ...]:
    """Ready endpoints for one service port, deduplicated and sorted (zone, address, port).
    With `subset_labels`, only endpoints whose Pod is known and matches them."""
    out: set[LbEndpoint] = set()
    for eps in sets:
        port = endpoint_set_port(eps, sp, single_port_service)
        if port is None:
            continue
        for ep in eps.endpoints:
            if not ep.ready:
                continue
            wl = workloads.get((eps.namespace, ep.pod)) if ep.pod else None
            if subset_labels is not None and (wl is None or not labels_match(subset_labels, wl.labels)):
                continue
            out.add(LbEndpoint(ep.address, port, ep.zone or "", wl is not None and runs_sidecar(wl)))
    return tuple(sorted(out, key=_sort_key))


def build_cla(name: str, endpoints: tuple[LbEndpoint, ...]) -> endpoint_pb2.ClusterLoadAssignment:
    """The load assignment of cluster `name`, one locality group per zone. Empty when there
    are no endpoints (Envoy still needs it to finish warming the cluster)."""
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    for zone, group in groupby(sorted(endpoints, key=_sort_key), key=lambda e: e.zone):
        loc = cla.endpoints.add()
        if zone:
            loc.locality.zone = zone
        for ep in group:
            lb = loc.lb_endpoints.add()
            sa = lb.endpoint.address.socket_address
            sa.address = ep.address
            sa.port_value = ep.port
            if ep.mtls:
                mesh_endpoint_metadata(lb.metadata)
    return cla
