"""Cross-object checks for places where Istio YAML could mean something else in Meshline
than in Istio, reported so that nothing differs in silence. Pure, no I/O.

`check_istio_fidelity(mesh)` (called by `validate.check_mesh`) warns about:
- mesh-wide objects in `istio-system` (Istio's default root namespace) while Meshline's
  root namespace is another one: there they apply to that one namespace only, so a
  mesh-wide STRICT PeerAuthentication or DENY policy would fail open everywhere else;
- VirtualService `sourceLabels` that no Pod carries (the match applies to no client), or on
  a host served by a waypoint (a waypoint serves many clients and never matches them);
- tcp `destinationSubnets` that contain the cluster IP of none of the VirtualService's
  hosts (or a headless Service, which has none), so the match never applies;
- DestinationRule hash keys other than `useSourceIp` on TCP ports (Envoy's TCP proxy can
  hash only on the connection), and workloadSelectors no Pod of the rule's namespace matches;
- Sidecar egress listeners whose `port.protocol` differs from the protocol of the services
  they import on that port (Meshline keeps each service port's own protocol).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

from controlplane.model.ir import (
    DestinationRule,
    Issue,
    Labels,
    PortProtocol,
    Service,
    Sidecar,
    SourceRef,
    VirtualService,
    labels_match,
)
from controlplane.model.mesh import Mesh

ISTIO_ROOT_NAMESPACE = "istio-system"

_PROTOCOLS = {
    "HTTP": (PortProtocol.HTTP, PortProtocol.UNKNOWN),
    "HTTP2": (PortProtocol.HTTP2, PortProtocol.GRPC, PortProtocol.UNKNOWN),
    "GRPC": (PortProtocol.GRPC, PortProtocol.HTTP2, PortProtocol.UNKNOWN),
    "GRPC-WEB": (PortProtocol.GRPC, PortProtocol.HTTP, PortProtocol.UNKNOWN),
    "TCP": (PortProtocol.TCP, PortProtocol.UNKNOWN),
    "TLS": (PortProtocol.TCP,),
    "HTTPS": (PortProtocol.TCP,),
    "MONGO": (PortProtocol.TCP,),
    "MYSQL": (PortProtocol.TCP,),
    "REDIS": (PortProtocol.TCP,),
}
"""A Sidecar egress `port.protocol` and the service port protocols it agrees with."""


def check_istio_fidelity(mesh: Mesh) -> Iterator[Issue]:
    yield from _root_namespace(mesh)
    for vs in sorted(mesh.virtual_services, key=lambda v: (v.namespace, v.name)):
        yield from _source_labels(mesh, vs)
        yield from _destination_subnets(mesh, vs)
    for dr in sorted(mesh.destination_rules, key=lambda d: (d.namespace, d.name)):
        yield from _tcp_hash(mesh, dr)
        yield from _dr_selector(mesh, dr)
    for sc in mesh.sidecars:
        yield from _egress_protocols(mesh, sc)


# --------------------------------------------------------------------------- root namespace


def _mesh_wide(mesh: Mesh) -> Iterator[tuple[SourceRef, str]]:
    """(ref, what it would do mesh-wide) of the objects that are mesh-wide in a root namespace."""
    for pa in mesh.peer_authentications:
        if not pa.selector:
            yield pa.ref, f"its mTLS mode {pa.mode} for every workload of the mesh"
    for ap in mesh.authorization_policies:
        if not ap.selector and not ap.target_refs:
            yield ap.ref, f"its {ap.action} rules for every workload of the mesh"
    for sc in mesh.sidecars:
        if not sc.selector:
            yield sc.ref, "its egress scoping for every sidecar of the mesh"
    for dr in mesh.destination_rules:
        yield dr.ref, f"its traffic policy for {dr.host} to clients in every namespace"


def _root_namespace(mesh: Mesh) -> Iterator[Issue]:
    if mesh.root_namespace == ISTIO_ROOT_NAMESPACE:
        return
    for ref, effect in sorted(_mesh_wide(mesh), key=lambda r: (r[0].kind, r[0].name)):
        if ref.namespace != ISTIO_ROOT_NAMESPACE:
            continue
        yield Issue(ref, "metadata.namespace",
                    f"NOT MESH-WIDE: {ISTIO_ROOT_NAMESPACE} is Istio's root namespace, but Meshline's root namespace "
                    f"is {mesh.root_namespace}, so this object applies only to namespace {ISTIO_ROOT_NAMESPACE}, "
                    f"not {effect} (run Meshline with --root-namespace {ISTIO_ROOT_NAMESPACE}, or move it to "
                    f"{mesh.root_namespace})", "warning")


# --------------------------------------------------------------------------- VirtualService matches


def _labels_text(labels: Labels) -> str:
    return ",".join(f"{k}={v}" for k, v in labels)


def _source_label_matches(vs: VirtualService) -> Iterator[tuple[str, Labels]]:
    for i, hr in enumerate(vs.http):
        for j, m in enumerate(hr.matches):
            if m.source_labels:
                yield f"spec.http[{i}].match[{j}].sourceLabels", m.source_labels
    for i, tr in enumerate(vs.tcp):
        for j, lm in enumerate(tr.matches):
            if lm.source_labels:
                yield f"spec.tcp[{i}].match[{j}].sourceLabels", lm.source_labels


def _source_labels(mesh: Mesh, vs: VirtualService) -> Iterator[Issue]:
    from controlplane.model.ambient import waypoint_service

    matches = list(_source_label_matches(vs))
    if not matches:
        return
    waypoints = sorted({f"{wp.namespace}/{wp.name}" for h in vs.hosts
                        if (svc := mesh.services.get(h)) is not None
                        and (wp := waypoint_service(mesh, svc)) is not None})
    for path, selector in matches:
        if mesh.workloads and not any(labels_match(selector, wl.labels) for wl in mesh.workloads.values()):
            yield Issue(vs.ref, path, f"no Pod has the labels {_labels_text(selector)}: this match applies to no "
                        "client", "warning")
        if waypoints:
            yield Issue(vs.ref, path, f"requests through waypoint {', '.join(waypoints)} never match sourceLabels "
                        "(a waypoint serves many clients); only sidecar clients can match", "warning")


def _destination_subnets(mesh: Mesh, vs: VirtualService) -> Iterator[Issue]:
    """Subnets can pick some of the hosts of a VirtualService; a match whose subnets contain
    the cluster IP of none of them never applies, and headless hosts are never matched."""
    services = [svc for h in vs.hosts if (svc := mesh.services.get(h)) is not None]
    for i, tr in enumerate(vs.tcp):
        for j, lm in enumerate(tr.matches):
            if not lm.destination_subnets or not services:
                continue
            path = f"spec.tcp[{i}].match[{j}].destinationSubnets"
            for svc in services:
                if not _has_vip(svc):
                    yield Issue(vs.ref, path, f"Service {svc.namespace}/{svc.name} is headless (no cluster IP): the "
                                "destination address is a Pod's, which Meshline does not match against "
                                "destinationSubnets, so this match never applies to it", "warning")
            with_vip = [svc for svc in services if _has_vip(svc)]
            if with_vip and not any(_contains(lm.destination_subnets, svc.cluster_ip or "") for svc in with_vip):
                ips = ", ".join(f"{svc.cluster_ip} ({svc.namespace}/{svc.name})" for svc in with_vip)
                yield Issue(vs.ref, path, f"{', '.join(lm.destination_subnets)} contains none of the cluster IPs of "
                            f"this VirtualService's hosts ({ips}): this match never applies", "warning")


def _has_vip(svc: Service) -> bool:
    return bool(svc.cluster_ip) and (svc.cluster_ip or "").lower() != "none"


def _contains(subnets: tuple[str, ...], ip: str) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr.version == n.version and addr in n for n in (ipaddress.ip_network(s, strict=False)
                                                                for s in subnets))


# --------------------------------------------------------------------------- DestinationRule hashing


def _hash_fields(dr: DestinationRule) -> Iterator[tuple[str, int | None, str]]:
    """(field path, port or None for every port, hash key) of each non-source-IP hash."""
    def key_of(lb: object) -> str | None:
        ch = getattr(lb, "consistent_hash", None)
        if ch is None or ch.use_source_ip:
            return None
        if ch.http_header_name:
            return "httpHeaderName"
        if ch.http_cookie_name:
            return "httpCookie"
        return "httpQueryParameterName" if ch.http_query_parameter_name else None

    policies = [("spec.trafficPolicy", dr.traffic_policy)]
    policies += [(f"spec.subsets[{k}].trafficPolicy", s.traffic_policy) for k, s in enumerate(dr.subsets)]
    for path, tp in policies:
        if tp is None:
            continue
        key = key_of(tp.load_balancer)
        if key is not None:
            yield f"{path}.loadBalancer.consistentHash.{key}", None, key
        for n, pl in enumerate(tp.port_level):
            key = key_of(pl.load_balancer)
            if key is not None:
                yield f"{path}.portLevelSettings[{n}].loadBalancer.consistentHash.{key}", pl.port, key


def _tcp_hash(mesh: Mesh, dr: DestinationRule) -> Iterator[Issue]:
    svc = mesh.services.get(dr.host)
    if svc is None:
        return
    tcp_ports = [p.port for p in svc.ports if p.protocol is PortProtocol.TCP]
    for path, port, key in _hash_fields(dr):
        ports = [p for p in tcp_ports if port is None or p == port]
        if ports:
            yield Issue(dr.ref, path, f"{key} hashing needs HTTP requests: on TCP port{'s' if len(ports) > 1 else ''} "
                        f"{', '.join(map(str, ports))} of Service {svc.namespace}/{svc.name} no request carries it, so "
                        "connections are spread without a stable key (use useSourceIp for TCP)", "warning")


def _dr_selector(mesh: Mesh, dr: DestinationRule) -> Iterator[Issue]:
    if not dr.workload_selector or not mesh.workloads:
        return
    if not any(ns == dr.namespace and labels_match(dr.workload_selector, wl.labels)
               for (ns, _), wl in mesh.workloads.items()):
        yield Issue(dr.ref, "spec.workloadSelector.matchLabels",
                    f"no Pod of namespace {dr.namespace} has the labels {_labels_text(dr.workload_selector)}: this "
                    "rule applies to no client (a workloadSelector never reaches other namespaces)", "warning")


# --------------------------------------------------------------------------- Sidecar egress protocol


def _egress_protocols(mesh: Mesh, sc: Sidecar) -> Iterator[Issue]:
    for i, eg in enumerate(sc.egress):
        if eg.port is None or eg.protocol is None:
            continue
        agree = _PROTOCOLS.get(eg.protocol, ())
        differ = sorted({f"{svc.namespace}/{svc.name} ({p.protocol.value})"
                         for svc in mesh.services_by_port.get(eg.port, ())
                         for p in svc.ports if p.port == eg.port and p.protocol not in agree})
        if differ:
            shown = ", ".join(differ[:3]) + (f" and {len(differ) - 3} more" if len(differ) > 3 else "")
            yield Issue(sc.ref, f"spec.egress[{i}].port.protocol",
                        f"{eg.protocol} differs from the protocol of {shown} on port {eg.port}: Meshline keeps each "
                        "service port's own protocol (from its name or appProtocol), it does not treat this port "
                        f"as {eg.protocol}", "warning")


__all__ = ["ISTIO_ROOT_NAMESPACE", "check_istio_fidelity"]
