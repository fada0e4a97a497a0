"""Gateway API routes attached to Services (GAMMA) -> VirtualService values, plus the route
status the Gateway API asks for. Pure, no I/O.

`resolve(routes, grants, services)` is called while the Mesh is assembled. For every
HTTPRoute, GRPCRoute and TCPRoute parentRef naming a Service (group "" or "core", kind
Service, optional port):

- the parent must exist (and have the port, when one is given), else the parent's status
  is `Accepted=False/NoMatchingParent`;
- each backendRef must be a core Service (else `ResolvedRefs=False/InvalidKind`), in the
  route's namespace or in one whose ReferenceGrant allows it (`RefNotPermitted`), that
  exists and has the port (`BackendNotFound`). Requests for an invalid backend get an
  error for that backend's share of the weight (a route whose every backend is invalid,
  or whose weights are all 0, answers 500, as the Gateway API requires; a share of a
  split goes to a cluster that does not exist, and the route answers those requests 500
  too, while the valid backends keep their share);
- the routes attached to one Service become ONE VirtualService value for its host (the
  IR the VirtualService path uses, so every routing rule is translated in one place),
  with one route per match, ordered by the Gateway API's precedence: Exact path,
  RegularExpression (its place is left open by the spec; before prefixes, so that a
  catch-all cannot hide it), longest PathPrefix, method, most header matches, most query
  matches, then
  the oldest route, then namespace/name, then rule and match order;
- routes in the Service's own namespace (producer routes) apply to every client; routes
  in another namespace (consumer routes) only to clients in theirs. Meshline keeps one
  route table per Service: when producer routes exist, consumer routes are not applied
  (`Accepted=False/UnsupportedValue`), and without producer routes only the consumer
  routes of one namespace (the first by name) are, and none where a VirtualService routes
  the host (a consumer route must not take the host from other namespaces' clients);
- where a VirtualService also names the Service's host, the Gateway API (producer) routes
  win and the VirtualService gets a warning naming them (`gamma_issues`).

A parentRef of any other kind gets no status from Meshline (it is not Meshline's parent),
except a `Gateway` of class `meshline` (see `controlplane.model.gateways` when present).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace

from controlplane.model.gwapi import (
    GATEWAY_GROUP,
    MESH_CONTROLLER,
    BackendRef,
    Condition,
    GatewayRoute,
    ParentRef,
    ParentStatus,
    ReferenceGrant,
    RouteRule,
)
from controlplane.model.ir import (
    Destination,
    DirectResponse,
    Hostname,
    HTTPRoute,
    Issue,
    L4Match,
    Mirror,
    PortProtocol,
    RouteDestination,
    Service,
    TCPRoute,
    VirtualService,
    service_fqdn,
)

RouteKey = tuple[str, str, str]
"""(kind, namespace, name) of a route: its store key."""
INVALID_BACKEND_DOMAIN = "invalid-backend.meshline"
"""Hosts `<name>.<namespace>.invalid-backend.meshline` stand for invalid backends in a split:
no cluster has them, and the route answers their share of requests with 500
(translate.routes sets the route's cluster-not-found code)."""


def is_invalid_backend(host: str) -> bool:
    """Whether `host` is the stand-in of an invalid backendRef (`INVALID_BACKEND_DOMAIN`)."""
    return host.endswith("." + INVALID_BACKEND_DOMAIN)


@dataclass(frozen=True, slots=True)
class GammaResult:
    virtual_services: tuple[VirtualService, ...] = ()
    status: Mapping[RouteKey, tuple[ParentStatus, ...]] = field(default_factory=dict)


@dataclass(slots=True)
class _Attached:
    route: GatewayRoute
    parent: ParentRef
    svc: Service
    http: list[tuple[tuple[object, ...], HTTPRoute]]
    tcp: list[TCPRoute]
    problems: list[tuple[str, str]]  # (ResolvedRefs reason, message)


def route_key(route: GatewayRoute) -> RouteKey:
    return (route.kind, route.namespace, route.name)


def resolve(routes: Iterable[GatewayRoute], grants: Iterable[ReferenceGrant],
            services: Mapping[Hostname, Service], vs_hosts: Collection[Hostname] = frozenset()) -> GammaResult:
    """`vs_hosts`: the hosts VirtualServices route; consumer routes never take those over."""
    grants = tuple(grants)
    status: dict[RouteKey, list[ParentStatus]] = {}
    by_host: dict[Hostname, list[_Attached]] = {}
    for route in sorted(routes, key=route_key):
        entries = status.setdefault(route_key(route), [])
        for parent in route.parents:
            if not parent.is_service:
                continue  # not ours (Gateways of class meshline: controlplane.model.gateways)
            host = service_fqdn(parent.name, parent.namespace)
            svc = services.get(host)
            problem = _parent_problem(route, parent, svc)
            if svc is None or problem is not None:
                entries.append(_status(parent, problem or ("NoMatchingParent", ""), []))
                continue
            att = _attach(route, parent, svc, grants, services)
            by_host.setdefault(host, []).append(att)
    vss: list[VirtualService] = []
    for host in sorted(by_host):
        attached = by_host[host]
        svc_ns = attached[0].svc.namespace
        producers = [a for a in attached if a.route.namespace == svc_ns]
        export: tuple[str, ...]
        if producers:
            used, export = producers, ()
            why = (f"a route in another namespace than Service {svc_ns}/{attached[0].svc.name}'s (a consumer route) "
                   "is not applied while the Service has routes in its own namespace (Meshline keeps one route "
                   "table per Service)")
        elif host in vs_hosts:
            # One route table per Service: a consumer route taking the host would drop the
            # VirtualService for the clients of every other namespace (Istio keeps it for them).
            used, export = [], ()
            why = (f"a VirtualService routes Service {svc_ns}/{attached[0].svc.name} for the clients of every "
                   "namespace it is exported to; a consumer route (in another namespace than the Service's) "
                   "does not take it over (Meshline keeps one route table per Service)")
        else:
            first_ns = min(a.route.namespace for a in attached)
            used, export = [a for a in attached if a.route.namespace == first_ns], (first_ns,)
            why = (f"consumer routes of namespace {first_ns} already apply to Service "
                   f"{svc_ns}/{attached[0].svc.name} (Meshline applies the consumer routes of one namespace)")
        applied = {id(a) for a in used}  # (identity: comparing the routes field by field is quadratic)
        for a in attached:
            accepted = ("Accepted", "") if id(a) in applied else ("UnsupportedValue", why)
            status[route_key(a.route)].append(_status(a.parent, accepted, a.problems))
        if not used:
            continue
        http = [hr for a in used for hr in a.http]
        http.sort(key=lambda item: item[0])
        tcp = [t for a in used for t in a.tcp]
        first = min((a.route for a in used), key=lambda r: (r.created, r.namespace, r.name))
        vss.append(VirtualService(ref=first.ref, namespace=first.namespace, name=first.name, hosts=(host,),
                                  http=tuple(hr for _, hr in http), tcp=tuple(tcp), export_to=export))
    return GammaResult(tuple(vss), {k: tuple(v) for k, v in status.items() if v})


def _parent_problem(route: GatewayRoute, parent: ParentRef, svc: Service | None) -> tuple[str, str] | None:
    """(Accepted reason, message) when `route` cannot attach to the Service `parent` names."""
    if svc is None:
        return "NoMatchingParent", f"Service {parent.namespace}/{parent.name} does not exist"
    ports = [p for p in svc.ports if (parent.port is None or p.port == parent.port)
             and (parent.section_name is None or p.name == parent.section_name)]
    if not ports:
        have = ", ".join(f"{p.name or '-'}:{p.port}" for p in svc.ports) or "none"
        which = f"port {parent.port}" if parent.port is not None else f"port named {parent.section_name!r}"
        return "NoMatchingParent", f"Service {svc.namespace}/{svc.name} has no {which} (its ports: {have})"
    # An L7 route needs an HTTP port (or one whose protocol is sniffed), a TCPRoute a TCP one.
    if route.kind == "TCPRoute":
        usable = [p for p in ports if not p.protocol.is_http]
    else:
        usable = [p for p in ports if p.protocol.is_http or p.protocol is PortProtocol.UNKNOWN]
    if not usable:
        kind = "TCP" if route.kind != "TCPRoute" else "HTTP"
        return "UnsupportedValue", (f"a {route.kind} cannot apply to {kind} port(s) "
                                    f"{', '.join(str(p.port) for p in ports)} of Service {svc.namespace}/{svc.name} "
                                    "(the port's protocol, from its name or appProtocol, decides how it is proxied)")
    return None


def _status(parent: ParentRef, accepted: tuple[str, str], problems: list[tuple[str, str]]) -> ParentStatus:
    reason, message = accepted
    conds = [Condition("Accepted", "True" if reason == "Accepted" else "False", reason,
                       message or "accepted by Meshline: applied by the sidecars of this Service's clients and by "
                                  "its waypoint")]
    if problems:
        conds.append(Condition("ResolvedRefs", "False", problems[0][0], "; ".join(m for _, m in problems)))
    else:
        conds.append(Condition("ResolvedRefs", "True", "ResolvedRefs", "all references resolved"))
    return ParentStatus(parent, MESH_CONTROLLER, tuple(conds))


def _port_of(parent: ParentRef, svc: Service) -> int | None:
    if parent.port is not None:
        return parent.port
    if parent.section_name is not None:
        return next((p.port for p in svc.ports if p.name == parent.section_name), None)
    return None


def _attach(route: GatewayRoute, parent: ParentRef, svc: Service, grants: tuple[ReferenceGrant, ...],
            services: Mapping[Hostname, Service]) -> _Attached:
    att = _Attached(route, parent, svc, [], [], [])
    att.http, att.tcp = route_tables(route, _port_of(parent, svc), grants, services, att.problems)
    return att


def route_tables(route: GatewayRoute, port: int | None, grants: tuple[ReferenceGrant, ...],
                 services: Mapping[Hostname, Service], problems: list[tuple[str, str]]
                 ) -> tuple[list[tuple[tuple[object, ...], HTTPRoute]], list[TCPRoute]]:
    """A route's rules as IR routes for one parent port (None: every port): HTTP routes with
    their precedence keys, TCP routes; backend problems are appended to `problems`."""
    http: list[tuple[tuple[object, ...], HTTPRoute]] = []
    tcp: list[TCPRoute] = []
    for rule in route.rules:
        dests = _destinations(route, rule.backends, grants, services, problems)
        if route.kind == "TCPRoute":
            live = tuple(d for d in dests if d.weight > 0)
            if live:
                tcp.append(TCPRoute((L4Match(port=port),) if port else (), live))
            continue
        mirrors = _mirrors(route, rule, grants, services, problems)
        if rule.fails is not None:
            problems.append(("InvalidKind", f"spec.rules[{rule.index}]: {rule.fails}: its requests are answered 500"))
        for j, rm in enumerate(rule.matches):
            http.append(((rm.rank, route.created, route.namespace, route.name, rule.index, j),
                         _http_route(route, rule, j, port, dests, mirrors)))
    return http, tcp


def _http_route(route: GatewayRoute, rule: RouteRule, j: int, port: int | None,
                dests: tuple[RouteDestination, ...], mirrors: tuple[Mirror, ...]) -> HTTPRoute:
    rm = rule.matches[j]
    name = f"{route.kind.lower()}.{route.namespace}.{route.name}.{rule.index}.{j}"
    base = HTTPRoute(name=name, matches=(replace(rm.match, port=port),), headers=rule.headers, cors=rule.cors)
    if rule.fails is not None:
        return replace(base, direct_response=DirectResponse(500, f"{rule.fails}\n"))
    if rm.redirect is not None:
        return replace(base, redirect=rm.redirect)
    valid = [d for d in dests if not is_invalid_backend(d.destination.host)]
    if not valid or all(d.weight == 0 for d in dests):
        why = "every backendRef of this rule is invalid" if dests else "this rule has no backendRefs"
        if dests and valid:
            why = "every backendRef of this rule has weight 0"
        return replace(base, direct_response=DirectResponse(500, f"{why}\n"))
    return replace(base, route=dests, rewrite=rm.rewrite, timeout_ms=rule.timeout_ms, retries=rule.retries,
                   mirrors=mirrors)


def _destinations(route: GatewayRoute, backends: tuple[BackendRef, ...], grants: tuple[ReferenceGrant, ...],
                  services: Mapping[Hostname, Service], problems: list[tuple[str, str]]) -> tuple[RouteDestination, ...]:
    out: list[RouteDestination] = []
    for b in backends:
        dest, problem = backend_destination(route, b, grants, services)
        if problem is not None:
            problems.append(problem)
        if dest is None:
            dest = Destination(Hostname(f"{b.name}.{b.namespace}.{INVALID_BACKEND_DOMAIN}"), None, b.port or 80)
        out.append(RouteDestination(dest, b.weight, b.headers))
    return tuple(out)


def _mirrors(route: GatewayRoute, rule: RouteRule, grants: tuple[ReferenceGrant, ...],
             services: Mapping[Hostname, Service], problems: list[tuple[str, str]]) -> tuple[Mirror, ...]:
    out: list[Mirror] = []
    for m in rule.mirrors:
        dest, problem = backend_destination(route, m.backend, grants, services)
        if problem is not None:
            problems.append((problem[0], problem[1] + " (this mirror is not applied)"))
        if dest is not None:
            out.append(Mirror(dest, m.percentage))
    return tuple(out)


def backend_destination(route: GatewayRoute, b: BackendRef, grants: tuple[ReferenceGrant, ...],
                        services: Mapping[Hostname, Service]) -> tuple[Destination | None, tuple[str, str] | None]:
    """The destination a backendRef names, or None and (ResolvedRefs reason, message)."""
    where = f"{b.path}: " if b.path else ""
    if b.group not in ("", "core") or b.kind != "Service":
        return None, ("InvalidKind", f"{where}backend kind {b.group or 'core'}/{b.kind} is not supported "
                                     "(only Services are)")
    if b.namespace != route.namespace and not any(
            g.namespace == b.namespace and g.permits(GATEWAY_GROUP, route.kind, route.namespace, "", "Service", b.name)
            for g in grants):
        return None, ("RefNotPermitted", f"{where}Service {b.namespace}/{b.name} is in another namespace and no "
                                         f"ReferenceGrant in {b.namespace} allows {route.kind}s from "
                                         f"{route.namespace} to refer to it")
    host = service_fqdn(b.name, b.namespace)
    svc = services.get(host)
    if svc is None:
        return None, ("BackendNotFound", f"{where}Service {b.namespace}/{b.name} does not exist")
    if b.port is not None and all(p.port != b.port for p in svc.ports):
        have = ", ".join(str(p.port) for p in svc.ports) or "none"
        return None, ("BackendNotFound", f"{where}Service {b.namespace}/{b.name} has no port {b.port} "
                                         f"(its ports: {have})")
    return Destination(host, None, b.port), None


# --------------------------------------------------------------------------- issues


def gamma_issues(routes: Iterable[GatewayRoute], status: Mapping[RouteKey, tuple[ParentStatus, ...]],
                 virtual_services: Iterable[VirtualService],
                 vs_by_host: Mapping[Hostname, VirtualService]) -> list[Issue]:
    """Warnings for what the route status says did not work, and for VirtualServices whose
    host a Gateway API route took over."""
    out: list[Issue] = []
    for route in sorted(routes, key=route_key):
        for st in status.get(route_key(route), ()):
            i = route.parents.index(st.parent) if st.parent in route.parents else 0
            for c in st.conditions:
                if c.status == "False":
                    fld = f"spec.parentRefs[{i}]" if c.type == "Accepted" else "spec.rules"
                    out.append(Issue(route.ref, fld, f"{c.type}=False ({c.reason}) for parent "
                                     f"{st.parent.kind} {st.parent.namespace}/{st.parent.name}: {c.message}",
                                     "warning"))
    for vs in virtual_services:
        for host in vs.hosts:
            winner = vs_by_host.get(host)
            if winner is not None and winner.ref.kind in ("HTTPRoute", "GRPCRoute", "TCPRoute"):
                out.append(Issue(vs.ref, "spec.hosts", f"host {host} is routed by {winner.ref.kind} "
                                 f"{winner.namespace}/{winner.name} (Gateway API routes attached to a Service take "
                                 "precedence); this VirtualService is ignored for that host", "warning"))
    return out
