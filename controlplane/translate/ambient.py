"""Sidecarless translation: plans for node proxies and waypoints, and the HBONE pieces
sidecars use in a mixed mesh. Pure functions, no I/O.

Node proxy of node N (`plan_node`): the shared layout of `controlplane.translate.nodeproxy`
(per pod only a small in-netns outbound listener and its inbound side below; service, identity
and scope resources are shared by the node's pods). Per ambient pod P on N with an IP and a
known network namespace (`controlplane.model.ambient`), P's inbound side (`_pod_inbound`):
- `ambient_hbone_<ns>_<pod>`: 15008 inside P's netns, terminating tunnels with P's
  certificate for exactly P's IP:port and its services' VIP:port authorities, enforcing P's
  AuthorizationPolicies at L4, delivering inside P's netns. Its routes (those authorities and
  policies) are the RouteConfiguration of the same name, over RDS: a changed policy applies to
  the next tunnel, also on an HBONE connection pooled before the change.
- `ambient_plain_<ns>_<pod>`: 15006 inside P's netns for plaintext callers, per target port
  only where P's PeerAuthentication is not STRICT.
Certificates: one SDS secret per identity running on N, named by its SPIFFE URI (the
runtime sends only those; see `node_identities`).

Waypoint W of namespace NS (`plan_waypoint`): terminates HBONE on 15008 for the VIP:port
of every service bound to it, hands each port's stream to an internal listener running the
services' VirtualService routes (`waypoint_<port>`) and their L7 AuthorizationPolicies, and
originates HBONE to the chosen endpoint (`tunnel_cluster_specs`). The L7 policies it
enforces are those attached to it with `targetRefs` (kind Gateway: the waypoint; kind
Service: a service bound to it), as in Istio; selector policies are the node proxies' (L4).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from controlplane.model.ambient import (
    accepts_hbone,
    ambient_pods_on,
    identities,
    runs_sidecar,
    services_of_waypoint,
    waypoint_service,
)
from controlplane.model.ir import (
    AuthorizationPolicy,
    AuthzOperation,
    AuthzRule,
    ProxyMeta,
    Service,
    ServicePort,
    SourceRef,
    Workload,
)
from controlplane.model.mesh import Mesh
from controlplane.model.policy import (
    authorization_policies_for,
    effective_mtls,
    orphaned_policies,
    policies_for_port,
    waypoint_policies,
)
from controlplane.translate.clusters import (
    effective_policy,
)
from controlplane.translate.endpoints import endpoint_set_port
from controlplane.translate.hbone import (
    PlainPort,
    TunnelTarget,
    build_delivery_cluster,
    build_hbone_cla,
    build_hbone_cluster,
    build_hbone_inbound,
    build_hbone_routes,
    build_internal_cluster,
    build_plain_inbound,
    build_tunnel_listener,
)
from controlplane.translate.names import (
    BLACKHOLE_CLUSTER,
    dedupe_domains,
    outbound_cluster_name,
    service_domains,
)
from controlplane.translate.plan import CLUSTER, ENDPOINT, LISTENER, ROUTE, ResourceSpec
from controlplane.translate.security import spiffe_uri
from controlplane.translate.sidecar import _target_port, inbound_ports, route_spec

WORKLOAD_SECRET = "default"


def _vip(svc: Service) -> str | None:
    ip = svc.cluster_ip
    return ip if ip and ip.lower() != "none" else None


def _pods_behind(mesh: Mesh, svc: Service, sp: ServicePort, labels: tuple[tuple[str, str], ...] | None = None
                 ) -> list[tuple[str, Workload | None]]:
    """(IP, Pod or None) of the ready endpoints of `svc` on `sp` (of a subset: `labels`)."""
    out: dict[str, Workload | None] = {}
    single = len(svc.ports) == 1
    for eps in mesh.endpoints.get(svc.hostname, ()):
        if endpoint_set_port(eps, sp, single) is None:
            continue
        for ep in eps.endpoints:
            if not ep.ready:
                continue
            wl = mesh.workload(eps.namespace, ep.pod)
            if labels is not None and (wl is None or not all(kv in wl.labels for kv in labels)):
                continue
            out[ep.address] = wl
    return sorted(out.items())


def _peers(mesh: Mesh, pods: Iterable[Workload | None]) -> tuple[str, ...]:
    return tuple(sorted({spiffe_uri(mesh.trust_domain, w.namespace, w.service_account)
                         for w in pods if w is not None}))


def _all_hbone(mesh: Mesh, pods: list[tuple[str, Workload | None]]) -> bool:
    return bool(pods) and all(w is not None and accepts_hbone(mesh, w) for _, w in pods)


def identity_secret(trust_domain: str, namespace: str, service_account: str) -> str:
    """The SDS name of an identity's certificate on a node proxy: its SPIFFE URI."""
    return spiffe_uri(trust_domain, namespace, service_account)


