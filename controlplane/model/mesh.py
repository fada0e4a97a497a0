"""The whole mesh as one immutable value plus the lookups translation needs. Pure, no I/O."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from controlplane.model.ir import (
    DEFAULT_ROOT_NAMESPACE,
    DEFAULT_TRUST_DOMAIN,
    AuthorizationPolicy,
    DestinationRule,
    EndpointSet,
    Hostname,
    Issue,
    Namespace,
    PeerAuthentication,
    Service,
    Sidecar,
    VirtualService,
    Workload,
    labels_match,
)

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

    # Derived indexes, computed once in build_mesh().
    vs_by_host: Mapping[Hostname, VirtualService] = field(default_factory=dict)
    dr_by_host: Mapping[Hostname, DestinationRule] = field(default_factory=dict)
    services_by_port: Mapping[int, tuple[Service, ...]] = field(default_factory=dict)
    sidecars_by_namespace: Mapping[str, tuple[Sidecar, ...]] = field(default_factory=dict)
    services_by_namespace: Mapping[str, tuple[Service, ...]] = field(default_factory=dict)
    # (namespace, key, value) of a selector's first pair -> services: a pod can only match a
    # selector whose first pair it carries, so selection looks at a few candidates, not all.
    services_by_selector_head: Mapping[tuple[str, str, str], tuple[Service, ...]] = field(default_factory=dict)

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
    vs_by_host: dict[Hostname, VirtualService] = {}
    for vs in virtual_services:
        for h in vs.hosts:
            vs_by_host.setdefault(h, vs)
    dr_by_host: dict[Hostname, DestinationRule] = {}
    # Prefer a DestinationRule in the service's own namespace, then the first by name.
    for dr in destination_rules:
        svc = services.get(dr.host)
        cur = dr_by_host.get(dr.host)
        if cur is None or (svc is not None and dr.namespace == svc.namespace and cur.namespace != svc.namespace):
            dr_by_host[dr.host] = dr
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
        dr_by_host=dr_by_host,
        services_by_port={p: tuple(v) for p, v in sorted(by_port.items())},
        services_by_namespace={ns: tuple(v) for ns, v in by_ns.items()},
        services_by_selector_head={k: tuple(v) for k, v in by_head.items()},
        sidecars_by_namespace={ns: tuple(v) for ns, v in sorted(sidecars_by_ns.items())},
    )
