"""Sidecar scoping for translation: the (service, port) pairs a scoped proxy receives and
the identity of its scope, which keys the outbound layer that proxies share. Pure, no I/O.

A service port is in scope when an egress listener of the proxy's Sidecar
(`controlplane.model.scope.proxy_sidecar`) imports the service, on that listener's port
when it has one, on every port otherwise. As in Istio, the destinations of the
VirtualServices of imported hosts are imported too (their port, or the port the route
resolves to), so a route never points at a cluster the proxy lacks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from controlplane.model.ir import Destination, EgressHost, Hostname, ProxyMeta, Service, Sidecar
from controlplane.model.mesh import Mesh
from controlplane.model.scope import egress_host_matches, proxy_sidecar
from controlplane.translate.names import destination_port, visible_to

Scope = frozenset[tuple[Hostname, int]]
"""(service hostname, service port) pairs a proxy receives; None elsewhere means all."""
ScopeKey = tuple[str, str] | None
"""(namespace, name) of the Sidecar whose egress applies, or None (unscoped)."""


def scope_key(mesh: Mesh, proxy: ProxyMeta) -> ScopeKey:
    sc = proxy_sidecar(mesh, proxy)
    return None if sc is None else (sc.namespace, sc.name)


def proxy_scope(mesh: Mesh, proxy: ProxyMeta) -> Scope | None:
    """What `proxy` receives of the outbound configuration; None: everything."""
    sc = proxy_sidecar(mesh, proxy)
    return None if sc is None else sidecar_scope(mesh, sc, proxy.namespace)


def sidecar_scope(mesh: Mesh, sidecar: Sidecar, namespace: str) -> Scope:
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
            target = mesh.services.get(dest.host)
            if target is not None:
                dport = destination_port(dest, port, target)
                if any(p.port == dport for p in target.ports):
                    allowed.add((dest.host, dport))
    return frozenset(allowed)


def _candidates(mesh: Mesh, entry: EgressHost, namespace: str) -> Iterable[Service]:
    """The services `entry` can match: those of the namespace it names, or all of them."""
    if entry.namespace == "~":
        return ()
    if entry.namespace == "*":
        return mesh.services.values()
    return mesh.services_by_namespace.get(namespace if entry.namespace == "." else entry.namespace, ())


def _route_destinations(mesh: Mesh, host: Hostname, namespace: str) -> Iterator[Destination]:
    vs = mesh.vs_by_host.get(host)
    if vs is None or not visible_to(vs.export_to, vs.namespace, namespace):
        return
    for hr in vs.http:
        for rd in hr.route:
            yield rd.destination
        for m in hr.mirrors:
            yield m.destination
    for tr in vs.tcp:
        for rd in tr.route:
            yield rd.destination
