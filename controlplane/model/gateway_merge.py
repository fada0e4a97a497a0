"""Which Istio Gateways a gateway proxy serves, and how their servers merge. Pure, no I/O.

As Istio (PILOT_SCOPE_GATEWAY_TO_NAMESPACE off, its default): a gateway proxy serves EVERY
Gateway, of any namespace, whose `selector` its pod's labels include (`selected_gateways`;
an empty selector selects every gateway proxy). `meshline bootstrap --gateway NS/NAME`
narrows a proxy to that one Gateway (the earlier behaviour, kept for compatibility).

The servers of the selected Gateways merge per address and port (`merge_servers`), the
Gateways taken in namespace/name order (Istio orders by creation time, which Meshline does
not see), a Gateway's own servers in their order:
- plain HTTP servers (HTTP, HTTP2, GRPC) of several Gateways on one port share one listener
  and one route configuration `http.<port>`: the union of their virtual hosts;
- TLS servers (HTTPS, TLS) of several Gateways on one port each keep their SNI filter chain,
  unless a host of one was already claimed on that port by an earlier Gateway's TLS server
  (Envoy refuses two filter chains for one name): the later server is dropped;
- a later Gateway's server whose kind (plain HTTP, TLS, TCP) differs from what earlier
  Gateways put on that port, or a second Gateway's TCP server on a port, is dropped.
A dropped server is not served by that proxy and is warned about (`check_merges`, for the
Pods of the mesh two or more Gateways select), naming both Gateways and the field. So is a
VirtualService whose host on a merged plain HTTP port an earlier Gateway's VirtualService
already serves there (the first keeps the name; Istio would merge their routes).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from controlplane.model.gateways import gateway_virtual_services, server_vs_hosts
from controlplane.model.ir import Gateway, GatewayServer, Issue, Labels, ProxyMeta, SourceRef, labels_match
from controlplane.model.mesh import Mesh, visible_to

HTTP_PROTOCOLS = frozenset({"HTTP", "HTTP2", "GRPC"})


def proxy_labels(mesh: Mesh, meta: ProxyMeta) -> Labels:
    """The gateway proxy's labels: its pod's (`meta.workload` in the mesh), else its own."""
    pod = mesh.workload(meta.namespace, meta.workload)
    return pod.labels if pod is not None else meta.labels


def selected_gateways(mesh: Mesh, meta: ProxyMeta) -> tuple[Gateway, ...]:
    """The Gateways a gateway proxy serves, by namespace and name: only `meta.gateway` when
    the proxy names one (none if it does not exist), else every Gateway whose selector its
    labels include."""
    if meta.mode != "gateway":
        return ()
    if meta.gateway:
        gw = mesh.gateways.get(meta.gateway)
        return () if gw is None or not _may_serve(gw, meta) else (gw,)
    labels = proxy_labels(mesh, meta)
    return tuple(gw for _, gw in sorted(mesh.gateways.items())
                 if _may_serve(gw, meta) and labels_match(gw.selector, labels))


def _may_serve(gw: Gateway, meta: ProxyMeta) -> bool:
    """A Gateway API Gateway configures gateway proxies of its own namespace only (Istio: the
    instances of its Service in its namespace); an Istio Gateway, those of any namespace."""
    return not gw.own_namespace_only or meta.namespace == gw.namespace


@dataclass(frozen=True, slots=True)
class Placed:
    """One server of one Gateway, with its index in the Gateway's `servers`."""

    gateway: Gateway
    index: int
    server: GatewayServer


@dataclass(frozen=True, slots=True)
class Dropped:
    placed: Placed
    winner: Gateway
    reason: str


def server_kind(srv: GatewayServer) -> str:
    if srv.protocol in HTTP_PROTOCOLS:
        return "HTTP"
    if srv.protocol in ("HTTPS", "TLS") and srv.tls is not None:
        return "TLS"
    return "TCP"


def _sni(srv: GatewayServer) -> frozenset[str]:
    hosts = {h for _, h in srv.hosts}
    return frozenset({""}) if "*" in hosts or not hosts else frozenset(hosts)


