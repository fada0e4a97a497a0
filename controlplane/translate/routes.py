"""RouteConfigurations (RDS) for sidecar outbound HTTP: VirtualService http routes to Envoy.

Pure functions, no I/O. One RouteConfiguration per service port number (named after it),
one virtual host per service on that port. `plan_virtual_host` gathers from the Mesh
exactly what one virtual host needs (a `VirtualHostInput`); `build_route_config` is the
cache's builder and reads nothing else.

Decisions worth knowing:
- each match block of a VirtualService route becomes its own Envoy route (ORed), named
  `<route name>.<match name>` when the match has a name (Istio's naming); a match with
  `port` only applies to that port's route configuration, one with `sourceNamespace` only
  to clients in that namespace, one with `sourceLabels` only to clients whose workload
  labels include them: the planner passes the sourceLabels selectors the proxies of a
  shared outbound layer match (`translate.scope`), so workloads that match none of them
  keep sharing one layer; proxies without workload labels (waypoints) match none;
- the DestinationRule of a destination is looked up the way Istio does it, for the
  client's namespace and the workloadSelectors its labels match (`Mesh.destination_rule`);
- retries follow Istio's `retry.ConvertPolicy`: previous hosts are avoided unless
  `retryIgnorePreviousHosts: false` (or, by default, when the route hashes consistently),
  `retryRemoteLocalities` adds the previous_priorities retry priority, `backoff` sets the
  base interval;
- when no route of a VirtualService applies, the service gets the default route;
- a DestinationRule's consistentHash becomes the route's hash policy when every weighted
  destination of the route agrees on it;
- a destination standing for an invalid Gateway API backendRef (`model.gamma`) has no
  cluster; its route answers 500 for the requests it gets (`cluster_not_found_response_code`,
  as Istio does for Gateway API routes), not Envoy's default 503;
- pseudo-headers and `host` are dropped from header operations (Envoy rejects them;
  validation already reports them, `rewrite.authority` is the way to change the host).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.cors.v3 import cors_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.extensions.retry.priority.previous_priorities.v3 import previous_priorities_config_pb2
from envoy.type.matcher.v3 import string_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf.internal.containers import RepeatedCompositeFieldContainer, RepeatedScalarFieldContainer

from controlplane.model.convert_http import DEFAULT_RETRY, DEFAULT_RETRY_ON
from controlplane.model.gamma import is_invalid_backend
from controlplane.model.ir import (
    ConsistentHash,
    CorsPolicy,
    Destination,
    Fault,
    HeaderOps,
    Headers,
    HTTPMatch,
    HTTPRoute,
    L4Match,
    Labels,
    Retry,
    Service,
    SourceRef,
    StringMatch,
)
from controlplane.model.mesh import Mesh
from controlplane.translate.clusters import effective_policy
from controlplane.translate.names import (
    PASSTHROUGH_CLUSTER,
    destination_port,
    duration_ms,
    outbound_cluster_name,
    pack,
    virtual_host_name,
    weighted_split,
)

FAULT_FILTER = "envoy.filters.http.fault"
CORS_FILTER = "envoy.filters.http.cors"
_REDIRECT_CODES = {
    301: rc.RedirectAction.MOVED_PERMANENTLY,
    302: rc.RedirectAction.FOUND,
    303: rc.RedirectAction.SEE_OTHER,
    307: rc.RedirectAction.TEMPORARY_REDIRECT,
    308: rc.RedirectAction.PERMANENT_REDIRECT,
}
_APPEND = base_pb2.HeaderValueOption


@dataclass(frozen=True, slots=True)
class Target:
    """A resolved destination: its cluster and the consistent hash its DR asks for."""

    cluster: str
    hash: ConsistentHash | None = None


@dataclass(frozen=True, slots=True)
class VirtualHostInput:
    """Everything one virtual host is built from."""

    name: str
    domains: tuple[str, ...]
    default: Target
    route_prefix: str = ""  # route names: `<prefix>.<index>` when the VS route is unnamed
    http: tuple[HTTPRoute, ...] = ()
    targets: tuple[tuple[Destination, Target], ...] = ()
    source_labels: frozenset[Labels] = frozenset()  # the sourceLabels selectors the clients match


# --------------------------------------------------------------------------- planning


def _target(mesh: Mesh, dest: Destination, port: int, namespace: str,
            classes: frozenset[Labels] = frozenset()) -> Target:
    svc = mesh.service(dest.host, namespace)  # the Service (or entry) clients in `namespace` get
    dport = destination_port(dest, port, svc)
    dr = mesh.destination_rule(dest.host, namespace, classes)
    lb = effective_policy(dr, dport, dest.subset).load_balancer
    key = mesh.registry_key(svc) if svc is not None else dest.host
    return Target(outbound_cluster_name(dport, key, dest.subset), lb.consistent_hash if lb else None)


def plan_virtual_host(
    mesh: Mesh, svc: Service, port: int, namespace: str, domains: tuple[str, ...],
    source_labels: frozenset[Labels] = frozenset(),
) -> tuple[VirtualHostInput, tuple[SourceRef, ...]]:
    """The input of `svc`'s virtual host on `port` for clients in `namespace` whose workload
    labels match the selectors `source_labels` (VirtualService sourceLabels, DestinationRule
    workloadSelectors) and no others, and the objects that shaped it."""
    sources: list[SourceRef] = [svc.ref]
    default = _target(mesh, Destination(svc.hostname, None, port), port, namespace, source_labels)
    dr = mesh.destination_rule(svc.hostname, namespace, source_labels)
    if dr is not None and default.hash is not None:
        sources.append(dr.ref)
    vs = mesh.virtual_service(svc.hostname, namespace)
    if vs is None or not vs.http:
        return VirtualHostInput(virtual_host_name(svc.hostname, port), domains, default), tuple(sources)
    sources.append(vs.ref)
    dests: dict[Destination, Target] = {}
    used: set[Labels] = set()
    for hr in vs.http:
        used.update(m.source_labels for m in hr.matches if m.source_labels)
        for d in [rd.destination for rd in hr.route] + [m.destination for m in hr.mirrors]:
            if d not in dests:
                dests[d] = _target(mesh, d, port, namespace, source_labels)
                ddr = mesh.destination_rule(d.host, namespace, source_labels)
                if ddr is not None and ddr.ref not in sources:
                    sources.append(ddr.ref)
    vh = VirtualHostInput(
        name=virtual_host_name(svc.hostname, port),
        domains=domains,
        default=default,
        route_prefix=f"{vs.name}.{vs.namespace}",
        http=vs.http,
        targets=tuple(dests.items()),
        source_labels=frozenset(source_labels & used),  # only what this VS asks: equal inputs stay shared
    )
    return vh, tuple(sources)


# --------------------------------------------------------------------------- matches


def _string_matcher(out: string_pb2.StringMatcher, m: StringMatch) -> None:
    if m.kind == "exact":
        out.exact = m.value
    elif m.kind == "prefix":
        out.prefix = m.value
    else:
        out.safe_regex.regex = m.value


def _header_matcher(out: rc.HeaderMatcher, name: str, m: StringMatch | None, invert: bool = False) -> None:
    out.name = name
    if m is None or (m.kind == "prefix" and not m.value):
        out.present_match = True
    else:
        _string_matcher(out.string_match, m)
    if invert:
        out.invert_match = True


def match_applies(m: HTTPMatch | L4Match, port: int, namespace: str, source_labels: frozenset[Labels]) -> bool:
    """Whether a VirtualService match (http or tcp) applies to clients in `namespace` whose
    workloads match the sourceLabels selectors `source_labels`, on service port `port`: its
    `port`, `sourceNamespace` and `sourceLabels` all do (Istio). A tcp match's
    `destinationSubnets` is checked by its caller."""
    return ((m.port is None or m.port == port)
            and (m.source_namespace is None or m.source_namespace == namespace)
            and (not m.source_labels or m.source_labels in source_labels))


def _applicable(matches: Sequence[HTTPMatch], port: int, namespace: str,
                source_labels: frozenset[Labels] = frozenset()) -> list[HTTPMatch]:
    if not matches:
        return [HTTPMatch()]
    return [m for m in matches if match_applies(m, port, namespace, source_labels)]


def _fill_match(out: rc.RouteMatch, m: HTTPMatch) -> None:
    if m.uri is None:
        out.prefix = "/"
    elif m.uri.kind == "exact":
        out.path = m.uri.value
    elif m.uri.kind == "prefix":
        out.prefix = m.uri.value
    elif m.uri.kind == "path_prefix":
        if m.uri.value == "/":
            out.prefix = "/"
        else:
            out.path_separated_prefix = m.uri.value
    else:
        out.safe_regex.regex = m.uri.value
    if m.ignore_uri_case:
        out.case_sensitive.value = False
    for h in m.headers:
        _header_matcher(out.headers.add(), h.name, h.match)
    for h in m.without_headers:
        _header_matcher(out.headers.add(), h.name, h.match, invert=True)
    for name, sm in ((":method", m.method), (":authority", m.authority), (":scheme", m.scheme)):
        if sm is not None:
            _header_matcher(out.headers.add(), name, sm)
    for q in m.query_params:
        qp = out.query_parameters.add(name=q.name)
        if q.match is None:
            qp.present_match = True
        else:
            _string_matcher(qp.string_match, q.match)


# --------------------------------------------------------------------------- actions


def _fraction(percentage: float) -> percent_pb2.FractionalPercent:
    return percent_pb2.FractionalPercent(
        numerator=round(percentage * 10_000), denominator=percent_pb2.FractionalPercent.MILLION
    )


def _is_authority(name: str) -> bool:
    return name.lower() in (":authority", "host")


def _header_ops(adds: RepeatedCompositeFieldContainer[base_pb2.HeaderValueOption],
                removes: RepeatedScalarFieldContainer[str], ops: HeaderOps) -> None:
    """Append `ops` to a (headers_to_add, headers_to_remove) pair of repeated fields."""
    for items, action in (
        (ops.set, _APPEND.OVERWRITE_IF_EXISTS_OR_ADD),
        (ops.add, _APPEND.APPEND_IF_EXISTS_OR_ADD),
    ):
        for key, value in items:
            if key.startswith(":") or _is_authority(key):
                continue
            hv = adds.add()
            hv.header.key = key
            hv.header.value = value
            hv.append_action = action
    removes.extend(k for k in ops.remove if not (k.startswith(":") or _is_authority(k)))


def _apply_headers(target: rc.Route | rc.WeightedCluster.ClusterWeight, headers: Headers | None) -> None:
    if headers is None:
        return
    _header_ops(target.request_headers_to_add, target.request_headers_to_remove, headers.request)
    _header_ops(target.response_headers_to_add, target.response_headers_to_remove, headers.response)


PREVIOUS_PRIORITIES_UPDATE_FREQUENCY = 2
"""Istio's `update_frequency` for the previous_priorities retry priority."""


