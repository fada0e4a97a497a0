"""Kubernetes Gateway API objects -> IR (`controlplane.model.gwapi`). Pure, no I/O.

Read with the Gateway API's v1 schema (HTTPRoute and GRPCRoute v1, TCPRoute v1alpha2, TLSRoute
v1alpha2/v1alpha3/v1 (SNI `hostnames`, one rule of backendRefs; Gateway TLS Passthrough listeners only),
ReferenceGrant v1beta1; older served versions are accepted too). Every field is translated,
or named in a warning (or, where the Gateway API forbids ignoring it, an error). What a
route's fields mean for traffic:

- matches: `path` Exact / PathPrefix (whole segments) / RegularExpression (RE2), `headers`
  and `queryParams` Exact / RegularExpression, `method`; a match without `path` is
  PathPrefix `/` (the schema's default). GRPCRoute `method` {service, method} Exact or
  RegularExpression becomes a `:path` match (`/service/method`).
- filters: RequestHeaderModifier, ResponseHeaderModifier, RequestRedirect, URLRewrite,
  RequestMirror, CORS; ExtensionRef and ExternalAuth are not supported: such a rule answers
  500 (the Gateway API forbids skipping a filter), with a warning naming the field, and
  its route's ResolvedRefs is False (InvalidKind).
- backendRefs: Services with a port and a relative weight (default 1); their own header
  modifier filters; other kinds are resolved (and refused: `InvalidKind`) in `gamma`.
- timeouts: `request` (the route timeout), `backendRequest` (each try's timeout);
  `retry` (experimental): attempts, codes, backoff.

Cross-object rules (parents, backends, ReferenceGrants, precedence) live in
`controlplane.model.gamma`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from controlplane.model.convert_base import (
    Ctx,
    as_map,
    check_fields,
    check_regex,
    child,
    get_duration,
    get_int,
    get_list,
    get_port,
    get_str,
    get_str_list,
    index,
    is_dns_label,
    is_header_name,
    item_map,
    join,
)
from controlplane.model.convert_gwfilters import backend_refs, redirect_for, rewrite_for, rule_filters
from controlplane.model.convert_gwgateway import convert_gateway, convert_gateway_class
from controlplane.model.convert_http import DEFAULT_RETRY
from controlplane.model.gwapi import (
    GATEWAY_GROUP,
    GatewayRoute,
    ParentRef,
    ReferenceGrant,
    RouteKind,
    RouteRule,
    RuleMatch,
)
from controlplane.model.ir import (
    HeaderMatch,
    HTTPMatch,
    Retry,
    StringMatch,
)

API_VERSIONS: Mapping[str, tuple[str, ...]] = {
    "HTTPRoute": ("gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1"),
    "GRPCRoute": ("gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1alpha2"),
    "TCPRoute": ("gateway.networking.k8s.io/v1alpha2",),
    "TLSRoute": ("gateway.networking.k8s.io/v1alpha2", "gateway.networking.k8s.io/v1alpha3",
                 "gateway.networking.k8s.io/v1"),
    "ReferenceGrant": ("gateway.networking.k8s.io/v1beta1", "gateway.networking.k8s.io/v1alpha2"),
    "Gateway": ("gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1"),
    "GatewayClass": ("gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1"),
}
"""The Gateway API kinds this module converts, and the apiVersions accepted for each."""
UNSUPPORTED: Mapping[str, str] = {
    "UDPRoute": "its routes are not applied",
    "BackendTLSPolicy": "no TLS is originated to its backends (use a DestinationRule's tls)",
    "ListenerSet": "its listeners are not added to any Gateway",
}
"""What is lost when another kind of the Gateway API's groups is ignored."""

_TOP_LEVEL = ("apiVersion", "kind", "metadata", "spec", "status")
_ROUTE_SPEC = ("parentRefs", "hostnames", "rules")
_PARENT_FIELDS = ("group", "kind", "namespace", "name", "sectionName", "port")
_HTTP_RULE = ("name", "matches", "filters", "backendRefs", "timeouts", "retry", "sessionPersistence")
_GRPC_RULE = ("name", "matches", "filters", "backendRefs", "sessionPersistence")
_HTTP_MATCH = ("path", "headers", "queryParams", "method")
_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
_HTTP_FILTERS = ("RequestHeaderModifier", "ResponseHeaderModifier", "RequestRedirect", "URLRewrite",
                 "RequestMirror", "ExtensionRef", "CORS", "ExternalAuth")
