"""Cross-object checks over a whole `Mesh`. Pure, no I/O.

`convert` validates each object on its own; `check_mesh` finds the problems only visible
across objects: conflicting VirtualServices, hosts and destinations with no Service,
subsets no DestinationRule defines, ports a Service lacks, subsets that select no Pod,
duplicate DestinationRules, competing PeerAuthentications, AuthorizationPolicy rules
with HTTP-only attributes that land on a workload's TCP ports, and Sidecars that compete
(two namespace defaults: an error; two selecting one Pod: a warning) or name a host no
Service has; `validate_istio` adds the checks for where Istio YAML could mean something
else in Meshline (root namespace, sourceLabels, destinationSubnets, ...). It only reports: the Mesh already resolves conflicts
(first VirtualService by (namespace, name) wins a host; see `build_mesh`). Issues come
out in a deterministic order (by object, then by field).
"""

from __future__ import annotations

from collections.abc import Iterator

from controlplane.model.ambient import ambient_entry_issues
from controlplane.model.authn import check_jwt_conditions, check_request_authentications
from controlplane.model.gamma import gamma_issues
from controlplane.model.gateway_merge import check_merges
from controlplane.model.gwgateways import gateway_issues
from controlplane.model.ir import (
    AuthorizationPolicy,
    Destination,
    DestinationRule,
    Hostname,
    Issue,
    PeerAuthentication,
    PortProtocol,
    Service,
    Sidecar,
    Subset,
    VirtualService,
    Workload,
    labels_match,
    service_fqdn,
)
from controlplane.model.mesh import Mesh, vs_lookup
from controlplane.model.meshconfig import check_custom_policies
from controlplane.model.policy import (
    authorization_policy_applies,
    http_only_attributes,
    peer_authentication_levels,
    rule_ports,
    served_ports,
)
from controlplane.model.scope import egress_host_matches, namespace_default, selecting_sidecar
from controlplane.model.serviceentry import check_service_entries
from controlplane.model.telemetry import check_telemetries
from controlplane.model.validate_gateway import check_gateways
from controlplane.model.validate_istio import check_istio_fidelity
from controlplane.model.validate_tls import check_credentials


def check_mesh(mesh: Mesh) -> tuple[Issue, ...]:
    """Every cross-object issue of `mesh` (errors and warnings)."""
    vss = sorted(mesh.virtual_services, key=lambda v: (v.namespace, v.name))
    drs = sorted(mesh.destination_rules, key=lambda d: (d.namespace, d.name))
    issues: list[Issue] = []
    for vs in vss:
        issues.extend(_host_conflicts(mesh, vs))
        issues.extend(_unknown_vs_hosts(mesh, vs))
        issues.extend(_destinations(mesh, vs))
    issues.extend(_duplicate_rules(mesh, drs))
    for dr in drs:
        issues.extend(_rule_checks(mesh, dr))
    issues.extend(_peer_authn_conflicts(mesh))
    for ap in mesh.authorization_policies:
        issues.extend(_l7_on_tcp(mesh, ap))
        issues.extend(_l7_without_waypoint(mesh, ap))
    issues.extend(_sidecar_conflicts(mesh))
    for sc in mesh.sidecars:
        issues.extend(_sidecar_hosts(mesh, sc))
    issues.extend(check_istio_fidelity(mesh))
    issues.extend(check_custom_policies(mesh.authorization_policies, mesh.mesh_config, mesh.services))
    issues.extend(check_credentials(mesh))
    if mesh.gateways or mesh.gateway_virtual_services:
        issues.extend(check_gateways(mesh))
        issues.extend(check_merges(mesh))
    if mesh.gateway_routes:
        issues.extend(gamma_issues(mesh.gateway_routes, mesh.route_status, mesh.virtual_services, mesh.vss_by_host))
    if mesh.gateway_status:
        issues.extend(gateway_issues(mesh.gateway_status, mesh.gateway_routes, mesh.route_status))
    issues.extend(check_telemetries(mesh))
    issues.extend(check_request_authentications(mesh))
    issues.extend(check_jwt_conditions(mesh))
    if mesh.service_entries:
        kube = {h: s for h, s in mesh.services.items() if s.entry is None}
        issues.extend(check_service_entries(mesh.service_entries, kube, mesh.entry_candidates))
        issues.extend(ambient_entry_issues(mesh))
    return tuple(issues)


