"""Sidecar translation: plans (ResourceSpecs) of the clusters, endpoints, routes and
listeners a sidecar Envoy receives. Pure functions, no I/O.

- `plan_outbound(mesh, namespace, capture, bind_address, scope)`: everything that depends
  only on the client's namespace, capture mode and Sidecar scope (`translate.scope`),
  shared by every sidecar of that class. A scoped proxy gets only the service ports in its
  scope: their clusters, endpoints, virtual hosts and listeners (plus the passthrough).
- `plan_inbound(mesh, proxy)`: the proxy's own workload's inbound listeners and clusters.

Listener layout per capture mode:
- bind: one listener `127.0.0.1_<P>` per service port P. When several services share P,
  HTTP ones are routed by Host header through route configuration `<P>`; if non-HTTP
  services share the port too, the protocol is sniffed and the first non-HTTP service by
  hostname takes the TCP traffic (others on that port are unreachable in bind mode).
  Inbound: `inbound_<podIP>_<targetPort>` on the pod's address, forwarding to the app.
- intercept: `virtualOutbound` (15001) hands captured connections to bind_to_port=false
  listeners: `0.0.0.0_<P>` for HTTP ports, `<clusterIP>_<P>` for TCP and sniffed services
  (`0.0.0.0_<P>` without a cluster IP, if no HTTP service claimed it). Unknown destinations
  go to `PassthroughCluster`. Inbound: `virtualInbound` (15006), one chain per target port.

Inbound ports are keyed by target port (`inbound|<targetPort>||`, as in Istio); named
target ports resolve through the Pod's container ports and are skipped without a Pod.

Security: inbound listeners get the workload's effective PeerAuthentication modes and its
AuthorizationPolicies (`controlplane.model.policy`; mTLS chains and RBAC filters are built
in `listeners`/`rbac`); outbound clusters originate mesh mTLS to endpoints whose Pod runs a
sidecar, or what the DestinationRule's `tls` says (`controlplane.translate.security`). The
mesh's trust domain and root namespace come with the `Mesh`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

from controlplane.model.ambient import runs_sidecar
from controlplane.model.ir import (
    CaptureMode,
    Destination,
    DestinationRule,
    Hostname,
    L4Match,
    Labels,
    PortProtocol,
    ProxyMeta,
    Service,
    ServicePort,
    SourceRef,
    Workload,
)
from controlplane.model.mesh import Mesh
from controlplane.translate.accesslog import AccessLogSink
from controlplane.translate.clusters import (
    build_blackhole_cluster,
    build_inbound_cluster,
    build_original_dst_cluster,
    build_outbound_cluster,
    build_passthrough_cluster,
    effective_policy,
    is_passthrough,
)
from controlplane.translate.endpoints import build_cla, locality_endpoints
from controlplane.translate.extauthz import authorizer_targets
from controlplane.translate.hbone import build_hbone_inbound, build_hbone_routes
from controlplane.translate.inbound import Inbound, inbound_ports, inbound_security
from controlplane.translate.jwt import build_jwks_cluster, jwks_clusters
from controlplane.translate.listeners import (
    InboundSecurity,
    OutboundListener,
    WeightedCluster,
    build_inbound_listener,
    build_outbound_listener,
    build_virtual_inbound,
    build_virtual_outbound,
)
from controlplane.translate.locality import ClientLocality
from controlplane.translate.names import (
    APP_ADDRESS_ANNOTATION,
    BLACKHOLE_CLUSTER,
    DEFAULT_APP_ADDRESS,
    INBOUND_PASSTHROUGH_CLUSTER,
    PASSTHROUGH_CLUSTER,
    VIRTUAL_INBOUND,
    VIRTUAL_OUTBOUND,
    dedupe_domains,
    destination_port,
    outbound_cluster_name,
    route_config_name,
    service_domains,
    weighted_split,
)
from controlplane.translate.plan import CLUSTER, ENDPOINT, LISTENER, ROUTE, ResourceSpec
from controlplane.translate.routes import build_route_config, match_applies, plan_virtual_host
from controlplane.translate.scope import Scope, registry_only, source_labels_of
from controlplane.translate.secrets import WORKLOAD_SECRET
from controlplane.translate.security import outbound_sni, spiffe_uri, upstream_tls
from controlplane.translate.serviceentry import (
    cluster_kind,
    entry_cluster_specs,
    entry_listener_addresses,
    entry_visible,
)
from controlplane.translate.tunnel import tunnel_cluster_specs, tunnel_targets, tunnelled


def _dr(mesh: Mesh, svc: Service, namespace: str, classes: frozenset[Labels] = frozenset()
        ) -> DestinationRule | None:
    """The DestinationRule clients in `namespace` matching `classes` use for `svc` (Istio's
    lookup order)."""
    return mesh.destination_rule(svc.hostname, namespace, classes)


def _sniffed_or_http(sp: ServicePort) -> bool:
    return sp.protocol.is_http or sp.protocol is PortProtocol.UNKNOWN


def _port_of(svc: Service, port: int) -> ServicePort:
    return next(p for p in svc.ports if p.port == port)


def _refs(*groups: tuple[SourceRef, ...]) -> tuple[SourceRef, ...]:
    return tuple(dict.fromkeys(r for g in groups for r in g))


def service_identities(mesh: Mesh, svc: Service, sidecars_only: bool) -> tuple[str, ...]:
    """The SPIFFE URIs of the service accounts of the Pods behind `svc`'s endpoints (only of
    those running a sidecar, with `sidecars_only`)."""
    uris = set()
    for eps in mesh.endpoints.get(mesh.registry_key(svc), ()):
        for ep in eps.endpoints:
            wl = mesh.workload(eps.namespace, ep.pod)
            if wl is not None and (runs_sidecar(wl) or not sidecars_only):
                uris.add(spiffe_uri(mesh.trust_domain, wl.namespace, wl.service_account))
            elif ep.identity is not None:  # a WorkloadEntry (or ServiceEntry endpoint) in the mesh
                uris.add(ep.identity)
    if svc.entry is not None:
        uris.update(svc.entry.subject_alt_names)
    return tuple(sorted(uris))


def _cluster_specs(mesh: Mesh, svc: Service, namespace: str, scope: Scope | None = None,
                   capture: CaptureMode = "bind", client: ClientLocality | None = None) -> list[ResourceSpec]:
    if scope is not None and not any((svc.hostname, sp.port) in scope for sp in svc.ports):
        return []
    if not entry_visible(svc, namespace):
        return []
    dr = _dr(mesh, svc, namespace, source_labels_of(scope))
    key = mesh.registry_key(svc)  # the hostname, or a ServiceEntry's own key (Mesh.service)
    sets = mesh.endpoints.get(key, ())
    peers = (service_identities(mesh, svc, True), service_identities(mesh, svc, False))
    single = len(svc.ports) == 1
    subsets: list[tuple[str | None, tuple[tuple[str, str], ...] | None]] = [(None, None)]
    if dr is not None:
        subsets += [(s.name, s.labels) for s in dr.subsets]
    sources = (svc.ref,) if dr is None else (svc.ref, dr.ref)
    out: list[ResourceSpec] = []
    for sp in svc.ports:
        if scope is not None and (svc.hostname, sp.port) not in scope:
            continue
        if capture == "intercept" and tunnelled(mesh, svc, sp):
            # Ambient destinations accept mesh traffic only through the HBONE tunnel.
            for subset, labels in subsets:
                out += tunnel_cluster_specs(mesh, svc, sp, subset, labels, WORKLOAD_SECRET, via_waypoint=True)
            continue
        for subset, labels in subsets:
            name = outbound_cluster_name(sp.port, key, subset)
            policy = effective_policy(dr, sp.port, subset)
            lb = policy.load_balancer
            eps, cla_args = locality_endpoints(sets, sp, single, mesh.workloads, labels, lb.locality_lb if lb else None,
                                               policy.outlier_detection is not None, client)
            sni = outbound_sni(sp.port, subset, svc.hostname)
            tls = upstream_tls(policy.tls, any(e.mtls for e in eps), sni, peers, mesh.trust_domain, sp.protocol)
            args = (name, sp.protocol, policy, tls)
            if capture == "intercept" and is_passthrough(policy):
                out.append(ResourceSpec(CLUSTER, name, build_original_dst_cluster, args, sources))
                continue
            if svc.entry is not None:  # a ServiceEntry host: the cluster type follows its resolution
                out += entry_cluster_specs(cluster_kind(svc, capture), svc, sp.port, name, sp.protocol, policy, tls,
                                           eps, cla_args, sources)
                continue
            out.append(ResourceSpec(CLUSTER, name, build_outbound_cluster, args, sources))
            out.append(ResourceSpec(ENDPOINT, name, build_cla, (name, *cla_args), sources))
    return out


def bind_cluster_specs(mesh: Mesh, svc: Service, namespace: str) -> list[ResourceSpec]:
    """`svc`'s outbound clusters (every port, every DestinationRule subset) as a proxy without
    capture originates them: a waypoint reaching a ServiceEntry host's endpoints directly."""
    return _cluster_specs(mesh, svc, namespace)


