"""Waypoint translation (the L7 half of the sidecarless data plane). Pure, no I/O.

Node proxies (the L4 half) are planned in `controlplane.translate.nodeproxy` (their per-pod
inbound side and identities in `nodepod`); the HBONE tunnel pieces all of them share in
`controlplane.translate.tunnel`. `plan_node` is re-exported here for callers that think of
"ambient" as one thing.

Waypoint W of namespace NS (`plan_waypoint`): terminates HBONE on 15008 for the VIP:port
of every service bound to it, hands each port's stream to an internal listener running the
services' VirtualService routes (`waypoint_<port>`) and their L7 AuthorizationPolicies, and
originates HBONE to the chosen endpoint (`tunnel_cluster_specs`). The L7 policies it
enforces are those attached to it with `targetRefs` (kind Gateway: the waypoint; kind
Service: a service bound to it), as in Istio; selector policies are the node proxies' (L4).
CUSTOM ones ask their provider's external authorizer through Envoy's ext_authz filter, as on
sidecars (`controlplane.translate.extauthz`), over the authorizer's outbound cluster.
RequestAuthentications attached the same way put the JWT filter before them
(`controlplane.translate.jwt`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace

from envoy.config.listener.v3 import listener_pb2
from google.protobuf.message import Message

from controlplane.model.ambient import node_addresses, services_of_waypoint
from controlplane.model.authn import issuers, jwt_rules, waypoint_request_authentications
from controlplane.model.ir import (
    AuthorizationPolicy,
    AuthzOperation,
    AuthzRule,
    JwtRule,
    Labels,
    ProxyMeta,
    Service,
    ServicePort,
)
from controlplane.model.mesh import Mesh
from controlplane.model.policy import policies_for_port, waypoint_policies
from controlplane.model.telemetry import waypoint_access_logs
from controlplane.translate.accesslog import AccessLogSink, resolve
from controlplane.translate.extauthz import ExtAuthzTarget, custom_target, http_authz_filters
from controlplane.translate.hbone import TunnelTarget, build_hbone_inbound, build_internal_cluster
from controlplane.translate.jwt import HostRules, build_jwks_cluster, http_jwt_filters, jwks_clusters
from controlplane.translate.listeners import hcm_filter
from controlplane.translate.names import dedupe_domains, destination_port, service_domains
from controlplane.translate.nodeproxy import plan_node
from controlplane.translate.plan import CLUSTER, LISTENER, ResourceSpec
from controlplane.translate.secrets import WORKLOAD_SECRET
from controlplane.translate.sidecar import authorizer_cluster_specs, bind_cluster_specs, route_spec
from controlplane.translate.tunnel import all_hbone, pods_behind, tunnel_cluster_specs

__all__ = ["build_waypoint_http", "plan_node", "plan_waypoint"]


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
        if not node_addresses(svc):
            continue
        for sp in svc.ports:
            by_port.setdefault(sp.port, []).append(svc)
            if _direct(mesh, svc):
                add(bind_cluster_specs(mesh, svc, ns))
                continue
            dr = mesh.dr_by_host.get(svc.hostname)
            add(tunnel_cluster_specs(mesh, svc, sp, None, None, WORKLOAD_SECRET))
            for subset in dr.subsets if dr is not None else ():
                add(tunnel_cluster_specs(mesh, svc, sp, subset.name, subset.labels, WORKLOAD_SECRET))
        for dsvc, dsp, dsubset, labels in _route_backends(mesh, svc, ns):
            if _direct(mesh, dsvc):
                add(bind_cluster_specs(mesh, dsvc, ns))
            else:
                add(tunnel_cluster_specs(mesh, dsvc, dsp, dsubset, labels, WORKLOAD_SECRET))
    targets: list[TunnelTarget] = []
    for port, services in sorted(by_port.items()):
        inner = f"waypoint_{port}"
        cluster = f"waypoint_inner|{port}"
        # Each address of a service (a ServiceEntry host may have several) is an authority.
        targets.append(TunnelTarget(port, tuple(f"{ip}:{port}" for s in services for ip in node_addresses(s)),
                                    cluster))
        add([ResourceSpec(CLUSTER, cluster, build_internal_cluster, (cluster, inner))])
        # Routed as in bind capture: no catch-all to a PassthroughCluster, which a waypoint
        # does not have (an unknown Host gets Envoy's 404, not a 503 for a missing cluster).
        add([route_spec(mesh, port, services, ns, "bind", name=inner)])
        domains = dedupe_domains(service_domains(s, port, ns) for s in services)
        authz = _per_service_policies(mesh, ns, name, services, port, domains)
        ext = custom_target(authz, mesh.mesh_config, mesh.services)  # None: CUSTOM rules deny
        if ext is not None:
            add(authorizer_cluster_specs(mesh, ns, ext.host, ext.provider.port))
        ras = waypoint_request_authentications(mesh, ns, name, tuple(s.name for s in services))
        jwt = jwt_rules(ras)
        # Each service validates the rules attached to it or to the waypoint, not its neighbours'.
        jwt_hosts = tuple((tuple(hosts), jwt_rules(waypoint_request_authentications(mesh, ns, name, (s.name,))))
                          for s, hosts in zip(services, domains, strict=True))
        add([ResourceSpec(CLUSTER, jc.name, build_jwks_cluster, (jc,), tuple(r.ref for r in ras))
             for jc in jwks_clusters(jwt)])
        logs, log_refs = waypoint_access_logs(mesh, ns, name, tuple(s.name for s in services))
        sinks = resolve(logs, mesh.mesh_config)
        add([ResourceSpec(LISTENER, inner, build_waypoint_http, (inner, td, authz, jwt, ext, sinks, jwt_hosts),
                          tuple(dict.fromkeys((*(s.ref for s in services), *(a.ref for a in authz),
                                               *(r.ref for r in ras), *log_refs))))])
    add([ResourceSpec(LISTENER, "waypoint_hbone", build_hbone_inbound,
                      ("waypoint_hbone", None, WORKLOAD_SECRET, td, tuple(targets), ()),
                      tuple(s.ref for s in bound))])
    return sorted(out.values(), key=lambda s: (s.type_url, s.name))


def _direct(mesh: Mesh, svc: Service) -> bool:
    """A ServiceEntry host whose endpoints do not all take HBONE (external hosts, VMs): the
    waypoint connects to them as a sidecar without capture would (plain, or the TLS its
    DestinationRule originates), with the cluster type its resolution asks for."""
    return svc.entry is not None and not any(all_hbone(mesh, pods_behind(mesh, svc, sp)) for sp in svc.ports)


def _route_backends(mesh: Mesh, svc: Service,
                    namespace: str) -> Iterator[tuple[Service, ServicePort, str | None, Labels | None]]:
    """The other services (and subsets) the routes of `svc` (VirtualService or Gateway API
    route, as the waypoint in `namespace` sees it) send to or mirror to: the waypoint tunnels
    to their pods too."""
    vs = mesh.virtual_service(svc.hostname, namespace)
    if vs is None:
        return
    dests = [d.destination for hr in vs.http for d in hr.route] + [m.destination for hr in vs.http for m in hr.mirrors]
    dests += [d.destination for tr in vs.tcp for d in tr.route]
    for dest in dict.fromkeys(dests):
        dsvc = mesh.service(dest.host, namespace)
        if dsvc is None or not node_addresses(dsvc):
            continue
        labels: Labels | None = None
        if dest.subset is not None:
            dr = mesh.dr_by_host.get(dest.host)
            found = next((s for s in dr.subsets if s.name == dest.subset), None) if dr is not None else None
            if found is None:
                continue
            labels = found.labels
        for sp in svc.ports:
            port = destination_port(dest, sp.port, dsvc)
            dsp = next((p for p in dsvc.ports if p.port == port), None)
            if dsp is not None and (dsvc, dsp.port, dest.subset) != (svc, sp.port, None):
                yield dsvc, dsp, dest.subset, labels


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


def build_waypoint_http(name: str, trust_domain: str, authz: tuple[AuthorizationPolicy, ...],
                        jwt: tuple[JwtRule, ...] = (), ext_authz: ExtAuthzTarget | None = None,
                        logs: tuple[AccessLogSink, ...] = (), jwt_hosts: HostRules = ()
                        ) -> listener_pb2.Listener:
    """The internal listener of one port: HTTP routing (RDS `name`), JWT validation, L7
    authorization (CUSTOM policies: `ext_authz`'s authorizer, or they deny without one) and
    the access logs of the Telemetry attached to the waypoint or its services. `jwt`: every
    rule of the port's services; `jwt_hosts`: each service's Host names and its own rules, so
    a request is validated only against the rules of the service it is for."""
    lst = listener_pb2.Listener(name=name)
    lst.internal_listener.SetInParent()
    filters: list[tuple[str, Message]] = [*http_jwt_filters(jwt, jwt_hosts)]
    filters += http_authz_filters(authz, trust_domain, ext_authz, issuers(jwt)) if authz else []
    lst.filter_chains.add(name=name).filters.append(hcm_filter(name, name, None, filters, logs=logs))
    return lst
