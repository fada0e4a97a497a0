"""Gateway API Gateways of class `meshline` -> the gateway proxy's IR (an Istio-style
`Gateway` and VirtualServices bound to it, served by `meshline bootstrap --mode gateway`:
`controlplane.translate.gateway`), plus the status the Gateway API asks for. Pure, no I/O.

- A GatewayClass whose `controllerName` is `meshline.io/gateway-controller` is Meshline's:
  its status is `Accepted=True`. Gateways of another class are left alone (no status).
- A Gateway of Meshline's class becomes the IR `Gateway` `ns/name` whose proxies are the
  pods of its own namespace labelled `gateway.networking.k8s.io/gateway-name: <name>` (as
  Istio labels a Gateway's deployment and applies a Gateway only to the instances of its
  Service in its namespace: a pod of another namespace with that label gets nothing). Its HTTP listeners, HTTPS listeners terminating TLS, TLS listeners
  in mode Passthrough and TCP listeners become servers. An HTTPS listener's `certificateRefs`
  name Secrets of the Gateway's namespace or, when a ReferenceGrant of the Secret's namespace
  allows Gateways of the Gateway's namespace to refer to it, of another namespace; the first
  is served over SDS (`ServerTLS.credential_namespace`: the gateway proxy receives it only
  when its pod is one the Gateway selects: `controlplane.translate.gateway`). A reference
  that is not a Secret, not permitted (`RefNotPermitted`) or to a Secret without a usable
  certificate and key (`InvalidCertificateRef`) makes the listener's `ResolvedRefs` False
  and the listener is not served at all (fail closed); its Secrets are listed in the IR
  Gateway's `withheld_credentials`, whose SDS names then carry stand-ins (a proxy that held
  the key before, e.g. in a draining listener, has it overwritten). UDP listeners, TLS listeners that
  terminate and HTTPS Passthrough are not supported (the listener's status says why, and
  the listener is not served).
- A TCPRoute attached to a TCP listener forwards its connections (weighted backends; the
  oldest route of a listener wins, a connection having nothing to match on).
- A TLSRoute attached to a TLS Passthrough listener forwards the connections whose SNI is
  one of its hostnames (intersected with the listener's) to its weighted backends, the TLS
  bytes untouched (a TLS inspector reads the SNI; one filter chain per name: the Istio
  PASSTHROUGH path, `VirtualService.tls`, one VirtualService per listener whose matches name
  it: `TLSMatch.listener`). For a name two TLSRoutes of a listener claim, the oldest wins;
  a name within the hostname of a more specific TLS or HTTPS listener of the same port is
  that listener's (Gateway API listener isolation: the listener whose hostname matches the
  SNI most specifically gets the connection, and only its routes see it). A route told a
  name it attached for is not its: its `Accepted` message says which and why, and a warning.
- An HTTPRoute or GRPCRoute whose parentRef names the Gateway (optionally a listener by
  `sectionName` or `port`) attaches to the listeners that allow its namespace
  (`allowedRoutes.namespaces`: Same by default, All, Selector on namespace labels) and its
  kind, and whose hostname intersects the route's `hostnames` (none: the listener's); a
  name within a more specific hostname of another listener of the port is not attached
  there (listener isolation, as for TLSRoutes; said in `Accepted` and warned). The
  rules of every route attached for one hostname become one VirtualService bound to the
  Gateway, ordered by the Gateway API's precedence (`controlplane.model.gamma`), each
  match limited to the listener ports it attached to. Route status: controllerName
  `meshline.io/gateway-controller`, `Accepted` (NoMatchingParent, NotAllowedByListeners,
  NoMatchingListenerHostname) and `ResolvedRefs`.
- An Istio Gateway with the same namespace/name keeps that name for the gateway proxy; the
  Gateway API one is then not served (its status says so).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from controlplane.model.gamma import (
    INVALID_BACKEND_DOMAIN,
    RouteKey,
    backend_destination,
    route_key,
    route_tables,
)
from controlplane.model.gateways import intersect_host
from controlplane.model.gwapi import (
    GATEWAY_CONTROLLER,
    ApiGateway,
    Condition,
    GatewayClass,
    GatewayRoute,
    Listener,
    ListenerStatus,
    ObjectStatus,
    ParentRef,
    ParentStatus,
    ReferenceGrant,
)
from controlplane.model.ir import (
    Destination,
    Gateway,
    GatewayServer,
    Hostname,
    HTTPRoute,
    Issue,
    Namespace,
    RouteDestination,
    ServerTLS,
    Service,
    TCPRoute,
    TlsCredential,
    TLSMatch,
    TLSRoute,
    VirtualService,
    labels_match,
)

GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
ObjectKey = tuple[str, str, str]
# the Accepted message of a route's parent that lost some hostnames goes on with this (a warning)
NOT_SERVED = "not served"
_HTTP_KINDS = ("HTTPRoute", "GRPCRoute")
_TCP_KINDS = ("TCPRoute",)
_TLS_KINDS = ("TLSRoute",)


@dataclass(frozen=True, slots=True)
class GatewayResult:
    gateways: Mapping[str, Gateway] = field(default_factory=dict)  # "ns/name" -> IR Gateway
    virtual_services: tuple[VirtualService, ...] = ()  # bound to those gateways
    route_status: Mapping[RouteKey, tuple[ParentStatus, ...]] = field(default_factory=dict)
    object_status: Mapping[ObjectKey, ObjectStatus] = field(default_factory=dict)


def _key(ref_kind: str, namespace: str, name: str) -> ObjectKey:
    return (ref_kind, namespace, name)


def resolve_gateways(gateways: Iterable[ApiGateway], classes: Iterable[GatewayClass],
                     routes: Iterable[GatewayRoute], grants: Iterable[ReferenceGrant],
                     services: Mapping[Hostname, Service], namespaces: Mapping[str, Namespace],
                     taken: Iterable[str] = (),
                     credentials: Mapping[tuple[str, str], TlsCredential] | None = None) -> GatewayResult:
    """`taken`: the `ns/name` of Istio Gateways (they keep the name); `credentials`: the TLS
    Secrets by (namespace, name), to check certificateRefs (None: not checked)."""
    grants_t = tuple(grants)
    ours = {c.name: c for c in classes if c.controller == GATEWAY_CONTROLLER}
    object_status: dict[ObjectKey, ObjectStatus] = {}
    for c in ours.values():
        object_status[_key(c.ref.kind, c.ref.namespace, c.ref.name)] = ObjectStatus(
            (Condition("Accepted", "True", "Accepted", "handled by Meshline: Gateways of this class are served by "
                                                       "`meshline bootstrap --mode gateway` proxies"),),
            generation=c.generation, ref=c.ref)
    served: dict[str, ApiGateway] = {}
    listeners_ok: dict[str, dict[str, tuple[Listener, GatewayServer]]] = {}
    listener_conds: dict[str, dict[str, list[Condition]]] = {}
    refused_refs: dict[str, set[tuple[str, str]]] = {}
    taken_set = set(taken)
    for gw in sorted(gateways, key=lambda g: (g.namespace, g.name)):
        if gw.class_name not in ours:
            continue
        key = f"{gw.namespace}/{gw.name}"
        if key in taken_set:
            object_status[_key(gw.ref.kind, gw.namespace, gw.name)] = ObjectStatus((
                Condition("Accepted", "False", "Pending", f"an Istio Gateway {key} exists: gateway proxies "
                          "(--gateway " + key + ") serve that one; rename this Gateway"),
                Condition("Programmed", "False", "Pending", "not served")), generation=gw.generation, ref=gw.ref)
            continue
        served[key] = gw
        listeners_ok[key], listener_conds[key] = {}, {}
        for lst in gw.listeners:
            server, problem = _server(gw, lst, grants_t, credentials)
            if server is not None:
                listeners_ok[key][lst.name] = (lst, server)
                listener_conds[key][lst.name] = [
                    Condition("Accepted", "True", "Accepted", "served by the gateway proxies"),
                    Condition("Programmed", "True", "Programmed", "sent to the gateway proxies over xDS"),
                    Condition("ResolvedRefs", "True", "ResolvedRefs", "all references resolved")]
            else:
                reason, msg = problem or ("UnsupportedProtocol", "not supported")
                refs = reason in ("InvalidCertificateRef", "RefNotPermitted")
                if refs:
                    refused_refs.setdefault(key, set()).update(
                        (ns, name) for group, kind, ns, name in lst.certificate_refs
                        if group in ("", "core") and kind == "Secret")
                listener_conds[key][lst.name] = [
                    Condition("Accepted", "True" if refs else "False", "Accepted" if refs else reason, msg),
                    Condition("Programmed", "False", "Invalid", msg),
                    Condition("ResolvedRefs", "False" if refs else "True", reason if refs else "ResolvedRefs", msg)]
    # Routes with a parentRef naming a served Gateway.
    route_status: dict[RouteKey, list[ParentStatus]] = {}
    attached: dict[str, dict[str, int]] = {k: {} for k in served}
    per_host: dict[tuple[str, str], list[tuple[tuple[object, ...], HTTPRoute, GatewayRoute]]] = {}
    per_port: dict[tuple[str, int], list[tuple[TCPRoute, GatewayRoute]]] = {}
    per_sni: dict[tuple[str, str], list[tuple[TLSRoute, GatewayRoute, ParentRef]]] = {}  # by listener
    status_at: dict[tuple[RouteKey, ParentRef], int] = {}
    lost: dict[tuple[RouteKey, ParentRef], list[str]] = {}  # the names a route attached for but does not get
    for route in sorted(routes, key=route_key):
        for parent in route.parents:
            if not parent.is_gateway:
                continue
            gkey = f"{parent.namespace}/{parent.name}"
            target = served.get(gkey)
            if target is None:
                continue  # not ours (or not served: its own status says why)
            problems: list[tuple[str, str]] = []
            accepted, hosts = _attach(route, parent, target, listeners_ok[gkey], namespaces)
            if accepted[0] == "Accepted":
                for lst, names in hosts:
                    attached[gkey][lst.name] = attached[gkey].get(lst.name, 0) + 1
                    if route.kind == "TLSRoute":  # SNI names -> the first rule's backends
                        dests = _l4_destinations(route, grants_t, services, problems)
                        if dests:
                            per_sni.setdefault((gkey, lst.name), []).append(
                                (TLSRoute((TLSMatch(tuple(names), lst.port, listener=lst.name),), dests), route,
                                 parent))
                        continue
                    table, tcp = route_tables(route, lst.port, grants_t, services, problems)
                    table = [(k, replace(hr, matches=tuple(replace(m, listener=lst.name) for m in hr.matches)))
                             for k, hr in table]  # only this listener's server routes by them
                    served_listeners = [other for other, _ in listeners_ok[gkey].values()]
                    for name in names:
                        better = _more_specific_listener(lst, served_listeners, name)
                        if better is not None:  # listener isolation, as for TLSRoutes (_sni_owners)
                            lost.setdefault((route_key(route), parent), []).append(_isolated(name, lst, better))
                            continue
                        for k, hr in table:
                            per_host.setdefault((gkey, name), []).append((k, hr, route))
                    for tr in tcp[:1]:  # a TCP connection has nothing to match on: the first route wins
                        per_port.setdefault((gkey, lst.port), []).append((tr, route))
            statuses = route_status.setdefault(route_key(route), [])
            status_at.setdefault((route_key(route), parent), len(statuses))
            statuses.append(_route_status(parent, accepted, list(dict.fromkeys(problems))))
    # One VirtualService per (gateway, hostname), bound to the gateway.
    vss: list[VirtualService] = []
    for (gkey, host), items in sorted(per_host.items()):
        items.sort(key=lambda t: t[0])
        seen: set[tuple[str, int | None]] = set()
        http: list[HTTPRoute] = []
        for _, hr, _r in items:
            ident = (hr.name, hr.matches[0].port if hr.matches else None)
            if ident not in seen:
                seen.add(ident)
                http.append(replace(hr, name=f"{hr.name}.{ident[1]}" if ident[1] else hr.name))
        first = min((r for _, _, r in items), key=lambda r: (r.created, r.namespace, r.name))
        gw = served[gkey]
        vss.append(VirtualService(ref=first.ref, namespace=gw.namespace, name=f"{gw.name}.{host}", hosts=(),
                                  http=tuple(http), gateways=(gkey,), host_patterns=(host,)))
    for (gkey, port), tcp_items in sorted(per_port.items()):
        gw = served[gkey]
        tr, first_route = min(tcp_items, key=lambda t: (t[1].created, t[1].namespace, t[1].name))
        vss.append(VirtualService(ref=first_route.ref, namespace=gw.namespace, name=f"{gw.name}.tcp.{port}", hosts=(),
                                  tcp=(tr,), gateways=(gkey,), host_patterns=("*",)))
    for (gkey, lname), tls_items in sorted(per_sni.items()):
        gw = served[gkey]
        lst = listeners_ok[gkey][lname][0]
        kept = _sni_owners(lst, [other for other, _ in listeners_ok[gkey].values()], tls_items, lost)
        if not kept:
            continue
        sni_names = tuple(dict.fromkeys(n for tr, _ in kept for m in tr.matches for n in m.sni_hosts))
        shared = sum(1 for g, n in per_sni if g == gkey and listeners_ok[g][n][0].port == lst.port) > 1
        vss.append(VirtualService(ref=kept[0][1].ref, namespace=gw.namespace,
                                  name=f"{gw.name}.tls.{lst.port}" + (f".{lname}" if shared else ""),
                                  hosts=(), tls=tuple(tr for tr, _ in kept), gateways=(gkey,),
                                  host_patterns=sni_names))
    for (rkey, parent), why in lost.items():  # the names a route attached for but does not get: said
        statuses = route_status[rkey]
        i = status_at[(rkey, parent)]
        statuses[i] = replace(statuses[i], conditions=tuple(
            replace(c, message=f"{c.message}; {NOT_SERVED}: {'; '.join(dict.fromkeys(why))}")
            if c.type == "Accepted" else c for c in statuses[i].conditions))
    out_gateways: dict[str, Gateway] = {}
    for gkey, gw in served.items():
        servers = tuple(server for _, server in listeners_ok[gkey].values())
        served_refs = {(s.tls.credential_namespace or gw.namespace, s.tls.credential_name) for s in servers
                       if s.tls is not None and s.tls.credential_name}
        out_gateways[gkey] = Gateway(gw.ref, gw.namespace, gw.name, ((GATEWAY_NAME_LABEL, gw.name),), servers,
                                     tuple(sorted(refused_refs.get(gkey, set()) - served_refs)),
                                     own_namespace_only=True)
        lstatus = tuple(ListenerStatus(lst.name, _kinds(lst), attached[gkey].get(lst.name, 0),
                                       tuple(listener_conds[gkey][lst.name])) for lst in gw.listeners)
        all_ok = all(lst.name in listeners_ok[gkey] for lst in gw.listeners)
        object_status[_key(gw.ref.kind, gw.namespace, gw.name)] = ObjectStatus((
            Condition("Accepted", "True", "Accepted" if all_ok else "ListenersNotValid",
                      "served by `meshline bootstrap --mode gateway --gateway " + gkey + "` proxies (pods labelled "
                      f"{GATEWAY_NAME_LABEL}={gw.name})" + ("" if all_ok else "; some listeners are not served")),
            Condition("Programmed", "True", "Programmed", "configuration sent to the gateway proxies over xDS")),
            lstatus, gw.generation, gw.ref)
    return GatewayResult(out_gateways, tuple(vss), {k: tuple(v) for k, v in route_status.items()}, object_status)


def _specificity(host: str) -> tuple[int, int]:
    """How specific a listener hostname is: `*` < `*.suffix` (longer: more) < an exact name."""
    if host == "*":
        return (0, 0)
    return (1, len(host)) if host.startswith("*.") else (2, len(host))


def _more_specific_listener(lst: Listener, listeners: Iterable[Listener], name: str) -> Listener | None:
    """The listener of `lst`'s port that gets a request or connection for `name` instead of
    `lst` (Gateway API listener isolation): the one whose hostname covers `name` most
    specifically, when more specifically than `lst`'s. Plain HTTP listeners compete by Host;
    HTTPS and TLS ones by SNI."""
    if lst.protocol not in ("HTTP", "HTTPS", "TLS"):
        return None  # TCP: nothing to tell connections apart by
    group = ("HTTP",) if lst.protocol == "HTTP" else ("HTTPS", "TLS")
    mine = _specificity(lst.hostname or "*")
    rivals = [o for o in listeners if o.name != lst.name and o.port == lst.port and o.protocol in group
              and _specificity(o.hostname or "*") > mine and intersect_host(o.hostname or "*", name) == name]
    return max(rivals, key=lambda o: _specificity(o.hostname or "*"), default=None)


def _isolated(name: str, lst: Listener, better: Listener) -> str:
    return (f"hostname {name} on listener {lst.name} (listener {better.name}'s hostname {better.hostname} is more "
            "specific: requests and connections for it go to that listener and its routes only)")


def _sni_owners(lst: Listener, listeners: Iterable[Listener],
                items: list[tuple[TLSRoute, GatewayRoute, ParentRef]],
                lost: dict[tuple[RouteKey, ParentRef], list[str]]) -> list[tuple[TLSRoute, GatewayRoute]]:
    """The TLSRoutes attached to TLS Passthrough listener `lst`, each with the SNI names it keeps
    there: a name within the hostname of a more specific TLS or HTTPS listener of the same port
    is that listener's (Gateway API listener isolation: a connection goes to the listener with
    the most specific matching hostname, and only its routes see it); a name two routes claim
    is the oldest's (creation time, then namespace/name). The names a route loses go to `lost`."""
    rivals = list(listeners)
    owner: dict[str, GatewayRoute] = {}
    out: list[tuple[TLSRoute, GatewayRoute]] = []
    for tr, route, parent in sorted(items, key=lambda t: (t[1].created, t[1].namespace, t[1].name)):
        matches: list[TLSMatch] = []
        for m in tr.matches:
            keep: list[str] = []
            for n in m.sni_hosts:
                better = _more_specific_listener(lst, rivals, n)
                if better is not None:
                    lost.setdefault((route_key(route), parent), []).append(_isolated(n, lst, better))
                    continue
                first = owner.setdefault(n, route)
                if first is not route:
                    lost.setdefault((route_key(route), parent), []).append(
                        f"hostname {n} on listener {lst.name} ({first.kind} {first.namespace}/{first.name}, "
                        "the older route, has it)")
                elif n not in keep:
                    keep.append(n)
            if keep:
                matches.append(replace(m, sni_hosts=tuple(keep)))
        if matches:
            out.append((replace(tr, matches=tuple(matches)), route))
    return out


