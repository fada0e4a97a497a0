"""Node-proxy plans whose size adds up instead of multiplying: a·P + b·K + c·S + d·W
(P ambient pods on the node, K identities among them, S service ports, W pods in the mesh).
Pure, no I/O. Envoy resources: `controlplane.translate.nodeproxy_envoy` (its docstring walks
one connection through them).

Per ambient pod P of the node (P's own resources, nobody else's):
- `ambient_outbound_<ns>_<pod>`: 15001 in P's netns, one filter chain: label the connection
  with P's identity and hand it to P's scope listener;
- `ambient_hbone_<ns>_<pod>`, `ambient_plain_<ns>_<pod>`, `inbound_ambient|<port>|<ns>/<pod>`:
  P's inbound side (`controlplane.translate.nodepod.pod_inbound`).
Per identity running on the node: `ambient_src|<SPIFFE URI>` (its certificate; SDS secret
named by the URI, sent by the runtime).
Per Sidecar scope among the node's pods (one, `ambient_outbound`, when no Sidecar applies
and no pod's namespace sees a ServiceEntry not exported everywhere; such a namespace's pods
get `ambient_outbound|@<ns>`, routing the entries that namespace resolves hosts to):
an internal listener matching every destination the scope imports, and per /24 (IPv6: /120)
block of mesh pod addresses an `ambient_pods|...|<block>` listener for direct pod-IP calls,
with one chain per destination identity (so a new replica re-sends one small block listener).
Once: `ambient_connect`, passthrough and blackhole clusters.

Endpoint-dependent (`plan_node_shared`, identical for every node whose pods import the same
services, so a runtime can share and patch it per host like a sidecar's outbound layer): per
imported service port `ambient|<VIP:port>` and its endpoints (HBONE pods: internal endpoints
carrying their tunnel address and identity; otherwise plaintext EDS as before), and per
waypoint in use `ambient_wp|<host>`. Nothing else reads endpoints: a new replica anywhere
changes its service's ClusterLoadAssignment and, once its Pod has an IP, one block listener.

Sidecar scope: a pod reaches the service ports its Sidecar imports (as its sidecar would,
ports included), and by pod IP only pods of imported services; the rest passes through.
A ServiceEntry with several IPs gets a /32 and an `ambient|<IP:port>` cluster per address;
two entries of one address cannot both have that cluster: one is kept
(`controlplane.model.ambient.address_owners`) and the other warned.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from controlplane.model.ambient import (
    EntryView,
    accepts_hbone,
    address_owners,
    ambient_pods_on,
    identities,
    namespace_entries,
    node_addresses,
    routed_by_node_proxy,
    view_services,
    waypoint_service,
)
from controlplane.model.ir import Hostname, Service, ServicePort, SourceRef, Workload
from controlplane.model.mesh import Mesh
from controlplane.model.scope import proxy_sidecar
from controlplane.translate.clusters import (
    build_blackhole_cluster,
    build_outbound_cluster,
    build_passthrough_cluster,
    effective_policy,
)
from controlplane.translate.endpoints import build_cla, select_endpoints
from controlplane.translate.names import BLACKHOLE_CLUSTER, PASSTHROUGH_CLUSTER
from controlplane.translate.nodepod import identity_secret, pod_inbound, pod_meta
from controlplane.translate.nodeproxy_envoy import (
    CONNECT_LISTENER,
    SOURCE_CLUSTER,
    WAYPOINT_CLUSTER,
    IpRoute,
    TunnelEndpoint,
    WaypointRoute,
    build_connect_listener,
    build_hop_cluster,
    build_pod_outbound,
    build_pods_listener,
    build_scope_listener,
    build_source_cluster,
    build_tunnel_cla,
    build_tunnel_service_cluster,
    service_cluster,
)
from controlplane.translate.plan import CLUSTER, ENDPOINT, LISTENER, ResourceSpec
from controlplane.translate.scope import sidecar_scope
from controlplane.translate.security import spiffe_uri
from controlplane.translate.serviceentry import build_dns_cluster
from controlplane.translate.tunnel import all_hbone, pods_behind

SCOPE_LISTENER = "ambient_outbound"
PODS_LISTENER = "ambient_pods"


@dataclass(frozen=True, slots=True)
class PodScope:
    """A Sidecar scope as node proxies key it: `tag` names the Sidecar and the pods'
    namespace ("" = no Sidecar and the mesh-wide ServiceEntry hosts; "@<ns>" = no Sidecar,
    the hosts namespace <ns> sees), `pairs` the (service, port)s it imports (None = all),
    `entries` how its ServiceEntry hosts differ from the mesh-wide ones
    (`controlplane.model.ambient.namespace_entries`)."""

    tag: str
    pairs: frozenset[tuple[Hostname, int]] | None
    sources: tuple[SourceRef, ...] = ()
    entries: EntryView = ()

    @property
    def listener(self) -> str:
        return SCOPE_LISTENER if not self.tag else f"{SCOPE_LISTENER}|{self.tag}"

    def block_listener(self, block: str) -> str:
        return f"{PODS_LISTENER}|{block}" if not self.tag else f"{PODS_LISTENER}|{self.tag}|{block}"

    def ports(self, svc: Service) -> tuple[int, ...]:
        return tuple(sp.port for sp in svc.ports if self.pairs is None or (svc.hostname, sp.port) in self.pairs)


def pod_scope(mesh: Mesh, wl: Workload, memo: dict[object, PodScope] | None = None) -> PodScope:
    """The scope of `wl`'s outbound traffic: its Sidecar's egress (L4: sourceLabels classes
    of VirtualServices do not apply to a node proxy). `memo` shares the work between pods of
    one namespace under one Sidecar. Pods of a namespace that sees other ServiceEntry hosts
    than the mesh-wide ones (an entry not exported everywhere) get their own scope."""
    sc = proxy_sidecar(mesh, pod_meta(wl))
    key = (sc.namespace, sc.name, wl.namespace) if sc is not None else ("", "", wl.namespace)
    found = memo.get(key) if memo is not None else None
    if found is None:
        view = namespace_entries(mesh, wl.namespace)
        if sc is None:
            found = PodScope(f"@{wl.namespace}" if view else "", None, (), view)
        else:
            found = PodScope(f"{sc.namespace}/{sc.name}@{wl.namespace}",
                             frozenset(sidecar_scope(mesh, sc, wl.namespace)), (sc.ref,), view)
        if memo is not None:
            memo[key] = found
    return found


def node_scopes(mesh: Mesh, node: str) -> dict[str, PodScope]:
    """The distinct scopes of `node`'s ambient pods, by tag."""
    out: dict[str, PodScope] = {}
    memo: dict[object, PodScope] = {}
    for wl in ambient_pods_on(mesh, node):
        sc = pod_scope(mesh, wl, memo)
        out.setdefault(sc.tag, sc)
    return dict(sorted(out.items()))


