"""Istio 1.31 fields Meshline's CRDs lacked until issue 16 (tests/test_istio_api_schema.py's
KNOWN_MISSING, now empty): the translated ones change Envoy's configuration as Istio does,
the others are accepted with a warning that names the field. Pure, no I/O."""

from __future__ import annotations

from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

from controlplane.model.convert import convert
from controlplane.model.ir import AuthorizationPolicy, Issue, RequestAuthentication
from controlplane.model.raw import RawObject
from controlplane.translate.jwt import _provider
from controlplane.translate.rbac import rule_policy
from tests.envoymatch import string_matches
from tests.test_istio_fields import _JWKS, evaluate

_API = {"AuthorizationPolicy": "security.istio.io/v1", "RequestAuthentication": "security.istio.io/v1",
        "DestinationRule": "networking.istio.io/v1", "VirtualService": "networking.istio.io/v1",
        "Gateway": "networking.istio.io/v1"}


def _convert(kind: str, spec: dict[str, Any]) -> tuple[object, list[Issue]]:
    body = {"apiVersion": _API[kind], "kind": kind, "metadata": {"name": "t", "namespace": "default"}, "spec": spec}
    value, issues = convert(RawObject(kind, _API[kind], "default", "t", body))
    return value, list(issues)


def _errors(issues: list[Issue]) -> list[tuple[str, str]]:
    return [(i.field, i.message) for i in issues if i.severity == "error"]


def _warned(issues: list[Issue], field: str) -> list[str]:
    return [i.message for i in issues if i.severity == "warning" and i.field == field]


# --------------------------------------------------------------------------- trustDomains


def _admits(p: rbac_pb2.Principal, uri_san: str | None) -> bool:
    """Envoy's evaluation of the principal kinds trustDomains produces, for a peer whose
    certificate has `uri_san` (None: plaintext)."""
    kind = p.WhichOneof("identifier")
    if kind == "and_ids":
        return all(_admits(x, uri_san) for x in p.and_ids.ids)
    if kind == "or_ids":
        return any(_admits(x, uri_san) for x in p.or_ids.ids)
    if kind == "not_id":
        return not _admits(p.not_id, uri_san)
    if kind == "any":
        return True
    assert kind == "authenticated", kind
    return uri_san is not None and string_matches(p.authenticated.principal_name, uri_san)


def _peer_check(source: dict[str, Any], trust_domain: str = "cluster.local") -> Any:
    value, issues = _convert("AuthorizationPolicy", {"action": "ALLOW", "rules": [{"from": [{"source": source}]}]})
    assert not _errors(issues), issues
    assert isinstance(value, AuthorizationPolicy)
    policy = rule_policy(value.rules[0], trust_domain, tcp=False)

    def admits(uri: str | None) -> bool:
        return any(_admits(p, uri) for p in policy.principals)
    return admits


def test_trust_domains_admit_peers_of_those_trust_domains_only() -> None:
    admits = _peer_check({"trustDomains": ["partner.example", "corp-*", "*.test"], "notTrustDomains": ["corp-old"]})
    assert admits("spiffe://partner.example/ns/a/sa/b")
    assert not admits("spiffe://partner.example.evil/ns/a/sa/b")  # a trust domain is a whole name
    assert not admits("spiffe://other.example/ns/partner.example/sa/b")
    assert admits("spiffe://corp-east/ns/a/sa/b")
    assert not admits("spiffe://corp-old/ns/a/sa/b")  # notTrustDomains
    assert admits("spiffe://lab.test/ns/a/sa/b")
    assert not admits("spiffe://lab.testing/ns/a/sa/b")
    assert not admits(None)  # plaintext peers have no trust domain (Istio: requires mTLS)


def test_cluster_local_trust_domain_is_the_mesh_one_and_star_is_any_peer() -> None:
    admits = _peer_check({"trustDomains": ["cluster.local"]}, trust_domain="mesh.example")
    assert admits("spiffe://mesh.example/ns/a/sa/b")
    assert not admits("spiffe://cluster.local.example/ns/a/sa/b")
    any_peer = _peer_check({"trustDomains": ["*"]})
    assert any_peer("spiffe://whatever/ns/a/sa/b")
    assert not any_peer(None)


def test_a_bad_trust_domain_is_refused_by_name() -> None:
    _, issues = _convert("AuthorizationPolicy", {"rules": [{"from": [{"source": {"trustDomains": ["a/b"]}}]}]})
    assert [f for f, _ in _errors(issues)] == ["spec.rules[0].from[0].source.trustDomains[0]"]


# --------------------------------------------------------------------------- http2KeepAlive


