"""Ingress/egress gateway translation (Istio `Gateway` + bound VirtualServices). Pure, no I/O.

A gateway proxy (`meshline bootstrap --mode gateway`) serves every Gateway whose selector its
pod's labels include, of any namespace, as Istio (`--gateway NS/NAME` narrows it to that one
Gateway): `controlplane.model.gateway_merge` selects them and merges their servers per port
(conflicting servers of a later Gateway are dropped and warned). `plan_gateway`:

- the VirtualServices it applies: bound to one of those Gateways and exported to the proxy's
  namespace (each applies to its Gateway's servers only);
- one listener per server address and port (`<bind or 0.0.0.0>_<port>`);
- HTTP/HTTP2/GRPC servers: an HTTP connection manager on RDS `http.<port>` (Istio's name),
  whose virtual hosts are the hosts of the VirtualServices bound to the Gateway
  (`controlplane.model.gateways.bound_view`) intersected with the servers' hosts; a server with
  `tls.httpsRedirect` makes its virtual hosts redirect to https (`require_tls: ALL`);
- HTTPS servers (SIMPLE, MUTUAL, OPTIONAL_MUTUAL): one filter chain per server, matched by SNI
  on the server's hosts (none for `*`), with a `DownstreamTlsContext` whose certificate is the
  `credentialName` Secret over SDS (`kubernetes://<name>`, client CA `kubernetes://<name>-cacert`)
  or the files the server names, and its own RDS `https.<port>.<server>.<gateway>.<ns>`;
- HTTPS/TLS PASSTHROUGH servers: one SNI filter chain (a TLS inspector reads the SNI) per
  bound VirtualService `tls` route match (`sniHosts` x server hosts; a Gateway API match only
  on the server of its listener), `tcp_proxy` to its destinations, the TLS bytes untouched;
- each SNI name in one filter chain of a listener (Envoy refuses two that match alike): the
  server whose host covers it most specifically keeps it; a PASSTHROUGH server's host that a
  less specific server's chain would also match, and that none of its routes covers, gets a
  chain that refuses the connection (Gateway API listener isolation);
- TCP servers, and TLS servers that terminate: `tcp_proxy` to the destination of the bound
  VirtualServices' tcp routes;
- clusters and endpoints of the services its bound routes send to or mirror to (http, tcp and
  tls routes of the VirtualServices bound to its Gateways, Gateway API routes included), on
  the ports those routes resolve to for its servers' ports, as a sidecar of the gateway's
  namespace sees them (DestinationRules, ISTIO_MUTUAL to sidecar-injected endpoints):
  `gateway_scope` (a sidecar `Scope`, the mechanism Sidecar egress uses) and
  `plan_gateway_clusters`, the layer gateway proxies of one namespace and scope share and
  endpoint-only changes patch. A gateway proxy receives no cluster of the mesh it cannot route to;
- the AuthorizationPolicies and RequestAuthentications that select the gateway's pod (its
  namespace's and the root namespace's, by `selector`), as Istio enforces them on a gateway:
  JWT validation and RBAC on every HTTP chain, RBAC on TCP chains (`GatewayAuthz`), each
  listener with the policies of its port. CUSTOM policies deny there (no authorizer is
  wired to gateways: fail closed);
- the access logs Telemetry `accessLogging` asks for at the gateway's pod (mesh, namespace and
  workload level by the pod's labels: `controlplane.model.telemetry.access_logs_for`) with
  mode CLIENT, as Istio treats a gateway's listeners (its `workloadMode` of the gateway
  listener class is CLIENT): per request on HTTP chains, per connection on TCP chains.

Certificates are not translation: `gateway_credentials` (`controlplane.translate.gateway_credentials`,
re-exported here) lists the Secrets the runtime's identity planner adds for an authenticated
gateway proxy: the real ones only for a proxy proven to be a workload the Gateway selects,
fail-closed stand-ins otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf.message import Message

from controlplane.model.authn import issuers, jwt_rules, request_authentications_for
from controlplane.model.gateway_merge import Placed, merge_servers, selected_gateways
from controlplane.model.gateways import gateway_virtual_services, intersect_host, server_vs_hosts
from controlplane.model.ir import (
    AuthorizationPolicy,
    Destination,
    Gateway,
    GatewayServer,
    Hostname,
    JwtRule,
    ProxyMeta,
    ServerTLS,
    SourceRef,
    VirtualService,
)
from controlplane.model.mesh import Mesh, visible_to
from controlplane.model.policy import authorization_policies_for, policies_for_port
from controlplane.model.telemetry import access_logs_for
from controlplane.translate.accesslog import AccessLogSink, resolve
from controlplane.translate.extauthz import http_authz_filters, network_authz_filters
from controlplane.translate.gateway_credentials import gateway_authorized as gateway_authorized  # re-exported
from controlplane.translate.gateway_credentials import (
    gateway_credentials as gateway_credentials,  # re-exported
)
from controlplane.translate.gateway_credentials import server_ca_sds, server_credential_sds
from controlplane.translate.jwt import build_jwks_cluster, http_jwt_filters, jwks_clusters
from controlplane.translate.listeners import WeightedCluster, hcm_filter
from controlplane.translate.listeners import _tcp_proxy as tcp_proxy_filter
from controlplane.translate.names import destination_port, pack, weighted_split
from controlplane.translate.plan import CLUSTER, LISTENER, ROUTE, ResourceSpec
from controlplane.translate.routes import Target, VirtualHostInput, _target, build_route_config
from controlplane.translate.scope import Scope
from controlplane.translate.secrets import ads_config_source
from controlplane.translate.sidecar import _cluster_specs

HTTP_PROTOCOLS = frozenset({"HTTP", "HTTP2", "GRPC"})
BLACKHOLE = "BlackHoleCluster"
_TLS_VERSIONS = {
    "TLSV1_0": common_pb2.TlsParameters.TLSv1_0,
    "TLSV1_1": common_pb2.TlsParameters.TLSv1_1,
    "TLSV1_2": common_pb2.TlsParameters.TLSv1_2,
    "TLSV1_3": common_pb2.TlsParameters.TLSv1_3,
}


def gateways_of(mesh: Mesh, meta: ProxyMeta) -> tuple[Gateway, ...]:
    """The Gateways a gateway proxy serves (`controlplane.model.gateway_merge.selected_gateways`)."""
    return selected_gateways(mesh, meta)


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True, slots=True)
class ServerChain:
    """One filter chain of a gateway listener: which SNI names it matches, its TLS, and what
    it runs (an RDS route config, or a tcp_proxy to weighted clusters)."""

    name: str
    server_names: tuple[str, ...] = ()
    tls: ServerTLS | None = None
    rds: str | None = None
    tcp: tuple[WeightedCluster, ...] = ()
    alpn: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class GatewayAuthz:
    """What a gateway listener enforces: the AuthorizationPolicies of its port and the JWT
    rules of the RequestAuthentications that select the gateway's pod."""

    trust_domain: str
    policies: tuple[AuthorizationPolicy, ...] = ()
    jwt: tuple[JwtRule, ...] = ()


