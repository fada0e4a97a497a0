"""VirtualService HTTP route parts -> IR: matches, header operations, retries, faults, CORS,
redirects, rewrites and direct responses. Pure, no I/O.

Field names follow Istio's public v1 `HTTPRoute` schema. Readers report problems on the
`Ctx` and return None for a part that is invalid; the caller drops the whole object when
any error was reported.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

from controlplane.model.convert_base import (
    INT32_MAX,
    Ctx,
    as_map,
    check_fields,
    check_regex,
    child,
    get_bool,
    get_duration,
    get_int,
    get_labels,
    get_list,
    get_percentage,
    get_port,
    get_str,
    get_str_list,
    index,
    is_dns_label,
    is_header_name,
    item_map,
    join,
)
from controlplane.model.ir import (
    CorsPolicy,
    DirectResponse,
    Fault,
    FaultAbort,
    FaultDelay,
    HeaderMatch,
    HeaderOps,
    Headers,
    HTTPMatch,
    Redirect,
    Retry,
    Rewrite,
    StringMatch,
    StringMatchKind,
)

STRING_MATCH_KINDS: tuple[StringMatchKind, ...] = ("exact", "prefix", "regex")

_HTTP_RETRY_ON = (
    "5xx gateway-error reset reset-before-request connect-failure envoy-ratelimited retriable-4xx "
    "refused-stream retriable-status-codes retriable-headers http3-post-connect-failure"
)
_GRPC_RETRY_ON = "cancelled deadline-exceeded internal resource-exhausted unavailable"
RETRY_ON_CONDITIONS = frozenset((_HTTP_RETRY_ON + " " + _GRPC_RETRY_ON).split())
"""Envoy's x-envoy-retry-on and x-envoy-retry-grpc-on conditions."""
DEFAULT_RETRY_ON: tuple[str, ...] = (
    "connect-failure",
    "refused-stream",
    "unavailable",
    "cancelled",
    "retriable-status-codes",
)
"""Istio's default `retryOn`, used when `retries.retryOn` is absent."""
DEFAULT_RETRIABLE_STATUS_CODES: tuple[int, ...] = (503,)
DEFAULT_RETRY = Retry(attempts=2, retry_on=DEFAULT_RETRY_ON, retriable_status_codes=DEFAULT_RETRIABLE_STATUS_CODES)
"""Istio's default retry policy, for an HTTP route without `retries` (translate.routes applies it)."""

_GRPC_NAMES = (
    "OK CANCELLED UNKNOWN INVALID_ARGUMENT DEADLINE_EXCEEDED NOT_FOUND ALREADY_EXISTS PERMISSION_DENIED "
    "RESOURCE_EXHAUSTED FAILED_PRECONDITION ABORTED OUT_OF_RANGE UNIMPLEMENTED INTERNAL UNAVAILABLE "
    "DATA_LOSS UNAUTHENTICATED"
)
GRPC_STATUS_CODES: Mapping[str, int] = {name: code for code, name in enumerate(_GRPC_NAMES.split())}
"""gRPC status names -> codes (UNAVAILABLE -> 14)."""
REDIRECT_CODES = (301, 302, 303, 307, 308)
_IGNORED_MATCH_HEADER_KEYS = ("uri", "scheme", "method", "authority")
_UNMODIFIABLE_HEADERS = ("host",)


# --------------------------------------------------------------------------- string matches


def string_match(
    ctx: Ctx, value: object, path: str, *, presence_ok: bool = False
) -> tuple[bool, StringMatch | None]:
    """Istio `StringMatch` (`{exact|prefix|regex: ...}`) -> (valid, match).

    With `presence_ok`, an empty map means "present with any value" (match None)."""
    m = as_map(ctx, value, path)
    if m is None:
        if value is None and presence_ok:
            return True, None
        if value is None:
            ctx.error(path, "expected one of exact, prefix or regex")
        return False, None
    check_fields(ctx, m, path, STRING_MATCH_KINDS)
    given = [k for k in STRING_MATCH_KINDS if m.get(k) is not None]
    if not given:
        if presence_ok:
            return True, None
        ctx.error(path, "one of exact, prefix or regex is required")
        return False, None
    if len(given) > 1:
        ctx.error(path, f"only one of exact, prefix or regex may be set, got {', '.join(given)}")
        return False, None
    kind = given[0]
    text = get_str(ctx, m, kind, path)
    if text is None:
        return False, None
    if kind == "regex" and not check_regex(ctx, text, join(path, kind)):
        return False, None
    return True, StringMatch(kind, text)