def _cluster(spec: dict[str, Any], name: str) -> cluster_pb2.Cluster:
    own, cross, out = evaluate("DestinationRule", spec)
    assert not [i for i in (*own, *cross) if i.severity == "error"], (own, cross)
    return cluster_pb2.Cluster.FromString(out[f"pp-bind/type.googleapis.com/envoy.config.cluster.v3.Cluster/{name}"])


def _h2(c: cluster_pb2.Cluster) -> Any:
    opts = http_protocol_options_pb2.HttpProtocolOptions()
    c.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].Unpack(opts)
    return opts


def test_http2_keepalive_pings_http2_upstreams() -> None:
    spec = {"host": "reviews.default.svc.cluster.local",
            "trafficPolicy": {"connectionPool": {"http": {"http2KeepAlive": {"interval": "30s", "timeout": "1.5s"}}}}}
    h2 = _cluster(spec, "outbound|9443||reviews.default.svc.cluster.local")  # port http2-admin
    ka = _h2(h2).explicit_http_config.http2_protocol_options.connection_keepalive
    assert (ka.interval.seconds, ka.timeout.seconds, ka.timeout.nanos) == (30, 1, 500_000_000)
    # HTTP/1.1 connections have no PING frames: that cluster is unchanged.
    h1 = _cluster(spec, "outbound|9080||reviews.default.svc.cluster.local")
    assert h1 == _cluster({"host": "reviews.default.svc.cluster.local"}, "outbound|9080||reviews.default.svc.cluster.local")


def test_http2_keepalive_needs_interval_and_timeout() -> None:
    _, issues = _convert("DestinationRule", {"host": "reviews", "trafficPolicy": {
        "connectionPool": {"http": {"http2KeepAlive": {"interval": "30s"}}}}})
    assert _errors(issues) == [("spec.trafficPolicy.connectionPool.http.http2KeepAlive.timeout",
                                "is required when http2KeepAlive is set (as in Istio)")]


# --------------------------------------------------------------------------- outlierDetectionHttpErrorCodes


def test_outlier_detection_http_error_codes_are_the_only_errors() -> None:
    def od(codes: list[int]) -> dict[str, Any]:
        return {"host": "reviews.default.svc.cluster.local", "trafficPolicy": {"outlierDetection": {
            "consecutive5xxErrors": 2, "outlierDetectionHttpErrorCodes": codes}}}
    name = "outbound|9080||reviews.default.svc.cluster.local"
    one = _h2(_cluster(od([418]), name)).outlier_detection.error_matcher
    assert [h.string_match.exact for h in one.http_response_headers_match.headers] == ["418"]
    assert [h.name for h in one.http_response_headers_match.headers] == [":status"]
    two = _h2(_cluster(od([500, 503, 500]), name)).outlier_detection.error_matcher
    assert [[h.string_match.exact for h in r.http_response_headers_match.headers]
            for r in two.or_match.rules] == [["500"], ["503"]]
    # the cluster keeps its HTTP/1.1 protocol and consecutive5xxErrors ejects
    c = _cluster(od([418]), name)
    assert _h2(c).explicit_http_config.HasField("http_protocol_options") and c.outlier_detection.consecutive_5xx.value == 2
    _, issues = _convert("DestinationRule", {"host": "reviews", "trafficPolicy": {"outlierDetection": {
        "outlierDetectionHttpErrorCodes": [503, 99, "x"]}}})
    assert [f for f, _ in _errors(issues)] == [
        "spec.trafficPolicy.outlierDetection.outlierDetectionHttpErrorCodes[1]",
        "spec.trafficPolicy.outlierDetection.outlierDetectionHttpErrorCodes[2]"]


# --------------------------------------------------------------------------- retryBudget


def test_retry_budget_limits_retries_to_a_share_of_requests() -> None:
    spec = {"host": "reviews.default.svc.cluster.local", "trafficPolicy": {
        "connectionPool": {"http": {"maxRetries": 7}},
        "retryBudget": {"percent": 25.5, "minRetryConcurrency": 4},
        "portLevelSettings": [{"port": {"number": 9443}, "connectionPool": {"http": {"maxRetries": 9}}}]}}
    for name in ("outbound|9080||reviews.default.svc.cluster.local", "outbound|9443||reviews.default.svc.cluster.local"):
        t = _cluster(spec, name).circuit_breakers.thresholds[0]
        # (Istio's PortTrafficPolicy has no retryBudget: the port keeps the rule's)
        assert (t.retry_budget.budget_percent.value, t.retry_budget.min_retry_concurrency.value) == (25.5, 4), name
    # unset values are Envoy's defaults, which are Istio's (20%, 3)
    t = _cluster({"host": "reviews.default.svc.cluster.local", "trafficPolicy": {"retryBudget": {}}},
                 "outbound|9080||reviews.default.svc.cluster.local").circuit_breakers.thresholds[0]
    assert t.HasField("retry_budget") and not t.retry_budget.HasField("budget_percent")
    _, issues = _convert("DestinationRule", {"host": "reviews", "trafficPolicy": {"retryBudget": {"percent": 120}}})
    assert [f for f, _ in _errors(issues)] == ["spec.trafficPolicy.retryBudget.percent"]


