"""ServiceEntry hosts as registry services, their endpoints, and the cross-object checks.
Pure, no I/O.

`registry_services(...)` turns every host of every valid ServiceEntry into a `Service`
(hostname = the host, `entry` = its resolution, location, addresses, exportTo and
subjectAltNames) and `EndpointSet`s, so the rest of the model treats it as any service:
VirtualService hosts and destinations, DestinationRule lookup (the ServiceEntry's namespace
is the service's namespace), subsets by labels, Sidecar egress scope and REGISTRY_ONLY.

Endpoints, as in Istio:
- `endpoints[]`: one set per endpoint; the port of each entry port is the endpoint's own
  `ports[name]`, else the entry port's `targetPort`, else its number;
- `workloadSelector`: the Pods (with an IP) and the WorkloadEntries of the entry's namespace
  whose labels match, ports as above (a WorkloadEntry's `ports[name]` first);
- resolution DNS / DNS_ROUND_ROBIN without either: each host is its own endpoint (the
  name Envoy resolves).
Mesh mTLS: never for MESH_EXTERNAL; for MESH_INTERNAL a Pod's own sidecar status decides,
and an endpoint or WorkloadEntry is a mesh workload when its label
`security.istio.io/tlsMode` is `istio`, or, without that label, when it names a
`serviceAccount` (Istio's rule); its identity is that service account's SPIFFE URI.

Two-label names: VirtualService and DestinationRule hosts written `a.b` mean the Kubernetes
Service `a.b.svc.cluster.local` in Meshline; when no such Service exists and an entry declares
the host `a.b` (`httpbin.org`), they mean that host, as in Istio (`alias_entry_hosts`).

Conflicts: a Kubernetes Service with the same hostname wins (warning on the entry; Istio
does not let an entry squat a Kubernetes Service's name). Of several entries with one host,
each client namespace gets its own (Istio's `servicesExportedToNamespace` order, then the
first one kept by `SidecarScope.appendSidecarServices`): the entries private to its own
namespace, then those exported to it by name, then those exported everywhere; within each
class the oldest (`metadata.creationTimestamp`; ties, and objects without one as from a
directory, by namespace then name), as Istio's `SortServicesByCreationTime` and its
ServiceEntry controller order them (`age_order`). `Mesh.service(host, client_namespace)` is
that lookup, the one translators use. `Mesh.services[host]` holds one entry per host (the
first exported everywhere, else the first in `age_order`); the others that win for some
namespace keep their endpoints under their own registry key `entry_key`
(`<host>~<namespace>/<name>`), which also names their clusters
(`outbound|<port>||<host>~<namespace>/<name>`), so two namespaces that resolve a host to
different entries never get different content under one cluster name (a node proxy or
waypoint serving both holds both). An entry that loses a namespace it is exported to gets a
warning naming the winner and the namespaces.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace

from controlplane.model.ir import (
    Destination,
    DestinationRule,
    Endpoint,
    EndpointPort,
    EndpointSet,
    Hostname,
    HTTPRoute,
    Issue,
    Service,
    ServiceEntry,
    ServicePort,
    VirtualService,
    Workload,
    WorkloadEntry,
    labels_match,
)
from controlplane.model.mesh import entry_key, entry_lookup, visible_to

TLS_MODE_LABEL = "security.istio.io/tlsMode"


def _spiffe(trust_domain: str, namespace: str, sa: str) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{sa}"


def _mesh_tls(se: ServiceEntry, we: WorkloadEntry) -> bool:
    if se.info.mesh_external:
        return False
    mode = dict(we.labels).get(TLS_MODE_LABEL)
    if mode is not None:
        return mode == "istio"
    return bool(we.service_account)


def _port_of(sp: ServicePort, ports: Mapping[str, int]) -> int:
    return ports.get(sp.name) or (sp.target_port if isinstance(sp.target_port, int) else sp.port)


def _entry_set(se: ServiceEntry, we: WorkloadEntry, trust_domain: str) -> EndpointSet:
    ports = dict(we.ports)
    tls = _mesh_tls(se, we)
    identity = _spiffe(trust_domain, we.namespace, we.service_account) if tls and we.service_account else None
    ep = Endpoint(we.address, labels=we.labels, locality=we.locality, weight=we.weight, mesh_tls=tls,
                  identity=identity)
    return EndpointSet(we.ref, se.namespace, se.name,
                       tuple(EndpointPort(sp.name, _port_of(sp, ports)) for sp in se.ports), (ep,))


def entry_endpoints(se: ServiceEntry, workloads: Iterable[Workload], workload_entries: Iterable[WorkloadEntry],
                    trust_domain: str) -> tuple[EndpointSet, ...]:
    """The endpoint sets of `se`'s hosts (the same for each of its hosts)."""
    if se.info.resolution == "NONE":
        return ()
    out: list[EndpointSet] = [_entry_set(se, we, trust_domain) for we in se.endpoints]
    if se.workload_selector is not None:
        for wl in sorted(workloads, key=lambda w: w.name):
            if wl.namespace != se.namespace or not wl.ip or not labels_match(se.workload_selector, wl.labels):
                continue
            ep = Endpoint(wl.ip, pod=wl.name, node=wl.node, mesh_tls=False if se.info.mesh_external else None)
            out.append(EndpointSet(wl.ref, se.namespace, se.name,
                                   tuple(EndpointPort(sp.name, _port_of(sp, {})) for sp in se.ports), (ep,)))
        for we in sorted(workload_entries, key=lambda w: w.name):
            if we.namespace == se.namespace and we.address and labels_match(se.workload_selector, we.labels):
                out.append(_entry_set(se, we, trust_domain))
    return tuple(out)