def node_identities(mesh: Mesh, node: str) -> list[tuple[str, str]]:
    """The (namespace, service account) pairs a node proxy of `node` holds certificates for."""
    return identities(ambient_pods_on(mesh, node))


# --------------------------------------------------------------------------- node proxy


def _eds_name(kind: str, port: int, host: str, subset: str | None = None) -> str:
    return f"{kind}|{port}|{subset or ''}|{host}"


def _pod_meta(wl: Workload) -> ProxyMeta:
    """The pod as a workload (the view a sidecar of it would have: its Sidecar scope applies)."""
    return ProxyMeta(node_id="", mode="sidecar", namespace=wl.namespace, workload=wl.name, labels=wl.labels,
                     service_account=wl.service_account)


def tunnel_targets(mesh: Mesh, wl: Workload, cluster_of: dict[int, str]) -> tuple[TunnelTarget, ...]:
    """The CONNECT authorities that reach `wl` per target port: its IP:port and the VIP:port
    of every service selecting it."""
    domains: dict[int, list[str]] = {tp: [f"{wl.ip}:{tp}"] for tp in cluster_of}
    for svc in mesh.services_selecting(wl.namespace, wl.labels):
        vip = _vip(svc)
        for sp in svc.ports:
            tp = _target_port(sp, wl)
            if vip is not None and tp in domains:
                domains[tp].append(f"{vip}:{sp.port}")
    return tuple(TunnelTarget(tp, tuple(dict.fromkeys(domains[tp])), cluster_of[tp]) for tp in sorted(cluster_of))


def _pod_inbound(mesh: Mesh, wl: Workload) -> list[ResourceSpec]:
    assert wl.ip is not None
    td = mesh.trust_domain
    key = f"{wl.namespace}_{wl.name}"
    ports = inbound_ports(mesh, _pod_meta(wl), wl)
    mtls = effective_mtls(mesh, wl.namespace, wl.labels)
    port_modes = dict(mtls.ports)
    authz = (*authorization_policies_for(mesh, wl.namespace, wl.labels),
             *orphaned_policies(mesh, wl, lambda svc: waypoint_service(mesh, svc) is not None))
    sources = (wl.ref, *mtls.sources, *(a.ref for a in authz), *(r for ib in ports for r in ib.sources))
    sources = tuple(dict.fromkeys(sources))
    specs: list[ResourceSpec] = []
    clusters: dict[int, str] = {}
    for ib in ports:
        tp = ib.port.port
        name = f"inbound_ambient|{tp}|{wl.namespace}/{wl.name}"
        clusters[tp] = name
        specs.append(ResourceSpec(CLUSTER, name, build_delivery_cluster, (name, wl.ip, tp, wl.netns), ib.sources))
    cert = identity_secret(td, wl.namespace, wl.service_account)
    hb = f"ambient_hbone_{key}"
    # Routes (targets, policies) over RDS: a policy change reaches tunnels on pooled connections.
    specs.append(ResourceSpec(LISTENER, hb, build_hbone_inbound, (hb, wl.netns, cert, td, None, ()), (wl.ref,)))
    specs.append(ResourceSpec(ROUTE, hb, build_hbone_routes, (hb, td, tunnel_targets(mesh, wl, clusters), authz),
                              sources))
    plain = tuple(PlainPort(tp, clusters[tp], port_modes.get(tp, mtls.mode) not in ("STRICT",))
                  for tp in sorted(clusters))
    pl = f"ambient_plain_{key}"
    specs.append(ResourceSpec(LISTENER, pl, build_plain_inbound,
                              (pl, wl.netns, plain, BLACKHOLE_CLUSTER, td, authz), sources))
    return specs


