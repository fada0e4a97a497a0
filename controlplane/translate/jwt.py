"""RequestAuthentication -> Envoy's JWT authentication filter, and the RBAC matchers of the
JWT attributes AuthorizationPolicies use. Pure, no I/O.

The filter (`envoy.filters.http.jwt_authn`), first in a workload's (or waypoint's) HTTP
chain, as Istio builds it: one provider `origins-<i>` per jwtRule (issuer, audiences, keys,
token locations, forwarding), and one requirement for every request: any provider, or no
token at all (`requires_any: [origins-0, ..., allow_missing]`). So a request with a token
none of the rules validates (bad signature, expired, wrong issuer or audience) is refused
with 401, and a request without a token passes, unauthenticated (an AuthorizationPolicy
decides whether that is enough). CORS preflight requests are not checked, as in Istio.

Keys: inline `jwks` (`local_jwks`), or `jwksUri` fetched by Envoy (`remote_jwks`) through a
cluster of the proxy's own `jwks|<host>|<port>` (STATIC for an IP address, STRICT_DNS for a
name; TLS with the system CA bundle and the host's DNS SAN for https), as Istio's fallback
for a JWKS host outside the registry does. Envoy fetches the keys when the listener starts
(`async_fetch`) and caches them for 10 minutes.

What a validated token says reaches RBAC as dynamic metadata: each provider writes the
payload under `envoy.filters.http.jwt_authn` / `<issuer>` (`payload_in_metadata`), so a
request principal `<iss>/<sub>` is the pair (metadata key, its `sub` claim). Istio's match
forms (`*`, `prefix*`, `*suffix`, exact) on `iss/sub` are rewritten, per issuer the proxy
validates, into matches of the `sub` claim (`request_principal`); claims (`request.auth.
claims[a][b]`, `.audiences` = `aud`, `.presenter` = `azp`) match a string claim or any
element of a list claim (`claim`); `scope` and `permission` are space-separated lists, as in
Istio (Envoy's `normalize_payload_in_metadata`). With no issuer (no RequestAuthentication applies) nothing
matches: requests carry no request principal.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_pb2
from envoy.type.matcher.v3 import metadata_pb2, string_pb2, value_pb2

from controlplane.model.ir import JwksUri, JwtRule
from controlplane.translate.names import duration_ms
from controlplane.translate.security import tls_socket, upstream_simple

JWT_FILTER = "envoy.filters.http.jwt_authn"
PROVIDER_PREFIX = "origins-"
JWKS_CACHE_S = 600
JWKS_CONNECT_TIMEOUT_MS = 5_000
_CLAIM_PARTS = re.compile(r"\[([^\[\]]+)\]")
SPACE_DELIMITED_CLAIMS = ("scope", "permission")
"""Claims whose space-separated value is a list in the metadata, as Istio treats them (OAuth's
`scope`): `request.auth.claims[scope]` then matches one scope of "read write"."""


# --------------------------------------------------------------------------- the filter


def jwks_cluster_name(uri: JwksUri) -> str:
    return f"jwks|{uri.host}|{uri.port}"


@dataclass(frozen=True, slots=True)
class JwksCluster:
    """Where Envoy fetches one JWKS host's keys."""

    name: str
    host: str
    port: int
    tls: bool


def jwks_clusters(rules: Sequence[JwtRule]) -> tuple[JwksCluster, ...]:
    """The clusters the `jwksUri`s of `rules` need, sorted by name, each once."""
    out = {jwks_cluster_name(r.jwks_uri): JwksCluster(jwks_cluster_name(r.jwks_uri), r.jwks_uri.host,
                                                        r.jwks_uri.port, r.jwks_uri.scheme == "https")
           for r in rules if r.jwks_uri is not None}
    return tuple(out[k] for k in sorted(out))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def build_jwks_cluster(spec: JwksCluster) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name=spec.name)
    c.type = cluster_pb2.Cluster.STATIC if _is_ip(spec.host) else cluster_pb2.Cluster.STRICT_DNS
    c.connect_timeout.CopyFrom(duration_ms(JWKS_CONNECT_TIMEOUT_MS))
    c.load_assignment.cluster_name = spec.name
    sa = c.load_assignment.endpoints.add().lb_endpoints.add().endpoint.address.socket_address
    sa.address = spec.host.strip("[]")
    sa.port_value = spec.port
    if spec.tls:
        sans = () if _is_ip(spec.host) else (spec.host,)
        c.transport_socket.CopyFrom(tls_socket(upstream_simple(spec.host if sans else "", sans)))
    return c


