"""Which security policies apply to a workload, resolved the way Istio does. Pure, no I/O.

- PeerAuthentication: a policy with a workload selector in the workload's namespace, else
  the namespace-wide policy (no selector), else the mesh-wide policy (no selector, in the
  root namespace); a mode of UNSET inherits from the next level, and with none set the mode
  is PERMISSIVE. Port-level modes come only from the workload-selector policy; UNSET there
  inherits the workload's mode. When several policies compete at one level the first by
  name wins (validation reports the conflict).
- AuthorizationPolicy: every policy in the workload's namespace whose selector matches its
  labels (no selector: all of them), plus every such policy in the root namespace, which
  applies to workloads in all namespaces.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from controlplane.model.ir import (
    AuthorizationPolicy,
    AuthzOperation,
    AuthzRule,
    Labels,
    MtlsMode,
    PeerAuthentication,
    PortProtocol,
    Service,
    SourceRef,
    Workload,
    labels_match,
)
from controlplane.model.mesh import Mesh

DEFAULT_MTLS_MODE: MtlsMode = "PERMISSIVE"


@dataclass(frozen=True, slots=True)
class MtlsPolicy:
    """The mTLS modes in force for one workload: `mode` for every port without an override
    in `ports` ((port, mode) pairs, sorted). Modes are never UNSET here."""

    mode: MtlsMode = DEFAULT_MTLS_MODE
    ports: tuple[tuple[int, MtlsMode], ...] = ()
    sources: tuple[SourceRef, ...] = ()

    def for_port(self, port: int) -> MtlsMode:
        return next((m for p, m in self.ports if p == port), self.mode)


def peer_authentication_levels(
    mesh: Mesh, namespace: str, labels: Labels
) -> tuple[PeerAuthentication | None, PeerAuthentication | None, PeerAuthentication | None]:
    """(workload-selector, namespace-wide, mesh-wide) PeerAuthentication for a workload."""
    workload = namespace_wide = mesh_wide = None
    for pa in mesh.peer_authentications:  # sorted by (namespace, name): the first wins
        if pa.namespace == namespace:
            if pa.selector and workload is None and labels_match(pa.selector, labels):
                workload = pa
            elif not pa.selector and namespace_wide is None:
                namespace_wide = pa
        if pa.namespace == mesh.root_namespace and not pa.selector and mesh_wide is None:
            mesh_wide = pa
    if namespace == mesh.root_namespace:
        mesh_wide = None  # the namespace-wide policy of the root namespace is the mesh-wide one
    return workload, namespace_wide, mesh_wide


def effective_mtls(mesh: Mesh, namespace: str, labels: Labels) -> MtlsPolicy:
    levels = [pa for pa in peer_authentication_levels(mesh, namespace, labels) if pa is not None]
    mode = next((pa.mode for pa in levels if pa.mode != "UNSET"), DEFAULT_MTLS_MODE)
    workload = levels[0] if levels and levels[0].selector else None
    ports: tuple[tuple[int, MtlsMode], ...] = ()
    if workload is not None:
        ports = tuple((p, mode if m == "UNSET" else m) for p, m in workload.port_level)
    return MtlsPolicy(mode, ports, tuple(pa.ref for pa in levels))


def authorization_policy_applies(policy: AuthorizationPolicy, root_namespace: str, namespace: str,
                                 labels: Labels) -> bool:
    if policy.target_refs:  # attached to a waypoint or Service: enforced by the waypoint
        return False
    if policy.namespace != namespace and policy.namespace != root_namespace:
        return False
    return labels_match(policy.selector, labels)


def waypoint_policies(mesh: Mesh, namespace: str, waypoint: str, services: tuple[str, ...]
                      ) -> tuple[AuthorizationPolicy, ...]:
    """The policies a waypoint enforces for `services` (names in `namespace`): those attached
    to the waypoint itself (`kind: Gateway`) or to one of the services, in (namespace, name)
    order."""
    wanted = {("Gateway", waypoint), *(("Service", s) for s in services)}
    return tuple(ap for ap in mesh.authorization_policies
                 if ap.namespace == namespace and wanted & set(ap.target_refs))


def authorization_policies_for(mesh: Mesh, namespace: str, labels: Labels) -> tuple[AuthorizationPolicy, ...]:
    """The AuthorizationPolicies that apply to a workload, sorted by (namespace, name)."""
    return tuple(
        ap
        for ap in mesh.authorization_policies
        if authorization_policy_applies(ap, mesh.root_namespace, namespace, labels)
    )


HTTP_ONLY_OPERATION_FIELDS = ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")
HTTP_ONLY_SOURCE_FIELDS = ("requestPrincipals", "notRequestPrincipals")


def is_http_only_key(key: str) -> bool:
    """`when` keys only an HTTP request has (headers, JWT claims)."""
    return key.startswith(("request.headers[", "request.auth."))


def http_only_attributes(rule: AuthzRule) -> tuple[str, ...]:
    """The HTTP-only attributes `rule` uses (e.g. `methods`, `request.headers[x-user]`), in
    the order first used: on a TCP connection they cannot be evaluated."""
    found: list[str] = []
    for op in rule.operations:
        for name, attr in zip(HTTP_ONLY_OPERATION_FIELDS,
                              ("hosts", "not_hosts", "methods", "not_methods", "paths", "not_paths"), strict=True):
            if getattr(op, attr):
                found.append(name)
    for src in rule.sources:
        if src.request_principals:
            found.append("requestPrincipals")
        if src.not_request_principals:
            found.append("notRequestPrincipals")
    found += [c.key for c in rule.conditions if is_http_only_key(c.key)]
    return tuple(dict.fromkeys(found))


def rule_ports(rule: AuthzRule) -> frozenset[int] | None:
    """The destination ports `rule` can match, or None when it is not limited to some."""
    ports: frozenset[int] | None = None
    if rule.operations and all(op.ports for op in rule.operations):
        ports = frozenset(p for op in rule.operations for p in op.ports)
    for cond in rule.conditions:
        if cond.key == "destination.port" and cond.values:
            allowed = frozenset(int(v) for v in cond.values)
            ports = allowed if ports is None else ports & allowed
    return ports


def served_ports(mesh: Mesh, wl: Workload) -> dict[int, PortProtocol]:
    """The ports a Pod serves (service target ports, named ones resolved through its container
    ports) and their protocol; the first service by hostname decides, as in translation."""
    out: dict[int, PortProtocol] = {}
    for svc in sorted(mesh.services_selecting(wl.namespace, wl.labels), key=lambda s: s.hostname):
        for sp in svc.ports:
            tp = sp.target_port
            if isinstance(tp, str):
                tp = int(tp) if tp.isdigit() else next((c.port for c in wl.ports if c.name == tp), 0)
            if tp:
                out.setdefault(tp, sp.protocol)
    return out


def _op_for_port(op: AuthzOperation, ports: tuple[int, ...]) -> AuthzOperation | None:
    if (op.ports and not set(ports) & set(op.ports)) or set(ports) & set(op.not_ports):
        return None
    return replace(op, ports=(), not_ports=())


def _rule_for_port(rule: AuthzRule, ports: tuple[int, ...]) -> AuthzRule | None:
    """`rule` with its port attributes decided for a destination known by `ports` (e.g. a
    service port and its target port): None when it cannot match there."""
    ops = rule.operations
    if ops:
        kept = tuple(o for o in (_op_for_port(op, ports) for op in ops) if o is not None)
        if not kept:
            return None
        ops = kept
    names = {str(p) for p in ports}
    conds = []
    for c in rule.conditions:
        if c.key == "destination.port":
            if (c.values and not names & set(c.values)) or names & set(c.not_values):
                return None
            continue
        conds.append(c)
    return replace(rule, operations=ops, conditions=tuple(conds))


def policies_for_port(policies: tuple[AuthorizationPolicy, ...], *ports: int) -> tuple[AuthorizationPolicy, ...]:
    """The policies as they apply to connections for a destination port known as any of
    `ports`, with port attributes already decided. Used where the port Envoy sees is not the
    app's port (the tunnel's 15008, a waypoint's internal listener): a rule that cannot match
    there is dropped (an ALLOW policy left without rules still applies, and so denies)."""
    out = []
    for ap in policies:
        rules = tuple(r for r in (_rule_for_port(rule, ports) for rule in ap.rules) if r is not None)
        out.append(replace(ap, rules=rules))
    return tuple(out)


def orphaned_policies(mesh: Mesh, wl: Workload, waypoint_of: Callable[[Service], bool]
                      ) -> tuple[AuthorizationPolicy, ...]:
    """Policies attached (targetRefs) to a service selecting `wl`, or to the waypoint such a
    service names, while that service has no waypoint to enforce them (`waypoint_of(svc)`
    False): the workload's own proxy must enforce them, failing closed on what it cannot
    evaluate."""
    wanted: set[tuple[str, str]] = set()
    for svc in mesh.services_selecting(wl.namespace, wl.labels):
        if waypoint_of(svc):
            continue
        wanted.add(("Service", svc.name))
        from controlplane.model.ambient import waypoint_name

        named = waypoint_name(mesh, svc)  # the service's own label, else its namespace's
        if named:
            wanted.add(("Gateway", named))
    return tuple(ap for ap in mesh.authorization_policies
                 if ap.namespace == wl.namespace and wanted & set(ap.target_refs))