def node_shared_key(mesh: Mesh, node: str) -> tuple[str, ...]:
    """Node proxies with equal keys have equal `plan_node_shared` plans."""
    return tuple(node_scopes(mesh, node))


def block_of(ip: str) -> str:
    """The CIDR block a pod address is grouped in: its /24 (IPv6: /120), the size of the pod
    range a CNI typically gives one node, so a node's pods usually share one block."""
    addr = ipaddress.ip_address(ip)
    bits = 24 if addr.version == 4 else 120
    return str(ipaddress.ip_network(f"{ip}/{bits}", strict=False))


# --------------------------------------------------------------------------- endpoint-dependent


Imported = dict[Hostname, tuple[Service, tuple[int, ...], tuple[str, ...]]]


def _imported(mesh: Mesh, scopes: Iterable[PodScope]) -> Imported:
    """Registry key -> (its Service, its ports imported by any of `scopes`, its addresses),
    of the services each scope's pods see (their namespace's ServiceEntry hosts) that have
    an address. An address several of them share names one cluster: its owner's
    (`address_owners`; the others are warned by `ambient_entry_issues`)."""
    owners = address_owners(mesh)
    out: Imported = {}
    for scope in scopes:
        for key, svc in view_services(mesh, scope.entries):
            if not routed_by_node_proxy(svc):
                continue
            addrs = tuple(ip for ip in node_addresses(svc) if owners.get(ip, ("",))[0] == key)
            ports = scope.ports(svc)
            if not addrs or not ports:
                continue
            had = out.get(key)
            if had is not None:
                ports = tuple(sorted({*had[1], *ports}))
            out[key] = (svc, ports, addrs)
    return dict(sorted(out.items()))


def _tunnel_endpoints(mesh: Mesh, pods: list[tuple[str, Workload | None]]) -> tuple[TunnelEndpoint, ...]:
    """Pods whose identity is known (an unknown one could not be verified: left out)."""
    td = mesh.trust_domain
    return tuple(TunnelEndpoint(ip, spiffe_uri(td, w.namespace, w.service_account)) for ip, w in pods if w is not None)


def _service_specs(mesh: Mesh, svc: Service, ports: tuple[int, ...], addrs: tuple[str, ...]
                   ) -> list[ResourceSpec]:
    """Per address and imported port, `ambient|<address:port>` and its endpoints (the same
    for every address of a ServiceEntry host)."""
    refs: tuple[SourceRef, ...] = (svc.ref,)
    specs = []
    for sp in svc.ports:
        if sp.port not in ports:
            continue
        pods = pods_behind(mesh, svc, sp)
        for vip in addrs:
            specs += _port_specs(mesh, svc, sp, service_cluster(vip, sp.port), pods, refs)
    return specs