def route_spec(
    mesh: Mesh, port: int, services: list[Service], namespace: str, capture: CaptureMode, name: str | None = None,
    source_labels: frozenset[Labels] = frozenset(), registry_only: bool = False,
) -> ResourceSpec:
    """The route configuration of `services` on `port` for clients in `namespace` (named after
    the port unless `name` is given: a waypoint's per-port configuration) whose workloads
    match the VirtualService sourceLabels selectors `source_labels`."""
    domains = dedupe_domains(service_domains(s, port, namespace) for s in services)
    vhosts = []
    sources: list[SourceRef] = []
    for svc, doms in zip(services, domains, strict=True):
        vh, refs = plan_virtual_host(mesh, svc, port, namespace, doms, source_labels)
        vhosts.append(vh)
        sources += refs
    name = name or route_config_name(port)
    args: tuple[object, ...] = (name, port, namespace, tuple(vhosts), capture == "intercept")
    if registry_only and capture == "intercept":
        args = (name, port, namespace, tuple(vhosts), False, True)
    return ResourceSpec(ROUTE, name, build_route_config, args, _refs(tuple(sources)))


def _in_subnets(ip: str | None, subnets: tuple[str, ...]) -> bool:
    """Whether the destination address `ip` (a service's cluster IP) is in one of `subnets`
    (no subnets: any destination). A service without a cluster IP has no one destination
    address, so a match on subnets never applies to it (validation says so)."""
    if not subnets:
        return True
    if not ip or ip.lower() == "none":
        return False
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr.version == net.version and addr in net
               for net in (ipaddress.ip_network(s, strict=False) for s in subnets))