# --------------------------------------------------------------------------- redirect.prefixRewrite


def _redirect_route(http: dict[str, Any]) -> route_pb2.Route:
    own, _, out = evaluate("VirtualService", {"hosts": ["reviews"], "http": [http]})
    assert not [i for i in own if i.severity == "error"], own
    rc = route_pb2.RouteConfiguration.FromString(out["pp-bind/type.googleapis.com/envoy.config.route.v3."
                                                     "RouteConfiguration/9080"])
    vh = next(v for v in rc.virtual_hosts if "reviews" in v.domains)
    return vh.routes[0]


def test_redirect_prefix_rewrite_replaces_the_matched_prefix() -> None:
    r = _redirect_route({"match": [{"uri": {"prefix": "/old/"}}], "redirect": {"prefixRewrite": "/new/"}})
    assert (r.match.prefix, r.redirect.prefix_rewrite, r.redirect.path_redirect) == ("/old/", "/new/", "")


def test_redirect_prefix_rewrite_with_uri_is_refused_and_with_an_exact_match_warned() -> None:
    _, issues = _convert("VirtualService", {"hosts": ["reviews"], "http": [
        {"redirect": {"uri": "/a", "prefixRewrite": "/b"}}]})
    assert [f for f, _ in _errors(issues)] == ["spec.http[0].redirect.prefixRewrite"]
    _, issues = _convert("VirtualService", {"hosts": ["reviews"], "http": [
        {"match": [{"uri": {"exact": "/a"}}], "redirect": {"prefixRewrite": "/b"}}]})
    assert not _errors(issues)
    assert _warned(issues, "spec.http[0].redirect.prefixRewrite")


# --------------------------------------------------------------------------- jwks_uri


def test_jwks_uri_is_istios_other_spelling_of_jwks_uri() -> None:
    a, issues = _convert("RequestAuthentication", {"jwtRules": [{"issuer": "i", "jwks_uri": "https://k.example/jwks"}]})
    b, _ = _convert("RequestAuthentication", {"jwtRules": [{"issuer": "i", "jwksUri": "https://k.example/jwks"}]})
    assert not issues
    assert isinstance(a, RequestAuthentication) and isinstance(b, RequestAuthentication)
    assert a.rules == b.rules and a.rules[0].jwks_uri is not None
    _, issues = _convert("RequestAuthentication", {"jwtRules": [
        {"issuer": "i", "jwks_uri": "https://k.example/jwks", "jwksUri": "https://k.example/jwks"}]})
    assert [f for f, _ in _errors(issues)] == ["spec.jwtRules[0].jwks_uri"]


# --------------------------------------------------------------------------- spaceDelimitedClaims


def test_space_delimited_claims_are_split_word_by_word_besides_scope_and_permission() -> None:
    rule = {"issuer": "iss", "jwks": _JWKS, "spaceDelimitedClaims": ["roles", "scope", "org.groups"]}
    ra, issues = _convert("RequestAuthentication", {"jwtRules": [rule]})
    assert not _errors(issues)
    # a dotted name is a top-level claim of that name for Envoy, not a nested one: said so
    assert _warned(issues, "spec.jwtRules[0].spaceDelimitedClaims[2]")
    assert isinstance(ra, RequestAuthentication)
    provider = _provider(ra.rules[0])
    assert list(provider.normalize_payload_in_metadata.space_delimited_claims) == [
        "scope", "permission", "roles", "org.groups"]
    plain, _ = _convert("RequestAuthentication", {"jwtRules": [{"issuer": "iss", "jwks": _JWKS}]})
    assert isinstance(plain, RequestAuthentication)
    assert list(_provider(plain.rules[0]).normalize_payload_in_metadata.space_delimited_claims) == [
        "scope", "permission"]


# --------------------------------------------------------------------------- warned


def test_fields_meshline_does_not_implement_are_warned_by_name() -> None:
    _, dr = _convert("DestinationRule", {"host": "reviews", "trafficPolicy": {
        "loadBalancer": {"zoneAwareLbSetting": {"enabled": True, "minClusterSize": 3}},
        "outlierDetection": {"consecutive5xxErrors": 3},
        "retryBudget": {"percent": 20, "budgetInterval": "1s"}}})
    assert not _errors(dr)
    for f in ("loadBalancer.zoneAwareLbSetting", "retryBudget.budgetInterval"):
        assert _warned(dr, f"spec.trafficPolicy.{f}"), (f, dr)