def _bound_of(mesh: Mesh, gws: Iterable[Gateway], namespace: str) -> dict[str, tuple[VirtualService, ...]]:
    """The VirtualServices bound to each Gateway that a gateway proxy of `namespace` applies:
    as Istio, only those exported to its namespace (exportTo)."""
    return {gw.key: tuple(vs for vs in gateway_virtual_services(gw, mesh.gateway_virtual_services)
                          if visible_to(vs.export_to, vs.namespace, namespace)) for gw in gws}


def gateway_scope(mesh: Mesh, meta: ProxyMeta) -> Scope:
    """The (service host, port) pairs a gateway proxy's routes can reach: every destination and
    mirror of the http, tcp and tls routes bound to its Gateways, on the port each resolves to
    for one of the Gateway's server ports (`destination_port`, as the route and listener
    builders resolve it). Its clusters are those (`plan_gateway_clusters`), not the mesh's."""
    gws = gateways_of(mesh, meta)
    pairs: set[tuple[Hostname, int]] = set()
    for gw in gws:
        ports = sorted({s.port for s in gw.servers} | {s.target_port for s in gw.servers if s.target_port})
        for vs in _bound_of(mesh, (gw,), meta.namespace)[gw.key]:
            dests = [rd.destination for hr in vs.http for rd in hr.route]
            dests += [m.destination for hr in vs.http for m in hr.mirrors]
            dests += [rd.destination for tr in vs.tcp for rd in tr.route]
            dests += [rd.destination for tl in vs.tls for rd in tl.route]
            for d in dict.fromkeys(dests):
                svc = mesh.service(d.host, meta.namespace)  # the entry this namespace gets
                if svc is None:
                    continue
                for port in ports:
                    dport = destination_port(d, port, svc)
                    if any(p.port == dport for p in svc.ports):
                        pairs.add((d.host, dport))
    return Scope(pairs)


