"""VirtualService spec -> IR `VirtualService`. Pure, no I/O.

The spec follows Istio's public v1 schema. Hosts and destination hosts are resolved in the
VirtualService's namespace (`reviews` -> `reviews.<ns>.svc.cluster.local`). Every unknown
field, wrong type or invalid value is an error naming its field path; Istio fields that
Meshline accepts but does not implement are warnings.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from controlplane.model import convert_http as h
from controlplane.model.convert_base import (
    Ctx,
    check_fields,
    child,
    get_duration,
    get_export_to,
    get_int,
    get_labels,
    get_list,
    get_percentage,
    get_port,
    get_str,
    get_str_list,
    host_problem,
    index,
    is_dns_label,
    item_map,
    join,
    resolve_host,
)
from controlplane.model.gateways import MESH, resolve_gateway_name
from controlplane.model.ir import (
    Destination,
    Hostname,
    HTTPMatch,
    HTTPRoute,
    L4Match,
    Mirror,
    RouteDestination,
    TCPRoute,
    TLSMatch,
    TLSRoute,
    VirtualService,
)

_SPEC_FIELDS = ("hosts", "gateways", "http", "tcp", "tls", "exportTo")
_HTTP_FIELDS = (
    "name",
    "match",
    "route",
    "redirect",
    "directResponse",
    "delegate",
    "rewrite",
    "timeout",
    "retries",
    "fault",
    "mirror",
    "mirrors",
    "mirrorPercentage",
    "mirrorPercent",
    "mirror_percent",
    "corsPolicy",
    "headers",
)
_TCP_FIELDS = ("match", "route")
_L4_MATCH_FIELDS = (
    "port",
    "destinationSubnets",
    "sourceLabels",
    "gateways",
    "sourceNamespace",
    "sourceSubnet",
)


def convert_virtual_service(ctx: Ctx, namespace: str, name: str) -> VirtualService | None:
    spec = child(ctx, ctx.raw.body, "spec", "")
    if spec is None:
        if ctx.raw.body.get("spec") is None:
            ctx.error("spec", "is required")
        return None
    check_fields(ctx, spec, "spec", _SPEC_FIELDS)
    gateways = _gateways(ctx, spec, namespace)
    hosts, patterns = _hosts(ctx, spec, namespace, MESH in gateways)
    http_items = get_list(ctx, spec, "http", "spec")
    tcp_items = get_list(ctx, spec, "tcp", "spec")
    tls_items = get_list(ctx, spec, "tls", "spec")
    http: list[HTTPRoute] = []
    for i, item in enumerate(http_items):
        route = http_route(ctx, item, index("spec.http", i), namespace)
        if route is not None:
            http.append(route)
    tcp: list[TCPRoute] = []
    for i, item in enumerate(tcp_items):
        t = tcp_route(ctx, item, index("spec.tcp", i), namespace)
        if t is not None:
            tcp.append(t)
    tls: list[TLSRoute] = []
    for i, item in enumerate(tls_items):
        t_route = tls_route(ctx, item, index("spec.tls", i), namespace)
        if t_route is not None:
            tls.append(t_route)
    if tls_items and (MESH in gateways or any(MESH in m.gateways for r in tls for m in r.matches)):
        ctx.warn("spec.tls", "tls routes are applied by gateways (PASSTHROUGH servers) only; sidecars and "
                             "waypoints ignore them")
    if all(spec.get(k) is None or spec.get(k) == [] for k in ("http", "tcp", "tls")):
        ctx.error("spec", "at least one http, tcp or tls route is required")
    export_to = get_export_to(ctx, spec, "spec")
    return VirtualService(
        ref=ctx.raw.ref,
        namespace=namespace,
        name=name,
        hosts=hosts,
        http=tuple(http),
        tcp=tuple(tcp),
        export_to=export_to,
        gateways=gateways,
        host_patterns=patterns,
        tls=tuple(tls),
    )


def _gateways(ctx: Ctx, spec: Mapping[str, Any], namespace: str) -> tuple[str, ...]:
    """`spec.gateways` as `mesh` / `ns/name` (empty: `mesh`; controlplane.model.gateways)."""
    names = get_str_list(ctx, spec, "gateways", "spec")
    out: list[str] = []
    for i, name in enumerate(names):
        resolved = resolve_gateway_name(name, namespace)
        ns, _, gw = resolved.partition("/")
        if resolved != MESH and not (is_dns_label(ns) and is_dns_label(gw)):
            ctx.error(index("spec.gateways", i), f"{name!r} is not 'mesh', a Gateway name or namespace/name")
            continue
        out.append(resolved)
    return tuple(dict.fromkeys(out)) or (MESH,)


def _hosts(ctx: Ctx, spec: Mapping[str, Any], namespace: str, for_mesh: bool
           ) -> tuple[tuple[Hostname, ...], tuple[str, ...]]:
    """(service hosts for mesh routing, every host pattern for gateways). Wildcard hosts are
    for gateways only: warned about on a VirtualService bound to `mesh`."""
    given = spec.get("hosts")
    if given is None or (isinstance(given, list) and not given):
        ctx.error("spec.hosts", "at least one host is required")
        return (), ()
    names = get_str_list(ctx, spec, "hosts", "spec")
    out: list[Hostname] = []
    patterns: list[str] = []
    usable = 0
    for i, host in enumerate(names):
        p = index("spec.hosts", i)
        if "*" in host:
            wild = host.strip().rstrip(".").lower()
            if wild != "*" and (not wild.startswith("*.") or host_problem(wild[2:]) is not None):
                ctx.error(p, f"{host!r}: a wildcard is only allowed as the first label")
                continue
            patterns.append(wild)
            if for_mesh:
                ctx.warn(p, f"wildcard host {host!r} is not supported for mesh traffic yet; ignored there "
                            "(gateways use it)")
            continue
        problem = host_problem(host)
        if problem is not None:
            ctx.error(p, problem)
            continue
        usable += 1
        fqdn = resolve_host(host, namespace)
        if fqdn in out:
            ctx.warn(p, f"duplicate host {fqdn}")
            continue
        out.append(fqdn)
        patterns.append(fqdn)
        literal = host.strip().rstrip(".").lower()
        if "." in literal and literal != fqdn:  # `example.com`: a gateway host, or service example.com
            patterns.append(literal)
    if names and not usable and not patterns and not ctx.failed:
        ctx.warn("spec.hosts", "no usable hosts: this VirtualService has no effect")
    return tuple(out), tuple(dict.fromkeys(patterns))


# --------------------------------------------------------------------------- destinations


def destination(ctx: Ctx, value: object, path: str, namespace: str) -> Destination | None:
    """Istio `Destination` {host, subset, port{number}} with the host resolved."""
    m = item_map(ctx, value, path)
    if m is None:
        return None
    check_fields(ctx, m, path, ("host", "subset", "port"))
    host = get_str(ctx, m, "host", path, required=True)
    subset = get_str(ctx, m, "subset", path)
    port = h.port_selector(ctx, m, path)
    if host is None:
        return None
    if "*" in host:
        ctx.error(join(path, "host"), f"a destination host must not be a wildcard, got {host!r}")
        return None
    problem = host_problem(host)
    if problem is not None:
        ctx.error(join(path, "host"), problem)
        return None
    if subset is not None and subset and not is_dns_label(subset):
        ctx.error(join(path, "subset"), f"{subset!r} is not a valid subset name")
        return None
    return Destination(resolve_host(host, namespace), subset or None, port)


def route_destinations(
    ctx: Ctx, items: Sequence[Any], path: str, namespace: str, *, http: bool
) -> tuple[RouteDestination, ...]:
    """Weighted destinations. One destination without a weight gets 100; with several, a
    missing weight is 0. Negative weights, or weights that are all 0, are errors."""
    fields = ("destination", "weight", "headers") if http else ("destination", "weight")
    parsed: list[tuple[Destination, int | None, Any]] = []
    valid = True
    for i, item in enumerate(items):
        p = index(path, i)
        m = item_map(ctx, item, p)
        if m is None:
            valid = False
            continue
        check_fields(ctx, m, p, fields)
        dest = None
        if m.get("destination") is None:
            ctx.error(join(p, "destination"), "is required")
        else:
            dest = destination(ctx, m["destination"], join(p, "destination"), namespace)
        weight = m.get("weight")
        w: int | None = None
        if weight is not None:
            w = get_int(ctx, m, "weight", p)
            if w is not None and w < 0:
                ctx.error(join(p, "weight"), f"must not be negative, got {w}")
                w = None
            if w is None:
                valid = False
        hdrs = h.headers(ctx, m, "headers", p) if http else None
        if dest is None:
            valid = False
            continue
        parsed.append((dest, w, hdrs))
    if not valid:
        return ()
    if len(parsed) == 1 and parsed[0][1] is None:
        return (RouteDestination(parsed[0][0], 100, parsed[0][2]),)
    out = tuple(RouteDestination(d, w or 0, hd) for d, w, hd in parsed)
    if out and all(r.weight == 0 for r in out):
        ctx.error(path, "all weights are 0: at least one destination needs a positive weight")
    elif len(out) > 1 and sum(r.weight for r in out) != 100:
        total = sum(r.weight for r in out)
        ctx.warn(path, f"weights sum to {total}, not 100: traffic is split in proportion "
                 f"({', '.join(str(r.weight) for r in out)} of {total})")
    return out


def _mirrors(ctx: Ctx, m: Mapping[str, Any], path: str, namespace: str) -> tuple[Mirror, ...]:
    out: list[Mirror] = []
    listed = get_list(ctx, m, "mirrors", path)
    pct = get_percentage(ctx, m, "mirrorPercentage", path)
    legacy: int | None = None
    for key in ("mirrorPercent", "mirror_percent"):
        value = get_int(ctx, m, key, path, lo=0, hi=100)
        legacy = value if value is not None else legacy
    if m.get("mirror") is not None:
        if listed:
            ctx.error(join(path, "mirrors"), "set mirror or mirrors, not both")
        dest = destination(ctx, m["mirror"], join(path, "mirror"), namespace)
        if pct is None and legacy is not None:
            pct = float(legacy)
        if dest is not None:
            out.append(Mirror(dest, pct))
    elif pct is not None or legacy is not None:
        ctx.warn(
            join(path, "mirrorPercentage"), "ignored: there is no mirror (mirrors use their own percentage)"
        )
    for i, item in enumerate(listed):
        p = index(join(path, "mirrors"), i)
        im = item_map(ctx, item, p)
        if im is None:
            continue
        check_fields(ctx, im, p, ("destination", "percentage"))
        if im.get("destination") is None:
            ctx.error(join(p, "destination"), "is required")
            continue
        dest = destination(ctx, im["destination"], join(p, "destination"), namespace)
        mirror_pct = get_percentage(ctx, im, "percentage", p)
        if dest is not None:
            out.append(Mirror(dest, mirror_pct))
    return tuple(out)


# --------------------------------------------------------------------------- http and tcp routes


def http_route(ctx: Ctx, value: object, path: str, namespace: str) -> HTTPRoute | None:
    m = item_map(ctx, value, path)
    if m is None:
        return None
    errors = ctx.error_count()
    check_fields(ctx, m, path, _HTTP_FIELDS)
    if m.get("delegate") is not None:
        ctx.error(join(path, "delegate"), "delegate VirtualServices are not supported")
    matches: list[HTTPMatch] = []
    for i, item in enumerate(get_list(ctx, m, "match", path)):
        match = h.http_match(ctx, item, index(join(path, "match"), i))
        if match is not None:
            matches.append(replace(match, gateways=tuple(resolve_gateway_name(g, namespace)
                                                          for g in match.gateways)))
    route_items = get_list(ctx, m, "route", path)
    route = route_destinations(ctx, route_items, join(path, "route"), namespace, http=True)
    actions = [k for k in ("redirect", "directResponse") if m.get(k) is not None]
    if route_items:
        actions.insert(0, "route")
    if not actions and m.get("delegate") is None:
        ctx.error(path, "an http route needs one of route, redirect or directResponse")
    elif len(actions) > 1:
        ctx.error(
            path,
            f"an http route takes only one of route, redirect or directResponse, got {' and '.join(actions)}",
        )
    rw = h.rewrite(ctx, m, path)
    if rw is not None and m.get("redirect") is not None:
        ctx.error(join(path, "rewrite"), "rewrite cannot be combined with redirect")
    result = HTTPRoute(
        name=get_str(ctx, m, "name", path) or "",
        matches=tuple(matches),
        route=route,
        redirect=h.redirect(ctx, m, path),
        direct_response=h.direct_response(ctx, m, path),
        rewrite=rw,
        timeout_ms=get_duration(ctx, m, "timeout", path),
        retries=h.retries(ctx, m, path),
        fault=h.fault(ctx, m, path),
        mirrors=_mirrors(ctx, m, path, namespace),
        headers=h.headers(ctx, m, "headers", path),
        cors=h.cors(ctx, m, path),
    )
    return result if ctx.error_count() == errors else None


def _l4_match(ctx: Ctx, value: object, path: str) -> L4Match | None:
    m = item_map(ctx, value, path)
    if m is None:
        return None
    check_fields(ctx, m, path, _L4_MATCH_FIELDS)
    gateways = h.check_gateways(ctx, m, path)
    if m.get("sourceSubnet") is not None:
        ctx.error(join(path, "sourceSubnet"), "sourceSubnet is not supported")
    subnets: list[str] = []
    for i, text in enumerate(get_str_list(ctx, m, "destinationSubnets", path)):
        try:
            subnets.append(str(ipaddress.ip_network(text, strict=False)))
        except ValueError:
            ctx.error(
                index(join(path, "destinationSubnets"), i), f"{text!r} is not an IP address or CIDR block"
            )
    source_ns = get_str(ctx, m, "sourceNamespace", path)
    if source_ns is not None and not is_dns_label(source_ns):
        ctx.error(join(path, "sourceNamespace"), f"{source_ns!r} is not a namespace name")
    return L4Match(
        port=get_port(ctx, m, "port", path),
        destination_subnets=tuple(subnets),
        source_labels=get_labels(ctx, m, "sourceLabels", path),
        source_namespace=source_ns or None,
        gateways=gateways,
    )


def tcp_route(ctx: Ctx, value: object, path: str, namespace: str) -> TCPRoute | None:
    m = item_map(ctx, value, path)
    if m is None:
        return None
    errors = ctx.error_count()
    check_fields(ctx, m, path, _TCP_FIELDS)
    matches: list[L4Match] = []
    for i, item in enumerate(get_list(ctx, m, "match", path)):
        match = _l4_match(ctx, item, index(join(path, "match"), i))
        if match is not None:
            matches.append(replace(match, gateways=tuple(resolve_gateway_name(g, namespace)
                                                          for g in match.gateways)))
    items = get_list(ctx, m, "route", path)
    if not items:
        ctx.error(join(path, "route"), "at least one destination is required")
    route = route_destinations(ctx, items, join(path, "route"), namespace, http=False)
    if ctx.error_count() != errors:
        return None
    return TCPRoute(tuple(matches), route)


_TLS_MATCH_FIELDS = ("sniHosts", "port", "gateways")
_TLS_MATCH_IGNORED = {
    "destinationSubnets": "destinationSubnets is not supported on tls routes; ignored",
    "sourceLabels": "sourceLabels is not supported on tls routes (gateways only); ignored",
    "sourceNamespace": "sourceNamespace is not supported on tls routes (gateways only); ignored",
}


def _tls_match(ctx: Ctx, value: object, path: str, namespace: str) -> TLSMatch | None:
    m = item_map(ctx, value, path)
    if m is None:
        return None
    check_fields(ctx, m, path, _TLS_MATCH_FIELDS, _TLS_MATCH_IGNORED)
    gateways = h.check_gateways(ctx, m, path)
    names: list[str] = []
    for i, text in enumerate(get_str_list(ctx, m, "sniHosts", path)):
        host = text.strip().rstrip(".").lower()
        bare = host[2:] if host.startswith("*.") else host
        problem = None if host == "*" else host_problem(bare)
        if problem is not None or "*" in bare:
            ctx.error(index(join(path, "sniHosts"), i), problem or f"{text!r}: a wildcard is only allowed as the "
                                                                   "first label")
            continue
        names.append(host)
    if not names:
        ctx.error(join(path, "sniHosts"), "at least one SNI host is required")
        return None
    return TLSMatch(tuple(dict.fromkeys(names)), get_port(ctx, m, "port", path),
                    tuple(resolve_gateway_name(g, namespace) for g in gateways))


def tls_route(ctx: Ctx, value: object, path: str, namespace: str) -> TLSRoute | None:
    """`tls[]` (Istio TLSRoute): SNI matches (required) and weighted destinations."""
    m = item_map(ctx, value, path)
    if m is None:
        return None
    errors = ctx.error_count()
    check_fields(ctx, m, path, _TCP_FIELDS)
    matches: list[TLSMatch] = []
    items = get_list(ctx, m, "match", path)
    if not items:
        ctx.error(join(path, "match"), "at least one match with sniHosts is required")
    for i, item in enumerate(items):
        match = _tls_match(ctx, item, index(join(path, "match"), i), namespace)
        if match is not None:
            matches.append(match)
    routes = get_list(ctx, m, "route", path)
    if not routes:
        ctx.error(join(path, "route"), "at least one destination is required")
    route = route_destinations(ctx, routes, join(path, "route"), namespace, http=False)
    if ctx.error_count() != errors:
        return None
    return TLSRoute(tuple(matches), route)
