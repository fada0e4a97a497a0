"""The whole mesh as one immutable value plus the lookups translation needs. Pure, no I/O.

DestinationRule lookup (`Mesh.destination_rule`), as Istio documents it: for a client in
namespace C calling host H, the first rule for H (by name) in C, else in H's own
namespace, else in the root namespace, each only when its `exportTo` makes it visible in C.
A rule in any other namespace applies to clients in that namespace only. A rule with a
`workloadSelector` applies only to clients of its own namespace whose labels include the
selector (and comes before that namespace's rules without one); the caller passes the
selectors its client matches. `dr_by_host` is the rule (without a workloadSelector) a
client in the service's own namespace sees (what status pages show).

VirtualService lookup (`Mesh.virtual_service`), as Istio's SidecarScope does it: a proxy in
namespace C sees only the VirtualServices exported to C, and for one host takes the first of
them in this order (istio pilot `PushContext.VirtualServicesForGateway` / the sidecar's
`SelectVirtualServices` append "privateByNamespaceAndGateway" [C's own, not public], then
"exportedToNamespaceByGateway" [exported to C by name], then "publicByGateway"; "Favor
same-namespace ... to give the consumer override preference"); within each class Istio goes
oldest first, Meshline by (namespace, name). So a private (`exportTo: ["."]`) VirtualService
in namespace aaa changes only what clients in aaa get; every other namespace still gets the
public one (issues 16/18). `vs_by_host` is the VirtualService a client in the service's own
namespace sees (else, no Service there, the first public one: what status pages show).
Gateway API routes attached to a Service join as VirtualService values (`with_route_tables`,
controlplane.model.gamma): the producer routes' table public, each namespace's consumer
routes' table exported to that namespace, each ahead of the VirtualServices of its class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from controlplane.model.gwapi import GatewayRoute, ObjectStatus, ParentStatus, ReferenceGrant
from controlplane.model.ir import (
    DEFAULT_ROOT_NAMESPACE,
    DEFAULT_TRUST_DOMAIN,
    AuthorizationPolicy,
    DestinationRule,
    EndpointSet,
    Gateway,
    Hostname,
    Issue,
    Labels,
    Namespace,
    PeerAuthentication,
    RequestAuthentication,
    Service,
    ServiceEntry,
    Sidecar,
    Telemetry,
    TlsCredential,
    VirtualService,
    Workload,
    WorkloadEntry,
    labels_match,
)
from controlplane.model.meshconfig import NO_MESH_CONFIG, MeshConfig

_EMPTY: Mapping[str, object] = MappingProxyType({})


@dataclass(frozen=True, slots=True, eq=False)
class Mesh:
    """A consistent view of every valid object. Mappings are never mutated after creation.

    `root_namespace` holds mesh-wide security policy; `trust_domain` is the SPIFFE trust
    domain of workload identities (both are settings, carried here so that translation
    reads them from its input like everything else)."""

    namespaces: Mapping[str, Namespace] = field(default_factory=dict)
    services: Mapping[Hostname, Service] = field(default_factory=dict)
    endpoints: Mapping[Hostname, tuple[EndpointSet, ...]] = field(default_factory=dict)
    workloads: Mapping[tuple[str, str], Workload] = field(default_factory=dict)
    virtual_services: tuple[VirtualService, ...] = ()
    destination_rules: tuple[DestinationRule, ...] = ()
    issues: tuple[Issue, ...] = ()
    peer_authentications: tuple[PeerAuthentication, ...] = ()
    authorization_policies: tuple[AuthorizationPolicy, ...] = ()
    root_namespace: str = DEFAULT_ROOT_NAMESPACE
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    sidecars: tuple[Sidecar, ...] = ()  # sorted by (namespace, name)
    mesh_config: MeshConfig = NO_MESH_CONFIG  # `--mesh-config`: extension providers (CUSTOM authorization)
    # (namespace, name) -> TLS Secret (DestinationRule credentialName); keys never logged
    credentials: Mapping[tuple[str, str], TlsCredential] = field(default_factory=dict)
    # Gateway API routes (GAMMA: their VirtualService values are in `vs_by_host`, not in
    # `virtual_services`; controlplane.model.gamma), ReferenceGrants, and each route's
    # status: (kind, namespace, name) -> the status.parents entries Meshline owns
    gateway_routes: tuple[GatewayRoute, ...] = ()
    reference_grants: tuple[ReferenceGrant, ...] = ()
    route_status: Mapping[tuple[str, str, str], tuple[ParentStatus, ...]] = field(default_factory=dict)
    # store key -> the status Meshline owns of Gateway API Gateways (class meshline) and
    # GatewayClasses (controlplane.model.gwgateways); their proxies' IR is in `gateways`
    gateway_status: Mapping[tuple[str, str, str], ObjectStatus] = field(default_factory=dict)
    # Istio Gateways by "ns/name", and the VirtualServices bound to some Gateway (whole, with
    # their `gateways`; `virtual_services` holds the views bound to `mesh`: model.gateways)
    gateways: Mapping[str, Gateway] = field(default_factory=dict)
    gateway_virtual_services: tuple[VirtualService, ...] = ()
    # JWT rules (controlplane.model.authn) and access logging (controlplane.model.telemetry),
    # each sorted by (namespace, name)
    request_authentications: tuple[RequestAuthentication, ...] = ()
    telemetries: tuple[Telemetry, ...] = ()
    # ServiceEntries (sorted by (namespace, name); their hosts are in `services`, see
    # controlplane.model.serviceentry) and WorkloadEntries
    service_entries: tuple[ServiceEntry, ...] = ()
    workload_entries: tuple[WorkloadEntry, ...] = ()
    # host -> every ServiceEntry Service of a host several entries declare, oldest first
    # (serviceentry.age_order): `service` picks one per client namespace (model.serviceentry)
    entry_candidates: Mapping[Hostname, tuple[Service, ...]] = field(default_factory=dict)

    # Derived indexes, computed once in build_mesh().
    vs_by_host: Mapping[Hostname, VirtualService] = field(default_factory=dict)
    # host -> every mesh VirtualService for it, sorted by (namespace, name) (`virtual_service`)
    vss_by_host: Mapping[Hostname, tuple[VirtualService, ...]] = field(default_factory=dict)
    dr_by_host: Mapping[Hostname, DestinationRule] = field(default_factory=dict)
    # host -> every DestinationRule for it, sorted by (namespace, name)
    drs_by_host: Mapping[Hostname, tuple[DestinationRule, ...]] = field(default_factory=dict)
    # (sourceLabels selector, VirtualService using it) for every http/tcp match that has one,
    # of the VirtualServices that win their hosts for some namespace; sorted, each pair once
    source_selectors: tuple[tuple[Labels, VirtualService], ...] = ()
    # (workloadSelector, DestinationRule) of every rule that has one, sorted by (namespace, name)
    dr_selectors: tuple[tuple[Labels, DestinationRule], ...] = ()
    services_by_port: Mapping[int, tuple[Service, ...]] = field(default_factory=dict)
    sidecars_by_namespace: Mapping[str, tuple[Sidecar, ...]] = field(default_factory=dict)
    services_by_namespace: Mapping[str, tuple[Service, ...]] = field(default_factory=dict)
    # (namespace, key, value) of a selector's first pair -> services: a pod can only match a
    # selector whose first pair it carries, so selection looks at a few candidates, not all.
    services_by_selector_head: Mapping[tuple[str, str, str], tuple[Service, ...]] = field(default_factory=dict)

    def destination_rule(self, host: Hostname, client_namespace: str,
                         client_selectors: frozenset[Labels] = frozenset()) -> DestinationRule | None:
        """The DestinationRule for `host` that applies to clients in `client_namespace`
        (Istio's lookup order: the client's namespace, the service's, the root namespace).
        `client_selectors`: the workloadSelectors the client's labels match."""
        rules = self.drs_by_host.get(host)
        if not rules:
            return None
        services = self.services
        if host in self.entry_candidates:  # the entry this namespace gets is the service's namespace
            svc = self.service(host, client_namespace)
            services = {host: svc} if svc is not None else {}
        return _lookup(rules, host, client_namespace, self.root_namespace, services, client_selectors)

    def virtual_service(self, host: Hostname, client_namespace: str) -> VirtualService | None:
        """The VirtualService for `host` that applies to clients in `client_namespace` (the
        module docstring: exportTo, then the client's own, then exported to it by name, then
        public). The translators' one way to find a host's VirtualService."""
        candidates = self.vss_by_host.get(host)
        if candidates is None:  # a host only `vs_by_host` knows (a Gateway API route's)
            vs = self.vs_by_host.get(host)
            return vs if vs is not None and visible_to(vs.export_to, vs.namespace, client_namespace) else None
        return _vs_lookup(candidates, client_namespace)

    def service(self, host: Hostname, client_namespace: str) -> Service | None:
        """The Service clients in `client_namespace` reach as `host`: a Kubernetes Service, else
        the ServiceEntry host Istio's lookup gives them (`entry_lookup`: their namespace's own,
        exported to them by name, exported everywhere), None when none is visible to them.
        The translators' one way to resolve a hostname for a client namespace."""
        candidates = self.entry_candidates.get(host)
        if candidates is not None:
            return entry_lookup(candidates, client_namespace)
        svc = self.services.get(host)
        if svc is None or svc.entry is None or visible_to(svc.entry.export_to, svc.namespace, client_namespace):
            return svc
        return None

    def registry_key(self, svc: Service) -> Hostname:
        """The key of `svc`'s endpoints in `endpoints` and the host part of its cluster names:
        its hostname, except for a ServiceEntry host that another entry of the same host holds
        in `services` (`entry_key`)."""
        held = self.services.get(svc.hostname)
        if held is svc or held == svc or svc.entry is None:
            return svc.hostname
        return entry_key(svc)

    def workload(self, namespace: str, name: str | None) -> Workload | None:
        if not name:
            return None
        return self.workloads.get((namespace, name))

    def services_selecting(self, namespace: str, labels: tuple[tuple[str, str], ...]) -> tuple[Service, ...]:
        """Services in `namespace` whose (non-empty) selector matches `labels`."""
        found: dict[Hostname, Service] = {}
        for k, v in labels:
            for s in self.services_by_selector_head.get((namespace, k, v), ()):
                if labels_match(s.selector, labels):
                    found[s.hostname] = s
        return tuple(found[h] for h in sorted(found))


@dataclass(frozen=True, slots=True, eq=False)
class EndpointDelta:
    """A mesh equals `base` except for the endpoints of `hosts` (the store's fast path for
    EndpointSlice-only changes; snapshot building then re-plans just those hosts)."""

    base: Mesh
    hosts: frozenset[str]


def build_mesh(
    namespaces: Mapping[str, Namespace],
    services: Mapping[Hostname, Service],
    endpoints: Mapping[Hostname, tuple[EndpointSet, ...]],
    workloads: Mapping[tuple[str, str], Workload],
    virtual_services: tuple[VirtualService, ...],
    destination_rules: tuple[DestinationRule, ...],
    issues: tuple[Issue, ...] = (),
    *,
    peer_authentications: tuple[PeerAuthentication, ...] = (),
    authorization_policies: tuple[AuthorizationPolicy, ...] = (),
    root_namespace: str = DEFAULT_ROOT_NAMESPACE,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    sidecars: tuple[Sidecar, ...] = (),
) -> Mesh:
    """Assemble a Mesh and its indexes. VirtualServices/DestinationRules (and the security
    policies) must be sorted by (namespace, name); when several claim one host, the first
    wins (conflicts are reported by validation, not here). Sidecars too must be sorted by
    (namespace, name)."""
    vss: dict[Hostname, list[VirtualService]] = {}
    for vs in virtual_services:
        for h in dict.fromkeys(vs.hosts):
            vss.setdefault(h, []).append(vs)
    vss_by_host = {h: tuple(v) for h, v in vss.items()}
    vs_by_host: dict[Hostname, VirtualService] = {}
    for host, candidates in vss_by_host.items():
        svc = services.get(host)
        shown = _vs_lookup(candidates, svc.namespace) if svc is not None else None
        vs_by_host[host] = shown or next((v for v in candidates if _is_public(v.export_to)), candidates[0])
    drs: dict[Hostname, list[DestinationRule]] = {}
    for dr in destination_rules:
        drs.setdefault(dr.host, []).append(dr)
    drs_by_host = {h: tuple(sorted(v, key=lambda d: (d.namespace, d.name))) for h, v in drs.items()}
    dr_by_host: dict[Hostname, DestinationRule] = {}
    for host, rules in drs_by_host.items():
        svc = services.get(host)
        # The service's own namespace as the client, then (no Service) the first rule by name.
        seen = _lookup(rules, host, svc.namespace if svc else None, root_namespace, services)
        plain = tuple(r for r in rules if not r.workload_selector)
        if seen is not None:
            dr_by_host[host] = seen
        elif svc is None and plain:
            dr_by_host[host] = plain[0]
    selectors: dict[tuple[Labels, str, str], tuple[Labels, VirtualService]] = {}
    for vs in dict.fromkeys(v for c in vss_by_host.values() for v in c):
        for hr in vs.http:
            for m in hr.matches:
                if m.source_labels:
                    selectors[(m.source_labels, vs.namespace, vs.name)] = (m.source_labels, vs)
        for tr in vs.tcp:
            for lm in tr.matches:
                if lm.source_labels:
                    selectors[(lm.source_labels, vs.namespace, vs.name)] = (lm.source_labels, vs)
    by_port: dict[int, list[Service]] = {}
    by_ns: dict[str, list[Service]] = {}
    by_head: dict[tuple[str, str, str], list[Service]] = {}
    for host in sorted(services):
        svc = services[host]
        by_ns.setdefault(svc.namespace, []).append(svc)
        if svc.selector:
            by_head.setdefault((svc.namespace, *svc.selector[0]), []).append(svc)
        for p in svc.ports:
            by_port.setdefault(p.port, []).append(svc)
    sidecars_by_ns: dict[str, list[Sidecar]] = {}
    for sc in sidecars:
        sidecars_by_ns.setdefault(sc.namespace, []).append(sc)
    return Mesh(
        namespaces=namespaces,
        services=services,
        endpoints=endpoints,
        workloads=workloads,
        virtual_services=virtual_services,
        destination_rules=destination_rules,
        issues=issues,
        peer_authentications=peer_authentications,
        authorization_policies=authorization_policies,
        root_namespace=root_namespace,
        trust_domain=trust_domain,
        sidecars=sidecars,
        vs_by_host=vs_by_host,
        vss_by_host=vss_by_host,
        dr_by_host=dr_by_host,
        drs_by_host=drs_by_host,
        source_selectors=tuple(selectors[k] for k in sorted(selectors)),
        dr_selectors=tuple((dr.workload_selector, dr) for dr in sorted(destination_rules,
                                                                      key=lambda d: (d.namespace, d.name))
                           if dr.workload_selector),
        services_by_port={p: tuple(v) for p, v in sorted(by_port.items())},
        services_by_namespace={ns: tuple(v) for ns, v in by_ns.items()},
        services_by_selector_head={k: tuple(v) for k, v in by_head.items()},
        sidecars_by_namespace={ns: tuple(v) for ns, v in sorted(sidecars_by_ns.items())},
    )


def entry_key(svc: Service) -> Hostname:
    """The registry key (and cluster host part) of a ServiceEntry host `svc` that is not the
    one `Mesh.services` holds for its hostname: `<host>~<namespace>/<name>`
    (controlplane.model.serviceentry)."""
    return Hostname(f"{svc.hostname}~{svc.namespace}/{svc.name}")


def entry_lookup(candidates: Sequence[Service], client_namespace: str) -> Service | None:
    """The ServiceEntry host of `candidates` (one host's, oldest first: serviceentry.age_order) that
    clients in `client_namespace` get, in Istio's class order: private to their namespace,
    exported to it by name, exported everywhere; the first of the best class."""
    best: tuple[int, Service] | None = None
    for svc in candidates:
        export = svc.entry.export_to if svc.entry is not None else ()
        if not visible_to(export, svc.namespace, client_namespace):
            continue
        rank = 2 if _is_public(export) else 0 if svc.namespace == client_namespace else 1
        if rank == 0:
            return svc
        if best is None or rank < best[0]:
            best = (rank, svc)
    return best[1] if best is not None else None


def visible_to(export_to: Sequence[str], owner_namespace: str, client_namespace: str) -> bool:
    """Istio's exportTo (VirtualService, DestinationRule, ...): empty or `*` exports everywhere,
    `.` to the owner's namespace, a namespace name to it, `~` nowhere. The one owner of the
    rule (translate.names re-exports it)."""
    if _is_public(export_to):
        return True
    if "." in export_to and owner_namespace == client_namespace:
        return True
    return client_namespace in export_to


def _is_public(export_to: Sequence[str]) -> bool:
    return not export_to or "*" in export_to


def vs_lookup(candidates: Sequence[VirtualService], client_namespace: str) -> VirtualService | None:
    """The VirtualService of `candidates` (one host's, in precedence order) that applies to
    clients in `client_namespace` (`Mesh.virtual_service`'s rule, for callers that weigh a
    subset of the candidates)."""
    return _vs_lookup(candidates, client_namespace)


def with_route_tables(mesh: Mesh, tables: Sequence[VirtualService]) -> Mesh:
    """`mesh` with the Gateway API route tables `tables` (VirtualService values from
    controlplane.model.gamma, one host each) joining their hosts' candidates, before the
    VirtualServices: within one visibility class a route comes first; a consumer route
    (exported to its own namespace only) ranks as that namespace's own. `vs_by_host` is
    recomputed for those hosts (what a client in the Service's namespace gets)."""
    added: dict[Hostname, list[VirtualService]] = {}
    for vs in tables:
        for h in vs.hosts:
            added.setdefault(h, []).append(vs)
    if not added:
        return mesh
    vss_by_host = dict(mesh.vss_by_host)
    vs_by_host = dict(mesh.vs_by_host)
    for host, routes in added.items():
        candidates = (*routes, *mesh.vss_by_host.get(host, ()))
        vss_by_host[host] = candidates
        svc = mesh.services.get(host)
        shown = _vs_lookup(candidates, svc.namespace) if svc is not None else None
        vs_by_host[host] = shown or next((v for v in candidates if _is_public(v.export_to)), candidates[0])
    return replace(mesh, vss_by_host=vss_by_host, vs_by_host=vs_by_host)


def _vs_lookup(candidates: Sequence[VirtualService], client_namespace: str) -> VirtualService | None:
    """The first visible of `candidates` (sorted by (namespace, name)): the client namespace's
    own non-public ones, then those exported to it by name, then the public ones (Istio's
    private / exportedToNamespace / public classes; the module docstring)."""
    best: tuple[int, VirtualService] | None = None
    for vs in candidates:
        if not visible_to(vs.export_to, vs.namespace, client_namespace):
            continue
        rank = 2 if _is_public(vs.export_to) else 0 if vs.namespace == client_namespace else 1
        if rank == 0:
            return vs
        if best is None or rank < best[0]:
            best = (rank, vs)
    return best[1] if best is not None else None


def _lookup(rules: tuple[DestinationRule, ...], host: Hostname, client_namespace: str | None,
            root_namespace: str, services: Mapping[Hostname, Service],
            client_selectors: frozenset[Labels] = frozenset()) -> DestinationRule | None:
    if client_namespace is None:
        return None
    for dr in rules:  # a workloadSelector rule of the client's namespace that selects it
        if dr.workload_selector and dr.namespace == client_namespace and dr.workload_selector in client_selectors:
            return dr
    svc = services.get(host)
    order = [client_namespace, *([svc.namespace] if svc else []), root_namespace]
    for ns in dict.fromkeys(order):
        for dr in rules:
            if (dr.namespace == ns and not dr.workload_selector
                    and visible_to(dr.export_to, dr.namespace, client_namespace)):
                return dr
    return None