def _l4_destinations(route: GatewayRoute, grants: tuple[ReferenceGrant, ...], services: Mapping[Hostname, Service],
                     problems: list[tuple[str, str]]) -> tuple[RouteDestination, ...]:
    """The weighted destinations of a TLSRoute's (first) rule; an invalid backend keeps its
    share as a destination no cluster serves (its connections fail), and is a problem."""
    out: list[RouteDestination] = []
    for b in route.rules[0].backends if route.rules else ():
        dest, problem = backend_destination(route, b, grants, services)
        if problem is not None:
            problems.append(problem)
        if dest is None:
            dest = Destination(Hostname(f"{b.name}.{b.namespace}.{INVALID_BACKEND_DOMAIN}"), None, b.port or 80)
        if b.weight > 0:
            out.append(RouteDestination(dest, b.weight))
    return tuple(out)


def _kinds(lst: Listener) -> tuple[str, ...]:
    if lst.protocol == "TCP":
        return tuple(k for k in (lst.allowed_kinds or _TCP_KINDS) if k in _TCP_KINDS)
    if lst.protocol == "TLS":
        return tuple(k for k in (lst.allowed_kinds or _TLS_KINDS) if k in _TLS_KINDS)
    if lst.protocol not in ("HTTP", "HTTPS"):
        return ()
    return tuple(k for k in (lst.allowed_kinds or _HTTP_KINDS) if k in _HTTP_KINDS)