def _l4_applies(m: L4Match, svc: Service, port: int, namespace: str, source_labels: frozenset[Labels]) -> bool:
    return match_applies(m, port, namespace, source_labels) and _in_subnets(svc.cluster_ip, m.destination_subnets)


def _tcp_destinations(mesh: Mesh, svc: Service, port: int, namespace: str,
                      source_labels: frozenset[Labels]) -> tuple[tuple[Destination, int], ...]:
    """(destination, weight) pairs of the first applicable VirtualService tcp route, else the
    service itself."""
    vs = mesh.virtual_service(svc.hostname, namespace)
    if vs is not None:
        for tr in vs.tcp:
            applies = not tr.matches or any(_l4_applies(m, svc, port, namespace, source_labels) for m in tr.matches)
            dests = weighted_split(tr.route)
            if applies and dests:
                return tuple((d.destination, d.weight) for d in dests)
    return ((Destination(svc.hostname, None, port), 100),)


def tcp_target(mesh: Mesh, svc: Service, port: int, namespace: str,
               source_labels: frozenset[Labels] = frozenset()) -> tuple[WeightedCluster, ...]:
    """Where TCP traffic for `svc` on `port` goes: the first applicable VirtualService tcp
    route (weighted), else the service's own cluster. A match applies when its port, source
    namespace, sourceLabels (one of `source_labels`, the selectors the clients match) and
    destinationSubnets (the service's cluster IP) all do."""
    dests = _tcp_destinations(mesh, svc, port, namespace, source_labels)
    if len(dests) == 1 and dests[0][0] == Destination(svc.hostname, None, port):
        return (WeightedCluster(outbound_cluster_name(port, mesh.registry_key(svc))),)
    return tuple(WeightedCluster(_destination_cluster(mesh, d, port, namespace), w) for d, w in dests)