def plan_node(mesh: Mesh, node: str) -> list[ResourceSpec]:
    """Everything the node proxy of `node` needs, sorted by (type, name): the shared layout
    of `controlplane.translate.nodeproxy`."""
    from controlplane.translate.nodeproxy import plan_node as plan

    return plan(mesh, node)


# --------------------------------------------------------------------------- HBONE from behind a route


def tunnel_cluster_specs(mesh: Mesh, svc: Service, sp: ServicePort, subset: str | None,
                         labels: tuple[tuple[str, str], ...] | None, cert: str,
                         via_waypoint: bool = False) -> list[ResourceSpec]:
    """`outbound|<port>|<subset>|<host>` as an internal hop into a tunnel to the (subset's)
    pods: route -> that cluster -> internal listener -> HBONE cluster -> pods' 15008, with
    the authority `<VIP>:<port>` (or the pod IP:port is unknowable: headless services are
    not tunnelled this way)."""
    name = outbound_cluster_name(sp.port, svc.hostname, subset)
    vip = _vip(svc)
    if vip is None:
        return []
    lst = f"tunnel|{sp.port}|{subset or ''}|{svc.hostname}"
    refs: tuple[SourceRef, ...] = (svc.ref,)
    wp = waypoint_service(mesh, svc) if via_waypoint else None
    if wp is not None:
        # The service's waypoint decides (routing, L7 policy): tunnel there, naming the service.
        wsp = next((p for p in wp.ports if p.port == 15008), wp.ports[0] if wp.ports else None)
        wpods = _pods_behind(mesh, wp, wsp) if wsp is not None else []
        weds = _eds_name("hbone", 15008, wp.hostname)
        whb = f"{weds}|{cert}"
        wrefs = (svc.ref, wp.ref)
        return [
            ResourceSpec(CLUSTER, name, build_internal_cluster, (name, lst), wrefs),
            ResourceSpec(LISTENER, lst, build_tunnel_listener, (lst, f"{vip}:{sp.port}", whb), wrefs),
            ResourceSpec(CLUSTER, whb, build_hbone_cluster,
                         (whb, weds, cert, mesh.trust_domain, _peers(mesh, (w for _, w in wpods))), (wp.ref,)),
            ResourceSpec(ENDPOINT, weds, build_hbone_cla, (weds, tuple(ip for ip, _ in wpods)), (wp.ref,)),
        ]
    pods = _pods_behind(mesh, svc, sp, labels)
    dr = mesh.dr_by_host.get(svc.hostname)
    eds = _eds_name("hbone", sp.port, svc.hostname, subset)
    hb = f"{eds}|{cert}"
    return [
        ResourceSpec(CLUSTER, name, build_internal_cluster, (name, lst), refs),
        ResourceSpec(LISTENER, lst, build_tunnel_listener, (lst, f"{vip}:{sp.port}", hb), refs),
        ResourceSpec(CLUSTER, hb, build_hbone_cluster,
                     (hb, eds, cert, mesh.trust_domain, _peers(mesh, (w for _, w in pods)),
                      effective_policy(dr, sp.port, subset)), refs if dr is None else (*refs, dr.ref)),
        ResourceSpec(ENDPOINT, eds, build_hbone_cla, (eds, tuple(ip for ip, _ in pods)), refs),
    ]


def needs_tunnel(mesh: Mesh, svc: Service, sp: ServicePort) -> bool:
    """Whether a sidecar must tunnel to `svc` on `sp`: its pods accept only HBONE for mesh
    traffic (some are ambient, and all accept HBONE)."""
    pods = _pods_behind(mesh, svc, sp)
    return (_all_hbone(mesh, pods) and any(w is not None and not runs_sidecar(w) for _, w in pods)
            and _vip(svc) is not None)


# --------------------------------------------------------------------------- waypoint