_GRPC_FILTERS = ("RequestHeaderModifier", "ResponseHeaderModifier", "RequestMirror", "ExtensionRef")
_L4_KINDS = ("TCPRoute", "TLSRoute")  # rules of backendRefs only (a TLSRoute matches on its hostnames: SNI)
_URI_RANK = {"exact": 3, "regex": 2, "path_prefix": 1}


def convert_gateway_api(ctx: Ctx, namespace: str, name: str) -> object | None:
    """The IR value of a Gateway API object of a kind in `API_VERSIONS` (apiVersion checked
    by the caller)."""
    raw = ctx.raw
    check_fields(ctx, raw.body, "", _TOP_LEVEL)
    spec = child(ctx, raw.body, "spec", "")
    if spec is None:
        if raw.body.get("spec") is None:
            ctx.error("spec", "is required")
        return None
    if raw.kind == "ReferenceGrant":
        return _reference_grant(ctx, spec, namespace, name)
    if raw.kind == "Gateway":
        return convert_gateway(ctx, spec, namespace, name)
    if raw.kind == "GatewayClass":
        return convert_gateway_class(ctx, spec, name)
    kind: RouteKind = raw.kind  # type: ignore[assignment]
    return _route(ctx, kind, spec, namespace, name)


# --------------------------------------------------------------------------- routes


def _route(ctx: Ctx, kind: RouteKind, spec: Mapping[str, Any], namespace: str, name: str) -> GatewayRoute | None:
    check_fields(ctx, spec, "spec", _ROUTE_SPEC if kind != "TCPRoute" else ("parentRefs", "rules"),
                 {"useDefaultGateways": "useDefaultGateways is not supported; ignored (name the parent in parentRefs)"})
    parents = tuple(p for i, item in enumerate(get_list(ctx, spec, "parentRefs", "spec"))
                    if (p := _parent_ref(ctx, item, index("spec.parentRefs", i), namespace)) is not None)
    if not get_list(ctx, spec, "parentRefs", "spec"):
        ctx.warn("spec.parentRefs", "no parentRefs: this route is attached to nothing and has no effect")
    if kind == "TLSRoute" and any(p.is_service for p in parents):
        ctx.warn("spec.parentRefs", "a TLSRoute attached to a Service (mesh routing) is not supported by Meshline; "
                 "that parentRef is ignored (attach TLSRoutes to a Gateway's TLS listener, mode Passthrough)")
        parents = tuple(p for p in parents if not p.is_service)
    hostnames = get_str_list(ctx, spec, "hostnames", "spec")
    for i, host in enumerate(hostnames):
        bare = host[2:] if host.startswith("*.") else host
        if len(host) > 253 or not _HOSTNAME_RE.fullmatch(bare.lower()) or _IPV4_RE.fullmatch(bare):
            ctx.error(index("spec.hostnames", i), f"{host!r} is not a valid hostname (a DNS name, optionally "
                      "prefixed by '*.'; no IP address)")
    if hostnames and any(p.is_service for p in parents):
        ctx.warn("spec.hostnames", "ignored for Service parents: a route attached to a Service applies to "
                 "all of that Service's traffic, whatever its Host (GAMMA)")
    rules: list[RouteRule] = []
    items = get_list(ctx, spec, "rules", "spec")
    if kind in _L4_KINDS and not items:
        ctx.error("spec.rules", "at least one rule is required")
    for i, item in enumerate(items):
        path = index("spec.rules", i)
        if kind in _L4_KINDS and i > 0:
            ctx.warn(path, f"a {kind} rule after the first is never used (a {kind[:3]} connection has nothing "
                     "else to match on); ignored")
            continue
        rule = _rule(ctx, kind, item, path, i, namespace)
        if rule is not None:
            rules.append(rule)
    meta = as_map(ctx, ctx.raw.body.get("metadata"), "metadata") or {}
    gen = meta.get("generation")
    created = meta.get("creationTimestamp")
    return GatewayRoute(ctx.raw.ref, kind, namespace, name, parents, tuple(rules), tuple(h.lower() for h in hostnames),
                        gen if isinstance(gen, int) and not isinstance(gen, bool) else None,
                        str(created) if created is not None else "")


def _parent_ref(ctx: Ctx, value: object, path: str, namespace: str) -> ParentRef | None:
    m = item_map(ctx, value, path)
    if m is None:
        return None
    check_fields(ctx, m, path, _PARENT_FIELDS)
    group = get_str(ctx, m, "group", path)
    kind = get_str(ctx, m, "kind", path)
    ns = get_str(ctx, m, "namespace", path)
    name = get_str(ctx, m, "name", path, required=True)
    section = get_str(ctx, m, "sectionName", path)
    port = get_port(ctx, m, "port", path)
    if name is None:
        return None
    if ns is not None and not is_dns_label(ns):
        ctx.error(join(path, "namespace"), f"{ns!r} is not a valid namespace name")
        return None
    given: list[tuple[str, str | int]] = []
    for key, v in (("group", group), ("kind", kind), ("namespace", ns), ("name", name), ("sectionName", section),
                   ("port", port)):
        if v is not None:
            given.append((key, v))
    return ParentRef(GATEWAY_GROUP if group is None else group, kind or "Gateway", ns or namespace, name, port,
                     section, tuple(given))


