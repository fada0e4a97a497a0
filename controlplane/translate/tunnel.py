"""The HBONE tunnel as sidecars, waypoints and node proxies share it: who must be reached
through it (`needs_tunnel`, `tunnelled`), the route-facing hop into it
(`tunnel_cluster_specs`: route -> `outbound|...` internal cluster -> internal listener ->
HBONE cluster -> the pods' 15008), and the CONNECT authorities that reach a workload
(`tunnel_targets`). Envoy messages are built in `controlplane.translate.hbone`. Pure, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable

from controlplane.model.ambient import (
    accepts_hbone,
    entry_services_selecting,
    node_addresses,
    runs_sidecar,
    waypoint_service,
)
from controlplane.model.ir import Service, ServicePort, SourceRef, Workload
from controlplane.model.mesh import Mesh
from controlplane.translate.clusters import effective_policy
from controlplane.translate.endpoints import endpoint_set_port
from controlplane.translate.hbone import (
    TunnelTarget,
    build_hbone_cla,
    build_hbone_cluster,
    build_internal_cluster,
    build_tunnel_listener,
)
from controlplane.translate.inbound import target_port
from controlplane.translate.names import outbound_cluster_name
from controlplane.translate.plan import CLUSTER, ENDPOINT, LISTENER, ResourceSpec
from controlplane.translate.secrets import WORKLOAD_SECRET
from controlplane.translate.security import spiffe_uri

__all__ = [
    "WORKLOAD_SECRET", "all_hbone", "eds_name", "needs_tunnel", "peer_identities", "pods_behind", "service_vip",
    "tunnel_cluster_specs", "tunnel_targets", "tunnelled",
]


def service_vip(svc: Service) -> str | None:
    """The service's cluster IP (None for a headless service)."""
    ip = svc.cluster_ip
    return ip if ip and ip.lower() != "none" else None


def pods_behind(mesh: Mesh, svc: Service, sp: ServicePort, labels: tuple[tuple[str, str], ...] | None = None
                ) -> list[tuple[str, Workload | None]]:
    """(IP, Pod or None) of the ready endpoints of `svc` on `sp` (of a subset: `labels`)."""
    out: dict[str, Workload | None] = {}
    single = len(svc.ports) == 1
    for eps in mesh.endpoints.get(mesh.registry_key(svc), ()):
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


def peer_identities(mesh: Mesh, pods: Iterable[Workload | None]) -> tuple[str, ...]:
    """The SPIFFE URIs of `pods` (the SANs a tunnel to them accepts)."""
    return tuple(sorted({spiffe_uri(mesh.trust_domain, w.namespace, w.service_account)
                         for w in pods if w is not None}))


def all_hbone(mesh: Mesh, pods: list[tuple[str, Workload | None]]) -> bool:
    """Whether there are pods and every one accepts HBONE."""
    return bool(pods) and all(w is not None and accepts_hbone(mesh, w) for _, w in pods)


def eds_name(kind: str, port: int, host: str, subset: str | None = None) -> str:
    return f"{kind}|{port}|{subset or ''}|{host}"


def tunnel_targets(mesh: Mesh, wl: Workload, cluster_of: dict[int, str]) -> tuple[TunnelTarget, ...]:
    """The CONNECT authorities that reach `wl` per target port: its IP:port and the VIP:port
    of every service selecting it."""
    domains: dict[int, list[str]] = {tp: [f"{wl.ip}:{tp}"] for tp in cluster_of}
    for svc in mesh.services_selecting(wl.namespace, wl.labels):
        vip = service_vip(svc)
        for sp in svc.ports:
            tp = target_port(sp, wl)
            if vip is not None and tp in domains:
                domains[tp].append(f"{vip}:{sp.port}")
    for svc in entry_services_selecting(mesh, wl):  # MESH_INTERNAL ServiceEntry hosts picking it
        for sp in svc.ports:
            tp = sp.target_port if isinstance(sp.target_port, int) else sp.port
            if tp in domains:  # each of its addresses (node proxies name the one dialled)
                domains[tp] += [f"{ip}:{sp.port}" for ip in node_addresses(svc)]
    return tuple(TunnelTarget(tp, tuple(dict.fromkeys(domains[tp])), cluster_of[tp]) for tp in sorted(cluster_of))