def _retry(out: rc.RetryPolicy, retry: Retry, hashed: bool = False) -> None:
    """Istio's `retry.ConvertPolicy`. `hashed`: the route hashes consistently, so retries stay
    on the same host unless `retryIgnorePreviousHosts: true` says otherwise."""
    retry_on = list(retry.retry_on) or list(DEFAULT_RETRY_ON)
    codes = retry.retriable_status_codes
    if not retry.retry_on and not codes:
        codes = (503,)
    if codes and "retriable-status-codes" not in retry_on:
        retry_on.append("retriable-status-codes")
    out.retry_on = ",".join(retry_on)
    out.num_retries.value = retry.attempts
    if retry.per_try_timeout_ms:
        out.per_try_timeout.CopyFrom(duration_ms(retry.per_try_timeout_ms))
    out.retriable_status_codes.extend(codes)
    avoid_previous = (not hashed) if retry.ignore_previous_hosts is None else retry.ignore_previous_hosts
    if avoid_previous:
        pred = out.retry_host_predicate.add(name="envoy.retry_host_predicates.previous_hosts")
        pred.typed_config.CopyFrom(pack(previous_hosts_pb2.PreviousHostsPredicate()))
    if retry.retry_remote_localities:
        prio = out.retry_priority
        prio.name = "envoy.retry_priorities.previous_priorities"
        prio.typed_config.CopyFrom(pack(previous_priorities_config_pb2.PreviousPrioritiesConfig(
            update_frequency=PREVIOUS_PRIORITIES_UPDATE_FREQUENCY)))
    if retry.backoff_ms:
        out.retry_back_off.base_interval.CopyFrom(duration_ms(retry.backoff_ms))
    out.host_selection_retry_max_attempts = 5