def _server(gw: ApiGateway, lst: Listener, grants: tuple[ReferenceGrant, ...],
            credentials: Mapping[tuple[str, str], TlsCredential] | None = None
            ) -> tuple[GatewayServer | None, tuple[str, str] | None]:
    host = (("*", lst.hostname or "*"),)
    if lst.protocol == "HTTP":
        return GatewayServer(lst.port, "HTTP", lst.name, host, name=lst.name), None
    if lst.protocol == "TCP":
        return GatewayServer(lst.port, "TCP", lst.name, (("*", "*"),), name=lst.name), None
    if lst.protocol == "TLS":
        if lst.tls_mode == "Passthrough":
            return GatewayServer(lst.port, "TLS", lst.name, host, ServerTLS(mode="PASSTHROUGH"), name=lst.name), None
        return None, ("UnsupportedProtocol", "a TLS listener that terminates TLS is not supported by Meshline's "
                                             "gateway (use tls.mode Passthrough with TLSRoutes, or an HTTPS listener)")
    if lst.protocol != "HTTPS":
        return None, ("UnsupportedProtocol", f"protocol {lst.protocol} is not supported by Meshline's gateway "
                                             "(HTTP, HTTPS, TLS Passthrough and TCP are)")
    if lst.tls_mode == "Passthrough":
        return None, ("UnsupportedProtocol", "HTTPS with TLS Passthrough is not supported (use a listener of protocol "
                                             "TLS, mode Passthrough, with TLSRoutes)")
    if not lst.certificate_refs:
        return None, ("InvalidCertificateRef", "an HTTPS listener that terminates TLS needs a certificateRef")
    for i, (group, kind, ns, name) in enumerate(lst.certificate_refs):
        where = f"certificateRefs[{i}]"
        if group not in ("", "core") or kind != "Secret":
            return None, ("InvalidCertificateRef", f"{where} {group or 'core'}/{kind} {name} is not a Secret")
        if ns != gw.namespace and not any(
                g.namespace == ns and g.permits("gateway.networking.k8s.io", "Gateway", gw.namespace, "", "Secret", name)
                for g in grants):
            return None, ("RefNotPermitted", f"{where}: no ReferenceGrant in namespace {ns} allows Gateways of "
                                             f"{gw.namespace} to refer to Secret {name}: the listener is not served")
        cred = credentials.get((ns, name)) if credentials is not None else None
        if credentials is not None and (cred is None or not (cred.cert_pem and cred.key_pem)):
            return None, ("InvalidCertificateRef", f"{where}: Secret {ns}/{name} "
                          + ("was not found (or holds no TLS keys)" if cred is None else
                             "has no certificate and key (tls.crt/tls.key)") + ": the listener is not served")
        if cred is not None and cred.problem is not None:
            return None, ("InvalidCertificateRef", f"{where}: Secret {ns}/{name} is unusable ({cred.problem}): "
                                                   "the listener is not served")
    # one certificate per listener is served: the first (later ones would differ only by SNI)
    _, _, ns, name = lst.certificate_refs[0]
    return GatewayServer(lst.port, "HTTPS", lst.name, host,
                         ServerTLS(mode="SIMPLE", credential_name=name, credential_namespace=ns), name=lst.name), None