def tunnel_cluster_specs(mesh: Mesh, svc: Service, sp: ServicePort, subset: str | None,
                         labels: tuple[tuple[str, str], ...] | None, cert: str,
                         via_waypoint: bool = False) -> list[ResourceSpec]:
    """`outbound|<port>|<subset>|<host>` as an internal hop into a tunnel to the (subset's)
    pods: route -> that cluster -> internal listener -> HBONE cluster -> pods' 15008, with
    the authority `<VIP>:<port>` (or the pod IP:port is unknowable: headless services are
    not tunnelled this way)."""
    key = mesh.registry_key(svc)  # the hostname, or a ServiceEntry's own key (Mesh.service)
    name = outbound_cluster_name(sp.port, key, subset)
    vip = service_vip(svc) or next(iter(node_addresses(svc)), None)  # a ServiceEntry's first of several
    if vip is None:
        return []
    lst = f"tunnel|{sp.port}|{subset or ''}|{key}"
    refs: tuple[SourceRef, ...] = (svc.ref,)
    wp = waypoint_service(mesh, svc) if via_waypoint else None
    if wp is not None:
        # The service's waypoint decides (routing, L7 policy): tunnel there, naming the service.
        wsp = next((p for p in wp.ports if p.port == 15008), wp.ports[0] if wp.ports else None)
        wpods = pods_behind(mesh, wp, wsp) if wsp is not None else []
        weds = eds_name("hbone", 15008, wp.hostname)
        whb = f"{weds}|{cert}"
        wrefs = (svc.ref, wp.ref)
        return [
            ResourceSpec(CLUSTER, name, build_internal_cluster, (name, lst), wrefs),
            ResourceSpec(LISTENER, lst, build_tunnel_listener, (lst, f"{vip}:{sp.port}", whb), wrefs),
            ResourceSpec(CLUSTER, whb, build_hbone_cluster,
                         (whb, weds, cert, mesh.trust_domain, peer_identities(mesh, (w for _, w in wpods))),
                         (wp.ref,)),
            ResourceSpec(ENDPOINT, weds, build_hbone_cla, (weds, tuple(ip for ip, _ in wpods)), (wp.ref,)),
        ]
    pods = pods_behind(mesh, svc, sp, labels)
    dr = mesh.dr_by_host.get(svc.hostname)
    eds = eds_name("hbone", sp.port, key, subset)
    hb = f"{eds}|{cert}"
    return [
        ResourceSpec(CLUSTER, name, build_internal_cluster, (name, lst), refs),
        ResourceSpec(LISTENER, lst, build_tunnel_listener, (lst, f"{vip}:{sp.port}", hb), refs),
        ResourceSpec(CLUSTER, hb, build_hbone_cluster,
                     (hb, eds, cert, mesh.trust_domain, peer_identities(mesh, (w for _, w in pods)),
                      effective_policy(dr, sp.port, subset)), refs if dr is None else (*refs, dr.ref)),
        ResourceSpec(ENDPOINT, eds, build_hbone_cla, (eds, tuple(ip for ip, _ in pods)), refs),
    ]


def needs_tunnel(mesh: Mesh, svc: Service, sp: ServicePort) -> bool:
    """Whether a sidecar must tunnel to `svc` on `sp`: its pods accept only HBONE for mesh
    traffic (some are ambient, and all accept HBONE)."""
    pods = pods_behind(mesh, svc, sp)
    return (all_hbone(mesh, pods) and any(w is not None and not runs_sidecar(w) for _, w in pods)
            and service_vip(svc) is not None)


def tunnelled(mesh: Mesh, svc: Service, sp: ServicePort) -> bool:
    """Whether a sidecar reaches `svc` on `sp` through the HBONE tunnel: its pods are ambient,
    or it uses a waypoint (which then enforces its L7 policies for sidecar callers too)."""
    return waypoint_service(mesh, svc) is not None or needs_tunnel(mesh, svc, sp)