def _destination_cluster(mesh: Mesh, dest: Destination, port: int, namespace: str) -> str:
    """The cluster a destination names for clients in `namespace` (the Service `Mesh.service`
    resolves its host to)."""
    svc = mesh.service(dest.host, namespace)
    dport = destination_port(dest, port, svc)
    return outbound_cluster_name(dport, mesh.registry_key(svc) if svc is not None else dest.host, dest.subset)


def tcp_hashes_source_ip(mesh: Mesh, svc: Service, port: int, namespace: str,
                         source_labels: frozenset[Labels] = frozenset()) -> bool:
    """Whether the TCP proxy for `svc` on `port` hashes on the client's IP: every cluster it
    sends to has a DestinationRule `consistentHash.useSourceIp` for clients in `namespace`
    (Envoy's tcp_proxy takes its hash key from its own `hash_policy`, not the cluster's)."""
    for dest, _ in _tcp_destinations(mesh, svc, port, namespace, source_labels):
        dport = destination_port(dest, port, mesh.service(dest.host, namespace))
        lb = effective_policy(mesh.destination_rule(dest.host, namespace, source_labels), dport,
                              dest.subset).load_balancer
        if lb is None or lb.consistent_hash is None or not lb.consistent_hash.use_source_ip:
            return False
    return True


def _tcp_sources(mesh: Mesh, svc: Service, namespace: str) -> tuple[SourceRef, ...]:
    vs = mesh.virtual_service(svc.hostname, namespace)
    return (svc.ref,) if vs is None or not vs.tcp else (svc.ref, vs.ref)


def _listener_spec(spec: OutboundListener, sources: tuple[SourceRef, ...]) -> ResourceSpec:
    return ResourceSpec(LISTENER, spec.name, build_outbound_listener, (spec,), sources)


def _bind_listener(
    mesh: Mesh, port: int, services: list[Service], namespace: str, address: str = "127.0.0.1",
    source_labels: frozenset[Labels] = frozenset(),
) -> ResourceSpec:
    http = [s for s in services if _port_of(s, port).protocol.is_http]
    other = [s for s in services if not _port_of(s, port).protocol.is_http]
    sniffed = any(_port_of(s, port).protocol is PortProtocol.UNKNOWN for s in services)
    route = route_config_name(port) if http or sniffed else None
    tcp = tcp_target(mesh, other[0], port, namespace, source_labels) if other else ()
    hashed = bool(other) and tcp_hashes_source_ip(mesh, other[0], port, namespace, source_labels)
    spec = OutboundListener(f"{address}_{port}", address, port, True, route, tcp, hashed)
    sources = tuple(s.ref for s in services) + (_tcp_sources(mesh, other[0], namespace) if other else ())
    return _listener_spec(spec, _refs(sources))