def _header_matches(ctx: Ctx, m: Mapping[str, Any], key: str, path: str) -> tuple[HeaderMatch, ...]:
    p = join(path, key)
    hm = as_map(ctx, m.get(key), p)
    if hm is None:
        return ()
    out: list[HeaderMatch] = []
    for name, value in hm.items():
        hp = join(p, str(name))
        if not isinstance(name, str) or not (is_header_name(name) or name.startswith(":")):
            ctx.error(hp, f"{name!r} is not a valid header name")
            continue
        if key == "headers" and name in _IGNORED_MATCH_HEADER_KEYS:
            ctx.warn(hp, f"the {name!r} header key is ignored; use match.{name} instead")
            continue
        ok, match = string_match(ctx, value, hp, presence_ok=True)
        if ok:
            out.append(HeaderMatch(name.lower() if key != "queryParams" else name, match))
    return tuple(sorted(out, key=lambda h: h.name))


_MATCH_FIELDS = (
    "name",
    "uri",
    "scheme",
    "method",
    "authority",
    "headers",
    "port",
    "sourceLabels",
    "gateways",
    "queryParams",
    "ignoreUriCase",
    "withoutHeaders",
    "sourceNamespace",
)
_MATCH_IGNORED = {"statPrefix": "statPrefix is not supported; ignored"}


def check_gateways(ctx: Ctx, m: Mapping[str, Any], path: str) -> tuple[str, ...]:
    """A match-level `gateways` list as written (`mesh`, `name` or `ns/name`; resolved in the
    VirtualService's namespace by `controlplane.model.gateways.resolve_gateway_name`); it
    overrides the VirtualService's `gateways` for this match. Empty: not set."""
    if "gateways" not in m or m.get("gateways") is None:
        return ()
    gateways = get_str_list(ctx, m, "gateways", path)
    if not gateways:
        ctx.error(join(path, "gateways"), "must not be empty (leave it out to inherit spec.gateways)")
    return tuple(dict.fromkeys(gateways))


def http_match(ctx: Ctx, value: object, path: str) -> HTTPMatch | None:
    m = item_map(ctx, value, path)
    if m is None:
        return None
    errors = ctx.error_count()
    check_fields(ctx, m, path, _MATCH_FIELDS, _MATCH_IGNORED)
    gateways = check_gateways(ctx, m, path)
    parts: dict[str, StringMatch | None] = {}
    for key in ("uri", "scheme", "method", "authority"):
        if m.get(key) is not None:
            _, parts[key] = string_match(ctx, m[key], join(path, key))
    source_ns = get_str(ctx, m, "sourceNamespace", path)
    if source_ns is not None and not is_dns_label(source_ns):
        ctx.error(join(path, "sourceNamespace"), f"{source_ns!r} is not a namespace name")
    match = HTTPMatch(
        name=get_str(ctx, m, "name", path) or "",
        uri=parts.get("uri"),
        ignore_uri_case=bool(get_bool(ctx, m, "ignoreUriCase", path)),
        method=parts.get("method"),
        authority=parts.get("authority"),
        scheme=parts.get("scheme"),
        headers=_header_matches(ctx, m, "headers", path),
        without_headers=_header_matches(ctx, m, "withoutHeaders", path),
        query_params=_header_matches(ctx, m, "queryParams", path),
        port=get_port(ctx, m, "port", path),
        source_labels=get_labels(ctx, m, "sourceLabels", path),
        source_namespace=source_ns or None,
        gateways=gateways,
    )
    return match if ctx.error_count() == errors else None


# --------------------------------------------------------------------------- header operations


def _header_ops(ctx: Ctx, m: Mapping[str, Any], key: str, path: str) -> HeaderOps:
    p = join(path, key)
    om = as_map(ctx, m.get(key), p)
    if om is None:
        return HeaderOps()
    check_fields(ctx, om, p, ("set", "add", "remove"))
    pairs: dict[str, tuple[tuple[str, str], ...]] = {}
    for op in ("set", "add"):
        op_path = join(p, op)
        mm = as_map(ctx, om.get(op), op_path)
        items: list[tuple[str, str]] = []
        for name, value in (mm or {}).items():
            hp = join(op_path, str(name))
            if not _modifiable_header(ctx, name, hp):
                continue
            if not isinstance(value, str):
                ctx.error(hp, f"expected a string value, got {value!r} (quote it)")
                continue
            if any(c in value for c in "\r\n\0"):
                ctx.error(hp, "header values must not contain CR, LF or NUL")
                continue
            items.append((name.lower(), value))
        pairs[op] = tuple(items)
    remove: list[str] = []
    for i, name in enumerate(get_str_list(ctx, om, "remove", p)):
        if _modifiable_header(ctx, name, index(join(p, "remove"), i)):
            remove.append(name.lower())
    return HeaderOps(set=tuple(sorted(pairs["set"])), add=tuple(sorted(pairs["add"])), remove=tuple(remove))