def _port_specs(mesh: Mesh, svc: Service, sp: ServicePort, name: str, pods: list[tuple[str, Workload | None]],
                refs: tuple[SourceRef, ...]) -> list[ResourceSpec]:
    specs: list[ResourceSpec] = []
    resolution = svc.entry.resolution if svc.entry is not None else "STATIC"
    if all_hbone(mesh, pods):
        specs += [ResourceSpec(CLUSTER, name, build_tunnel_service_cluster, (name,), refs),
                  ResourceSpec(ENDPOINT, name, build_tunnel_cla, (name, _tunnel_endpoints(mesh, pods)), refs)]
    elif resolution in ("DNS", "DNS_ROUND_ROBIN"):  # the endpoints may be names: Envoy resolves them
        eps = select_endpoints(mesh.endpoints.get(mesh.registry_key(svc), ()), sp, len(svc.ports) == 1,
                               mesh.workloads)
        specs.append(ResourceSpec(CLUSTER, name, build_dns_cluster,
                                  (name, sp.protocol, effective_policy(None, sp.port), None, (eps,),
                                   resolution == "DNS_ROUND_ROBIN"), refs))
    else:  # some pods outside the mesh: plaintext to every endpoint, as a sidecar would
        eps = select_endpoints(mesh.endpoints.get(mesh.registry_key(svc), ()), sp, len(svc.ports) == 1,
                               mesh.workloads)
        specs += [ResourceSpec(CLUSTER, name, build_outbound_cluster,
                               (name, sp.protocol, effective_policy(None, sp.port), None), refs),
                  ResourceSpec(ENDPOINT, name, build_cla, (name, eps), refs)]
    return specs


def _waypoint_specs(mesh: Mesh, wp: Service) -> list[ResourceSpec]:
    name = WAYPOINT_CLUSTER + wp.hostname
    wsp = next((p for p in wp.ports if p.port == 15008), wp.ports[0] if wp.ports else None)
    pods = pods_behind(mesh, wp, wsp) if wsp is not None else []
    refs: tuple[SourceRef, ...] = (wp.ref,)
    return [ResourceSpec(CLUSTER, name, build_tunnel_service_cluster, (name,), refs),
            ResourceSpec(ENDPOINT, name, build_tunnel_cla, (name, _tunnel_endpoints(mesh, pods)), refs)]


def _shared(mesh: Mesh, node: str, hosts: frozenset[str] | None) -> list[ResourceSpec]:
    specs: list[ResourceSpec] = []
    waypoints: dict[Hostname, Service] = {}
    for svc, ports, addrs in _imported(mesh, node_scopes(mesh, node).values()).values():
        wp = waypoint_service(mesh, svc)
        if wp is not None:
            waypoints[wp.hostname] = wp
        elif hosts is None or svc.hostname in hosts:
            specs += _service_specs(mesh, svc, ports, addrs)
    for host, wp in sorted(waypoints.items()):
        if hosts is None or host in hosts:
            specs += _waypoint_specs(mesh, wp)
    return specs


def plan_node_shared(mesh: Mesh, node: str) -> list[ResourceSpec]:
    """The node proxy's endpoint-dependent resources: service and waypoint clusters and
    their ClusterLoadAssignments."""
    return _shared(mesh, node, None)


def plan_node_shared_hosts(mesh: Mesh, node: str, hosts: frozenset[str]) -> list[ResourceSpec]:
    """The part of `plan_node_shared` that depends on the endpoints of `hosts`."""
    return _shared(mesh, node, hosts)


# --------------------------------------------------------------------------- per node, per pod


def _scope_listener_specs(mesh: Mesh, scope: PodScope, blocks: dict[str, dict[str, list[str]]]
                          ) -> list[ResourceSpec]:
    services: list[IpRoute] = []
    full: list[str] = []
    refs: list[SourceRef] = list(scope.sources)
    by_waypoint: dict[Hostname, tuple[Service, list[IpRoute], list[str]]] = {}
    for svc, ports, addrs in _imported(mesh, [scope]).values():
        cidrs = tuple(f"{vip}/{128 if ':' in vip else 32}" for vip in addrs)
        every = len(ports) == len(svc.ports)
        refs.append(svc.ref)
        wp = waypoint_service(mesh, svc)
        if wp is not None:
            _, routes, whole = by_waypoint.setdefault(wp.hostname, (wp, [], []))
            if every:
                whole.extend(cidrs)
            else:
                routes.append(IpRoute(cidrs, f"waypoint|{wp.hostname}", ports))
        elif every:
            full.extend(cidrs)
        else:
            services.append(IpRoute(cidrs, "services", ports))
    if full:
        services.insert(0, IpRoute(tuple(full), "services"))
    waypoints = []
    for whost, (wp, routes, whole) in sorted(by_waypoint.items()):
        chain = f"waypoint|{whost}"
        if whole:
            routes.insert(0, IpRoute(tuple(whole), chain))
        waypoints.append(WaypointRoute(chain, WAYPOINT_CLUSTER + whost, tuple(routes)))
        refs.append(wp.ref)
    block_routes = tuple((b, scope.block_listener(b)) for b in sorted(blocks))
    name = scope.listener
    specs = [
        ResourceSpec(LISTENER, name, build_scope_listener,
                     (name, tuple(services), tuple(waypoints), block_routes, PASSTHROUGH_CLUSTER),
                     tuple(dict.fromkeys(refs))),
        ResourceSpec(CLUSTER, name, build_hop_cluster, (name, name)),
    ]
    for block, by_uri in sorted(blocks.items()):
        lname = scope.block_listener(block)
        idents = tuple((uri, tuple(sorted(ips))) for uri, ips in sorted(by_uri.items()))
        specs += [ResourceSpec(LISTENER, lname, build_pods_listener,
                               (lname, idents, BLACKHOLE_CLUSTER, PASSTHROUGH_CLUSTER)),
                  ResourceSpec(CLUSTER, lname, build_hop_cluster, (lname, lname))]
    return specs