def _rule(ctx: Ctx, kind: RouteKind, value: object, path: str, i: int, namespace: str) -> RouteRule | None:
    m = item_map(ctx, value, path)
    if m is None:
        return None
    errors = ctx.error_count()
    if kind in _L4_KINDS:
        check_fields(ctx, m, path, ("name", "backendRefs"))
        backends = backend_refs(ctx, m, path, namespace, http=False)
        if not backends and ctx.error_count() == errors:
            ctx.error(join(path, "backendRefs"), "at least one backendRef is required")
        return RouteRule(i, get_str(ctx, m, "name", path) or "", (), backends) if ctx.error_count() == errors else None
    check_fields(ctx, m, path, _HTTP_RULE if kind == "HTTPRoute" else _GRPC_RULE)
    if m.get("sessionPersistence") is not None:
        ctx.warn(join(path, "sessionPersistence"), "sessionPersistence is not supported; ignored (requests are "
                 "balanced as without it; a DestinationRule consistentHash gives affinity)")
    matches: list[tuple[HTTPMatch, tuple[int, ...]]] = []
    match_items = get_list(ctx, m, "matches", path)
    for j, item in enumerate(match_items):
        mp = index(join(path, "matches"), j)
        parsed = _http_match(ctx, item, mp) if kind == "HTTPRoute" else _grpc_match(ctx, item, mp)
        if parsed is not None:
            matches.append(parsed)
    if not match_items:
        matches.append((HTTPMatch(uri=StringMatch("path_prefix", "/")), _rank(StringMatch("path_prefix", "/"), 0, 0, 0)))
    headers, redirect, rewrite, mirrors, fails, cors = rule_filters(ctx, m, path, namespace,
                                                         _HTTP_FILTERS if kind == "HTTPRoute" else _GRPC_FILTERS)
    backends = backend_refs(ctx, m, path, namespace, http=True)
    if redirect is not None and backends:
        ctx.error(join(path, "backendRefs"), "a rule with a RequestRedirect filter must not have backendRefs")
    timeout_ms, retries = _timeouts(ctx, m, path) if kind == "HTTPRoute" else (None, None)
    rule_matches: list[RuleMatch] = []
    for j, (hm, rank) in enumerate(matches):
        prefix = hm.uri.value if hm.uri is not None and hm.uri.kind == "path_prefix" else None
        c = ctx if j == 0 else Ctx(ctx.raw)  # the filters are read once per match: report each issue once
        rw = rewrite_for(c, rewrite, prefix, join(path, "filters"))
        rd = redirect_for(c, redirect, prefix, join(path, "filters"))
        ctx.issues.extend(i for i in c.issues if c is not ctx and i not in ctx.issues)
        rule_matches.append(RuleMatch(hm, rank, rw, rd))
    if ctx.error_count() != errors:
        return None
    return RouteRule(i, get_str(ctx, m, "name", path) or "", tuple(rule_matches), backends, mirrors, headers,
                     timeout_ms, retries, fails, cors)


def _rank(uri: StringMatch | None, method: int, headers: int, query: int) -> tuple[int, ...]:
    """Gateway API precedence (smaller first): Exact path, then RegularExpression (the spec
    leaves regexes' place open; before prefixes, so that a catch-all PathPrefix `/` cannot
    hide them), then PathPrefix by length, then a method match, then more header matches,
    then more query parameter matches."""
    kind_rank = _URI_RANK.get(uri.kind, 0) if uri is not None else 0
    length = len(uri.value) if uri is not None and uri.kind == "path_prefix" else 0
    return (-kind_rank, -length, -method, -headers, -query)


def _string_match(ctx: Ctx, m: Mapping[str, Any], path: str, kinds: Mapping[str, str], default: str,
                  value_required: bool = True) -> StringMatch | None:
    typ = get_str(ctx, m, "type", path) or default
    value = get_str(ctx, m, "value", path, required=value_required)
    if typ not in kinds:
        ctx.error(join(path, "type"), f"unsupported type {typ!r} (expected {' or '.join(kinds)})")
        return None
    if value is None:
        return None
    if kinds[typ] == "regex" and not check_regex(ctx, value, join(path, "value")):
        return None
    return StringMatch(kinds[typ], value)  # type: ignore[arg-type]