def plan_gateway(mesh: Mesh, meta: ProxyMeta) -> list[ResourceSpec]:
    """A gateway proxy's own resources (listeners, routes; no certificates, no clusters: those
    are `plan_gateway_clusters`, the shared layer), sorted by (type, name)."""
    gws = gateways_of(mesh, meta)
    if not gws:
        return []
    bound_of = _bound_of(mesh, gws, meta.namespace)
    out: dict[tuple[str, str], ResourceSpec] = {}

    def add(specs: Iterable[ResourceSpec]) -> None:
        for s in specs:
            out.setdefault((s.type_url, s.name), s)

    # The policies that select the gateway's pod, as for any workload (Istio enforces them).
    pod = mesh.workload(meta.namespace, meta.workload) if meta.workload else None
    labels = pod.labels if pod is not None else meta.labels
    policies = authorization_policies_for(mesh, meta.namespace, labels)
    ras = request_authentications_for(mesh, meta.namespace, labels)
    jwt = jwt_rules(ras)
    # Telemetry accessLogging: a gateway's traffic is CLIENT to Istio (workloadMode of the
    # gateway listener class), selected by the pod's labels like a sidecar's.
    log_refs: tuple[SourceRef, ...] = ()
    sinks: tuple[AccessLogSink, ...] = ()
    if mesh.telemetries:
        logs, log_refs = access_logs_for(mesh, meta.namespace, labels, "CLIENT")
        sinks = resolve(logs, mesh.mesh_config)
    add([ResourceSpec(CLUSTER, jc.name, build_jwks_cluster, (jc,), tuple(r.ref for r in ras))
         for jc in jwks_clusters(jwt)])
    by_addr, _dropped = merge_servers(gws)  # dropped servers: warned by check_merges
    for (addr, port), placed in sorted(by_addr.items()):
        chains: list[ServerChain] = []
        owners: list[GatewayServer | None] = []  # the server of each chain (None: plain HTTP)
        refs: list[SourceRef] = [p.gateway.ref for p in placed]
        plain_http = [p for p in placed if p.server.protocol in HTTP_PROTOCOLS]
        if plain_http:
            rds = f"http.{port}"
            add([_route_spec(mesh, rds, port, plain_http, bound_of, meta.namespace)])
            chains.append(ServerChain(name=rds, rds=rds))
            owners.append(None)
        for p in placed:
            if p.server.protocol in HTTP_PROTOCOLS:
                continue
            server_chains, specs = _server_chain(mesh, p.gateway, p.index, p.server, bound_of[p.gateway.key],
                                                 meta.namespace)
            add(specs)
            taken = {c.name for c in chains}
            chains += [c if c.name not in taken else replace(c, name=f"{c.name}.{p.gateway.name}.{p.gateway.namespace}")
                       for c in server_chains]
            owners += [p.server] * len(server_chains)
        chains = _one_chain_per_name(chains, owners, [p.server for p in placed])
        for p in placed:
            refs += [vs.ref for vs in bound_of[p.gateway.key]]
        authz = GatewayAuthz(mesh.trust_domain, policies_for_port(policies, port), jwt)
        refs += [ap.ref for ap in authz.policies] + [ra.ref for ra in ras] + list(log_refs)
        name = f"{addr}_{port}"
        add([ResourceSpec(LISTENER, name, build_gateway_listener, (name, addr, port, tuple(chains), authz, sinks),
                          tuple(dict.fromkeys(refs)))])
    return sorted(out.values(), key=lambda s: (s.type_url, s.name))