def _vs_key(vs: VirtualService) -> str:
    return f"{vs.namespace}/{vs.name}"


def _host_conflicts(mesh: Mesh, vs: VirtualService) -> Iterator[Issue]:
    """A VirtualService that no client namespace it is exported to gets for a host (another
    wins in each: Mesh.virtual_service). One that some namespaces override with their own
    (a private `exportTo: ["."]` one) still applies elsewhere and is not reported."""
    for host in vs.hosts:
        if vs.ref.kind != "VirtualService":
            continue  # a Gateway API route's table; where routes take a host: model.gamma warns
        # its own namespace, those it names, and ("" stands for) any other namespace
        seen = {vs.namespace, *(n for n in vs.export_to if n not in (".", "*", "~")),
                *([""] if not vs.export_to or "*" in vs.export_to else [])}
        plain = [c for c in mesh.vss_by_host.get(host, ()) if c.ref.kind == "VirtualService"]
        winners = [vs_lookup(plain, n) for n in sorted(seen)]
        if any(w is vs for w in winners):
            continue
        winner = next((w for w in winners if w is not None), None)
        if winner is not None:
            yield Issue(
                vs.ref,
                "spec.hosts",
                f"host {host} is already claimed by VirtualService {_vs_key(winner)}, which wins; "
                "this VirtualService is ignored for that host",
            )


def _unknown_vs_hosts(mesh: Mesh, vs: VirtualService) -> Iterator[Issue]:
    for host in vs.hosts:
        if host not in mesh.services:
            yield Issue(vs.ref, "spec.hosts", f"no Service is known for host {host}", "warning")


# --------------------------------------------------------------------------- destinations


def _all_destinations(vs: VirtualService) -> Iterator[tuple[str, Destination]]:
    """(field path, destination) of every route and mirror destination of `vs`."""
    for i, route in enumerate(vs.http):
        for j, rd in enumerate(route.route):
            yield f"spec.http[{i}].route[{j}].destination", rd.destination
        for k, mirror in enumerate(route.mirrors):
            yield f"spec.http[{i}].mirrors[{k}].destination", mirror.destination
    for i, tcp in enumerate(vs.tcp):
        for j, rd in enumerate(tcp.route):
            yield f"spec.tcp[{i}].route[{j}].destination", rd.destination


def _destinations(mesh: Mesh, vs: VirtualService) -> Iterator[Issue]:
    for path, dest in _all_destinations(vs):
        svc = mesh.services.get(dest.host)
        if svc is None:
            yield Issue(
                vs.ref,
                f"{path}.host",
                f"no Service is known for destination host {dest.host}; requests routed there will fail",
                "warning",
            )
        elif dest.port is not None and all(p.port != dest.port for p in svc.ports):
            have = ", ".join(str(p.port) for p in svc.ports) or "none"
            yield Issue(
                vs.ref,
                f"{path}.port",
                f"Service {svc.namespace}/{svc.name} has no port {dest.port} (its ports: {have})",
            )
        if dest.subset is not None:
            problem = _subset_problem(mesh, dest.host, dest.subset, vs.namespace)
            if problem is not None:
                yield Issue(vs.ref, f"{path}.subset", problem)


def _subset_problem(mesh: Mesh, host: Hostname, subset: str, namespace: str) -> str | None:
    """Why `subset` of `host` is undefined for clients in `namespace` (the VirtualService's;
    Istio's DestinationRule lookup), or None."""
    dr = mesh.destination_rule(host, namespace) or mesh.dr_by_host.get(host)
    if dr is None:
        return (
            f"subset {subset!r} of {host} is not defined: no DestinationRule exists for that host, "
            "so Envoy would answer 503"
        )
    names = [s.name for s in dr.subsets]
    if subset in names:
        return None
    defined = ", ".join(names) if names else "none"
    return (
        f"subset {subset!r} is not defined by DestinationRule {dr.namespace}/{dr.name} for {host} "
        f"(its subsets: {defined}), so Envoy would answer 503"
    )