def _header_list(ctx: Ctx, m: Mapping[str, Any], key: str, path: str, *, header: bool) -> tuple[HeaderMatch, ...]:
    out: list[HeaderMatch] = []
    seen: set[str] = set()
    for i, item in enumerate(get_list(ctx, m, key, path)):
        p = index(join(path, key), i)
        hm = item_map(ctx, item, p)
        if hm is None:
            continue
        check_fields(ctx, hm, p, ("type", "name", "value"))
        name = get_str(ctx, hm, "name", p, required=True)
        sm = _string_match(ctx, hm, p, {"Exact": "exact", "RegularExpression": "regex"}, "Exact")
        if name is None or sm is None:
            continue
        if header and not is_header_name(name):
            ctx.error(join(p, "name"), f"{name!r} is not a valid header name")
            continue
        norm = name.lower() if header else name
        if norm in seen:  # the Gateway API: only the first entry with an equivalent name counts
            ctx.warn(join(p, "name"), f"{name!r} is matched by an earlier entry; this one is ignored")
            continue
        seen.add(norm)
        out.append(HeaderMatch(norm, sm))
    return tuple(out)


def _http_match(ctx: Ctx, value: object, path: str) -> tuple[HTTPMatch, tuple[int, ...]] | None:
    m = item_map(ctx, value, path)
    if m is None:
        return None
    errors = ctx.error_count()
    check_fields(ctx, m, path, _HTTP_MATCH)
    uri: StringMatch | None = StringMatch("path_prefix", "/")
    pm = child(ctx, m, "path", path)
    if pm is not None:
        pp = join(path, "path")
        check_fields(ctx, pm, pp, ("type", "value"))
        if "value" not in pm:
            pm = {**pm, "value": "/"}
        uri = _string_match(ctx, pm, pp, {"Exact": "exact", "PathPrefix": "path_prefix",
                                          "RegularExpression": "regex"}, "PathPrefix")
        if uri is not None and uri.kind != "regex":
            if not uri.value.startswith("/"):
                ctx.error(join(pp, "value"), f"must start with '/', got {uri.value!r}")
            elif "//" in uri.value or re.search(r"/\.\.?(/|$)", uri.value) or "%2f" in uri.value.lower():
                ctx.error(join(pp, "value"), f"must not contain '//', '/./', '/../' or '%2f': {uri.value!r}")
            elif uri.kind == "path_prefix" and len(uri.value) > 1:
                uri = StringMatch("path_prefix", uri.value.rstrip("/") or "/")
    method = get_str(ctx, m, "method", path)
    if method is not None and method not in _METHODS:
        ctx.error(join(path, "method"), f"unsupported method {method!r} (expected one of {', '.join(_METHODS)})")
    headers = _header_list(ctx, m, "headers", path, header=True)
    query = _header_list(ctx, m, "queryParams", path, header=False)
    if ctx.error_count() != errors:
        return None
    match = HTTPMatch(uri=uri, method=StringMatch("exact", method) if method else None, headers=headers,
                      query_params=query)
    return match, _rank(uri, 1 if method else 0, len(headers), len(query))


_HOSTNAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_IPV4_RE = re.compile(r"[0-9.]+")
_GRPC_NAME_RE = r"[A-Za-z_][A-Za-z_0-9]*(\.[A-Za-z_][A-Za-z_0-9]*)*"