def _intercept_listeners(
    mesh: Mesh, port: int, services: list[Service], namespace: str,
    source_labels: frozenset[Labels] = frozenset(),
) -> list[ResourceSpec]:
    out: dict[str, ResourceSpec] = {}
    http = [s for s in services if _port_of(s, port).protocol.is_http]
    if http:
        spec = OutboundListener(f"0.0.0.0_{port}", "0.0.0.0", port, False, route_config_name(port))
        out[spec.name] = _listener_spec(spec, tuple(s.ref for s in http))
    for svc in services:
        protocol = _port_of(svc, port).protocol
        if protocol.is_http:
            continue
        ip = svc.cluster_ip if svc.cluster_ip and svc.cluster_ip.lower() != "none" else "0.0.0.0"
        route = route_config_name(port) if protocol is PortProtocol.UNKNOWN else None
        tcp = tcp_target(mesh, svc, port, namespace, source_labels)
        hashed = tcp_hashes_source_ip(mesh, svc, port, namespace, source_labels)
        # A ServiceEntry: one listener per address (CIDRs and no address: 0.0.0.0, warned at conversion).
        ips = entry_listener_addresses(svc) or (ip,)
        for ip in ips:
            spec = OutboundListener(f"{ip}_{port}", ip, port, False, route, tcp, hashed)
            out.setdefault(spec.name, _listener_spec(spec, _tcp_sources(mesh, svc, namespace)))
    return list(out.values())


def plan_outbound(
    mesh: Mesh,
    namespace: str,
    capture: CaptureMode,
    bind_address: str = "127.0.0.1",
    scope: Scope | None = None,
    client: ClientLocality | None = None,
    access_logs: tuple[AccessLogSink, ...] = (),
    access_log_sources: tuple[SourceRef, ...] = (),
) -> list[ResourceSpec]:
    """Clusters, endpoints, route configurations and listeners shared by every sidecar in
    `namespace` with capture mode `capture` (and scope), sorted by (type, name). In bind
    capture the outbound listeners bind `bind_address` (127.0.0.1 unless the proxy asks for
    another loopback address, so several sidecars can share one host). `scope`: the
    (hostname, port) pairs the proxies' Sidecar lets them receive; None: every service.
    `client`: the proxies' locality, for locality load balancing (None: unknown).
    `access_logs`: what the outbound listeners log (Telemetry accessLogging, CLIENT), by the
    Telemetries `access_log_sources`."""
    specs: list[ResourceSpec] = []
    by_port: Mapping[int, Sequence[Service]] = mesh.services_by_port
    hosts: Iterable[Hostname] = mesh.services
    classes = source_labels_of(scope)
    if scope is not None:
        scoped: dict[int, list[Service]] = {}
        for host, port in scope:
            svc = mesh.services.get(host)
            if svc is not None:
                scoped.setdefault(port, []).append(svc)
        by_port = scoped
        hosts = {s.hostname for on_port in scoped.values() for s in on_port}
    resolved: Mapping[Hostname, Service] = mesh.services
    if mesh.service_entries:  # ServiceEntry hosts: the one this namespace gets (Mesh.service), if any
        resolved = {h: svc for h in hosts if (svc := mesh.service(h, namespace)) is not None}
        by_port = _by_port(resolved.values(), scope)
        hosts = list(resolved)
    for host in sorted(hosts):
        specs += _cluster_specs(mesh, resolved[host], namespace, scope, capture, client)
    specs += _authorizer_specs(mesh, namespace, capture, scope, client)
    for port, on_port in sorted(by_port.items()):
        services = sorted(on_port, key=lambda s: s.hostname)
        routed = [s for s in services if _sniffed_or_http(_port_of(s, port))]
        if routed:
            specs.append(route_spec(mesh, port, routed, namespace, capture, source_labels=classes,
                                    registry_only=registry_only(scope)))
        if capture == "bind":
            specs.append(_bind_listener(mesh, port, services, namespace, bind_address, classes))
        else:
            specs += _intercept_listeners(mesh, port, services, namespace, classes)
    if capture == "intercept" and registry_only(scope):
        # Sidecar outboundTrafficPolicy REGISTRY_ONLY: nothing outside the scope passes.
        specs.append(ResourceSpec(CLUSTER, BLACKHOLE_CLUSTER, build_blackhole_cluster, (BLACKHOLE_CLUSTER,)))
        specs.append(ResourceSpec(LISTENER, VIRTUAL_OUTBOUND, build_virtual_outbound, (BLACKHOLE_CLUSTER,)))
    elif capture == "intercept":
        specs.append(
            ResourceSpec(CLUSTER, PASSTHROUGH_CLUSTER, build_passthrough_cluster, (PASSTHROUGH_CLUSTER,))
        )
        specs.append(ResourceSpec(LISTENER, VIRTUAL_OUTBOUND, build_virtual_outbound, (PASSTHROUGH_CLUSTER,)))
    if access_logs:
        specs = [replace(s, args=(replace(s.args[0], access_logs=access_logs),),
                         sources=_refs(s.sources, access_log_sources))
                 if s.build is build_outbound_listener else s for s in specs]
    return _unique(specs)


