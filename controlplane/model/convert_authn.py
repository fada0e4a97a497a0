"""RequestAuthentication spec -> IR (`controlplane.model.authn`). Pure, no I/O.

Istio's public v1 schema (`security.istio.io/v1`, `v1beta1`, or `security.meshline.io/v1`):
`selector` or `targetRef`/`targetRefs` (a waypoint, kind Gateway, or a Service of the
namespace) and `jwtRules[]`. Every field of a JWTRule is translated (`controlplane.translate.
jwt`); errors name the field: a missing issuer, neither or both of `jwksUri` and `jwks`
(Meshline does no OpenID discovery), a `jwksUri` that is not an absolute http(s) URL, inline
`jwks` that is not a JSON Web Key Set, a header name that is not one, a claim header twice.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from controlplane.model.convert_base import (
    Ctx,
    check_fields,
    get_bool,
    get_duration,
    get_list,
    get_str,
    get_str_list,
    index,
    is_header_name,
    item_map,
    join,
)
from controlplane.model.convert_security import _selector, _spec, _target_refs
from controlplane.model.ir import JwksUri, JwtHeader, JwtRule, RequestAuthentication

RA_SPEC_FIELDS = ("selector", "targetRef", "targetRefs", "jwtRules")
JWT_RULE_FIELDS = ("issuer", "audiences", "jwksUri", "jwks_uri", "jwks", "fromHeaders", "fromParams",
                   "fromCookies", "outputPayloadToHeader", "outputClaimToHeaders", "forwardOriginalToken", "timeout",
                   "spaceDelimitedClaims")
MAX_SPACE_DELIMITED_CLAIMS = 64  # Istio's maxItems


def convert_request_authentication(ctx: Ctx, namespace: str, name: str) -> RequestAuthentication | None:
    spec = _spec(ctx)
    if spec is None:
        return None
    check_fields(ctx, spec, "spec", RA_SPEC_FIELDS)
    targets = [k for k in ("selector", "targetRef", "targetRefs") if spec.get(k) is not None]
    if len(targets) > 1:
        ctx.error("spec", f"set at most one of selector, targetRef and targetRefs (got {', '.join(targets)})")
    selector = _selector(ctx, spec)
    rules: list[JwtRule] = []
    issuers: dict[str, str] = {}
    for i, item in enumerate(get_list(ctx, spec, "jwtRules", "spec")):
        p = index("spec.jwtRules", i)
        rule = _jwt_rule(ctx, item, p)
        if rule is None:
            continue
        if rule.issuer in issuers:
            ctx.warn(join(p, "issuer"), f"issuer {rule.issuer!r} is also the issuer of {issuers[rule.issuer]}: "
                                        "a token of that issuer is accepted when either rule validates it")
        issuers.setdefault(rule.issuer, p)
        rules.append(rule)
    return RequestAuthentication(ctx.raw.ref, namespace, name, selector, tuple(rules), _target_refs(ctx, spec, namespace))


def _jwks_uri(ctx: Ctx, text: str, p: str) -> JwksUri | None:
    try:
        u = urlsplit(text)
        port = u.port
    except ValueError as exc:
        ctx.error(p, f"{text!r} is not a URL: {exc}")
        return None
    if u.scheme not in ("http", "https") or not u.hostname:
        ctx.error(p, f"{text!r} is not an absolute http:// or https:// URL")
        return None
    return JwksUri(text, u.scheme, u.hostname.lower(), port or (443 if u.scheme == "https" else 80))


def _jwks(ctx: Ctx, text: str, p: str) -> str | None:
    try:
        doc = json.loads(text)
    except ValueError as exc:
        ctx.error(p, f"is not JSON: {exc}")
        return None
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, list) or not keys or not all(isinstance(k, dict) and "kty" in k for k in keys):
        ctx.error(p, 'is not a JSON Web Key Set ({"keys": [{"kty": ...}, ...]})')
        return None
    return text


def _header_name(ctx: Ctx, value: str | None, p: str) -> str | None:
    if value is None:
        return None
    if not value or not is_header_name(value):
        ctx.error(p, f"{value!r} is not a header name")
        return None
    return value.lower()


def _jwt_rule(ctx: Ctx, item: object, p: str) -> JwtRule | None:
    m = item_map(ctx, item, p)
    if m is None:
        return None
    before = ctx.error_count()
    check_fields(ctx, m, p, JWT_RULE_FIELDS)
    issuer = get_str(ctx, m, "issuer", p, required=True)
    uri_key = "jwks_uri" if m.get("jwksUri") is None and m.get("jwks_uri") is not None else "jwksUri"
    if m.get("jwksUri") is not None and m.get("jwks_uri") is not None:
        ctx.error(join(p, "jwks_uri"), "set jwksUri or jwks_uri (another spelling of it), not both")
    uri_text = get_str(ctx, m, uri_key, p)
    jwks_text = get_str(ctx, m, "jwks", p)
    uri = _jwks_uri(ctx, uri_text, join(p, uri_key)) if uri_text else None
    jwks = _jwks(ctx, jwks_text, join(p, "jwks")) if jwks_text else None
    if uri_text and jwks_text:
        ctx.error(join(p, "jwks"), "set jwksUri or jwks, not both")
    elif not uri_text and not jwks_text:
        ctx.error(join(p, "jwksUri"), "set jwksUri or jwks (Meshline does not discover keys through the "
                                      "issuer's OpenID configuration)")
    headers: list[JwtHeader] = []
    for i, h in enumerate(get_list(ctx, m, "fromHeaders", p)):
        hp = index(join(p, "fromHeaders"), i)
        hm = item_map(ctx, h, hp)
        if hm is None:
            continue
        check_fields(ctx, hm, hp, ("name", "prefix"))
        hname = _header_name(ctx, get_str(ctx, hm, "name", hp, required=True), join(hp, "name"))
        if hname is not None:
            headers.append(JwtHeader(hname, get_str(ctx, hm, "prefix", hp) or ""))
    params = get_str_list(ctx, m, "fromParams", p)
    cookies = get_str_list(ctx, m, "fromCookies", p)
    for key, values in (("fromParams", params), ("fromCookies", cookies)):
        for i, v in enumerate(values):
            if not v:
                ctx.error(index(join(p, key), i), "must not be empty")
    payload_header = _header_name(ctx, get_str(ctx, m, "outputPayloadToHeader", p), join(p, "outputPayloadToHeader"))
    claims: list[tuple[str, str]] = []
    seen: set[str] = set()
    for i, c in enumerate(get_list(ctx, m, "outputClaimToHeaders", p)):
        cp = index(join(p, "outputClaimToHeaders"), i)
        cm = item_map(ctx, c, cp)
        if cm is None:
            continue
        check_fields(ctx, cm, cp, ("header", "claim"))
        header = _header_name(ctx, get_str(ctx, cm, "header", cp, required=True), join(cp, "header"))
        claim = get_str(ctx, cm, "claim", cp, required=True)
        if header is not None and header in seen:
            ctx.error(join(cp, "header"), f"header {header!r} is set twice")
        elif header is not None and claim:
            seen.add(header)
            claims.append((header, claim))
    audiences = get_str_list(ctx, m, "audiences", p)
    timeout = get_duration(ctx, m, "timeout", p, min_ms=1)
    if timeout is not None and not uri_text:
        ctx.warn(join(p, "timeout"), "bounds a jwksUri fetch: it has no effect with inline jwks")
    forward = bool(get_bool(ctx, m, "forwardOriginalToken", p))
    split = _space_delimited_claims(ctx, m, p)
    if ctx.error_count() > before or not issuer:
        return None
    return JwtRule(issuer=issuer, audiences=audiences, jwks_uri=uri, jwks=jwks, from_headers=tuple(headers),
                   from_params=params, from_cookies=cookies, output_payload_to_header=payload_header,
                   output_claim_to_headers=tuple(claims), forward_original_token=forward, timeout_ms=timeout,
                   space_delimited_claims=split)


def _space_delimited_claims(ctx: Ctx, m: Mapping[str, Any], p: str) -> tuple[str, ...]:
    """`spaceDelimitedClaims`: claims whose space-separated value authorization rules match word
    by word, besides scope and permission (always); Envoy's `normalize_payload_in_metadata`,
    which splits top-level claims only."""
    kp = join(p, "spaceDelimitedClaims")
    names = get_str_list(ctx, m, "spaceDelimitedClaims", p)
    if len(names) > MAX_SPACE_DELIMITED_CLAIMS:
        ctx.error(kp, f"at most {MAX_SPACE_DELIMITED_CLAIMS} claims (as in Istio), got {len(names)}")
    out: list[str] = []
    for i, name in enumerate(names):
        if not name:
            ctx.error(index(kp, i), "must not be empty")
        elif "." in name:
            ctx.warn(index(kp, i), f"{name!r}: only a top-level claim of exactly this name is split (Envoy does "
                                   "not split nested claims)")
            out.append(name)
        elif name not in out:
            out.append(name)
    return tuple(out)