def _grpc_match(ctx: Ctx, value: object, path: str) -> tuple[HTTPMatch, tuple[int, ...]] | None:
    m = item_map(ctx, value, path)
    if m is None:
        return None
    errors = ctx.error_count()
    check_fields(ctx, m, path, ("method", "headers"))
    uri: StringMatch | None = None
    mm = child(ctx, m, "method", path)
    svc_len = meth_len = 0
    if mm is not None:
        mp = join(path, "method")
        check_fields(ctx, mm, mp, ("type", "service", "method"))
        typ = get_str(ctx, mm, "type", mp) or "Exact"
        service = get_str(ctx, mm, "service", mp)
        method = get_str(ctx, mm, "method", mp)
        if service is None and method is None:
            ctx.error(mp, "one of service or method is required")
        elif typ == "Exact":
            for key, v in (("service", service), ("method", method)):
                if v is not None and not re.fullmatch(_GRPC_NAME_RE if key == "service" else r"[A-Za-z_][A-Za-z_0-9]*",
                                                      v):
                    ctx.error(join(mp, key), f"{v!r} is not a valid gRPC {key} name")
            if service and method:
                uri = StringMatch("exact", f"/{service}/{method}")
            elif service:
                uri = StringMatch("prefix", f"/{service}/")
            else:
                uri = StringMatch("regex", f"/[^/]+/{re.escape(method or '')}")
        elif typ == "RegularExpression":
            for key, v in (("service", service), ("method", method)):
                if v is not None:
                    check_regex(ctx, v, join(mp, key))
            uri = StringMatch("regex", f"/{service or '[^/]+'}/{method or '[^/]+'}")
            if ctx.error_count() == errors:
                check_regex(ctx, uri.value, mp)
        else:
            ctx.error(join(mp, "type"), f"unsupported type {typ!r} (expected Exact or RegularExpression)")
        svc_len, meth_len = len(service or ""), len(method or "")
    headers = _header_list(ctx, m, "headers", path, header=True)
    if ctx.error_count() != errors:
        return None
    match = HTTPMatch(uri=uri, headers=headers)
    # GRPCRoute precedence: longer service, then longer method, then more header matches
    return match, (-svc_len, -meth_len, -len(headers))


def _timeouts(ctx: Ctx, m: Mapping[str, Any], path: str) -> tuple[int | None, Retry | None]:
    timeout = backend = None
    tm = child(ctx, m, "timeouts", path)
    if tm is not None:
        tp = join(path, "timeouts")
        check_fields(ctx, tm, tp, ("request", "backendRequest"))
        timeout = get_duration(ctx, tm, "request", tp)
        backend = get_duration(ctx, tm, "backendRequest", tp)
        if timeout and backend and backend > timeout:
            ctx.error(join(tp, "backendRequest"), f"must not be longer than request ({backend} ms > {timeout} ms)")
    retry: Retry | None = None
    rm = child(ctx, m, "retry", path)
    if rm is not None:
        rp = join(path, "retry")
        check_fields(ctx, rm, rp, ("codes", "attempts", "backoff"))
        attempts = get_int(ctx, rm, "attempts", rp, lo=0)
        codes: list[int] = []
        for i, c in enumerate(get_list(ctx, rm, "codes", rp)):
            if isinstance(c, int) and not isinstance(c, bool) and 400 <= c <= 599:
                codes.append(c)
            else:
                ctx.error(index(join(rp, "codes"), i), f"must be an HTTP status code 400-599, got {c!r}")
        backoff = get_duration(ctx, rm, "backoff", rp)
        retry = replace(DEFAULT_RETRY, attempts=DEFAULT_RETRY.attempts if attempts is None else attempts,
                        retriable_status_codes=tuple(codes) or DEFAULT_RETRY.retriable_status_codes,
                        backoff_ms=backoff)
    if backend:
        retry = replace(retry or DEFAULT_RETRY, per_try_timeout_ms=backend)
    return timeout, retry


# --------------------------------------------------------------------------- ReferenceGrant


def _reference_grant(ctx: Ctx, spec: Mapping[str, Any], namespace: str, name: str) -> ReferenceGrant | None:
    check_fields(ctx, spec, "spec", ("from", "to"))
    froms: list[tuple[str, str, str]] = []
    for i, item in enumerate(get_list(ctx, spec, "from", "spec")):
        p = index("spec.from", i)
        m = item_map(ctx, item, p)
        if m is None:
            continue
        check_fields(ctx, m, p, ("group", "kind", "namespace"))
        group = get_str(ctx, m, "group", p)
        kind = get_str(ctx, m, "kind", p, required=True)
        ns = get_str(ctx, m, "namespace", p, required=True)
        if group is None:
            ctx.error(join(p, "group"), "is required (\"\" for the core group)")
        if group is not None and kind and ns:
            froms.append((group, kind, ns))
    tos: list[tuple[str, str, str | None]] = []
    for i, item in enumerate(get_list(ctx, spec, "to", "spec")):
        p = index("spec.to", i)
        m = item_map(ctx, item, p)
        if m is None:
            continue
        check_fields(ctx, m, p, ("group", "kind", "name"))
        group = get_str(ctx, m, "group", p)
        kind = get_str(ctx, m, "kind", p, required=True)
        if group is None:
            ctx.error(join(p, "group"), "is required (\"\" for the core group)")
        if group is not None and kind:
            tos.append((group, kind, get_str(ctx, m, "name", p) or None))
    if not froms:
        ctx.error("spec.from", "at least one entry is required")
    if not tos:
        ctx.error("spec.to", "at least one entry is required")
    return ReferenceGrant(ctx.raw.ref, namespace, name, tuple(froms), tuple(tos))

