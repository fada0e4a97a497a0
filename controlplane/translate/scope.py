"""Sidecar scoping for translation: the (service, port) pairs a scoped proxy receives, the
VirtualService `sourceLabels` selectors its workload matches, and the identity of both,
which keys the outbound layer that proxies share. Pure, no I/O.

A service port is in scope when an egress listener of the proxy's Sidecar
(`controlplane.model.scope.proxy_sidecar`) imports the service, on that listener's port
when it has one, on every port otherwise. As in Istio, the destinations of the
VirtualServices of imported hosts are imported too (their port, or the port the route
resolves to), so a route never points at a cluster the proxy lacks.

Source classes: a VirtualService match with `sourceLabels` applies only to client
workloads whose labels include them, and a DestinationRule with a `workloadSelector` only
to such workloads of its namespace (Istio). The outbound layer is shared by proxies of one
namespace, capture mode and Sidecar, so the selectors a proxy's workload matches become part
of its scope: proxies matching the same selectors (typically none) still share one layer,
and a proxy matching some gets a variant in which those matches and rules apply. The
`Scope` then carries them (`source_labels`); a proxy without a Sidecar but with such a
class gets a Scope of every service port.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from controlplane.model.ir import (
    Destination,
    EgressHost,
    Hostname,
    Labels,
    ProxyMeta,
    Service,
    Sidecar,
    labels_match,
)
from controlplane.model.mesh import Mesh
from controlplane.model.scope import egress_host_matches, proxy_labels, proxy_sidecar
from controlplane.translate.names import destination_port


class Scope(frozenset[tuple[Hostname, int]]):
    """(service hostname, service port) pairs a proxy receives (None elsewhere means all),
    plus `source_labels`: the VirtualService sourceLabels selectors its workload matches."""

    __slots__ = ("registry_only", "source_labels")
    source_labels: frozenset[Labels]
    registry_only: bool  # the Sidecar's outboundTrafficPolicy is REGISTRY_ONLY

    def __new__(cls, pairs: Iterable[tuple[Hostname, int]] = (),
                source_labels: frozenset[Labels] = frozenset(), registry_only: bool = False) -> Scope:
        self = super().__new__(cls, pairs)
        self.source_labels = source_labels
        self.registry_only = registry_only
        return self


ScopeKey = tuple[str, str] | tuple[tuple[str, str] | None, tuple[Labels, ...]] | None
"""(namespace, name) of the Sidecar whose egress applies, or None (unscoped); with a source
class, (that, the sorted selectors)."""


def source_labels_of(scope: frozenset[tuple[Hostname, int]] | None) -> frozenset[Labels]:
    """The sourceLabels selectors a scope carries (none for a plain set or None)."""
    return scope.source_labels if isinstance(scope, Scope) else frozenset()


def registry_only(scope: frozenset[tuple[Hostname, int]] | None) -> bool:
    """Whether the proxies of `scope` refuse destinations outside it (REGISTRY_ONLY)."""
    return isinstance(scope, Scope) and scope.registry_only


def source_class(mesh: Mesh, proxy: ProxyMeta) -> frozenset[Labels]:
    """The selectors the proxy's workload labels match, of the VirtualService sourceLabels
    visible in its namespace and the DestinationRule workloadSelectors of its namespace. Only
    sidecars are matched: other proxies serve many workloads, so such matches and rules
    never apply to them."""
    if proxy.mode != "sidecar" or not (mesh.source_selectors or mesh.dr_selectors):
        return frozenset()
    labels = proxy_labels(mesh, proxy)
    found = {sel for sel, vs in mesh.source_selectors
             if labels_match(sel, labels) and any(mesh.virtual_service(h, proxy.namespace) is vs for h in vs.hosts)}
    found |= {sel for sel, dr in mesh.dr_selectors if dr.namespace == proxy.namespace and labels_match(sel, labels)}
    return frozenset(found)


def scope_key(mesh: Mesh, proxy: ProxyMeta) -> ScopeKey:
    sc = proxy_sidecar(mesh, proxy)
    key = None if sc is None else (sc.namespace, sc.name)
    classes = source_class(mesh, proxy)
    if not classes:
        return key
    return (key, tuple(sorted(classes)))


def proxy_scope(mesh: Mesh, proxy: ProxyMeta) -> Scope | None:
    """What `proxy` receives of the outbound configuration; None: everything."""
    sc = proxy_sidecar(mesh, proxy)
    classes = source_class(mesh, proxy)
    if sc is not None:
        return sidecar_scope(mesh, sc, proxy.namespace, classes)
    if not classes:
        return None
    return Scope(((s.hostname, p.port) for s in _registry(mesh, mesh.services.values()) for p in s.ports), classes)


def sidecar_scope(mesh: Mesh, sidecar: Sidecar, namespace: str,
                  source_labels: frozenset[Labels] = frozenset()) -> Scope:
    """The service ports `sidecar` imports for proxies in `namespace`."""
    allowed: set[tuple[Hostname, int]] = set()
    for eg in sidecar.egress:
        for entry in eg.hosts:
            for svc in _candidates(mesh, entry, namespace):
                if not egress_host_matches(entry, svc, namespace):
                    continue
                if eg.port is None:
                    allowed.update((svc.hostname, p.port) for p in svc.ports)
                elif any(p.port == eg.port for p in svc.ports):
                    allowed.add((svc.hostname, eg.port))
    for host, port in sorted(allowed):
        for dest in _route_destinations(mesh, host, namespace):
            target = mesh.service(dest.host, namespace)
            if target is not None:
                dport = destination_port(dest, port, target)
                if any(p.port == dport for p in target.ports):
                    allowed.add((dest.host, dport))
    return Scope(allowed, source_labels, sidecar.registry_only)


def _candidates(mesh: Mesh, entry: EgressHost, namespace: str) -> Iterable[Service]:
    """The services `entry` can match: those of the namespace it names, or all of them."""
    if entry.namespace == "~":
        return ()
    if entry.namespace == "*":
        return _registry(mesh, mesh.services.values())
    ns = namespace if entry.namespace == "." else entry.namespace
    return _registry(mesh, mesh.services_by_namespace.get(ns, ()), ns)


def _registry(mesh: Mesh, services: Iterable[Service], namespace: str | None = None) -> Iterable[Service]:
    """`services` plus the ServiceEntries (of `namespace`, when given) of hosts that several
    entries declare and that `mesh.services` does not hold (each namespace resolves such a
    host itself: `Mesh.service`)."""
    if not mesh.entry_candidates:
        return services
    others = [c for host, cands in mesh.entry_candidates.items() for c in cands
              if mesh.registry_key(c) != host and (namespace is None or c.namespace == namespace)]
    return [*services, *others]


def _route_destinations(mesh: Mesh, host: Hostname, namespace: str) -> Iterator[Destination]:
    vs = mesh.virtual_service(host, namespace)
    if vs is None:
        return
    for hr in vs.http:
        for rd in hr.route:
            yield rd.destination
        for m in hr.mirrors:
            yield m.destination
    for tr in vs.tcp:
        for rd in tr.route:
            yield rd.destination