def _hash_policy(ra: rc.RouteAction, ch: ConsistentHash) -> None:
    hp = rc.RouteAction.HashPolicy()
    if ch.http_header_name:
        hp.header.header_name = ch.http_header_name
    elif ch.http_cookie_name:
        hp.cookie.name = ch.http_cookie_name
        if ch.http_cookie_path:
            hp.cookie.path = ch.http_cookie_path
        if ch.http_cookie_ttl_ms is not None:
            hp.cookie.ttl.CopyFrom(duration_ms(ch.http_cookie_ttl_ms))
    elif ch.use_source_ip:
        hp.connection_properties.source_ip = True
    elif ch.http_query_parameter_name:
        hp.query_parameter.name = ch.http_query_parameter_name
    else:
        return
    ra.hash_policy.append(hp)


def _fault(f: Fault) -> fault_pb2.HTTPFault:
    out = fault_pb2.HTTPFault()
    if f.delay is not None:
        out.delay.fixed_delay.CopyFrom(duration_ms(f.delay.fixed_delay_ms))
        out.delay.percentage.CopyFrom(_fraction(f.delay.percentage))
    if f.abort is not None:
        if f.abort.http_status is not None:
            out.abort.http_status = f.abort.http_status
        elif f.abort.grpc_status is not None:
            out.abort.grpc_status = f.abort.grpc_status
        out.abort.percentage.CopyFrom(_fraction(f.abort.percentage))
    return out