def registry_services(entries: Iterable[ServiceEntry], workloads: Mapping[tuple[str, str], Workload],
                      workload_entries: Iterable[WorkloadEntry], kube_services: Mapping[Hostname, Service],
                      trust_domain: str) -> tuple[dict[Hostname, Service], dict[Hostname, tuple[EndpointSet, ...]],
                                                  dict[Hostname, tuple[Service, ...]]]:
    """(host -> Service, registry key -> endpoint sets, host -> candidates) of the entries'
    hosts (hosts of Kubernetes Services are skipped). The Service of a host is the first entry
    by `claim_order` (exported everywhere first) of the entries in `age_order`; `candidates`
    lists, for a host several entries declare, each of them in `age_order` (`Mesh.service`
    picks per client namespace); the endpoint sets of a candidate that is not the host's
    Service are under its `entry_key`."""
    services: dict[Hostname, Service] = {}
    endpoints: dict[Hostname, tuple[EndpointSet, ...]] = {}
    by_host: dict[Hostname, list[Service]] = {}
    wes = tuple(workload_entries)
    items = sorted(entries, key=age_order)
    rank = {id(se): i for i, se in enumerate(claim_order(items))}
    for se in items:
        sets: tuple[EndpointSet, ...] | None = None
        for host in se.hosts:
            if host in kube_services:
                continue
            if sets is None:
                sets = entry_endpoints(se, workloads.values(), wes, trust_domain)
            ip = se.info.addresses[0] if len(se.info.addresses) == 1 and "/" not in se.info.addresses[0] else None
            svc = Service(se.ref, se.namespace, se.name, host, ip, se.ports, entry=se.info, labels=se.labels)
            by_host.setdefault(host, []).append(svc)
            host_sets = sets
            if not sets and se.info.resolution in ("DNS", "DNS_ROUND_ROBIN") and se.workload_selector is None:
                host_sets = (EndpointSet(se.ref, se.namespace, se.name,
                                         tuple(EndpointPort(sp.name, _port_of(sp, {})) for sp in se.ports),
                                         (Endpoint(str(host), mesh_tls=False),)),)
            if host_sets:
                endpoints[entry_key(svc)] = host_sets
    order = {(se.namespace, se.name): rank[id(se)] for se in items}
    candidates: dict[Hostname, tuple[Service, ...]] = {}
    for host, svcs in by_host.items():
        first = min(svcs, key=lambda v: order[(v.namespace, v.name)])
        services[host] = first
        sets = endpoints.pop(entry_key(first), None)
        if sets:
            endpoints[host] = sets
        if len(svcs) > 1:
            candidates[host] = tuple(svcs)
    return services, endpoints, candidates


def age_order(se: ServiceEntry) -> tuple[str, str, str]:
    """Istio's order of services (`SortServicesByCreationTime`): the oldest first
    (`creationTimestamp`; absent: first), then, as its ServiceEntry controller breaks ties for
    one hostname, by namespace and name."""
    return (se.created, se.namespace, se.name)


def _public(se: ServiceEntry) -> bool:
    return not se.info.export_to or "*" in se.info.export_to


def claim_order(entries: Iterable[ServiceEntry]) -> list[ServiceEntry]:
    """The order in which entries claim the one Service `Mesh.services` holds for a host: those
    visible to every namespace first, then the others, each group in the given order (what a
    namespace without entries of its own sees; other namespaces: `entry_lookup`)."""
    items = list(entries)
    return [se for se in items if _public(se)] + [se for se in items if not _public(se)]