def _direct_pods(mesh: Mesh, scope: PodScope) -> dict[str, dict[str, list[str]]]:
    """block -> SPIFFE URI -> the /32s (/128s) of pods that take HBONE and that `scope` may
    call by IP (all of them, or the pods of services it imports)."""
    out: dict[str, dict[str, list[str]]] = {}
    td = mesh.trust_domain
    for wl in mesh.workloads.values():
        if not wl.ip or not accepts_hbone(mesh, wl):
            continue
        if scope.pairs is not None and not any(
                (svc.hostname, sp.port) in scope.pairs
                for svc in mesh.services_selecting(wl.namespace, wl.labels) for sp in svc.ports):
            continue
        cidr = f"{wl.ip}/{128 if ':' in wl.ip else 32}"
        uri = spiffe_uri(td, wl.namespace, wl.service_account)
        out.setdefault(block_of(wl.ip), {}).setdefault(uri, []).append(cidr)
    return out


def plan_node_own(mesh: Mesh, node: str) -> list[ResourceSpec]:
    """Everything of the node proxy that reads no endpoints: per-pod listeners and
    inbound clusters, identity clusters, scope and block listeners, `ambient_connect`."""
    pods = ambient_pods_on(mesh, node)
    td = mesh.trust_domain
    out: dict[tuple[str, str], ResourceSpec] = {}

    def add(specs: Iterable[ResourceSpec]) -> None:
        for s in specs:
            out.setdefault((s.type_url, s.name), s)

    add([ResourceSpec(CLUSTER, PASSTHROUGH_CLUSTER, build_passthrough_cluster, (PASSTHROUGH_CLUSTER,)),
         ResourceSpec(CLUSTER, BLACKHOLE_CLUSTER, build_blackhole_cluster, (BLACKHOLE_CLUSTER,))])
    if not pods:
        return sorted(out.values(), key=lambda s: (s.type_url, s.name))
    add([ResourceSpec(LISTENER, CONNECT_LISTENER, build_connect_listener, (CONNECT_LISTENER, BLACKHOLE_CLUSTER))])
    for ns, sa in identities(pods):
        uri = identity_secret(td, ns, sa)
        name = SOURCE_CLUSTER + uri
        add([ResourceSpec(CLUSTER, name, build_source_cluster, (name, uri, td))])
    scopes: dict[str, PodScope] = {}
    memo: dict[object, PodScope] = {}
    for wl in pods:
        scope = pod_scope(mesh, wl, memo)
        if scope.tag not in scopes:
            scopes[scope.tag] = scope
            add(_scope_listener_specs(mesh, scope, _direct_pods(mesh, scope)))
        name = f"ambient_outbound_{wl.namespace}_{wl.name}"
        source = SOURCE_CLUSTER + identity_secret(td, wl.namespace, wl.service_account)
        add([ResourceSpec(LISTENER, name, build_pod_outbound, (name, wl.netns, source, scope.listener), (wl.ref,))])
        add(pod_inbound(mesh, wl))
    return sorted(out.values(), key=lambda s: (s.type_url, s.name))


def plan_node(mesh: Mesh, node: str) -> list[ResourceSpec]:
    """Everything the node proxy of `node` needs, sorted by (type, name)."""
    specs = {(s.type_url, s.name): s for s in (*plan_node_own(mesh, node), *plan_node_shared(mesh, node))}
    return [specs[k] for k in sorted(specs)]


__all__ = [
    "PodScope", "block_of", "node_scopes", "node_shared_key", "plan_node", "plan_node_own", "plan_node_shared",
    "plan_node_shared_hosts", "pod_scope",
]