def _modifiable_header(ctx: Ctx, name: object, path: str) -> bool:
    if not isinstance(name, str) or not is_header_name(name):
        if isinstance(name, str) and name.startswith(":"):
            ctx.error(path, f"Envoy does not allow modifying pseudo-header {name!r}")
        else:
            ctx.error(path, f"{name!r} is not a valid header name")
        return False
    if name.lower() in _UNMODIFIABLE_HEADERS:
        ctx.error(path, f"Envoy does not allow modifying the {name!r} header (use rewrite.authority)")
        return False
    return True


def headers(ctx: Ctx, m: Mapping[str, Any], key: str, path: str) -> Headers | None:
    p = join(path, key)
    hm = as_map(ctx, m.get(key), p)
    if hm is None:
        return None
    check_fields(ctx, hm, p, ("request", "response"))
    return Headers(request=_header_ops(ctx, hm, "request", p), response=_header_ops(ctx, hm, "response", p))


# --------------------------------------------------------------------------- retries and faults


def retries(ctx: Ctx, m: Mapping[str, Any], path: str) -> Retry | None:
    p = join(path, "retries")
    rm = child(ctx, m, "retries", path)
    if rm is None:
        return None
    check_fields(
        ctx,
        rm,
        p,
        ("attempts", "perTryTimeout", "retryOn", "retryRemoteLocalities", "retryIgnorePreviousHosts", "backoff"),
    )
    attempts = get_int(ctx, rm, "attempts", p, lo=0, hi=INT32_MAX)
    per_try = get_duration(ctx, rm, "perTryTimeout", p, min_ms=1)
    remote = bool(get_bool(ctx, rm, "retryRemoteLocalities", p))
    ignore_previous = get_bool(ctx, rm, "retryIgnorePreviousHosts", p)
    backoff = get_duration(ctx, rm, "backoff", p, min_ms=1)
    retry_on_text = get_str(ctx, rm, "retryOn", p)
    if retry_on_text is None:
        return Retry(attempts or 0, per_try, DEFAULT_RETRY_ON, DEFAULT_RETRIABLE_STATUS_CODES, remote,
                     ignore_previous, backoff)
    conditions: list[str] = []
    codes: list[int] = []
    for word in (w.strip() for w in retry_on_text.split(",")):
        if not word:
            continue
        if word.isdigit():
            code = int(word)
            if not 100 <= code <= 599:
                ctx.error(join(p, "retryOn"), f"{word!r} is not an HTTP status code")
            elif code not in codes:
                codes.append(code)
        elif word not in RETRY_ON_CONDITIONS:
            ctx.error(
                join(p, "retryOn"),
                f"unknown retry condition {word!r} (expected an HTTP status code or one of "
                f"{', '.join(sorted(RETRY_ON_CONDITIONS))})",
            )
        elif word not in conditions:
            conditions.append(word)
    if codes and "retriable-status-codes" not in conditions:
        conditions.append("retriable-status-codes")
    return Retry(attempts or 0, per_try, tuple(conditions), tuple(codes), remote, ignore_previous, backoff)


def _legacy_percent(ctx: Ctx, m: Mapping[str, Any], path: str) -> float | None:
    """`percentage: {value}` or the legacy integer `percent`; default 100."""
    percentage = get_percentage(ctx, m, "percentage", path)
    legacy = get_int(ctx, m, "percent", path, lo=0, hi=100)
    if percentage is not None and legacy is not None:
        ctx.error(join(path, "percent"), "set percentage or the legacy percent, not both")
    if percentage is not None:
        return percentage
    return float(legacy) if legacy is not None else 100.0