def _cors(c: CorsPolicy) -> cors_pb2.CorsPolicy:
    out = cors_pb2.CorsPolicy()
    for origin in c.allow_origins:
        _string_matcher(out.allow_origin_string_match.add(), origin)
    if c.allow_methods:
        out.allow_methods = ",".join(c.allow_methods)
    if c.allow_headers:
        out.allow_headers = ",".join(c.allow_headers)
    if c.expose_headers:
        out.expose_headers = ",".join(c.expose_headers)
    if c.max_age_s is not None:
        out.max_age = str(c.max_age_s)
    if c.allow_credentials is not None:
        out.allow_credentials.value = c.allow_credentials
    return out


def _forward(r: rc.Route, hr: HTTPRoute, vh: VirtualHostInput) -> bool:
    """Fill `r.route` for a forwarding VirtualService route; False if it has nowhere to go."""
    targets = dict(vh.targets)
    dests = weighted_split(hr.route)
    if not dests:
        return False
    ra = r.route
    if len(dests) == 1:
        ra.cluster = targets[dests[0].destination].cluster
        _apply_headers(r, dests[0].headers)
    else:
        for d in dests:
            cw = ra.weighted_clusters.clusters.add(name=targets[d.destination].cluster)
            cw.weight.value = d.weight
            _apply_headers(cw, d.headers)
    if any(is_invalid_backend(d.destination.host) for d in dests):
        # Gateway API: requests that would go to an invalid backendRef get 500 (its share of a
        # split); its stand-in host has no cluster, and Envoy's default for that is 503.
        ra.cluster_not_found_response_code = rc.RouteAction.INTERNAL_SERVER_ERROR
    if hr.rewrite is not None:
        if hr.rewrite.authority:
            ra.host_rewrite_literal = hr.rewrite.authority
        if hr.rewrite.uri is not None:
            ra.prefix_rewrite = hr.rewrite.uri
        elif hr.rewrite.uri_regex is not None:
            ra.regex_rewrite.pattern.regex = hr.rewrite.uri_regex[0]
            ra.regex_rewrite.substitution = hr.rewrite.uri_regex[1]
    ra.timeout.CopyFrom(duration_ms(hr.timeout_ms or 0))
    for m in hr.mirrors:
        mp = ra.request_mirror_policies.add(cluster=targets[m.destination].cluster)
        if m.percentage is not None:
            mp.runtime_fraction.default_value.CopyFrom(_fraction(m.percentage))
    hashes = {targets[d.destination].hash for d in dests}
    ch = hashes.pop() if len(hashes) == 1 else None
    if ch is not None:
        _hash_policy(ra, ch)
    retry = DEFAULT_RETRY if hr.retries is None else hr.retries
    if retry.attempts > 0:
        _retry(ra.retry_policy, retry, hashed=bool(ra.hash_policy))
    return True