def plan_gateway_clusters(mesh: Mesh, namespace: str, hosts: Iterable[str] | None = None,
                          scope: Scope | None = None) -> list[ResourceSpec]:
    """The clusters and endpoints of the service ports in `scope` (`gateway_scope`; None: every
    mesh service) or of just those of `hosts` (an endpoint-only change patches those) for
    gateway proxies of `namespace`: as a sidecar there sees them (DestinationRules,
    ISTIO_MUTUAL to sidecar-injected endpoints). Shared by those proxies with one scope; the
    only part of a gateway's plan that reads endpoints."""
    out: dict[tuple[str, str], ResourceSpec] = {}
    candidates: Iterable[str] = mesh.services if scope is None else {h for h, _ in scope}
    if hosts is not None:
        wanted = set(hosts)
        candidates = [h for h in candidates if h in wanted]
    for host in sorted(h for h in candidates if h in mesh.services):
        svc = mesh.service(Hostname(host), namespace)  # the entry this namespace gets (routes: _target)
        for s in _cluster_specs(mesh, svc, namespace, scope) if svc is not None else ():
            out.setdefault((s.type_url, s.name), s)
    return sorted(out.values(), key=lambda s: (s.type_url, s.name))


def _server_label(gw: Gateway, index: int, srv: GatewayServer) -> str:
    """The server's part of its route configuration and filter chain names: its name, else its
    port name when no other server of the port shares it, else the port name and its index."""
    if srv.name:
        return srv.name
    same = [s for s in gw.servers if s.port == srv.port and s.bind == srv.bind and not s.name
            and (s.port_name or "") == (srv.port_name or "")]
    if srv.port_name and len(same) == 1:
        return srv.port_name
    return f"{srv.port_name or 'server'}.{index}"


def _server_chain(mesh: Mesh, gw: Gateway, index: int, srv: GatewayServer, bound: tuple[VirtualService, ...],
                  namespace: str) -> tuple[list[ServerChain], list[ResourceSpec]]:
    tls = srv.tls
    names = _sni_names(srv)
    label = _server_label(gw, index, srv)
    if srv.protocol == "HTTPS" and tls is not None and tls.mode != "PASSTHROUGH":
        rds = f"https.{srv.port}.{label}.{gw.name}.{gw.namespace}"
        spec = _route_spec(mesh, rds, srv.port, [Placed(gw, index, srv)], {gw.key: bound}, namespace)
        return [ServerChain(name=rds, server_names=names, tls=tls, rds=rds, alpn=("h2", "http/1.1"))], [spec]
    if tls is not None and tls.mode == "PASSTHROUGH":
        return _passthrough_chains(mesh, srv, label, bound, namespace), []
    # TCP, and TLS terminated here: the bound tcp routes for this port.
    tcp = _tcp_clusters(mesh, srv, bound, namespace)
    if not tcp:
        return [], []
    terminate = tls if srv.protocol == "TLS" else None  # a TCP server's tls is ignored (warned)
    return [ServerChain(name=f"{srv.protocol.lower()}.{srv.port}.{label}", server_names=names if terminate else (),
                        tls=terminate, tcp=tcp)], []