def _by_port(services: Iterable[Service], scope: Scope | None) -> dict[int, list[Service]]:
    """port -> the services (sorted by hostname) with that port (in `scope`, when given)."""
    out: dict[int, list[Service]] = {}
    for svc in sorted(services, key=lambda s: s.hostname):
        for sp in svc.ports:
            if scope is None or (svc.hostname, sp.port) in scope:
                out.setdefault(sp.port, []).append(svc)
    return out


def _unique(specs: list[ResourceSpec]) -> list[ResourceSpec]:
    """Sorted by (type, name); a resource several services share (a waypoint's tunnel) once."""
    return sorted({(s.type_url, s.name): s for s in reversed(specs)}.values(), key=lambda s: (s.type_url, s.name))


def plan_outbound_hosts(
    mesh: Mesh,
    namespace: str,
    capture: CaptureMode,
    hosts: Iterable[Hostname],
    scope: Scope | None = None,
    client: ClientLocality | None = None,
) -> list[ResourceSpec]:
    """The part of `plan_outbound(mesh, namespace, capture, ..., scope)` that depends on the
    endpoints of `hosts`: their clusters and load assignments (and, for services reached
    through the HBONE tunnel, its internal listeners). Everything else in the outbound plan
    (routes, listeners) reads services and routing rules, never endpoints."""
    specs: list[ResourceSpec] = []
    wanted = frozenset(hosts)
    for host in sorted(wanted):
        svc = mesh.service(host, namespace)
        if svc is not None:
            specs += _cluster_specs(mesh, svc, namespace, scope, capture, client)
    specs += _authorizer_specs(mesh, namespace, capture, scope, client, wanted)
    return _unique(specs)


def _authorizer_specs(mesh: Mesh, namespace: str, capture: CaptureMode, scope: Scope | None,
                      client: ClientLocality | None, hosts: frozenset[Hostname] | None = None
                      ) -> list[ResourceSpec]:
    """The outbound clusters (and endpoints) of the external authorizers of CUSTOM policies
    that the proxies' Sidecar scope leaves out: their ext_authz filters call them (`hosts`:
    only those of these hosts)."""
    if scope is None:
        return []
    out: list[ResourceSpec] = []
    for host, port in authorizer_targets(mesh.authorization_policies, mesh.mesh_config, mesh.services):
        if (host, port) in scope or (hosts is not None and host not in hosts):
            continue
        out += _authorizer_port_specs(mesh, mesh.services[host], port, namespace, capture, client)
    return out


def _authorizer_port_specs(mesh: Mesh, svc: Service, port: int, namespace: str, capture: CaptureMode,
                           client: ClientLocality | None = None) -> list[ResourceSpec]:
    """`svc`'s cluster specs for `port` only: `outbound|P|...` and, for ambient pods, the
    tunnel hop it needs (`tunnel|P|...` listener, `hbone|...` cluster and endpoints)."""
    others = {str(sp.port) for sp in svc.ports if sp.port != port}
    return [s for s in _cluster_specs(mesh, svc, namespace, None, capture, client)
            if s.name.split("|")[1] not in others]