def _provider(rule: JwtRule) -> jwt_pb2.JwtProvider:
    p = jwt_pb2.JwtProvider(issuer=rule.issuer, forward=rule.forward_original_token,
                            payload_in_metadata=rule.issuer)
    p.normalize_payload_in_metadata.space_delimited_claims.extend(
        (*SPACE_DELIMITED_CLAIMS, *(c for c in rule.space_delimited_claims if c not in SPACE_DELIMITED_CLAIMS)))
    p.audiences.extend(rule.audiences)
    if rule.jwks is not None:
        p.local_jwks.inline_string = rule.jwks
    elif rule.jwks_uri is not None:
        remote = p.remote_jwks
        remote.http_uri.uri = rule.jwks_uri.uri
        remote.http_uri.cluster = jwks_cluster_name(rule.jwks_uri)
        remote.http_uri.timeout.CopyFrom(duration_ms(rule.timeout_ms or 5_000))
        remote.cache_duration.CopyFrom(duration_ms(JWKS_CACHE_S * 1000))
        remote.async_fetch.SetInParent()
    for h in rule.from_headers:
        p.from_headers.add(name=h.name, value_prefix=h.prefix)
    p.from_params.extend(rule.from_params)
    p.from_cookies.extend(rule.from_cookies)
    if rule.output_payload_to_header:
        p.forward_payload_header = rule.output_payload_to_header
    for header, claim in rule.output_claim_to_headers:
        p.claim_to_headers.add(header_name=header, claim_name=claim)
    return p


def jwt_authn_filter(rules: Sequence[JwtRule]) -> jwt_pb2.JwtAuthentication:
    """The JWT filter for a proxy validating `rules` (see the module docstring)."""
    cfg = jwt_pb2.JwtAuthentication(bypass_cors_preflight=True)
    req = cfg.rules.add()
    req.match.prefix = "/"
    any_of = req.requires.requires_any.requirements
    for i, rule in enumerate(rules):
        name = f"{PROVIDER_PREFIX}{i}"
        cfg.providers[name].CopyFrom(_provider(rule))
        any_of.add(provider_name=name)
    any_of.add().allow_missing.SetInParent()
    return cfg


HostRules = tuple[tuple[tuple[str, ...], tuple[JwtRule, ...]], ...]
"""(the Host names of one service, the jwtRules that apply to it) for each service sharing
one HTTP listener (a waypoint port)."""


def jwt_authn_filter_by_host(by_host: HostRules) -> jwt_pb2.JwtAuthentication:
    """The JWT filter of a listener several services share: a request is checked against the
    rules of the service its Host names (`:authority`, any case, with or without the port as
    the service's names list it), and not at all for a service no rule applies to, as Istio
    applies a RequestAuthentication to the services it targets only. When every service has
    the same rules: one catch-all requirement (`jwt_authn_filter`)."""
    groups = [(hosts, rules) for hosts, rules in by_host]
    if len({rules for _, rules in groups}) == 1:
        return jwt_authn_filter(groups[0][1])
    cfg = jwt_pb2.JwtAuthentication(bypass_cors_preflight=True)
    index: dict[JwtRule, str] = {}
    for _, rules in groups:
        for rule in rules:
            if rule not in index:
                index[rule] = f"{PROVIDER_PREFIX}{len(index)}"
                cfg.providers[index[rule]].CopyFrom(_provider(rule))
    for hosts, rules in groups:
        if not rules:
            continue  # nothing validates tokens for this service: no request principal there
        for host in hosts:
            req = cfg.rules.add()
            req.match.prefix = "/"
            req.match.headers.add(name=":authority", string_match=string_pb2.StringMatcher(exact=host, ignore_case=True))
            any_of = req.requires.requires_any.requirements
            for rule in rules:
                any_of.add(provider_name=index[rule])
            any_of.add().allow_missing.SetInParent()
    return cfg