def fault(ctx: Ctx, m: Mapping[str, Any], path: str) -> Fault | None:
    p = join(path, "fault")
    fm = child(ctx, m, "fault", path)
    if fm is None:
        return None
    check_fields(ctx, fm, p, ("delay", "abort"))
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None
    dp = join(p, "delay")
    dm = child(ctx, fm, "delay", p)
    if dm is not None:
        check_fields(ctx, dm, dp, ("fixedDelay", "percentage", "percent", "exponentialDelay"))
        if dm.get("exponentialDelay") is not None:
            ctx.error(join(dp, "exponentialDelay"), "exponentialDelay is not supported; use fixedDelay")
        fixed = get_duration(ctx, dm, "fixedDelay", dp, min_ms=1)
        if fixed is None and "fixedDelay" not in dm:
            ctx.error(join(dp, "fixedDelay"), "is required")
        pct = _legacy_percent(ctx, dm, dp)
        if fixed is not None and pct is not None:
            delay = FaultDelay(fixed, pct)
    ap = join(p, "abort")
    am = child(ctx, fm, "abort", p)
    if am is not None:
        check_fields(ctx, am, ap, ("httpStatus", "grpcStatus", "http2Error", "percentage"))
        if am.get("http2Error") is not None:
            ctx.error(join(ap, "http2Error"), "http2Error is not supported; use httpStatus or grpcStatus")
        http_status = get_int(ctx, am, "httpStatus", ap, lo=200, hi=599)
        grpc_status = _grpc_status(ctx, am, ap)
        if am.get("httpStatus") is not None and am.get("grpcStatus") is not None:
            ctx.error(ap, "set httpStatus or grpcStatus, not both")
        elif am.get("httpStatus") is None and am.get("grpcStatus") is None and am.get("http2Error") is None:
            ctx.error(ap, "one of httpStatus or grpcStatus is required")
        pct = get_percentage(ctx, am, "percentage", ap)
        if http_status is not None or grpc_status is not None:
            abort = FaultAbort(http_status, grpc_status, 100.0 if pct is None else pct)
    if dm is None and am is None:
        ctx.error(p, "a fault needs a delay or an abort")
    return Fault(delay, abort) if delay is not None or abort is not None else None


def _grpc_status(ctx: Ctx, m: Mapping[str, Any], path: str) -> int | None:
    value = m.get("grpcStatus")
    p = join(path, "grpcStatus")
    if value is None:
        return None
    if isinstance(value, str) and value.upper() in GRPC_STATUS_CODES:
        return GRPC_STATUS_CODES[value.upper()]
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 16:
        return value
    ctx.error(p, f"unknown gRPC status {value!r} (expected a name such as UNAVAILABLE)")
    return None


# --------------------------------------------------------------------------- CORS, redirect, rewrite


def cors(ctx: Ctx, m: Mapping[str, Any], path: str) -> CorsPolicy | None:
    p = join(path, "corsPolicy")
    cm = child(ctx, m, "corsPolicy", path)
    if cm is None:
        return None
    check_fields(
        ctx,
        cm,
        p,
        (
            "allowOrigins",
            "allowOrigin",
            "allowMethods",
            "allowHeaders",
            "exposeHeaders",
            "maxAge",
            "allowCredentials",
        ),
        {"unmatchedPreflights": "unmatchedPreflights is not supported yet; ignored"},
    )
    origins: list[StringMatch] = []
    for i, item in enumerate(get_list(ctx, cm, "allowOrigins", p)):
        ok, match = string_match(ctx, item, index(join(p, "allowOrigins"), i))
        if ok and match is not None:
            origins.append(match)
    origins.extend(StringMatch("exact", o) for o in get_str_list(ctx, cm, "allowOrigin", p))
    max_age = get_duration(ctx, cm, "maxAge", p)
    return CorsPolicy(
        allow_origins=tuple(origins),
        allow_methods=get_str_list(ctx, cm, "allowMethods", p),
        allow_headers=get_str_list(ctx, cm, "allowHeaders", p),
        expose_headers=get_str_list(ctx, cm, "exposeHeaders", p),
        max_age_s=None if max_age is None else max_age // 1000,
        allow_credentials=get_bool(ctx, cm, "allowCredentials", p),
    )


