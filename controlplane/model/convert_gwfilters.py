"""Gateway API route filters and backendRefs -> IR pieces (`controlplane.model.convert_gatewayapi`
reads the rest of a route). Pure, no I/O.

RequestHeaderModifier / ResponseHeaderModifier -> header operations; RequestRedirect and
URLRewrite -> the IR redirect and rewrite of each match (a prefix replacement needs the
matched prefix); RequestMirror -> mirrors (percent or fraction); CORS -> the route's CORS
policy; ExtensionRef and ExternalAuth -> the reason the rule answers 500. backendRefs keep
their group, kind, namespace, port, weight and own header filters; they are resolved
against Services and ReferenceGrants in `controlplane.model.gamma`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from controlplane.model.convert_base import (
    Ctx,
    as_map,
    check_fields,
    child,
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
from controlplane.model.gwapi import BackendRef, Mirror
from controlplane.model.ir import CorsPolicy, HeaderOps, Headers, Redirect, Rewrite, StringMatch

FILTER_KEYS = {"RequestHeaderModifier": "requestHeaderModifier", "ResponseHeaderModifier": "responseHeaderModifier",
               "RequestRedirect": "requestRedirect", "URLRewrite": "urlRewrite", "RequestMirror": "requestMirror",
               "ExtensionRef": "extensionRef", "CORS": "cors", "ExternalAuth": "externalAuth"}


# --------------------------------------------------------------------------- filters


def header_modifier(ctx: Ctx, value: object, path: str) -> HeaderOps:
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


Filters = tuple[Headers | None, Mapping[str, Any] | None, Mapping[str, Any] | None, tuple[Mirror, ...], str | None,
                 CorsPolicy | None]


def rule_filters(ctx: Ctx, m: Mapping[str, Any], path: str, namespace: str, allowed: Sequence[str]) -> Filters:
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
        key = FILTER_KEYS[typ]
        check_fields(ctx, fm, p, ("type", key))
        if typ != "RequestMirror" and typ in seen:
            ctx.error(join(p, "type"), f"{typ} may appear only once per rule")
            continue
        seen.add(typ)
        body = fm.get(key)
        fp = join(p, key)
        if typ == "RequestHeaderModifier":
            request = header_modifier(ctx, body, fp)
        elif typ == "ResponseHeaderModifier":
            response = header_modifier(ctx, body, fp)
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
    ref = backend_ref(ctx, m.get("backendRef"), join(path, "backendRef"), namespace, weighted=False, http=False)
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


def rewrite_for(ctx: Ctx, spec: Mapping[str, Any] | None, prefix: str | None, where: str) -> Rewrite | None:
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


def redirect_for(ctx: Ctx, spec: Mapping[str, Any] | None, prefix: str | None, where: str) -> Redirect | None:
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


# --------------------------------------------------------------------------- backends


def backend_refs(ctx: Ctx, m: Mapping[str, Any], path: str, namespace: str, *, http: bool) -> tuple[BackendRef, ...]:
    out: list[BackendRef] = []
    for i, item in enumerate(get_list(ctx, m, "backendRefs", path)):
        ref = backend_ref(ctx, item, index(join(path, "backendRefs"), i), namespace, weighted=True, http=http)
        if ref is not None:
            out.append(ref)
    return tuple(out)


def backend_ref(ctx: Ctx, value: object, path: str, namespace: str, *, weighted: bool,
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
                key = FILTER_KEYS[typ]
                check_fields(ctx, fm, p, ("type", key))
                ops = header_modifier(ctx, fm.get(key), join(p, key))
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
