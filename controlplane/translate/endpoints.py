"""ClusterLoadAssignments (EDS) for outbound sidecar clusters. Pure functions, no I/O.

`select_endpoints` picks, from a service's EndpointSets, the addresses serving one service
port (and, for a subset, only those whose Pod carries the subset's labels), each with its
locality; `plan_localities` gives their locality groups the priorities or weights a client's
locality calls for (`controlplane.translate.locality`); `build_cla` is the cache's builder.

Endpoints whose Pod runs a Meshline sidecar carry the transport-socket-match metadata
(`envoy.transport_socket_match: {tlsMode: meshline}`) that makes a cluster in automatic mTLS
mode use mesh mTLS for them (see `controlplane.translate.security`).

Not-ready endpoints are left out rather than sent as UNHEALTHY, as Istio does by default:
with Envoy's panic threshold, a cluster whose hosts are mostly unhealthy would otherwise
spread traffic over the unready ones too.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import groupby

from envoy.config.endpoint.v3 import endpoint_pb2

from controlplane.model.ambient import runs_sidecar
from controlplane.model.ir import EndpointSet, Labels, LocalityLbSetting, ServicePort, Workload, labels_match
from controlplane.translate.locality import (
    NO_LOCALITY,
    ClientLocality,
    Locality,
    LocalityMode,
    distribute_weights,
    failover_priorities,
    label_value,
    labels_locality,
    locality_mode,
    parse_locality,
)
from controlplane.translate.security import mesh_endpoint_metadata


@dataclass(frozen=True, slots=True)
class LbEndpoint:
    address: str
    port: int
    locality: Locality = NO_LOCALITY
    mtls: bool = False  # its Pod runs a Meshline sidecar
    labels: Labels = ()  # its values of the failoverPriority label keys asked for (sorted)
    weight: int = 0  # a ServiceEntry endpoint's / WorkloadEntry's weight (0: none)


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


def _sort_key(ep: LbEndpoint) -> tuple[Locality, tuple[int, bytes, str], int]:
    return (ep.locality, _address_key(ep.address), ep.port)


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
    label_keys: tuple[str, ...] = (),
) -> tuple[LbEndpoint, ...]:
    """Ready endpoints for one service port, deduplicated and sorted (locality, address,
    port). With `subset_labels`, only endpoints whose Pod is known and matches them. The
    locality is the Pod's (`controlplane.translate.locality`), else the EndpointSlice's zone;
    `label_keys`: also record each endpoint's values of these labels (failoverPriority)."""
    out: set[LbEndpoint] = set()
    for eps in sets:
        port = endpoint_set_port(eps, sp, single_port_service)
        if port is None:
            continue
        for ep in eps.endpoints:
            if not ep.ready:
                continue
            wl = workloads.get((eps.namespace, ep.pod)) if ep.pod else None
            # A Pod's labels, else (ServiceEntry endpoints, WorkloadEntries) the endpoint's own.
            own = wl.labels if wl is not None else ep.labels
            if subset_labels is not None and (own is None or not labels_match(subset_labels, own)):
                continue
            loc = labels_locality(own) if own else NO_LOCALITY
            if loc == NO_LOCALITY and ep.locality:
                loc = parse_locality(ep.locality)
            if loc == NO_LOCALITY and ep.zone:
                loc = ("", ep.zone, "")
            values: Labels = ()
            if label_keys:
                have = dict(own or ())
                values = tuple(sorted((k, label_value(k, have, loc)) for k in label_keys))
            mtls = ep.mesh_tls if ep.mesh_tls is not None else (wl is not None and runs_sidecar(wl))
            out.add(LbEndpoint(ep.address, port, loc, mtls, values, ep.weight or 0))
    return tuple(sorted(out, key=_sort_key))


LocalityPlan = tuple[tuple[Locality, Labels, int, int], ...]
"""(locality, failoverPriority label values, priority, weight) per LocalityLbEndpoints group;
weight 0: none set. Endpoints of groups not listed are left out."""