def redirect(ctx: Ctx, m: Mapping[str, Any], path: str) -> Redirect | None:
    p = join(path, "redirect")
    rm = child(ctx, m, "redirect", path)
    if rm is None:
        return None
    check_fields(
        ctx,
        rm,
        p,
        ("uri", "authority", "port", "scheme", "redirectCode", "prefixRewrite"),
        {"derivePort": "derivePort is not supported yet; ignored"},
    )
    uri = get_str(ctx, rm, "uri", p)
    prefix = get_str(ctx, rm, "prefixRewrite", p)
    if uri is not None and prefix is not None:
        ctx.error(join(p, "prefixRewrite"), "set uri or prefixRewrite, not both (as in Istio)")
        prefix = None
    if prefix is not None:
        _prefix_rewrite_matches(ctx, m, join(p, "prefixRewrite"))
    code = get_int(ctx, rm, "redirectCode", p)
    if code is not None and code not in REDIRECT_CODES:
        ctx.error(
            join(p, "redirectCode"), f"must be one of {', '.join(map(str, REDIRECT_CODES))}, got {code}"
        )
    return Redirect(
        uri=uri,
        prefix_rewrite=prefix,
        authority=get_str(ctx, rm, "authority", p),
        port=get_port(ctx, rm, "port", p),
        scheme=get_str(ctx, rm, "scheme", p),
        redirect_code=code if code in REDIRECT_CODES else 301,
    )


def _prefix_rewrite_matches(ctx: Ctx, m: Mapping[str, Any], path: str) -> None:
    """Istio: a redirect's prefixRewrite needs prefix matches (it replaces the matched
    prefix); with an exact or regex uri match Envoy replaces the whole path."""
    matches = m.get("match")
    for i, item in enumerate(matches if isinstance(matches, list) else ()):
        uri = item.get("uri") if isinstance(item, Mapping) else None
        kinds = [k for k in ("exact", "regex") if isinstance(uri, Mapping) and uri.get(k) is not None]
        if kinds:
            ctx.warn(path, f"match[{i}] has a uri {kinds[0]} match, not a prefix: the whole path is "
                           "replaced by this value")


def rewrite(ctx: Ctx, m: Mapping[str, Any], path: str) -> Rewrite | None:
    p = join(path, "rewrite")
    rm = child(ctx, m, "rewrite", path)
    if rm is None:
        return None
    check_fields(ctx, rm, p, ("uri", "authority", "uriRegexRewrite"))
    uri_regex: tuple[str, str] | None = None
    xp = join(p, "uriRegexRewrite")
    xm = child(ctx, rm, "uriRegexRewrite", p)
    if xm is not None:
        check_fields(ctx, xm, xp, ("match", "rewrite"))
        pattern = get_str(ctx, xm, "match", xp, required=True)
        substitution = get_str(ctx, xm, "rewrite", xp)
        if substitution is None and "rewrite" not in xm:
            ctx.error(join(xp, "rewrite"), "is required")
        if pattern is not None and check_regex(ctx, pattern, join(xp, "match")) and substitution is not None:
            uri_regex = (pattern, substitution)
        if rm.get("uri") is not None:
            ctx.error(xp, "set uri or uriRegexRewrite, not both")
    return Rewrite(
        uri=get_str(ctx, rm, "uri", p), authority=get_str(ctx, rm, "authority", p), uri_regex=uri_regex
    )


def direct_response(ctx: Ctx, m: Mapping[str, Any], path: str) -> DirectResponse | None:
    p = join(path, "directResponse")
    dm = child(ctx, m, "directResponse", path)
    if dm is None:
        return None
    check_fields(ctx, dm, p, ("status", "body"))
    status = get_int(ctx, dm, "status", p, lo=200, hi=599, required=True)
    body: str | None = None
    bp = join(p, "body")
    bm = child(ctx, dm, "body", p)
    if bm is not None:
        check_fields(ctx, bm, bp, ("string", "bytes"))
        if bm.get("string") is not None and bm.get("bytes") is not None:
            ctx.error(bp, "set string or bytes, not both")
        body = get_str(ctx, bm, "string", bp)
        encoded = get_str(ctx, bm, "bytes", bp)
        if encoded is not None:
            try:
                body = base64.b64decode(encoded, validate=True).decode("utf-8")
            except (binascii.Error, ValueError):
                ctx.error(join(bp, "bytes"), "expected base64-encoded UTF-8 text")
    return DirectResponse(status, body) if status is not None else None


def port_selector(ctx: Ctx, m: Mapping[str, Any], path: str) -> int | None:
    """Istio `PortSelector`: `port: {number: N}`."""
    pm = child(ctx, m, "port", path)
    if pm is None:
        return None
    pp = join(path, "port")
    check_fields(ctx, pm, pp, ("number",))
    return get_port(ctx, pm, "number", pp)
