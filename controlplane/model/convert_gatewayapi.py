"""Kubernetes Gateway API objects -> IR (`controlplane.model.gwapi`). Pure, no I/O.

Read with the Gateway API's v1 schema (HTTPRoute and GRPCRoute v1, TCPRoute v1alpha2,
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
from collections.abc import Mapping, Sequence
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
from controlplane.model.convert_gwgateway import convert_gateway, convert_gateway_class
from controlplane.model.convert_http import DEFAULT_RETRY
from controlplane.model.gwapi import (
    GATEWAY_GROUP,
    BackendRef,
    GatewayRoute,
    Mirror,
    ParentRef,
    ReferenceGrant,
    RouteKind,
    RouteRule,
    RuleMatch,
)
from controlplane.model.ir import (
    CorsPolicy,
    HeaderMatch,
    HeaderOps,
    Headers,
    HTTPMatch,
    Redirect,
    Retry,
    Rewrite,
    StringMatch,
)

API_VERSIONS: Mapping[str, tuple[str, ...]] = {
    "HTTPRoute": ("gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1"),
    "GRPCRoute": ("gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1alpha2"),
    "TCPRoute": ("gateway.networking.k8s.io/v1alpha2",),
    "ReferenceGrant": ("gateway.networking.k8s.io/v1beta1", "gateway.networking.k8s.io/v1alpha2"),
    "Gateway": ("gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1"),
    "GatewayClass": ("gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1"),
}
"""The Gateway API kinds this module converts, and the apiVersions accepted for each."""
UNSUPPORTED: Mapping[str, str] = {
    "TLSRoute": "its routes are not applied",
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
_FILTER_KEYS = {"RequestHeaderModifier": "requestHeaderModifier", "ResponseHeaderModifier": "responseHeaderModifier",
                "RequestRedirect": "requestRedirect", "URLRewrite": "urlRewrite", "RequestMirror": "requestMirror",
                "ExtensionRef": "extensionRef", "CORS": "cors", "ExternalAuth": "externalAuth"}
_UNSUPPORTED_FILTERS = ("ExtensionRef", "ExternalAuth")
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
    hostnames = get_str_list(ctx, spec, "hostnames", "spec")
    if hostnames and any(p.is_service for p in parents):
        ctx.warn("spec.hostnames", "ignored for Service parents: a route attached to a Service applies to "
                 "all of that Service's traffic, whatever its Host (GAMMA)")
    rules: list[RouteRule] = []
    items = get_list(ctx, spec, "rules", "spec")
    if kind == "TCPRoute" and not items:
        ctx.error("spec.rules", "at least one rule is required")
    for i, item in enumerate(items):
        path = index("spec.rules", i)
        if kind == "TCPRoute" and i > 0:
            ctx.warn(path, "a TCPRoute rule after the first is never used (a TCP connection has nothing to "
                     "match on); ignored")
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
    if kind == "TCPRoute":
        check_fields(ctx, m, path, ("name", "backendRefs"))
        backends = _backend_refs(ctx, m, path, namespace, http=False)
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
    headers, redirect, rewrite, mirrors, fails, cors = _filters(ctx, m, path, namespace,
                                                         _HTTP_FILTERS if kind == "HTTPRoute" else _GRPC_FILTERS)
    backends = _backend_refs(ctx, m, path, namespace, http=True)
    if redirect is not None and backends:
        ctx.error(join(path, "backendRefs"), "a rule with a RequestRedirect filter must not have backendRefs")
    timeout_ms, retries = _timeouts(ctx, m, path) if kind == "HTTPRoute" else (None, None)
    rule_matches: list[RuleMatch] = []
    for j, (hm, rank) in enumerate(matches):
        prefix = hm.uri.value if hm.uri is not None and hm.uri.kind == "path_prefix" else None
        c = ctx if j == 0 else Ctx(ctx.raw)  # the filters are read once per match: report each issue once
        rw = _rewrite_for(c, rewrite, prefix, join(path, "filters"))
        rd = _redirect_for(c, redirect, prefix, join(path, "filters"))
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


# --------------------------------------------------------------------------- filters


def _header_modifier(ctx: Ctx, value: object, path: str) -> HeaderOps:
    m = as_map(ctx, value, path)
    if m is None:
        ctx.error(path, "is required for this filter type")
        return HeaderOps()
    check_fields(ctx, m, path, ("set", "add", "remove"))
    pairs: dict[str, list[tuple[str, str]]] = {"set": [], "add": []}
    for op in ("set", "add"):
        for i, item in enumerate(get_list(ctx, m, op, path)):
            p = index(join(path, op), i)
            im = item_map(ctx, item, p)
            if im is None:
                continue
            check_fields(ctx, im, p, ("name", "value"))
            name = get_str(ctx, im, "name", p, required=True)
            val = get_str(ctx, im, "value", p, required=False)
            if name is None:
                continue
            if not is_header_name(name) or name.lower() == "host":
                ctx.error(join(p, "name"), f"{name!r} cannot be modified (not a header name, or Host: use "
                          "URLRewrite hostname)")
                continue
            if val is None:
                ctx.error(join(p, "value"), "is required")
                continue
            if any(c in val for c in "\r\n\0"):
                ctx.error(join(p, "value"), "header values must not contain CR, LF or NUL")
                continue
            pairs[op].append((name.lower(), val))
    remove: list[str] = []
    for i, name in enumerate(get_str_list(ctx, m, "remove", path)):
        if not is_header_name(name) or name.lower() == "host":
            ctx.error(index(join(path, "remove"), i), f"{name!r} cannot be removed")
            continue
        remove.append(name.lower())
    return HeaderOps(set=tuple(sorted(pairs["set"])), add=tuple(sorted(pairs["add"])), remove=tuple(remove))


_Filters = tuple[Headers | None, Mapping[str, Any] | None, Mapping[str, Any] | None, tuple[Mirror, ...], str | None,
                 CorsPolicy | None]


def _filters(ctx: Ctx, m: Mapping[str, Any], path: str, namespace: str, allowed: Sequence[str]) -> _Filters:
    """(header operations, redirect spec, rewrite spec, mirrors, why the rule must fail, CORS)."""
    request = response = HeaderOps()
    cors: CorsPolicy | None = None
    redirect = rewrite = None
    mirrors: list[Mirror] = []
    fails: str | None = None
    seen: set[str] = set()
    for i, item in enumerate(get_list(ctx, m, "filters", path)):
        p = index(join(path, "filters"), i)
        fm = item_map(ctx, item, p)
        if fm is None:
            continue
        typ = get_str(ctx, fm, "type", p, required=True)
        if typ is None:
            continue
        if typ not in allowed:
            ctx.error(join(p, "type"), f"unsupported filter type {typ!r} here (expected one of {', '.join(allowed)})")
            continue
        key = _FILTER_KEYS[typ]
        check_fields(ctx, fm, p, ("type", key))
        if typ != "RequestMirror" and typ in seen:
            ctx.error(join(p, "type"), f"{typ} may appear only once per rule")
            continue
        seen.add(typ)
        body = fm.get(key)
        fp = join(p, key)
        if typ == "RequestHeaderModifier":
            request = _header_modifier(ctx, body, fp)
        elif typ == "ResponseHeaderModifier":
            response = _header_modifier(ctx, body, fp)
        elif typ == "RequestRedirect":
            redirect = as_map(ctx, body, fp) or {}
            redirect = {**redirect, "__path__": fp}
        elif typ == "URLRewrite":
            rewrite = as_map(ctx, body, fp) or {}
            rewrite = {**rewrite, "__path__": fp}
        elif typ == "RequestMirror":
            mirror = _mirror(ctx, body, fp, namespace)
            if mirror is not None:
                mirrors.append(mirror)
        elif typ == "CORS":
            cors = _cors(ctx, body, fp)
        else:  # ExtensionRef, ExternalAuth
            fails = fails or f"filter {typ} ({fp}) is not supported by Meshline"
            ctx.warn(join(p, "type"), f"{typ} filters are not supported: every request this rule matches is "
                     "answered 500 (the Gateway API forbids skipping a filter)")
    if redirect is not None and rewrite is not None:
        ctx.error(join(path, "filters"), "RequestRedirect and URLRewrite cannot both be set")
    headers = Headers(request, response) if not (request.empty and response.empty) else None
    return headers, redirect, rewrite, tuple(mirrors), fails, cors


def _cors(ctx: Ctx, value: object, path: str) -> CorsPolicy | None:
    m = as_map(ctx, value, path)
    if m is None:
        ctx.error(path, "is required for this filter type")
        return None
    check_fields(ctx, m, path, ("allowOrigins", "allowCredentials", "allowMethods", "allowHeaders", "exposeHeaders",
                                "maxAge"))
    origins: list[StringMatch] = []
    for i, origin in enumerate(get_str_list(ctx, m, "allowOrigins", path)):
        if origin == "*":
            origins.append(StringMatch("regex", ".*"))
        elif "*" in origin:  # a wildcard label: https://*.example.com
            origins.append(StringMatch("regex", ".*".join(re.escape(part) for part in origin.split("*"))))
        elif re.fullmatch(r"[a-z][a-z0-9+.-]*://[^/\s]+", origin):
            origins.append(StringMatch("exact", origin))
        else:
            ctx.error(index(join(path, "allowOrigins"), i), f"{origin!r} is not an origin (scheme://host[:port] or *)")
    credentials = m.get("allowCredentials")
    if credentials is not None and not isinstance(credentials, bool):
        ctx.error(join(path, "allowCredentials"), "expected true or false")
        credentials = None
    max_age = get_int(ctx, m, "maxAge", path, lo=1)
    return CorsPolicy(allow_origins=tuple(origins), allow_methods=get_str_list(ctx, m, "allowMethods", path),
                      allow_headers=get_str_list(ctx, m, "allowHeaders", path),
                      expose_headers=get_str_list(ctx, m, "exposeHeaders", path),
                      max_age_s=5 if max_age is None else max_age, allow_credentials=credentials)


def _mirror(ctx: Ctx, value: object, path: str, namespace: str) -> Mirror | None:
    m = as_map(ctx, value, path)
    if m is None:
        ctx.error(path, "is required for this filter type")
        return None
    check_fields(ctx, m, path, ("backendRef", "percent", "fraction"))
    ref = _backend_ref(ctx, m.get("backendRef"), join(path, "backendRef"), namespace, weighted=False, http=False)
    pct: float | None = None
    percent = get_int(ctx, m, "percent", path, lo=0, hi=100)
    fm = child(ctx, m, "fraction", path)
    if percent is not None and fm is not None:
        ctx.error(path, "set percent or fraction, not both")
    if percent is not None:
        pct = float(percent)
    elif fm is not None:
        fp = join(path, "fraction")
        check_fields(ctx, fm, fp, ("numerator", "denominator"))
        num = get_int(ctx, fm, "numerator", fp, lo=0, required=True)
        den = get_int(ctx, fm, "denominator", fp, lo=1)
        den = 100 if den is None else den
        if num is not None:
            if num > den:
                ctx.error(fp, f"numerator {num} is greater than denominator {den}")
            pct = 100.0 * num / den
    if ref is None:
        return None
    return Mirror(ref, pct)


def _path_modifier(ctx: Ctx, m: Mapping[str, Any], path: str) -> tuple[str, str] | None:
    """(type, value) of an HTTPPathModifier."""
    pm = child(ctx, m, "path", path)
    if pm is None:
        return None
    p = join(path, "path")
    check_fields(ctx, pm, p, ("type", "replaceFullPath", "replacePrefixMatch"))
    typ = get_str(ctx, pm, "type", p, required=True)
    if typ == "ReplaceFullPath":
        value = get_str(ctx, pm, "replaceFullPath", p, required=True)
    elif typ == "ReplacePrefixMatch":
        value = get_str(ctx, pm, "replacePrefixMatch", p, required=True)
    else:
        if typ is not None:
            ctx.error(join(p, "type"), f"unsupported type {typ!r} (expected ReplaceFullPath or ReplacePrefixMatch)")
        return None
    if value is None:
        return None
    if not value.startswith("/"):
        ctx.error(p, f"the replacement path must start with '/', got {value!r}")
        return None
    return typ, value


def _rewrite_for(ctx: Ctx, spec: Mapping[str, Any] | None, prefix: str | None, where: str) -> Rewrite | None:
    if spec is None:
        return None
    path = str(spec["__path__"])
    m = {k: v for k, v in spec.items() if k != "__path__"}
    check_fields(ctx, m, path, ("hostname", "path"))
    hostname = get_str(ctx, m, "hostname", path)
    mod = _path_modifier(ctx, m, path)
    if mod is None:
        return Rewrite(authority=hostname) if hostname else None
    typ, value = mod
    if typ == "ReplaceFullPath":
        return Rewrite(authority=hostname, uri_regex=("^.*$", value.replace("\\", "\\\\")))
    if prefix is None:
        ctx.error(join(path, "path"), "ReplacePrefixMatch needs every match of the rule to be a PathPrefix match")
        return None
    return Rewrite(authority=hostname, **_prefix_replacement(prefix, value))


def _prefix_replacement(prefix: str, value: str) -> dict[str, Any]:
    """Envoy's prefix_rewrite keeps what follows the prefix ("/a" -> "/" turns "/a/b" into
    "//b"): replacing with "/" uses a regex instead, and a trailing "/" of the replacement
    is dropped, so that "/a/b" becomes "/x/b" and "/a" becomes "/x" as the Gateway API says."""
    if value.rstrip("/") == "":
        if prefix == "/":
            return {"uri": "/"}
        return {"uri_regex": (f"^{re.escape(prefix)}/*", "/")}
    if prefix == "/":
        return {"uri_regex": ("^/", value.rstrip("/") + "/")}
    return {"uri": value.rstrip("/")}


def _redirect_for(ctx: Ctx, spec: Mapping[str, Any] | None, prefix: str | None, where: str) -> Redirect | None:
    if spec is None:
        return None
    path = str(spec["__path__"])
    m = {k: v for k, v in spec.items() if k != "__path__"}
    check_fields(ctx, m, path, ("scheme", "hostname", "path", "port", "statusCode"))
    scheme = get_str(ctx, m, "scheme", path)
    if scheme is not None and scheme not in ("http", "https"):
        ctx.error(join(path, "scheme"), f"must be http or https, got {scheme!r}")
    hostname = get_str(ctx, m, "hostname", path)
    port = get_port(ctx, m, "port", path)
    code = get_int(ctx, m, "statusCode", path)
    if code is not None and code not in (301, 302, 303, 307, 308):
        ctx.error(join(path, "statusCode"), f"must be 301, 302, 303, 307 or 308, got {code}")
    mod = _path_modifier(ctx, m, path)
    uri = prefix_rw = None
    if mod is not None:
        typ, value = mod
        if typ == "ReplaceFullPath":
            uri = value
        elif prefix is None:
            ctx.error(join(path, "path"), "ReplacePrefixMatch needs every match of the rule to be a PathPrefix match")
        else:
            prefix_rw = value.rstrip("/") or "/"
    return Redirect(uri=uri, authority=hostname, port=port, scheme=scheme, redirect_code=code or 302,
                    prefix_rewrite=prefix_rw)


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


# --------------------------------------------------------------------------- backends


def _backend_refs(ctx: Ctx, m: Mapping[str, Any], path: str, namespace: str, *, http: bool) -> tuple[BackendRef, ...]:
    out: list[BackendRef] = []
    for i, item in enumerate(get_list(ctx, m, "backendRefs", path)):
        ref = _backend_ref(ctx, item, index(join(path, "backendRefs"), i), namespace, weighted=True, http=http)
        if ref is not None:
            out.append(ref)
    return tuple(out)


def _backend_ref(ctx: Ctx, value: object, path: str, namespace: str, *, weighted: bool,
                 http: bool) -> BackendRef | None:
    m = item_map(ctx, value, path)
    if m is None:
        return None
    fields = ["group", "kind", "name", "namespace", "port"]
    if weighted:
        fields.append("weight")
    if http:
        fields.append("filters")
    check_fields(ctx, m, path, fields)
    group = get_str(ctx, m, "group", path) or ""
    kind = get_str(ctx, m, "kind", path) or "Service"
    name = get_str(ctx, m, "name", path, required=True)
    ns = get_str(ctx, m, "namespace", path)
    port = get_port(ctx, m, "port", path)
    weight = get_int(ctx, m, "weight", path, lo=0, hi=1_000_000) if weighted else 1
    if group in ("", "core") and kind == "Service" and port is None:
        ctx.error(join(path, "port"), "is required when the backend is a Service")
    if ns is not None and not is_dns_label(ns):
        ctx.error(join(path, "namespace"), f"{ns!r} is not a valid namespace name")
        return None
    headers: Headers | None = None
    if http:
        request = response = HeaderOps()
        for i, item in enumerate(get_list(ctx, m, "filters", path)):
            p = index(join(path, "filters"), i)
            fm = item_map(ctx, item, p)
            if fm is None:
                continue
            typ = get_str(ctx, fm, "type", p, required=True)
            if typ in ("RequestHeaderModifier", "ResponseHeaderModifier"):
                key = _FILTER_KEYS[typ]
                check_fields(ctx, fm, p, ("type", key))
                ops = _header_modifier(ctx, fm.get(key), join(p, key))
                if typ == "RequestHeaderModifier":
                    request = ops
                else:
                    response = ops
            elif typ is not None:
                ctx.error(join(p, "type"), f"backendRef filter {typ} is not supported by Meshline (only "
                          "RequestHeaderModifier and ResponseHeaderModifier are)")
        if not (request.empty and response.empty):
            headers = Headers(request, response)
    if name is None:
        return None
    return BackendRef(group, kind, ns or namespace, name, port, 1 if weight is None else weight, headers, path)


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