def _attach(route: GatewayRoute, parent: ParentRef, gw: ApiGateway, ok: Mapping[str, tuple[Listener, GatewayServer]],
            namespaces: Mapping[str, Namespace]) -> tuple[tuple[str, str], list[tuple[Listener, list[str]]]]:
    """(Accepted reason and message, [(listener, hostnames)]) of `route` on `gw`."""
    candidates = [lst for lst in gw.listeners
                  if (parent.section_name is None or lst.name == parent.section_name)
                  and (parent.port is None or lst.port == parent.port)]
    if not candidates:
        return ("NoMatchingParent", f"Gateway {gw.namespace}/{gw.name} has no listener "
                + (f"named {parent.section_name!r}" if parent.section_name else f"on port {parent.port}")), []
    allowed = [lst for lst in candidates if lst.name in ok and _allows(lst, gw, route, namespaces)]
    if not allowed:
        return ("NotAllowedByListeners", f"no served listener of Gateway {gw.namespace}/{gw.name} allows "
                f"{route.kind}s from namespace {route.namespace}"), []
    out: list[tuple[Listener, list[str]]] = []
    for lst in allowed:
        names = _hostnames(lst.hostname or "*", route.hostnames)
        if names:
            out.append((lst, names))
    if not out:
        return ("NoMatchingListenerHostname", "no listener hostname intersects the route's hostnames "
                f"({', '.join(route.hostnames)})"), []
    return ("Accepted", ""), out