def plan_waypoint(mesh: Mesh, meta: ProxyMeta) -> list[ResourceSpec]:
    """A waypoint's resources: HBONE termination, per-port L7 routing, HBONE origination."""
    name = meta.waypoint or meta.workload or "waypoint"
    ns = meta.namespace
    td = mesh.trust_domain
    bound = services_of_waypoint(mesh, ns, name)
    out: dict[tuple[str, str], ResourceSpec] = {}

    def add(specs: Iterable[ResourceSpec]) -> None:
        for s in specs:
            out.setdefault((s.type_url, s.name), s)

    by_port: dict[int, list[Service]] = {}
    for svc in bound:
        if _vip(svc) is None:
            continue
        for sp in svc.ports:
            by_port.setdefault(sp.port, []).append(svc)
            dr = mesh.dr_by_host.get(svc.hostname)
            add(tunnel_cluster_specs(mesh, svc, sp, None, None, WORKLOAD_SECRET))
            for subset in dr.subsets if dr is not None else ():
                add(tunnel_cluster_specs(mesh, svc, sp, subset.name, subset.labels, WORKLOAD_SECRET))
    targets: list[TunnelTarget] = []
    for port, services in sorted(by_port.items()):
        inner = f"waypoint_{port}"
        cluster = f"waypoint_inner|{port}"
        targets.append(TunnelTarget(port, tuple(f"{_vip(s)}:{port}" for s in services), cluster))
        add([ResourceSpec(CLUSTER, cluster, build_internal_cluster, (cluster, inner))])
        add([route_spec(mesh, port, services, ns, "intercept", name=inner)])
        domains = dedupe_domains(service_domains(s, port, ns) for s in services)
        authz = _per_service_policies(mesh, ns, name, services, port, domains)
        add([ResourceSpec(LISTENER, inner, build_waypoint_http, (inner, td, authz),
                          tuple(dict.fromkeys((*(s.ref for s in services), *(a.ref for a in authz)))))])
    add([ResourceSpec(LISTENER, "waypoint_hbone", build_hbone_inbound,
                      ("waypoint_hbone", None, WORKLOAD_SECRET, td, tuple(targets), ()),
                      tuple(s.ref for s in bound))])
    return sorted(out.values(), key=lambda s: (s.type_url, s.name))


def _per_service_policies(mesh: Mesh, ns: str, waypoint: str, services: list[Service], port: int,
                          domains: list[tuple[str, ...]]) -> tuple[AuthorizationPolicy, ...]:
    """The policies of one waypoint port, each rule limited to the Host names of the service
    it applies to (services sharing a port share the listener's RBAC filters); a service
    without ALLOW policies gets an allow-all of its own hosts once any other has one."""
    per: list[tuple[Service, tuple[str, ...], tuple[AuthorizationPolicy, ...]]] = []
    for svc, hosts in zip(services, domains, strict=True):
        ports = {port, *(sp.target_port for sp in svc.ports if sp.port == port and isinstance(sp.target_port, int))}
        pols = policies_for_port(waypoint_policies(mesh, ns, waypoint, (svc.name,)), *sorted(ports))
        per.append((svc, hosts, pols))
    any_allow = any(ap.action == "ALLOW" for _, _, pols in per for ap in pols)
    out: list[AuthorizationPolicy] = []
    for svc, hosts, pols in per:
        for ap in pols:
            rules = tuple(
                replace(r, operations=tuple(op if op.hosts else replace(op, hosts=hosts) for op in r.operations)
                        or (AuthzOperation(hosts=hosts),))
                for r in ap.rules
            )
            out.append(replace(ap, name=f"{ap.name}@{svc.name}", rules=rules))
        if any_allow and not any(ap.action == "ALLOW" for ap in pols):
            out.append(AuthorizationPolicy(svc.ref, ns, f"allow-unrestricted@{svc.name}", action="ALLOW",
                                           rules=(AuthzRule(operations=(AuthzOperation(hosts=hosts),)),)))
    return tuple(out)


def build_waypoint_http(name: str, trust_domain: str, authz: tuple[object, ...]) -> object:
    """The internal listener of one port: HTTP routing (RDS `name`) and L7 authorization."""
    from envoy.config.listener.v3 import listener_pb2

    from controlplane.translate.listeners import _hcm
    from controlplane.translate.rbac import http_rbac_filters

    lst = listener_pb2.Listener(name=name)
    lst.internal_listener.SetInParent()
    filters = http_rbac_filters(authz, trust_domain) if authz else []  # type: ignore[arg-type]
    lst.filter_chains.add(name=name).filters.append(_hcm(name, name, None, filters))
    return lst