# --------------------------------------------------------------------------- Gateway insecureSkipVerify


def _gateway(tls: dict[str, Any]) -> tuple[Any, list[Issue], dict[str, bytes]]:
    spec = {"selector": {"istio": "ingressgateway"}, "servers": [
        {"port": {"number": 8443, "name": "https", "protocol": "HTTPS"}, "hosts": ["*"], "tls": tls}]}
    own, cross, out = evaluate("Gateway", spec)
    lst = listener_pb2.Listener.FromString(out["gw-t/type.googleapis.com/envoy.config.listener.v3.Listener/0.0.0.0_8443"])
    ctx = tls_pb2.DownstreamTlsContext()
    lst.filter_chains[0].transport_socket.typed_config.Unpack(ctx)
    return ctx.common_tls_context.combined_validation_context, [*own, *cross], out


def _gateway_tls(tls: dict[str, Any]) -> tuple[Any, list[Issue]]:
    combined, issues, _ = _gateway(tls)
    return combined.default_validation_context, issues


def test_gateway_insecure_skip_verify_lets_unverified_client_certificates_through() -> None:
    skip, issues = _gateway_tls({"mode": "MUTUAL", "credentialName": "gw-cert", "insecureSkipVerify": True})
    assert not issues
    assert skip.trust_chain_verification == common_pb2.CertificateValidationContext.ACCEPT_UNTRUSTED
    strict, _ = _gateway_tls({"mode": "MUTUAL", "credentialName": "gw-cert"})
    assert strict.trust_chain_verification == common_pb2.CertificateValidationContext.VERIFY_TRUST_CHAIN
    # SIMPLE asks for no client certificate: said so, nothing changes
    _, issues = _gateway_tls({"mode": "SIMPLE", "credentialName": "gw-cert", "insecureSkipVerify": True})
    assert _warned(issues, "spec.servers[0].tls.insecureSkipVerify")


# --------------------------------------------------------------------------- Gateway caCertCredentialName

_SECRET = "gw-t/type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret/"


def test_gateway_ca_cert_credential_name_verifies_clients_with_that_secrets_ca() -> None:
    # client-credential (test_istio_fields' SCENARIO) holds a CA; gw-cert the server certificate
    combined, issues, out = _gateway({"mode": "MUTUAL", "credentialName": "gw-cert",
                                      "caCertCredentialName": "client-credential"})
    assert not [i for i in issues if i.severity == "error"], issues
    assert combined.validation_context_sds_secret_config.name == "kubernetes://client-credential-cacert"
    secret = secret_pb2.Secret.FromString(out[_SECRET + "kubernetes://client-credential-cacert"])
    assert secret.validation_context.trusted_ca.inline_bytes.startswith(b"-----BEGIN CERTIFICATE-----")
    # without it, credentialName's own CA
    combined, _, _ = _gateway({"mode": "MUTUAL", "credentialName": "gw-cert"})
    assert combined.validation_context_sds_secret_config.name == "kubernetes://gw-cert-cacert"


def test_gateway_ca_cert_credential_name_without_a_ca_fails_closed_and_is_warned() -> None:
    _, issues, out = _gateway({"mode": "MUTUAL", "credentialName": "gw-cert", "caCertCredentialName": "nothing-here"})
    assert [i.field for i in issues if i.severity == "warning"] == ["spec.servers[0].tls.caCertCredentialName"]
    # Meshline's stand-in CA, which no client chains to (not an empty or default bundle)
    stand_in = secret_pb2.Secret.FromString(out[_SECRET + "kubernetes://nothing-here-cacert"])
    _, _, real = _gateway({"mode": "MUTUAL", "credentialName": "gw-cert", "caCertCredentialName": "client-credential"})
    ca = secret_pb2.Secret.FromString(real[_SECRET + "kubernetes://client-credential-cacert"])
    assert stand_in.validation_context.trusted_ca.inline_bytes.startswith(b"-----BEGIN CERTIFICATE-----")
    assert stand_in.validation_context.trusted_ca.inline_bytes != ca.validation_context.trusted_ca.inline_bytes
    _, issues = _convert("Gateway", {"servers": [{"port": {"number": 443, "name": "https", "protocol": "HTTPS"},
                                                  "hosts": ["*"], "tls": {"mode": "MUTUAL", "credentialName": "c",
                                                                          "caCertificates": "/ca.pem",
                                                                          "caCertCredentialName": "c-ca"}}]})
    assert [f for f, _ in _errors(issues)] == ["spec.servers[0].tls.caCertCredentialName"]