def _allows(lst: Listener, gw: ApiGateway, route: GatewayRoute, namespaces: Mapping[str, Namespace]) -> bool:
    if route.kind not in _kinds(lst):
        return False
    if lst.allowed_namespaces == "All":
        return True
    if lst.allowed_namespaces == "Selector":
        ns = namespaces.get(route.namespace)
        return ns is not None and bool(lst.namespace_selector) and labels_match(lst.namespace_selector, ns.labels)
    return route.namespace == gw.namespace


def _hostnames(listener_host: str, route_hosts: tuple[str, ...]) -> list[str]:
    if not route_hosts:
        return [listener_host]
    out: list[str] = []
    for h in route_hosts:
        got = intersect_host(listener_host, h)
        if got is not None and got not in out:
            out.append(got)
    return out


def _route_status(parent: ParentRef, accepted: tuple[str, str], problems: list[tuple[str, str]]) -> ParentStatus:
    reason, message = accepted
    conds = [Condition("Accepted", "True" if reason == "Accepted" else "False", reason,
                       message or f"attached to Gateway {parent.namespace}/{parent.name}")]
    if problems:
        conds.append(Condition("ResolvedRefs", "False", problems[0][0], "; ".join(m for _, m in problems)))
    else:
        conds.append(Condition("ResolvedRefs", "True", "ResolvedRefs", "all references resolved"))
    return ParentStatus(parent, GATEWAY_CONTROLLER, tuple(conds))


