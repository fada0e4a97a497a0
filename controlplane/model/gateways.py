"""Which VirtualService routes apply where: the `gateways:` binding, as Istio defines it, and
the host intersection of a VirtualService with a Gateway server. Pure, no I/O.

The one owner of these rules: the store uses `bound_view(vs, MESH)` for what sidecars and
waypoints apply, `controlplane.translate.gateway` uses `bound_view(vs, "ns/name")` and
`server_vs_hosts` for a gateway.

- `spec.gateways` lists `mesh` (sidecars and waypoints) and Gateways as `ns/name` (`name`
  alone: the VirtualService's namespace); empty means `mesh` only.
- a match's `gateways` overrides the VirtualService's for that match; a route whose matches
  all apply elsewhere is dropped; a route without matches follows the VirtualService.
- a server host `ns/host` admits VirtualServices of namespace `ns` (`*`: any); the virtual
  host names are the VirtualService hosts intersected with the server hosts (`*` and
  `*.suffix` wildcards on either side: the more specific name wins).
"""

from __future__ import annotations

from dataclasses import replace

from controlplane.model.ir import Gateway, GatewayServer, HTTPMatch, L4Match, TLSMatch, VirtualService

MESH = "mesh"


def resolve_gateway_name(name: str, namespace: str) -> str:
    """A `gateways` entry as `mesh` or `ns/name` (`name` is in `namespace`; Istio's legacy
    `name.ns.svc.cluster.local` form is `ns/name`)."""
    name = name.strip()
    if name == MESH or "/" in name:
        return name
    if "." in name:
        parts = name.split(".")
        return f"{parts[1]}/{parts[0]}"
    return f"{namespace}/{name}"


def _applies(match_gateways: tuple[str, ...], vs_level: bool, key: str) -> bool:
    return key in match_gateways if match_gateways else vs_level


def bound_view(vs: VirtualService, key: str) -> VirtualService | None:
    """`vs` as the proxies of binding `key` (`mesh` or a Gateway's `ns/name`) apply it: only the
    routes (and matches) bound there, without their `gateways`; None when nothing is."""
    vs_level = key in vs.gateways
    mentioned = vs_level or any(key in m.gateways for r in vs.http for m in r.matches) or any(
        key in m.gateways for r in vs.tcp for m in r.matches) or any(key in m.gateways for r in vs.tls for m in r.matches)
    if not mentioned:
        return None
    http = []
    for hr in vs.http:
        if not hr.matches:
            if vs_level:
                http.append(hr)
            continue
        hm: list[HTTPMatch] = [replace(m, gateways=()) for m in hr.matches if _applies(m.gateways, vs_level, key)]
        if hm:
            http.append(replace(hr, matches=tuple(hm)) if len(hm) != len(hr.matches) or any(
                m.gateways for m in hr.matches) else hr)
    tcp = []
    for tr in vs.tcp:
        if not tr.matches:
            if vs_level:
                tcp.append(tr)
            continue
        lm: list[L4Match] = [replace(m, gateways=()) for m in tr.matches if _applies(m.gateways, vs_level, key)]
        if lm:
            tcp.append(replace(tr, matches=tuple(lm)))
    tls = []
    for sr in vs.tls:
        sm: list[TLSMatch] = [replace(m, gateways=()) for m in sr.matches if _applies(m.gateways, vs_level, key)]
        if sm:
            tls.append(replace(sr, matches=tuple(sm)))
    if not http and not tcp and not tls:
        return None
    if tuple(http) == vs.http and tuple(tcp) == vs.tcp and tuple(tls) == vs.tls:
        return vs
    return replace(vs, http=tuple(http), tcp=tuple(tcp), tls=tuple(tls))


def applies_to_gateways(vs: VirtualService) -> frozenset[str]:
    """Every Gateway (`ns/name`) that `vs` or one of its matches names."""
    out = {g for g in vs.gateways if g != MESH}
    out.update(g for r in vs.http for m in r.matches for g in m.gateways if g != MESH)
    out.update(g for r in vs.tcp for m in r.matches for g in m.gateways if g != MESH)
    out.update(g for r in vs.tls for m in r.matches for g in m.gateways if g != MESH)
    return frozenset(out)


def _wild_match(pattern: str, name: str) -> bool:
    """Whether `name` (possibly a wildcard itself) lies within `pattern`."""
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        suffix = pattern[1:]
        if name.startswith("*."):
            return name[1:].endswith(suffix)
        return name.endswith(suffix) and len(name) > len(suffix)
    return pattern == name


def intersect_host(server_host: str, vs_host: str) -> str | None:
    """The names both a server host and a VirtualService host cover (the more specific one),
    or None."""
    if _wild_match(server_host, vs_host):
        return vs_host
    if _wild_match(vs_host, server_host):
        return server_host
    return None


def server_vs_hosts(server: GatewayServer, vs: VirtualService) -> tuple[str, ...]:
    """The host names of `vs` a gateway server serves (server hosts whose namespace part admits
    `vs`'s namespace, intersected with `vs`'s hosts), sorted, each once.

    An exact server host is looked up among `vs`'s exact hosts and checked against its
    wildcard ones only, so thousands of servers and hosts cost set lookups, not every pair."""
    admitted = [host for ns, host in server.hosts if ns in ("*", vs.namespace)]
    if not admitted:
        return ()
    vhosts = vs.host_patterns or vs.hosts
    every = set(vhosts)  # (an exact server host never equals a wildcard name)
    wild = [vh for vh in vhosts if vh.startswith("*")] if "*" in "".join(vhosts) else []
    out: set[str] = set()
    for host in admitted:
        if not host.startswith("*"):
            if host in every or any(_wild_match(vh, host) for vh in wild):
                out.add(host)
            continue
        for vh in vhosts:
            got = intersect_host(host, vh)
            if got is not None:
                out.add(got)
    return tuple(sorted(out))


def gateway_virtual_services(gw: Gateway, virtual_services: tuple[VirtualService, ...]
                             ) -> tuple[VirtualService, ...]:
    """The views of the VirtualServices bound to `gw` (sorted by namespace and name)."""
    out = []
    for vs in virtual_services:
        view = bound_view(vs, gw.key)
        if view is not None:
            out.append(view)
    return tuple(out)
