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
  in another namespace (consumer routes) only to clients in theirs (GEP-1426). Each
  namespace with routes for a Service gets its own table: the producer routes become one
  VirtualService value exported everywhere, each namespace's consumer routes one exported
  to that namespace only, so clients there get their consumer routes and every other
  namespace the producer routes (or the plain Service). Sidecars of one namespace share one
  route configuration; namespaces whose tables are equal share its bytes (the cache);
- a VirtualService for the same host: both are VirtualService values for the host, and a
  client takes the one Istio's lookup gives it (`Mesh.virtual_service`: its namespace's
  own non-public ones, then those exported to it by name, then public ones; Istio
  compiles Gateway API routes into VirtualServices and selects among them the same way).
  A consumer route is its namespace's own, so it wins there over any VirtualService that
  namespace does not own privately; within one visibility class the route comes before
  the VirtualService (Istio goes by age there, Meshline has no age for VirtualServices).
  Where a route takes the host from a VirtualService, the VirtualService gets a warning
  naming the route and the namespaces (`gamma_issues`).

A parentRef of any other kind gets no status from Meshline (it is not Meshline's parent),
except a `Gateway` of class `meshline` (see `controlplane.model.gateways` when present).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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
from controlplane.model.mesh import vs_lookup

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
            services: Mapping[Hostname, Service]) -> GammaResult:
    """Route tables (VirtualService values, one per Service host and route namespace) and the
    route status. Which table a client gets is `Mesh.virtual_service`'s choice."""
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
        for a in attached:
            status[route_key(a.route)].append(_status(a.parent, ("Accepted", ""), a.problems))
        # One route table per namespace that has routes for this Service: the producer routes
        # (the Service's namespace) for every client, each namespace's consumer routes for its
        # own clients (`export_to`: Mesh.virtual_service ranks them first for that namespace).
        by_ns: dict[str, list[_Attached]] = {}
        for a in attached:
            by_ns.setdefault(a.route.namespace, []).append(a)
        for ns in sorted(by_ns):
            used = by_ns[ns]
            http = [hr for a in used for hr in a.http]
            http.sort(key=lambda item: item[0])
            tcp = [t for a in used for t in a.tcp]
            first = min((a.route for a in used), key=lambda r: (r.created, r.namespace, r.name))
            vss.append(VirtualService(ref=first.ref, namespace=first.namespace, name=first.name, hosts=(host,),
                                      http=tuple(hr for _, hr in http), tcp=tuple(tcp),
                                      export_to=() if ns == svc_ns else (ns,)))
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
                 vss_by_host: Mapping[Hostname, tuple[VirtualService, ...]]) -> list[Issue]:
    """Warnings for what the route status says did not work, and for VirtualServices whose
    host a Gateway API route takes for some namespaces' clients (`vss_by_host`: every
    candidate of a host, routes' tables included, as `Mesh.vss_by_host`)."""
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
        for j, host in enumerate(vs.hosts):
            lost = shadowed_by_routes(vs, vss_by_host.get(host, ()))
            if not lost:
                continue
            by_route: dict[str, list[str]] = {}
            for ns, winner in lost:
                by_route.setdefault(f"{winner.ref.kind} {winner.namespace}/{winner.name}", []).append(ns)
            applies = [ns for ns in _examined(vs, vss_by_host.get(host, ())) if ns is not None]
            if len(by_route) == 1 and "" in applies and len(lost) == len(applies):  # lost everywhere
                where = f"{next(iter(by_route))} for clients in every namespace"
            else:
                where = "; ".join(f"{name} for clients in {_namespaces(nss)}" for name, nss in by_route.items())
            out.append(Issue(vs.ref, f"spec.hosts[{j}]", f"host {host} is routed by {where} (a Gateway API route "
                             "attached to the Service comes before a VirtualService of the same visibility, and a "
                             "consumer route before any its namespace does not own): this VirtualService is not "
                             "applied to those clients", "warning"))
    return out


def _namespaces(nss: list[str]) -> str:
    named = [n for n in nss if n]
    text = ", ".join(named)
    if "" in nss:
        return f"{text} and every other namespace" if named else "every namespace"
    return f"namespace{'s' if len(named) > 1 else ''} {text}"


def shadowed_by_routes(vs: VirtualService, candidates: tuple[VirtualService, ...]
                       ) -> list[tuple[str, VirtualService]]:
    """(client namespace, route table) for each namespace where `vs` would apply to `host`
    among VirtualServices alone but a Gateway API route's table applies instead ("": any
    namespace not named otherwise). Looks at the namespaces that can differ: `vs`'s own,
    those it is exported to by name, those of consumer routes, and one standing for the rest."""
    if vs.ref.kind != "VirtualService" or all(c.ref.kind == "VirtualService" for c in candidates):
        return []
    out: list[tuple[str, VirtualService]] = []
    for ns in _examined(vs, candidates):
        if ns is not None:
            winner = vs_lookup(candidates, ns)
            if winner is not None and winner is not vs and winner.ref.kind != "VirtualService":
                out.append((ns, winner))
    return out


def _examined(vs: VirtualService, candidates: tuple[VirtualService, ...]) -> list[str | None]:
    """The namespaces `shadowed_by_routes` looks at, each replaced by None where `vs` would
    not apply even among VirtualServices alone."""
    plain = [c for c in candidates if c.ref.kind == "VirtualService"]
    names = {vs.namespace, *(n for n in vs.export_to if n not in (".", "*", "~")),
             *(c.namespace for c in candidates if c.ref.kind != "VirtualService"), ""}
    return [ns if vs_lookup(plain, ns) is vs else None for ns in sorted(names)]