def plan_localities(
    endpoints: tuple[LbEndpoint, ...], client: ClientLocality, setting: LocalityLbSetting | None,
    mode: LocalityMode,
) -> LocalityPlan:
    """The priorities (failover) or weights (distribute) `client` gives `endpoints`' groups."""
    counts: dict[tuple[Locality, Labels], int] = {}
    for ep in endpoints:
        counts[(ep.locality, ep.labels)] = counts.get((ep.locality, ep.labels), 0) + 1
    if mode == "distribute":
        assert setting is not None
        by_loc: dict[Locality, int] = {}
        for (loc, _), n in counts.items():
            by_loc[loc] = by_loc.get(loc, 0) + n
        weights = distribute_weights(client.locality, setting, by_loc)
        if weights is None:  # no rule for this client: every locality, weighted by its size
            return tuple(sorted((loc, vals, 0, n) for (loc, vals), n in counts.items()))
        return tuple(sorted((loc, vals, 0, weights[loc]) for (loc, vals) in counts if loc in weights))
    prios = failover_priorities(client, setting, counts)
    return tuple(sorted((loc, vals, prios[(loc, vals)], n) for (loc, vals), n in counts.items()))


def _add_group(cla: endpoint_pb2.ClusterLoadAssignment, locality: Locality, group: Iterable[LbEndpoint],
               priority: int = 0, weight: int = 0) -> None:
    loc = cla.endpoints.add()
    region, zone, subzone = locality
    if region:
        loc.locality.region = region
    if zone:
        loc.locality.zone = zone
    if subzone:
        loc.locality.sub_zone = subzone
    if priority:
        loc.priority = priority
    if weight:
        loc.load_balancing_weight.value = weight
    for ep in group:
        lb = loc.lb_endpoints.add()
        sa = lb.endpoint.address.socket_address
        sa.address = ep.address
        sa.port_value = ep.port
        if ep.weight:
            lb.load_balancing_weight.value = ep.weight
        if ep.mtls:
            mesh_endpoint_metadata(lb.metadata)


def build_cla(name: str, endpoints: tuple[LbEndpoint, ...],
              localities: LocalityPlan | None = None) -> endpoint_pb2.ClusterLoadAssignment:
    """The load assignment of cluster `name`, one group per locality. Empty when there are
    no endpoints (Envoy still needs it to finish warming the cluster). With `localities`
    (`plan_localities`), groups get their priority and weight, in priority order, and
    endpoints of unlisted groups are left out."""
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    if localities is None:
        for locality, group in groupby(sorted(endpoints, key=_sort_key), key=lambda e: e.locality):
            _add_group(cla, locality, group)
        return cla
    members: dict[tuple[Locality, Labels], list[LbEndpoint]] = {}
    for ep in sorted(endpoints, key=_sort_key):
        members.setdefault((ep.locality, ep.labels), []).append(ep)
    for locality, values, priority, weight in sorted(localities, key=lambda g: (g[2], g[0], g[1])):
        _add_group(cla, locality, members.get((locality, values), ()), priority, weight)
    return cla


def locality_endpoints(
    sets: Sequence[EndpointSet],
    sp: ServicePort,
    single_port_service: bool,
    workloads: Mapping[tuple[str, str], Workload],
    subset_labels: Labels | None,
    setting: LocalityLbSetting | None,
    outlier_detection: bool,
    client: ClientLocality | None,
) -> tuple[tuple[LbEndpoint, ...], tuple[object, ...]]:
    """The endpoints of one cluster and the arguments of its `build_cla` after the name: with
    locality load balancing in force (`locality_mode`), the groups' priorities or weights for
    `client` (None: a client of unknown locality)."""
    mode = locality_mode(setting, outlier_detection)
    keys: tuple[str, ...] = ()
    if mode == "failover" and setting is not None and setting.failover_priority:
        keys = tuple(sorted({k.split("=", 1)[0] for k in setting.failover_priority}))
    eps = select_endpoints(sets, sp, single_port_service, workloads, subset_labels, keys)
    if mode is None:
        return eps, (eps,)
    return eps, (eps, plan_localities(eps, client or ClientLocality(), setting, mode))