# --------------------------------------------------------------------------- destination rules


def _duplicate_rules(mesh: Mesh, drs: list[DestinationRule]) -> Iterator[Issue]:
    first: dict[tuple[str, Hostname, tuple[tuple[str, str], ...]], DestinationRule] = {}
    for dr in drs:
        key = (dr.namespace, dr.host, dr.workload_selector)
        if key in first:
            winner = first[key]
            yield Issue(
                dr.ref,
                "spec.host",
                f"DestinationRule {winner.namespace}/{winner.name} already configures {dr.host} in "
                f"namespace {dr.namespace}; this one is ignored",
            )
        else:
            first[key] = dr


def _rule_checks(mesh: Mesh, dr: DestinationRule) -> Iterator[Issue]:
    svc = mesh.services.get(dr.host)
    if svc is None:
        yield Issue(dr.ref, "spec.host", f"no Service is known for host {dr.host}", "warning")
        return
    pods = _service_pods(mesh, svc)
    for k, subset in enumerate(dr.subsets):
        if not any(labels_match(subset.labels, w.labels) for w in pods):
            yield Issue(
                dr.ref,
                f"spec.subsets[{k}]",
                f"subset {subset.name!r} ({_labels_text(subset)}) selects no Pod of Service "
                f"{svc.namespace}/{svc.name}; requests routed to it will fail with 503",
                "warning",
            )


def _labels_text(subset: Subset) -> str:
    return ",".join(f"{k}={v}" for k, v in subset.labels) or "no labels"


def _service_pods(mesh: Mesh, svc: Service) -> list[Workload]:
    """Pods behind `svc`: those its selector matches, else those its endpoints name."""
    if svc.selector:
        return [
            w
            for (ns, _), w in sorted(mesh.workloads.items())
            if ns == svc.namespace and labels_match(svc.selector, w.labels)
        ]
    pods: list[Workload] = []
    for eps in mesh.endpoints.get(svc.hostname, ()):
        for ep in eps.endpoints:
            w = mesh.workload(eps.namespace, ep.pod)
            if w is not None:
                pods.append(w)
    return pods


# --------------------------------------------------------------------------- security policy


def _peer_authn_conflicts(mesh: Mesh) -> Iterator[Issue]:
    """A PeerAuthentication that loses to another one at the same level for some workload."""
    found: dict[tuple[str, str], tuple[PeerAuthentication, str]] = {}
    namespace_wide: dict[str, PeerAuthentication] = {}
    for pa in mesh.peer_authentications:
        if not pa.selector:
            winner = namespace_wide.setdefault(pa.namespace, pa)
            if winner is not pa:
                yield Issue(pa.ref, "spec", f"PeerAuthentication {winner.namespace}/{winner.name} already applies to "
                            f"the whole namespace {pa.namespace}; this one is ignored", "warning")
    for (ns, name), wl in sorted(mesh.workloads.items()):
        selected, _, _ = peer_authentication_levels(mesh, ns, wl.labels)
        for pa in mesh.peer_authentications:
            if (pa.namespace == ns and pa.selector and pa is not selected and selected is not None
                    and labels_match(pa.selector, wl.labels)):
                found.setdefault((pa.namespace, pa.name), (pa, f"{name} (PeerAuthentication {selected.name} wins)"))
    for pa, where in found.values():
        yield Issue(pa.ref, "spec.selector", f"another PeerAuthentication already selects Pod {pa.namespace}/{where}; "
                    "this one is ignored for it", "warning")