def http_jwt_filters(rules: Sequence[JwtRule], by_host: HostRules = ()
                     ) -> list[tuple[str, jwt_pb2.JwtAuthentication]]:
    """(filter name, config) to put first in an HTTP chain: none without rules. `by_host`:
    the rules of each service of a shared listener (`jwt_authn_filter_by_host`)."""
    if not rules:
        return []
    return [(JWT_FILTER, jwt_authn_filter_by_host(by_host) if by_host else jwt_authn_filter(rules))]


# --------------------------------------------------------------------------- RBAC matchers


def _metadata_principal(path: Sequence[str], value: value_pb2.ValueMatcher) -> rbac_pb2.Principal:
    m = metadata_pb2.MetadataMatcher(filter=JWT_FILTER)
    for key in path:
        m.path.add(key=key)
    m.value.CopyFrom(value)
    p = rbac_pb2.Principal()
    p.metadata.CopyFrom(m)
    return p


def _string_value(m: string_pb2.StringMatcher) -> value_pb2.ValueMatcher:
    v = value_pb2.ValueMatcher()
    v.string_match.CopyFrom(m)
    return v


def _present() -> value_pb2.ValueMatcher:
    return value_pb2.ValueMatcher(present_match=True)


def _exact(text: str) -> string_pb2.StringMatcher:
    return string_pb2.StringMatcher(exact=text)


def _any_of(ids: Sequence[rbac_pb2.Principal]) -> rbac_pb2.Principal:
    if not ids:
        return _never()
    if len(ids) == 1:
        return ids[0]
    p = rbac_pb2.Principal()
    p.or_ids.ids.extend(ids)
    return p


def _never() -> rbac_pb2.Principal:
    p = rbac_pb2.Principal()
    p.not_id.any = True
    return p


def _sub_matchers(value: str, issuer: str) -> list[value_pb2.ValueMatcher]:
    """How `sub` must look for `<issuer>/<sub>` to match `value` (Istio's forms)."""
    full = f"{issuer}/"
    if value == "*":
        return [_present()]
    if value.startswith("*"):  # suffix of iss/sub
        suffix = value[1:]
        out = [_string_value(string_pb2.StringMatcher(suffix=suffix))]
        # The suffix reaches back into "<issuer>/": then `sub` is exactly its rest (empty
        # when the whole suffix lies in "<issuer>/": `*r/` does not match `other/alice`).
        for k in range(1, len(suffix) + 1):
            if full.endswith(suffix[:k]):
                out.append(_string_value(_exact(suffix[k:])))
        return out
    if value.endswith("*"):  # prefix of iss/sub
        prefix = value[:-1]
        if full.startswith(prefix):
            return [_present()]
        if prefix.startswith(full):
            return [_string_value(string_pb2.StringMatcher(prefix=prefix[len(full):]))]
        return []
    if value.startswith(full) and len(value) > len(full):
        return [_string_value(_exact(value[len(full):]))]
    return []


def request_principal(value: str, issuers: Sequence[str]) -> rbac_pb2.Principal:
    """A `requestPrincipals` value (or `request.auth.principal`) as an RBAC principal: the
    validated token of one of `issuers` has `<iss>/<sub>` matching it."""
    ids = [_metadata_principal((iss, "sub"), m) for iss in issuers for m in _sub_matchers(value, iss)]
    return _any_of(ids)


def claim_path(key: str) -> tuple[str, ...]:
    """The claim path of a `request.auth.*` key (`claims[a][b]` -> (a, b))."""
    if key == "request.auth.audiences":
        return ("aud",)
    if key == "request.auth.presenter":
        return ("azp",)
    return tuple(_CLAIM_PARTS.findall(key[len("request.auth.claims"):]))


def claim(path: Sequence[str], matcher: string_pb2.StringMatcher | None, issuers: Sequence[str]
          ) -> rbac_pb2.Principal:
    """A claim at `path` of a validated token matches `matcher` (None: the claim is present);
    a list claim matches when one of its elements does."""
    one = _present() if matcher is None else _string_value(matcher)
    either = value_pb2.ValueMatcher()
    either.or_match.value_matchers.append(one)
    either.or_match.value_matchers.add().list_match.one_of.CopyFrom(one)
    return _any_of([_metadata_principal((iss, *path), either) for iss in issuers])