def authorizer_cluster_specs(mesh: Mesh, namespace: str, host: str, port: int) -> list[ResourceSpec]:
    """The outbound cluster `outbound|<port>||<host>` (and what it needs: endpoints, or the
    HBONE hop to ambient pods) through which a waypoint of `namespace` calls the external
    authorizer of CUSTOM policies (`controlplane.translate.ambient`), as a sidecar would."""
    svc = mesh.services.get(Hostname(host))
    return [] if svc is None else _authorizer_port_specs(mesh, svc, port, namespace, "intercept")


# --------------------------------------------------------------------------- inbound


def _hbone_inbound(mesh: Mesh, wl: Workload, ports: list[Inbound], sec: InboundSecurity,
                   sources: tuple[SourceRef, ...]) -> list[ResourceSpec]:
    """15008: callers from ambient pods (and waypoints) tunnel to this sidecar's app. Its
    routes (targets, policies) come over RDS: a policy change reaches the next tunnel on a
    pooled HBONE connection at once (an inline change would leave that connection on the
    old filter chain, old policy, until it drains)."""
    targets = tunnel_targets(mesh, wl, {ib.port.port: ib.port.cluster for ib in ports})
    args = (HBONE_INBOUND, None, WORKLOAD_SECRET, mesh.trust_domain, None, ())
    rargs = (HBONE_INBOUND, mesh.trust_domain, targets, sec.authz)
    return [ResourceSpec(LISTENER, HBONE_INBOUND, build_hbone_inbound, args, (wl.ref,)),
            ResourceSpec(ROUTE, HBONE_INBOUND, build_hbone_routes, rargs, sources)]


HBONE_INBOUND = "inbound_hbone"


def plan_inbound(mesh: Mesh, proxy: ProxyMeta) -> list[ResourceSpec]:
    """The inbound clusters and listeners of the proxy's own workload, sorted by (type, name).
    In bind mode nothing is bound without a Pod IP to bind to."""
    wl = mesh.workload(proxy.namespace, proxy.workload)
    ports = inbound_ports(mesh, proxy, wl)
    sec, sec_sources = inbound_security(mesh, proxy, wl)
    app = dict(wl.annotations).get(APP_ADDRESS_ANNOTATION, DEFAULT_APP_ADDRESS) if wl else DEFAULT_APP_ADDRESS
    specs: list[ResourceSpec] = []
    for jc in jwks_clusters(sec.jwt):  # where Envoy fetches RequestAuthentication keys
        specs.append(ResourceSpec(CLUSTER, jc.name, build_jwks_cluster, (jc,), sec_sources))
    for ib in ports:
        p = ib.port
        args = (p.cluster, app, p.port, p.protocol)
        specs.append(ResourceSpec(CLUSTER, p.cluster, build_inbound_cluster, args, ib.sources))
    if proxy.capture == "intercept":
        name = INBOUND_PASSTHROUGH_CLUSTER
        specs.append(ResourceSpec(CLUSTER, name, build_passthrough_cluster, (name,)))
        blackhole = None
        if sec.mode != "STRICT" and any(m == "STRICT" for _, m in sec.ports):
            blackhole = BLACKHOLE_CLUSTER  # STRICT ports must not fall through to the plaintext default
            specs.append(ResourceSpec(CLUSTER, blackhole, build_blackhole_cluster, (blackhole,)))
        all_sources = _refs(*(ib.sources for ib in ports), sec_sources)
        args2 = (tuple(ib.port for ib in ports), name, sec, blackhole)
        specs.append(ResourceSpec(LISTENER, VIRTUAL_INBOUND, build_virtual_inbound, args2, all_sources))
        if wl is not None and wl.ip:
            specs += _hbone_inbound(mesh, wl, ports, sec, all_sources)
    elif wl is not None and wl.ip:
        for ib in ports:
            lname = f"inbound_{wl.ip}_{ib.port.port}"
            port_sec = replace(sec, mode=sec.for_port(ib.port.port), ports=())
            args3 = (lname, wl.ip, ib.port, port_sec)
            specs.append(ResourceSpec(LISTENER, lname, build_inbound_listener, args3, _refs(ib.sources, sec_sources)))
    return sorted(specs, key=lambda s: (s.type_url, s.name))