def gateway_issues(object_status: Mapping[ObjectKey, ObjectStatus], routes: Iterable[GatewayRoute] = (),
                   route_status: Mapping[RouteKey, tuple[ParentStatus, ...]] | None = None) -> list[Issue]:
    """Warnings for the Gateways (and listeners) Meshline does not fully serve, and for the
    hostnames of routes accepted by a Gateway that another route or listener gets."""
    out: list[Issue] = []
    for route in sorted(routes, key=route_key) if route_status else ():
        for ps in route_status.get(route_key(route), ()) if route_status else ():
            acc = ps.condition("Accepted")
            marker = f"; {NOT_SERVED}: "
            if ps.controller == GATEWAY_CONTROLLER and acc is not None and acc.status == "True" and marker in acc.message:
                out.append(Issue(route.ref, "spec.hostnames", f"for parent {ps.parent.kind} {ps.parent.namespace}/"
                                 f"{ps.parent.name}, {NOT_SERVED}: {acc.message.split(marker, 1)[1]}", "warning"))
    for key in sorted(object_status):
        st = object_status[key]
        if st.ref is None:
            continue
        for c in st.conditions:
            if c.status == "False" or c.reason == "ListenersNotValid":
                out.append(Issue(st.ref, "", f"{c.type}={c.status} ({c.reason}): {c.message}", "warning"))
        for i, ls in enumerate(st.listeners):
            for c in ls.conditions:
                if c.status == "False" and c.type != "Programmed":
                    out.append(Issue(st.ref, f"spec.listeners[{i}]", f"listener {ls.name}: {c.type}=False "
                                     f"({c.reason}): {c.message}", "warning"))
    return out