def _route_action(hr: HTTPRoute, vh: VirtualHostInput) -> rc.Route | None:
    """The Envoy route for `hr` without its match, or None if it has no action."""
    r = rc.Route()
    if hr.redirect is not None:
        rd = hr.redirect
        if rd.uri is not None:
            r.redirect.path_redirect = rd.uri
        elif rd.prefix_rewrite is not None:
            r.redirect.prefix_rewrite = rd.prefix_rewrite
        if rd.authority is not None:
            r.redirect.host_redirect = rd.authority
        if rd.port is not None:
            r.redirect.port_redirect = rd.port
        if rd.scheme is not None:
            r.redirect.scheme_redirect = rd.scheme
        r.redirect.response_code = _REDIRECT_CODES.get(rd.redirect_code, rc.RedirectAction.MOVED_PERMANENTLY)
    elif hr.direct_response is not None:
        r.direct_response.status = hr.direct_response.status
        if hr.direct_response.body is not None:
            r.direct_response.body.inline_string = hr.direct_response.body
    elif not _forward(r, hr, vh):
        return None
    _apply_headers(r, hr.headers)
    if hr.fault is not None:
        r.typed_per_filter_config[FAULT_FILTER].CopyFrom(pack(_fault(hr.fault)))
    if hr.cors is not None:
        r.typed_per_filter_config[CORS_FILTER].CopyFrom(pack(_cors(hr.cors)))
    return r


def default_route(target: Target, name: str = "default") -> rc.Route:
    """Prefix `/` to `target`, no timeout, Istio's default retries."""
    r = rc.Route(name=name)
    r.match.prefix = "/"
    r.route.cluster = target.cluster
    r.route.timeout.CopyFrom(duration_ms(0))
    if target.hash is not None:
        _hash_policy(r.route, target.hash)
    _retry(r.route.retry_policy, DEFAULT_RETRY, hashed=bool(r.route.hash_policy))
    return r


def _virtual_host(vh: VirtualHostInput, port: int, namespace: str) -> rc.VirtualHost:
    out = rc.VirtualHost(name=vh.name, domains=vh.domains)
    for i, hr in enumerate(vh.http):
        matches = _applicable(hr.matches, port, namespace, vh.source_labels)
        if not matches:
            continue
        template = _route_action(hr, vh)
        if template is None:
            continue
        for m in matches:
            r = out.routes.add()
            r.CopyFrom(template)
            base = hr.name or f"{vh.route_prefix}.{i}"
            r.name = f"{base}.{m.name}" if m.name else base
            _fill_match(r.match, m)
    if not out.routes:
        out.routes.append(default_route(vh.default))
    return out


def build_route_config(
    name: str, port: int, namespace: str, vhosts: tuple[VirtualHostInput, ...], passthrough: bool,
    block_unknown: bool = False,
) -> route_pb2.RouteConfiguration:
    """The RouteConfiguration for one service port as seen by clients in `namespace`. With
    `passthrough` (intercept capture) unknown hosts go to the PassthroughCluster; with
    `block_unknown` (Sidecar outboundTrafficPolicy REGISTRY_ONLY) they get a 502, as in Istio."""
    rcfg = route_pb2.RouteConfiguration(name=name)
    rcfg.validate_clusters.value = False
    hosts = [_virtual_host(vh, port, namespace) for vh in vhosts]
    if passthrough:
        allow_any = rc.VirtualHost(name="allow_any", domains=["*"])
        allow_any.routes.append(default_route(Target(PASSTHROUGH_CLUSTER), name="allow_any"))
        allow_any.routes[0].route.ClearField("retry_policy")
        hosts.append(allow_any)
    elif block_unknown:
        block_all = rc.VirtualHost(name="block_all", domains=["*"])
        r = block_all.routes.add(name="block_all")
        r.match.prefix = "/"
        r.direct_response.status = 502
        hosts.append(block_all)
    rcfg.virtual_hosts.extend(sorted(hosts, key=lambda v: v.name))
    return rcfg