_TCP_ENFORCEMENT = {
    "ALLOW": "never matching there (fails closed: that traffic is denied unless another rule allows it)",
    "DENY": "matching there whatever those attributes are (fails closed: it denies every connection the rest "
            "of the rule matches)",
    "AUDIT": "matching there whatever those attributes are (audits every connection the rest of the rule matches)",
}


def _l7_on_tcp(mesh: Mesh, ap: AuthorizationPolicy) -> Iterator[Issue]:
    """Rules using HTTP-only attributes that apply to TCP ports of the selected Pods."""
    tcp: dict[int, list[str]] = {}
    for (ns, name), wl in sorted(mesh.workloads.items()):
        if authorization_policy_applies(ap, mesh.root_namespace, ns, wl.labels):
            for port, protocol in served_ports(mesh, wl).items():
                if protocol is PortProtocol.TCP:
                    tcp.setdefault(port, []).append(f"{ns}/{name}")
    if not tcp:
        return
    for i, rule in enumerate(ap.rules):
        attrs = http_only_attributes(rule)
        limited = rule_ports(rule)
        ports = sorted(p for p in tcp if limited is None or p in limited)
        if not attrs or not ports:
            continue
        pods = sorted({pod for p in ports for pod in tcp[p]})
        shown = ", ".join(pods[:3]) + (f" and {len(pods) - 3} more" if len(pods) > 3 else "")
        yield Issue(
            ap.ref,
            f"spec.rules[{i}]",
            f"L7 rules on a TCP port: this rule uses HTTP-only attributes ({', '.join(attrs)}) but applies to TCP "
            f"port{'s' if len(ports) > 1 else ''} {', '.join(map(str, ports))} of Pod{'s' if len(pods) > 1 else ''} "
            f"{shown}; it is enforced as {_TCP_ENFORCEMENT[ap.action]}",
            "warning",
        )


def _l7_without_waypoint(mesh: Mesh, ap: AuthorizationPolicy) -> Iterator[Issue]:
    """L7 rules that no waypoint enforces: on ambient Pods (their node proxy works at L4), or
    attached to a Service without a waypoint, or to a waypoint that does not exist."""
    from controlplane.model.ambient import is_ambient, waypoint_service

    l7 = [(i, http_only_attributes(r)) for i, r in enumerate(ap.rules)]
    l7 = [(i, attrs) for i, attrs in l7 if attrs]
    how = _TCP_ENFORCEMENT[ap.action]
    if not ap.target_refs and ap.provider is not None:
        yield from _custom_on_node_proxies(mesh, ap)
    if not ap.target_refs:
        if not l7:
            return
        pods = sorted(f"{ns}/{name}" for (ns, name), wl in mesh.workloads.items()
                      if is_ambient(mesh, wl) and authorization_policy_applies(ap, mesh.root_namespace, ns, wl.labels))
        if not pods:
            return
        shown = ", ".join(pods[:3]) + (f" and {len(pods) - 3} more" if len(pods) > 3 else "")
        for i, attrs in l7:
            yield Issue(ap.ref, f"spec.rules[{i}]",
                        f"L7 rules on ambient Pods ({shown}) without a waypoint: their node proxy enforces L4 only, "
                        f"so this rule ({', '.join(attrs)}) is enforced as {how}; attach the policy to a waypoint "
                        "with targetRefs", "warning")
        return
    for kind, name in ap.target_refs:
        if kind == "Gateway":
            if mesh.services.get(service_fqdn(name, ap.namespace)) is None:
                yield Issue(ap.ref, "spec.targetRefs", f"waypoint {ap.namespace}/{name} does not exist (no Service "
                            f"of that name): nothing enforces this policy for the services bound to it, whose "
                            f"node proxies enforce it at L4 ({how})", "warning")
            continue
        svc = mesh.services.get(service_fqdn(name, ap.namespace))
        if svc is None:
            yield Issue(ap.ref, "spec.targetRefs", f"Service {ap.namespace}/{name} does not exist", "warning")
        elif waypoint_service(mesh, svc) is None and l7:
            yield Issue(ap.ref, "spec.targetRefs", f"Service {ap.namespace}/{name} uses no waypoint: its Pods' "
                        f"proxies enforce this policy, and its L7 rules fail closed there ({how})", "warning")