def check_service_entries(entries: Iterable[ServiceEntry], kube_services: Mapping[Hostname, Service],
                          candidates: Mapping[Hostname, tuple[Service, ...]]) -> list[Issue]:
    """Warnings for hosts that a Kubernetes Service holds, and for entries that another entry
    of the same host beats in some namespace the entry is exported to."""
    out: list[Issue] = []
    for se in entries:
        for i, host in enumerate(se.hosts):
            field = f"spec.hosts[{i}]"
            if host in kube_services:
                out.append(Issue(se.ref, field, f"{host} is a Kubernetes Service's hostname: the Service defines it "
                                                "and this host is ignored", "warning", se.ref.line))
                continue
            lost = _lost(se, candidates.get(host, ()))
            if lost:
                out.append(Issue(se.ref, field, f"{host} is also a host of {lost}; clients there get that entry "
                                                "(the one private to their namespace, then one exported to it by "
                                                "name, then one exported everywhere, first by namespace and name), "
                                                "not this one", "warning", se.ref.line))
    return out


def _lost(se: ServiceEntry, candidates: tuple[Service, ...]) -> str:
    """Where `se` loses its host to another candidate: "ServiceEntry/ns/name for clients in
    ..." parts joined by "; " ("" when it loses nowhere it is visible)."""
    if len(candidates) < 2:
        return ""
    names = {se.namespace, *(n for n in se.info.export_to if n not in (".", "*", "~")),
             *(c.namespace for c in candidates), *(n for c in candidates for n in c.entry.export_to  # type: ignore[union-attr]
                                                   if n not in (".", "*", "~")), ""}
    visible = [ns for ns in sorted(names) if visible_to(se.info.export_to, se.namespace, ns)]
    by_winner: dict[str, list[str]] = {}
    for ns in visible:
        winner = entry_lookup(candidates, ns)
        if winner is not None and winner.ref != se.ref:
            by_winner.setdefault(winner.ref.display, []).append(ns)
    parts = []
    for name, nss in by_winner.items():
        named = [n for n in nss if n]
        if "" in nss and len(nss) == len(visible):
            where = "every namespace"
        elif "" in nss:
            where = f"namespaces {', '.join(named)} and every other namespace" if named else "every other namespace"
        else:
            where = f"namespace{'s' if len(named) > 1 else ''} {', '.join(named)}"
        parts.append(f"{name} for clients in {where}")
    return "; ".join(parts)


_K8S_SUFFIX = ".svc.cluster.local"


def entry_alias(host: Hostname, kube_services: Mapping[Hostname, Service],
                entry_hosts: Mapping[Hostname, Service]) -> Hostname:
    """A VirtualService or DestinationRule host written `a.b` is read as the Kubernetes Service
    `a` of namespace `b` (`a.b.svc.cluster.local`); when no such Service exists and a
    ServiceEntry declares the host `a.b` (`httpbin.org`), it is that entry's host, as Istio
    reads any name with a dot."""
    if host in kube_services or not host.endswith(_K8S_SUFFIX):
        return host
    short = Hostname(host[: -len(_K8S_SUFFIX)])
    return short if short.count(".") == 1 and short in entry_hosts else host


def _dest(d: Destination, fix: Callable[[Hostname], Hostname]) -> Destination:
    h = fix(d.host)
    return d if h == d.host else replace(d, host=h)


def _http(r: HTTPRoute, fix: Callable[[Hostname], Hostname]) -> HTTPRoute:
    route = tuple(replace(rd, destination=_dest(rd.destination, fix)) for rd in r.route)
    mirrors = tuple(replace(m, destination=_dest(m.destination, fix)) for m in r.mirrors)
    return r if (route, mirrors) == (r.route, r.mirrors) else replace(r, route=route, mirrors=mirrors)


def alias_entry_hosts(vss: list[VirtualService], drs: list[DestinationRule], kube_services: Mapping[Hostname, Service],
                      entry_hosts: Mapping[Hostname, Service]) -> tuple[list[VirtualService], list[DestinationRule]]:
    """`vss` and `drs` with two-label hosts that name a ServiceEntry host (`entry_alias`)
    rewritten to it: their hosts, route and mirror destinations."""
    def fix(h: Hostname) -> Hostname:
        return entry_alias(h, kube_services, entry_hosts)

    out_vs: list[VirtualService] = []
    for vs in vss:
        hosts = tuple(fix(h) for h in vs.hosts)
        http = tuple(_http(r, fix) for r in vs.http)
        tcp = tuple(replace(t, route=tuple(replace(rd, destination=_dest(rd.destination, fix)) for rd in t.route))
                    for t in vs.tcp)
        changed = (hosts, http, tcp) != (vs.hosts, vs.http, vs.tcp)
        out_vs.append(replace(vs, hosts=hosts, http=http, tcp=tcp) if changed else vs)
    out_dr = [dr if fix(dr.host) == dr.host else replace(dr, host=fix(dr.host)) for dr in drs]
    return out_vs, out_dr
