"""A workload's inbound side as every proxy kind sees it: which target ports it serves
(`inbound_ports`), how a service port resolves to a target port (`target_port`), and the
PeerAuthentication/AuthorizationPolicy that guard them (`inbound_security`). Sidecars,
node proxies (per ambient pod) and the tunnel authorities of both read these. Pure, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from controlplane.model.ambient import waypoint_service
from controlplane.model.authn import jwt_rules, request_authentications_for
from controlplane.model.ir import ProxyMeta, ServicePort, SourceRef, Workload
from controlplane.model.mesh import Mesh
from controlplane.model.policy import authorization_policies_for, effective_mtls, orphaned_policies
from controlplane.model.telemetry import access_logs_for
from controlplane.translate.accesslog import resolve
from controlplane.translate.extauthz import custom_target
from controlplane.translate.listeners import InboundPort, InboundSecurity
from controlplane.translate.names import inbound_cluster_name


@dataclass(frozen=True, slots=True)
class Inbound:
    """One target port the workload serves and the Services that claim it."""

    port: InboundPort
    sources: tuple[SourceRef, ...]


def target_port(sp: ServicePort, wl: Workload | None) -> int | None:
    """The port `sp` sends to on `wl`: a number, or a named container port of the Pod (None
    without a Pod, or when the Pod has no port of that name)."""
    if isinstance(sp.target_port, int):
        return sp.target_port
    if sp.target_port.isdigit():
        return int(sp.target_port)
    if wl is None:
        return None
    return next((cp.port for cp in wl.ports if cp.name == sp.target_port), None)


def inbound_ports(mesh: Mesh, proxy: ProxyMeta, wl: Workload | None) -> list[Inbound]:
    """The ports the proxy's workload serves, by target port; the first service (by
    hostname) to claim a target port decides its protocol."""
    labels = wl.labels if wl is not None else proxy.labels
    found: dict[int, Inbound] = {}
    for svc in sorted(mesh.services_selecting(proxy.namespace, labels), key=lambda s: s.hostname):
        for sp in svc.ports:
            tp = target_port(sp, wl)
            if tp is None:
                continue
            cur = found.get(tp)
            if cur is None:
                found[tp] = Inbound(InboundPort(tp, inbound_cluster_name(tp), sp.protocol), (svc.ref,))
            elif svc.ref not in cur.sources:
                found[tp] = Inbound(cur.port, (*cur.sources, svc.ref))
    return [found[p] for p in sorted(found)]


def inbound_security(mesh: Mesh, proxy: ProxyMeta, wl: Workload | None
                     ) -> tuple[InboundSecurity, tuple[SourceRef, ...]]:
    """The workload's PeerAuthentication modes, AuthorizationPolicies, RequestAuthentication
    JWT rules and (inbound) Telemetry access logs, and their sources."""
    labels = wl.labels if wl is not None else proxy.labels
    mtls = effective_mtls(mesh, proxy.namespace, labels)
    authz = authorization_policies_for(mesh, proxy.namespace, labels)
    if wl is not None:
        # Policies attached (targetRefs) to this pod's services when no waypoint enforces them.
        authz = (*authz, *orphaned_policies(mesh, wl, lambda svc: waypoint_service(mesh, svc) is not None))
    ras = request_authentications_for(mesh, proxy.namespace, labels)
    logs, log_sources = access_logs_for(mesh, proxy.namespace, labels, "SERVER")
    sec = InboundSecurity(mtls.mode, mtls.ports, mesh.trust_domain, authz,
                          custom_target(authz, mesh.mesh_config, mesh.services), jwt_rules(ras),
                          resolve(logs, mesh.mesh_config))
    return sec, tuple(dict.fromkeys((*mtls.sources, *(a.ref for a in authz), *(r.ref for r in ras), *log_sources)))