def _passthrough_chains(mesh: Mesh, srv: GatewayServer, label: str, bound: tuple[VirtualService, ...],
                        namespace: str) -> list[ServerChain]:
    """PASSTHROUGH (Istio): one filter chain per bound `tls` route match, on the SNI names both
    the match's `sniHosts` and the server's hosts cover (each name once: the first
    VirtualService by namespace and name keeps it), forwarding the TLS bytes to the route's
    destinations."""
    out: list[ServerChain] = []
    taken: set[str] = set()
    for vs in bound:
        if not server_vs_hosts(srv, vs):
            continue
        for i, tr in enumerate(vs.tls):
            dests = weighted_split(tr.route)
            if not dests:
                continue
            tcp = tuple(WeightedCluster(_target(mesh, d.destination, srv.port, namespace).cluster, d.weight)
                        for d in dests)
            for j, m in enumerate(tr.matches):
                if m.port not in (None, srv.port) or (m.listener and m.listener != srv.name):
                    continue  # another port's, or (Gateway API) another listener's
                sni = sorted({got for _, h in srv.hosts for n in m.sni_hosts
                              if (got := intersect_host(h, n)) is not None} - taken)
                if not sni:
                    continue
                taken.update(sni)
                out.append(ServerChain(name=f"tls.{srv.port}.{label}.{vs.namespace}.{vs.name}.{i}.{j}",
                                       server_names=() if sni == ["*"] else tuple(sni), tcp=tcp))
    return out


def _host_specificity(host: str) -> tuple[int, int]:
    """`*` < `*.suffix` (a longer suffix: more) < an exact name."""
    if host == "*":
        return (0, 0)
    return (1, len(host)) if host.startswith("*.") else (2, len(host))


def _claim(srv: GatewayServer | None, name: str) -> tuple[int, int]:
    """How specifically `srv` covers SNI `name` (`*`: no SNI): its most specific host that does."""
    if srv is None:
        return (-1, 0)
    got = [_host_specificity(h) for _, h in srv.hosts if intersect_host(h, name) == name or h == name]
    return max(got, default=(-1, 0))


def _one_chain_per_name(chains: list[ServerChain], owners: list[GatewayServer | None],
                        servers: list[GatewayServer]) -> list[ServerChain]:
    """The filter chains of one listener with each SNI name in one chain only (Envoy refuses a
    listener two of whose chains match alike): the chain of the server whose host covers the name
    most specifically keeps it, the first on a tie (a server's own chains are unique already:
    the first VirtualService keeps a name). As the Gateway API's listener isolation: a connection
    whose SNI lies within a PASSTHROUGH server's (more specific) host is that server's, refused
    when none of its routes takes the name, rather than left to a less specific server's chain."""
    best: dict[str, tuple[tuple[int, int], int]] = {}  # name -> (its best claim, that chain's index)
    for i, (c, srv) in enumerate(zip(chains, owners, strict=True)):
        for n in c.server_names or ("*",):
            claim = _claim(srv, n)
            if n not in best or claim > best[n][0]:
                best[n] = (claim, i)
    out: list[ServerChain] = []
    for i, c in enumerate(chains):
        if not c.server_names:
            if best["*"][1] == i:
                out.append(c)
            continue
        names = tuple(n for n in c.server_names if best[n][1] == i)
        if names:
            out.append(c if names == c.server_names else replace(c, server_names=names))
    names_now = {n for c in out for n in (c.server_names or ("*",))}
    for srv in servers:
        if srv.tls is None or srv.tls.mode != "PASSTHROUGH":
            continue
        for _, h in srv.hosts:
            wider = [n for n in names_now if n != h and intersect_host(n, h) == h]
            if h != "*" and h not in names_now and wider:
                names_now.add(h)
                out.append(ServerChain(name=f"isolated.{srv.port}.{srv.name or 'server'}.{h}", server_names=(h,),
                                       tcp=(WeightedCluster(BLACKHOLE),)))
    return out


def _sni_names(srv: GatewayServer) -> tuple[str, ...]:
    hosts = sorted({h for _, h in srv.hosts})
    return () if "*" in hosts else tuple(hosts)