def merge_servers(gateways: Sequence[Gateway]
                  ) -> tuple[dict[tuple[str, int], list[Placed]], list[Dropped]]:
    """The servers served per (address, port), and the ones dropped as conflicting."""
    kept: dict[tuple[str, int], list[Placed]] = {}
    owner: dict[tuple[str, int], Gateway] = {}  # the first Gateway on the port
    kinds: dict[tuple[str, int], set[str]] = {}
    names: dict[tuple[str, int], dict[str, Gateway]] = {}  # TLS names claimed on the port
    dropped: list[Dropped] = []
    for gw in gateways:
        for i, srv in enumerate(gw.servers):
            at = (srv.bind or "0.0.0.0", srv.port)
            p = Placed(gw, i, srv)
            kind = server_kind(srv)
            first = owner.setdefault(at, gw)
            claimed = names.setdefault(at, {})
            if first is not gw:
                seen = kinds.get(at, set())
                if kind not in seen or kind == "TCP":
                    got = "/".join(sorted(seen)) or "nothing"
                    dropped.append(Dropped(p, first, f"port {srv.port} already serves {got} of Gateway "
                                                      f"{first.key}; this {kind} server conflicts"))
                    continue
                clash = sorted(n for n in _sni(srv) if n in claimed and claimed[n] is not gw)
                if kind == "TLS" and clash:
                    other = claimed[clash[0]]
                    what = "every host" if clash == [""] else ", ".join(clash)
                    dropped.append(Dropped(p, other, f"{what} on port {srv.port} is already served by a TLS "
                                                     f"server of Gateway {other.key}"))
                    continue
            kinds.setdefault(at, set()).add(kind)
            if kind == "TLS":
                for n in _sni(srv):
                    claimed.setdefault(n, gw)
            kept.setdefault(at, []).append(p)
    return kept, dropped


def check_merges(mesh: Mesh) -> Iterator[Issue]:
    """Warnings for servers a gateway Pod of the mesh does not serve because a Gateway before
    them, also selecting that Pod, holds their port (each server once)."""
    if len(mesh.gateways) < 2:
        return
    told: set[tuple[str, int]] = set()
    gws = [(key, gw) for key, gw in sorted(mesh.gateways.items()) if gw.selector]
    if len(gws) < 2:
        return
    combos: set[tuple[tuple[str, ...], str]] = set()
    # pods of one deployment share their labels: each distinct (namespace, labels) once
    for ns, labels in {(ns, pod.labels) for (ns, _), pod in mesh.workloads.items()}:
        chosen = tuple(key for key, gw in gws if labels_match(gw.selector, labels))
        if len(chosen) > 1:
            combos.add((chosen, ns))
    shadowed: set[tuple[str, str, str, int]] = set()
    for combo, ns in sorted(combos):
        kept, dropped = merge_servers([mesh.gateways[k] for k in combo])
        for (_, port), placed in sorted(kept.items()):
            for vs_ref, host, winner, winner_gw in _shadowed_hosts(mesh, placed, ns):
                if (vs_ref.namespace, vs_ref.name, host, port) in shadowed:
                    continue
                shadowed.add((vs_ref.namespace, vs_ref.name, host, port))
                yield Issue(vs_ref, "spec.hosts", f"host {host} on port {port} of the gateway proxies that Gateway "
                                                  f"{winner_gw} also selects is served by VirtualService {winner} "
                                                  "(its Gateway comes first by namespace and name); this one's routes "
                                                  "for it are not used there", "warning")
        for d in dropped:
            key = (d.placed.gateway.key, d.placed.index)
            if key in told:
                continue
            told.add(key)
            yield Issue(d.placed.gateway.ref, f"spec.servers[{d.placed.index}]",
                        f"not served by the gateway proxies Gateway {d.winner.key} also selects: {d.reason} "
                        f"(the first Gateway by namespace and name keeps the port)", "warning")


def _shadowed_hosts(mesh: Mesh, placed: Sequence[Placed], namespace: str
                    ) -> Iterator[tuple[SourceRef, str, str, str]]:
    """(VirtualService, host, winning VirtualService, its Gateway) for hosts of the plain HTTP
    servers of one port that another Gateway's VirtualService claimed first (as
    translate.gateway builds `http.<port>`); shadowing within one Gateway is
    validate_gateway's."""
    owner: dict[str, tuple[str, str]] = {}  # host -> (gateway key, "ns/name" of the VS)
    for gw in dict.fromkeys(p.gateway for p in placed if p.server.protocol in HTTP_PROTOCOLS):
        servers = [p.server for p in placed if p.gateway is gw and p.server.protocol in HTTP_PROTOCOLS]
        for vs in gateway_virtual_services(gw, mesh.gateway_virtual_services):
            if not vs.http or not visible_to(vs.export_to, vs.namespace, namespace):
                continue
            for host in dict.fromkeys(h for srv in servers for h in server_vs_hosts(srv, vs)):
                first = owner.setdefault(host, (gw.key, f"{vs.namespace}/{vs.name}"))
                if first[0] != gw.key:
                    yield vs.ref, host, first[1], first[0]