def _custom_on_node_proxies(mesh: Mesh, ap: AuthorizationPolicy) -> Iterator[Issue]:
    """A CUSTOM policy selecting ambient Pods: their node proxy cannot ask an external
    authorizer (Istio's ztunnel does not support the CUSTOM action either); Meshline's node
    proxies deny what its rules match instead (fail closed)."""
    from controlplane.model.ambient import is_ambient

    pods = sorted(f"{ns}/{name}" for (ns, name), wl in mesh.workloads.items()
                  if is_ambient(mesh, wl) and authorization_policy_applies(ap, mesh.root_namespace, ns, wl.labels))
    if pods:
        shown = ", ".join(pods[:3]) + (f" and {len(pods) - 3} more" if len(pods) > 3 else "")
        yield Issue(ap.ref, "spec.action", f"CUSTOM on ambient Pods ({shown}): their node proxy cannot ask the "
                    "external authorizer (Istio's ztunnel does not support the CUSTOM action either), so it denies "
                    "the requests this policy's rules match (fails closed); attach the policy to a waypoint with "
                    "targetRefs to have the authorizer decide", "warning")


# --------------------------------------------------------------------------- Sidecar


def _sidecar_conflicts(mesh: Mesh) -> Iterator[Issue]:
    """Extra namespace defaults (errors: ignored), and selector Sidecars that lose a Pod to
    another one (warnings)."""
    for sc in mesh.sidecars:
        if sc.selector:
            continue
        winner = namespace_default(mesh, sc.namespace)
        if winner is not None and winner is not sc:
            scope = "the mesh" if sc.namespace == mesh.root_namespace else f"namespace {sc.namespace}"
            yield Issue(sc.ref, "spec.workloadSelector", f"Sidecar {winner.namespace}/{winner.name} is already the "
                        f"default of {scope} (no workloadSelector); a namespace may have only one, this one "
                        "is ignored")
    lost: dict[tuple[str, str], tuple[Sidecar, str]] = {}
    for (ns, name), wl in sorted(mesh.workloads.items()):
        selected = selecting_sidecar(mesh, ns, wl.labels)
        if selected is None:
            continue
        for sc in mesh.sidecars_by_namespace.get(ns, ()):
            if sc.selector and sc is not selected and labels_match(sc.selector, wl.labels):
                lost.setdefault((sc.namespace, sc.name), (sc, f"{name} (Sidecar {selected.name} wins)"))
    for sc, where in lost.values():
        yield Issue(sc.ref, "spec.workloadSelector", f"another Sidecar already selects Pod {sc.namespace}/{where}; "
                    "this one is ignored for it", "warning")


def _sidecar_hosts(mesh: Mesh, sc: Sidecar) -> Iterator[Issue]:
    """Exact egress hosts that match no Service where they point (wildcards may match later
    services and are not checked). `.` is the Sidecar's namespace, except for the mesh
    default, where it is every namespace."""
    mesh_default = not sc.selector and sc.namespace == mesh.root_namespace
    services = sorted(mesh.services.values(), key=lambda s: s.hostname)
    for i, eg in enumerate(sc.egress):
        for j, entry in enumerate(eg.hosts):
            if entry.namespace == "~" or entry.host == "*" or entry.host.startswith("*."):
                continue
            found = [s for s in services
                     if egress_host_matches(entry, s, s.namespace if mesh_default else sc.namespace)]
            if not found:
                yield Issue(sc.ref, f"spec.egress[{i}].hosts[{j}]", f"no Service matches {entry.text}", "warning")
            elif eg.port is not None and all(p.port != eg.port for s in found for p in s.ports):
                yield Issue(sc.ref, f"spec.egress[{i}].port.number",
                            f"{entry.text} has no port {eg.port}; nothing is imported for it", "warning")