def _tcp_clusters(mesh: Mesh, srv: GatewayServer, bound: tuple[VirtualService, ...], namespace: str
                  ) -> tuple[WeightedCluster, ...]:
    """The weighted clusters of the first bound tcp route that applies to `srv`'s port."""
    for vs in bound:
        if not server_vs_hosts(srv, vs):
            continue
        for tr in vs.tcp:
            if tr.matches and not any(m.port in (None, srv.port) for m in tr.matches):
                continue
            dests = weighted_split(tr.route)
            if dests:
                return tuple(WeightedCluster(_target(mesh, d.destination, srv.port, namespace).cluster, d.weight)
                             for d in dests)
    return ()


def _domains(hosts: Sequence[str]) -> tuple[str, ...]:
    out: list[str] = []
    for h in hosts:
        out += [h] if h == "*" else [h, f"{h}:*"]
    return tuple(out)


def _route_spec(mesh: Mesh, name: str, port: int, placed: Sequence[Placed],
                bound_of: dict[str, tuple[VirtualService, ...]], namespace: str) -> ResourceSpec:
    """The route configuration `name` of the `placed` servers (sharing `port`, of one or more
    Gateways): a virtual host per VirtualService bound to a server's Gateway, named after its
    hosts that the servers of that Gateway serve (each name once: the first Gateway, then the
    first VirtualService by namespace and name keeps a name another one also claims)."""
    vhosts: list[VirtualHostInput] = []
    redirect: list[str] = []
    taken: set[str] = set()
    used: set[str] = set()
    gws = list(dict.fromkeys(p.gateway for p in placed))
    sources: list[SourceRef] = [gw.ref for gw in gws]
    for gw, vs in [(g, v) for g in gws for v in bound_of[g.key]]:
        # a Gateway API route's rules apply to the hosts of the listener it attached to only
        bound_to = {m.listener for hr in vs.http for m in hr.matches if m.listener}
        servers = [p.server for p in placed if p.gateway is gw and (not bound_to or p.server.name in bound_to)]
        hosts: list[str] = []
        secure = False
        for srv in servers:
            got = [h for h in server_vs_hosts(srv, vs) if h not in taken and h not in hosts]
            hosts += got
            secure = secure or bool(got and srv.tls is not None and srv.tls.https_redirect)
        if not hosts or not vs.http:
            continue
        if all(hr.matches and all(m.port not in (None, port) for m in hr.matches) for hr in vs.http):
            continue  # every route is for other ports (a Gateway API route attached to another listener)
        taken.update(hosts)
        targets: dict[Destination, Target] = {}
        for hr in vs.http:
            for d in [rd.destination for rd in hr.route] + [m.destination for m in hr.mirrors]:
                if d not in targets:
                    targets[d] = _target(mesh, d, port, namespace)
        vh_name = f"{vs.namespace}/{vs.name}:{port}"
        if vh_name in used:  # one VirtualService bound to two of the Gateways
            vh_name = f"{vh_name}@{gw.namespace}/{gw.name}"
        used.add(vh_name)
        vhosts.append(VirtualHostInput(name=vh_name, domains=_domains(sorted(hosts)), default=Target(BLACKHOLE),
                                       route_prefix=f"{vs.name}.{vs.namespace}", http=vs.http,
                                       targets=tuple(targets.items())))
        if secure:
            redirect.append(vh_name)
        sources.append(vs.ref)
    for srv in (p.server for p in placed):  # httpsRedirect servers redirect even hosts no VirtualService routes
        if srv.tls is not None and srv.tls.https_redirect:
            rest = sorted({h for _, h in srv.hosts} - taken)
            if rest:
                taken.update(rest)
                vh_name = f"redirect.{srv.port}.{'.'.join(rest)}"
                vhosts.append(VirtualHostInput(name=vh_name, domains=_domains(rest), default=Target(BLACKHOLE)))
                redirect.append(vh_name)
    # Gateway API listener isolation: a request for a name within a listener's (more specific)
    # hostname that no route of that listener serves is answered 404, not by another listener's
    # wider name (a route without hostnames on a catch-all listener)
    isolated: list[str] = []
    for gw in gws:
        if not any(m.listener for vs in bound_of[gw.key] for hr in vs.http for m in hr.matches):
            continue  # no Gateway API route: Istio's binding (every server's hosts)
        for srv in (p.server for p in placed if p.gateway is gw):
            for _, h in srv.hosts:
                if h != "*" and h not in taken and any(intersect_host(w, h) == h for w in taken):
                    taken.add(h)
                    vh_name = f"isolated.{port}.{srv.name or 'server'}.{h}"
                    vhosts.append(VirtualHostInput(name=vh_name, domains=_domains([h]), default=Target(BLACKHOLE)))
                    isolated.append(vh_name)
    return ResourceSpec(ROUTE, name, build_gateway_routes,
                        (name, port, namespace, tuple(vhosts), tuple(redirect), tuple(isolated)),
                        tuple(dict.fromkeys(sources)))


# --------------------------------------------------------------------------- builders


def build_gateway_routes(name: str, port: int, namespace: str, vhosts: tuple[VirtualHostInput, ...],
                         redirect: tuple[str, ...], isolated: tuple[str, ...] = ()) -> route_pb2.RouteConfiguration:
    """A gateway's route configuration: the VirtualServices' routes (`routes.build_route_config`);
    virtual hosts in `redirect` answer plain HTTP with a redirect to https; a request for a
    host no virtual host serves, or one of `isolated` (no route), gets Envoy's 404."""
    rcfg = build_route_config(name, port, namespace, vhosts, passthrough=False)
    for vh in rcfg.virtual_hosts:
        if vh.name in redirect:
            vh.require_tls = rc.VirtualHost.ALL
        if vh.name in isolated:
            del vh.routes[:]
    return rcfg


def _downstream_tls(tls: ServerTLS, alpn: tuple[str, ...]) -> tls_pb2.DownstreamTlsContext:
    ctx = tls_pb2.DownstreamTlsContext()
    common = ctx.common_tls_context
    common.alpn_protocols.extend(alpn)
    if tls.credential_name:
        common.tls_certificate_sds_secret_configs.append(secret_pb2.SdsSecretConfig(
            name=server_credential_sds(tls.credential_namespace, tls.credential_name), sds_config=ads_config_source()))
    else:
        cert = common.tls_certificates.add()
        cert.certificate_chain.filename = tls.server_certificate or ""
        cert.private_key.filename = tls.private_key or ""
    params = common.tls_params
    if tls.min_protocol_version in _TLS_VERSIONS:
        params.tls_minimum_protocol_version = _TLS_VERSIONS[tls.min_protocol_version]
    else:
        params.tls_minimum_protocol_version = common_pb2.TlsParameters.TLSv1_2  # Istio's gateway default
    if tls.max_protocol_version in _TLS_VERSIONS:
        params.tls_maximum_protocol_version = _TLS_VERSIONS[tls.max_protocol_version]
    params.cipher_suites.extend(tls.cipher_suites)
    if tls.mode in ("MUTUAL", "OPTIONAL_MUTUAL"):
        ctx.require_client_certificate.value = tls.mode == "MUTUAL"
        ca_name = tls.ca_cert_credential_name or tls.credential_name  # (Istio: the former takes precedence)
        if ca_name:
            ca_ns = None if tls.ca_cert_credential_name else tls.credential_namespace
            combined = common.combined_validation_context
            combined.validation_context_sds_secret_config.CopyFrom(secret_pb2.SdsSecretConfig(
                name=server_ca_sds(ca_ns, ca_name), sds_config=ads_config_source()))
            validation = combined.default_validation_context
        else:
            validation = common.validation_context
            validation.trusted_ca.filename = tls.ca_certificates or ""
            if tls.ca_crl:
                validation.crl.filename = tls.ca_crl
        for san in tls.subject_alt_names:
            kind = common_pb2.SubjectAltNameMatcher.URI if "://" in san else common_pb2.SubjectAltNameMatcher.DNS
            validation.match_typed_subject_alt_names.append(
                common_pb2.SubjectAltNameMatcher(san_type=kind, matcher=string_pb2.StringMatcher(exact=san)))
        validation.verify_certificate_spki.extend(tls.verify_certificate_spki)
        validation.verify_certificate_hash.extend(tls.verify_certificate_hash)
        if tls.insecure_skip_verify:
            # Istio's insecureSkipVerify (Gateway API AllowInsecureFallback): the client
            # certificate is verified, and the connection is let through when that fails.
            validation.trust_chain_verification = common_pb2.CertificateValidationContext.ACCEPT_UNTRUSTED
    return ctx


def build_gateway_listener(name: str, address: str, port: int, chains: tuple[ServerChain, ...],
                           authz: GatewayAuthz | None = None, logs: tuple[AccessLogSink, ...] = ()
                           ) -> listener_pb2.Listener:
    """One gateway listener: a filter chain per server (SNI-matched when it has TLS), each
    enforcing `authz` (JWT validation and RBAC before routing; RBAC before a tcp_proxy) and
    writing the access logs `logs` (per request on HTTP chains, per connection on TCP ones)."""
    policies = authz.policies if authz is not None else ()
    jwt = authz.jwt if authz is not None else ()
    td = authz.trust_domain if authz is not None else ""
    http_filters = [*http_jwt_filters(jwt), *(http_authz_filters(policies, td, None, issuers(jwt)) if policies else [])]
    lst = listener_pb2.Listener(name=name, traffic_direction=base_pb2.OUTBOUND)
    sa = lst.address.socket_address
    sa.address = address
    sa.port_value = port
    if any(c.server_names or c.tls is not None for c in chains):
        lf = lst.listener_filters.add(name="envoy.filters.listener.tls_inspector")
        lf.typed_config.CopyFrom(pack(tls_inspector_pb2.TlsInspector()))
    for c in chains:
        fc = lst.filter_chains.add(name=c.name)
        if c.server_names:
            fc.filter_chain_match.server_names.extend(c.server_names)
        if c.tls is not None:
            fc.transport_socket.name = "envoy.transport_sockets.tls"
            fc.transport_socket.typed_config.CopyFrom(pack(_downstream_tls(c.tls, c.alpn)))
        if c.rds is not None:
            fc.filters.append(_gateway_hcm(f"{name}.{c.name}", c.rds, c.tls is not None, http_filters, logs))
        else:
            for fname, cfg in network_authz_filters(policies, td, f"{name}.{c.name}") if policies else []:
                fc.filters.add(name=fname).typed_config.CopyFrom(pack(cfg))
            fc.filters.append(tcp_proxy_filter(f"{name}.{c.name}", c.tcp, logs=logs))
    if not chains:  # nothing bound yet: refuse connections until a VirtualService is
        fc = lst.filter_chains.add(name="blackhole")
        fc.filters.append(tcp_proxy_filter(f"{name}.blackhole", [WeightedCluster(BLACKHOLE)], logs=logs))
    return lst


def _gateway_hcm(stat: str, rds: str, secure: bool, filters: Sequence[tuple[str, Message]] = (),
                 logs: Sequence[AccessLogSink] = ()) -> listener_components_pb2.Filter:
    """An edge HTTP connection manager: the client's address is the remote address, and the
    x-forwarded-proto it sends is not trusted; `filters` (JWT, RBAC) run before routing."""
    f = hcm_filter(stat, rds, None, filters, logs=logs)
    h = hcm_pb2.HttpConnectionManager()
    f.typed_config.Unpack(h)
    h.use_remote_address.value = True
    h.xff_num_trusted_hops = 0
    h.scheme_header_transformation.scheme_to_overwrite = "https" if secure else "http"
    f.typed_config.CopyFrom(pack(h))
    return f
