"""RequestAuthentication (JWT) and Telemetry (access logging), issue 18: conversion errors
by field, Istio's selection and precedence, the RBAC matchers of request principals and
claims (evaluated against the metadata Envoy's JWT filter writes), and where the filters and
access logs land in sidecar and waypoint configuration. Real Envoy: golden case
`jwt-telemetry` and tests/e2e/test_jwt_accesslog_e2e.py."""

from __future__ import annotations

import json
import textwrap
from typing import Any

import pytest
from envoy.config.rbac.v3 import rbac_pb2
from envoy.type.matcher.v3 import value_pb2
from google.protobuf import json_format

from controlplane.model.ir import Issue, ProxyMeta, RequestAuthentication, Telemetry, labels_of
from controlplane.model.meshconfig import parse_mesh_config
from controlplane.model.store import assemble
from controlplane.model.telemetry import access_logs_for
from controlplane.translate.ambient import plan_waypoint
from controlplane.translate.jwt import JWT_FILTER, claim, request_principal
from controlplane.translate.plan import LISTENER
from controlplane.translate.proxy import shared_key
from controlplane.translate.rbac import string_matcher
from controlplane.translate.sidecar import plan_inbound
from tests.ambientfixtures import WAYPOINT_API, WAYPOINT_SERVICE
from tests.envoymatch import string_matches
from tests.test_convert import conv, only

JWKS = json.dumps({"keys": [{"kty": "EC", "crv": "P-256", "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
                             "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]})


def ra(spec: str, api: str = "security.istio.io/v1") -> tuple[Any, tuple[Issue, ...]]:
    return conv(f"apiVersion: {api}\nkind: RequestAuthentication\nmetadata: {{name: r, namespace: shop}}\nspec:\n"
                + textwrap.indent(textwrap.dedent(spec), "  "))


def tel(spec: str, api: str = "telemetry.istio.io/v1") -> tuple[Any, tuple[Issue, ...]]:
    return conv(f"apiVersion: {api}\nkind: Telemetry\nmetadata: {{name: t, namespace: shop}}\nspec:\n"
                + textwrap.indent(textwrap.dedent(spec), "  "))


# --------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("api", ["security.istio.io/v1", "security.istio.io/v1beta1", "security.meshline.io/v1"])
def test_request_authentication_converts(api: str) -> None:
    value, issues = ra(f"""
        selector: {{matchLabels: {{app: web}}}}
        jwtRules:
        - issuer: https://issuer.test
          jwksUri: https://keys.test:8443/jwks.json
          audiences: [web]
          fromHeaders: [{{name: X-Token, prefix: "Bearer "}}]
          fromParams: [token]
          outputClaimToHeaders: [{{header: x-sub, claim: sub}}]
          timeout: 2s
        - issuer: other
          jwks: '{JWKS}'
    """, api)
    assert not issues and isinstance(value, RequestAuthentication)
    first, second = value.rules
    assert value.selector == (("app", "web"),)
    assert (first.jwks_uri.host, first.jwks_uri.port, first.jwks_uri.scheme) == ("keys.test", 8443, "https")
    assert first.from_headers[0].name == "x-token" and first.timeout_ms == 2000
    assert first.output_claim_to_headers == (("x-sub", "sub"),)
    assert second.jwks == JWKS and second.jwks_uri is None


@pytest.mark.parametrize(("rule", "field", "fragment"), [
    ("{jwksUri: 'http://k/j'}", "spec.jwtRules[0].issuer", "is required"),
    ("{issuer: i}", "spec.jwtRules[0].jwksUri", "OpenID"),
    (f"{{issuer: i, jwksUri: 'http://k/j', jwks: '{JWKS}'}}", "spec.jwtRules[0].jwks", "not both"),
    ("{issuer: i, jwksUri: 'ftp://k/j'}", "spec.jwtRules[0].jwksUri", "http:// or https://"),
    ("{issuer: i, jwksUri: '/jwks.json'}", "spec.jwtRules[0].jwksUri", "absolute"),
    ("{issuer: i, jwks: 'not json'}", "spec.jwtRules[0].jwks", "is not JSON"),
    ("{issuer: i, jwks: '{\"keys\": []}'}", "spec.jwtRules[0].jwks", "JSON Web Key Set"),
    ("{issuer: i, jwks: 'x', jwksUri: 'http://k/j', bogus: 1}", "spec.jwtRules[0].bogus", "unknown field"),
    ("{issuer: i, jwksUri: 'http://k/j', fromHeaders: [{name: 'a b'}]}", "spec.jwtRules[0].fromHeaders[0].name",
     "not a header name"),
    ("{issuer: i, jwksUri: 'http://k/j', outputClaimToHeaders: [{header: x, claim: a}, {header: X, claim: b}]}",
     "spec.jwtRules[0].outputClaimToHeaders[1].header", "set twice"),
    ("{issuer: i, jwksUri: 'http://k/j', timeout: soon}", "spec.jwtRules[0].timeout", "invalid duration"),
])
def test_request_authentication_errors_name_the_field(rule: str, field: str, fragment: str) -> None:
    value, issues = ra(f"jwtRules: [{rule}]")
    assert value is None
    only(issues, field, fragment)


def test_request_authentication_warnings_and_target_refs() -> None:
    value, issues = ra(f"jwtRules: [{{issuer: i, jwks: '{JWKS}', timeout: 1s}}]")
    assert value is not None
    only(issues, "spec.jwtRules[0].timeout", "no effect with inline jwks", "warning")
    value, issues = ra("selector: {matchLabels: {a: b}}\ntargetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, "
                       f"name: wp}}]\njwtRules: [{{issuer: i, jwks: '{JWKS}'}}]")
    assert value is None
    only(issues, "spec", "set at most one of selector")
    value, issues = ra(f"targetRefs: [{{kind: Service, name: api}}]\njwtRules: [{{issuer: i, jwks: '{JWKS}'}}]")
    assert value is not None and not issues and value.target_refs == (("Service", "api"),)


def test_telemetry_converts_and_warns_what_it_does_not_configure() -> None:
    value, issues = tel("""
        selector: {matchLabels: {app: web}}
        accessLogging:
        - match: {mode: SERVER}
          providers: [{name: envoy}, {name: envoy}]
          filter: {expression: "response.code >= 500"}
        - disabled: true
        tracing: [{randomSamplingPercentage: 10}]
        metrics: [{providers: [{name: prometheus}]}]
    """)
    assert isinstance(value, Telemetry)
    first, second = value.access_logging
    assert (first.mode, first.providers, first.filter) == ("SERVER", ("envoy",), "response.code >= 500")
    assert second.disabled and second.providers == () and second.mode == "CLIENT_AND_SERVER"
    only(issues, "spec.tracing", "no tracing", "warning")
    only(issues, "spec.metrics", "no Istio metrics", "warning")
    value, issues = tel("accessLogging: [{match: {mode: BOTH}}]")
    assert value is None
    only(issues, "spec.accessLogging[0].match.mode", "unknown mode 'BOTH'")
    value, issues = tel("accessLogging: [{providers: [{}]}]")
    only(issues, "spec.accessLogging[0].providers[0].name", "is required")
    value, issues = tel("targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: wp}]\n"
                        "accessLogging: [{providers: [{name: envoy}]}]")
    assert value is not None and not issues and value.target_refs == (("Gateway", "wp"),)


def test_mesh_config_access_log_providers() -> None:
    cfg, issues = parse_mesh_config(textwrap.dedent("""
        defaultProviders: {accessLogging: [json], tracing: [zipkin]}
        extensionProviders:
        - {name: json, envoyFileAccessLog: {path: /tmp/a.log, logFormat: {labels: {code: "%RESPONSE_CODE%"}}}}
        - {name: text, envoyFileAccessLog: {logFormat: {text: "%REQ(:PATH)%"}}}
        - {name: bad, envoyFileAccessLog: {logFormat: {text: x, labels: {a: b}}}}
        - {name: als, envoyHttpAls: {service: als.x, port: 9000}}
    """), "mesh.yaml")
    by_name = {p.name: p for p in cfg.access_log_providers}
    assert set(by_name) == {"json", "text"} and cfg.default_access_logging == ("json",)
    assert by_name["json"].labels == (("code", "%RESPONSE_CODE%"),) and by_name["json"].path == "/tmp/a.log"
    assert by_name["text"].text == "%REQ(:PATH)%" and by_name["text"].path == "/dev/stdout"
    only(issues, "extensionProviders[2].envoyFileAccessLog.logFormat", "text or labels, not both")
    only(issues, "defaultProviders.tracing", "no tracing", "warning")
    only(issues, "extensionProviders[3].envoyHttpAls", "not used by Meshline", "warning")


# --------------------------------------------------------------------------- selection and precedence

BASE = """
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.1, selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}, annotations: {meshline.io/status: injected}}
spec: {containers: [{name: app, ports: [{containerPort: 8080}]}]}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: api-1, namespace: shop, labels: {app: api}, annotations: {meshline.io/status: injected}}
spec: {containers: [{name: app}]}
status: {podIP: 10.0.0.2}
"""


def mesh_of(*docs: str, mesh_config: str = "") -> Any:
    from controlplane.model.convert import convert
    from controlplane.sources.yamlload import parse_documents

    objects, errors = parse_documents(textwrap.dedent(BASE) + "".join(f"---\n{textwrap.dedent(d)}" for d in docs),
                                      "t.yaml")
    assert not errors
    values = []
    for raw in objects:
        value, issues = convert(raw)
        assert not [i for i in issues if i.severity == "error"], [i.format() for i in issues]
        if value is not None:
            values.append(value)
    cfg = parse_mesh_config(mesh_config, "mesh.yaml")[0]
    return assemble(values, mesh_config=cfg)


def telemetry(ns: str, name: str, spec: str) -> str:
    return (f"apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {{name: {name}, namespace: {ns}}}\n"
            f"spec:\n{textwrap.indent(textwrap.dedent(spec), '  ')}\n")


WEB = labels_of({"app": "web"})


def test_telemetry_levels_override_per_provider_as_istio() -> None:
    cfg = ("extensionProviders: [{name: file, envoyFileAccessLog: {path: /var/log/a}}]\n"
           "defaultProviders: {accessLogging: [file]}")
    mesh = mesh_of(
        telemetry("meshline-system", "mesh", "accessLogging: [{providers: [{name: envoy}]}, {}]"),
        telemetry("shop", "ns", "accessLogging: [{match: {mode: CLIENT}, providers: [{name: envoy}], "
                               "filter: {expression: 'response.code >= 400'}}]"),
        telemetry("shop", "web-only", "selector: {matchLabels: {app: web}}\n"
                                     "accessLogging: [{providers: [{name: file}], disabled: true}]"),
        mesh_config=cfg)

    def logs(labels: Any, direction: Any) -> list[tuple[str, str | None]]:
        return [(a.provider, a.filter) for a in access_logs_for(mesh, "shop", labels, direction)[0]]

    # api: mesh level (envoy + the default provider `file`), the namespace's CLIENT filter on envoy
    assert logs(labels_of({"app": "api"}), "SERVER") == [("envoy", None), ("file", None)]
    assert logs(labels_of({"app": "api"}), "CLIENT") == [("envoy", "response.code >= 400"), ("file", None)]
    # web: the workload level turns `file` off
    assert logs(WEB, "SERVER") == [("envoy", None)]
    refs = access_logs_for(mesh, "shop", WEB, "CLIENT")[1]
    assert [r.name for r in refs] == ["mesh", "ns", "web-only"]
    # another namespace sees the mesh level only
    assert [a.provider for a in access_logs_for(mesh, "other", WEB, "CLIENT")[0]] == ["envoy", "file"]


def test_unknown_access_log_providers_are_warned() -> None:
    mesh = mesh_of(telemetry("shop", "t", "accessLogging: [{providers: [{name: nope}]}, {}]"))
    found = {(i.field, i.severity): i.message for i in mesh.issues if i.ref.kind == "Telemetry"}
    assert "is not a provider of the mesh config" in found[("spec.accessLogging[0].providers[0].name", "warning")]
    assert "changes nothing" in found[("spec.accessLogging[1].providers", "warning")]


def test_workload_telemetry_gives_its_sidecars_their_own_outbound_layer() -> None:
    mesh = mesh_of(telemetry("shop", "web-only", "selector: {matchLabels: {app: web}}\n"
                                                 "accessLogging: [{providers: [{name: envoy}]}]"))
    web = ProxyMeta("web-1.shop", namespace="shop", workload="web-1")
    api = ProxyMeta("api-1.shop", namespace="shop", workload="api-1")
    api2 = ProxyMeta("api-2.shop", namespace="shop", workload="api-1")
    assert shared_key(mesh, web) != shared_key(mesh, api) and shared_key(mesh, api) == shared_key(mesh, api2)


# --------------------------------------------------------------------------- RBAC matchers

ISSUERS = ("https://issuer.test", "other")


def _matches_value(m: value_pb2.ValueMatcher, value: Any) -> bool:
    kind = m.WhichOneof("match_pattern")
    if kind == "present_match":
        return value is not None and not isinstance(value, dict | list)
    if kind == "string_match":
        return isinstance(value, str) and string_matches(m.string_match, value)
    if kind == "list_match":
        return isinstance(value, list) and any(_matches_value(m.list_match.one_of, v) for v in value)
    if kind == "or_match":
        return any(_matches_value(v, value) for v in m.or_match.value_matchers)
    raise AssertionError(kind)


def evaluate(p: rbac_pb2.Principal, metadata: dict[str, Any]) -> bool:
    """Envoy's evaluation of the principals these matchers use, against the dynamic metadata
    the JWT filter writes (`envoy.filters.http.jwt_authn` -> issuer -> payload)."""
    kind = p.WhichOneof("identifier")
    if kind == "or_ids":
        return any(evaluate(i, metadata) for i in p.or_ids.ids)
    if kind == "not_id":
        return not evaluate(p.not_id, metadata)
    if kind == "any":
        return True
    assert kind == "metadata" and p.metadata.filter == JWT_FILTER
    node: Any = metadata
    for seg in p.metadata.path:
        node = node.get(seg.key) if isinstance(node, dict) else None
    return _matches_value(p.metadata.value, node)


def istio_match(pattern: str, principal: str) -> bool:
    if pattern == "*":
        return bool(principal)
    if pattern.startswith("*"):
        return principal.endswith(pattern[1:])
    if pattern.endswith("*"):
        return principal.startswith(pattern[:-1])
    return principal == pattern


TOKENS = [None, ("https://issuer.test", "alice"), ("https://issuer.test", "bob"), ("other", "alice"),
          ("other", "st/alice"), ("other", "")]
PATTERNS = ["*", "https://issuer.test/alice", "https://issuer.test/*", "https://*", "*/alice", "*alice", "*t/alice",
            "other/*", "other/st/alice", "*st/alice", "https://issuer.test/al*", "o*", "nobody/x", "*test/bob",
            "*.test/", "*r/", "*/"]  # the last three: only an empty sub ends so (h8 review, issue 18)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_request_principal_matches_as_istio_does(pattern: str) -> None:
    principal = request_principal(pattern, ISSUERS)
    for token in TOKENS:
        md = {} if token is None else {token[0]: {"iss": token[0], "sub": token[1]}}
        expected = token is not None and istio_match(pattern, f"{token[0]}/{token[1]}")
        assert evaluate(principal, md) == expected, (pattern, token, json_format.MessageToDict(principal))


def test_no_issuer_means_no_request_principal() -> None:
    assert not evaluate(request_principal("*", ()), {"x": {"iss": "x", "sub": "y"}})


def test_claims_match_strings_and_list_elements() -> None:
    groups = claim(("groups",), string_matcher("admins"), ISSUERS)
    assert evaluate(groups, {"other": {"groups": ["users", "admins"]}})
    assert evaluate(groups, {"https://issuer.test": {"groups": "admins"}})
    assert not evaluate(groups, {"other": {"groups": ["users"]}})
    assert not evaluate(groups, {"unknown-issuer": {"groups": "admins"}})
    nested = claim(("realm", "role"), string_matcher("oper*"), ISSUERS)
    assert evaluate(nested, {"other": {"realm": {"role": "operator"}}})
    present = claim(("azp",), None, ISSUERS)
    assert evaluate(present, {"other": {"azp": "web"}}) and not evaluate(present, {"other": {}})


# --------------------------------------------------------------------------- where the filters land

RA = """
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  jwtRules: [{issuer: https://issuer.test, jwksUri: "http://127.0.0.1:9999/jwks"}]
"""
AP = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: need-jwt, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules: [{from: [{source: {requestPrincipals: ["*"]}}]}]
"""


def _hcm(specs: Any, listener: str) -> Any:
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2 as hcm_pb2,
    )

    (lst,) = [s.make() for s in specs if s.name == listener and s.type_url == LISTENER]
    h = hcm_pb2.HttpConnectionManager()
    lst.filter_chains[0].filters[0].typed_config.Unpack(h)
    return h


def _access_logs(specs: Any, listener: str) -> list[str]:
    """The paths the listener's HTTP access logs write to."""
    from envoy.extensions.access_loggers.file.v3 import file_pb2

    out = []
    for log in _hcm(specs, listener).access_log:
        cfg = file_pb2.FileAccessLog()
        log.typed_config.Unpack(cfg)
        out.append(cfg.path)
    return out


def _http_filters(specs: Any, listener: str) -> list[str]:
    (lst,) = [s.make() for s in specs if s.name == listener and s.type_url == LISTENER]
    hcm = lst.filter_chains[0].filters[0].typed_config
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2 as hcm_pb2,
    )

    h = hcm_pb2.HttpConnectionManager()
    hcm.Unpack(h)
    return [f.name for f in h.http_filters]


def test_sidecar_inbound_validates_jwts_before_authorization() -> None:
    mesh = mesh_of(RA, AP)
    specs = plan_inbound(mesh, ProxyMeta("web-1.shop", namespace="shop", workload="web-1"))
    assert _http_filters(specs, "inbound_10.0.0.1_8080")[:2] == [JWT_FILTER, "envoy.filters.http.rbac"]
    (cluster,) = [s.make() for s in specs if s.name == "jwks|127.0.0.1|9999"]
    assert cluster.type == cluster.STATIC  # type: ignore[attr-defined]
    # Without the RequestAuthentication the policy can never be met (fail closed): no JWT filter.
    specs = plan_inbound(mesh_of(AP), ProxyMeta("web-1.shop", namespace="shop", workload="web-1"))
    assert JWT_FILTER not in _http_filters(specs, "inbound_10.0.0.1_8080")


def test_waypoint_validates_jwts_of_request_authentications_attached_to_it() -> None:
    attached = RA.replace("selector: {matchLabels: {app: web}}",
                          "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: wp}]")
    mesh = mesh_of(WAYPOINT_API, WAYPOINT_SERVICE, attached)
    specs = plan_waypoint(mesh, ProxyMeta("wp-1.shop", mode="waypoint", namespace="shop", workload="wp-1",
                                          waypoint="wp"))
    assert _http_filters(specs, "waypoint_80")[0] == JWT_FILTER
    assert any(s.name == "jwks|127.0.0.1|9999" for s in specs)
    assert not _access_logs(specs, "waypoint_80")
    # The sidecars of the namespace do not apply it.
    specs = plan_inbound(mesh, ProxyMeta("web-1.shop", namespace="shop", workload="web-1"))
    assert JWT_FILTER not in _http_filters(specs, "inbound_10.0.0.1_8080")


def test_listeners_name_the_telemetry_behind_their_access_logs() -> None:
    """A NACK or a pre-flight rejection of a listener (e.g. a CEL filter Envoy cannot parse)
    is blamed on the Telemetry that shaped it."""
    from controlplane.translate.proxy import plan_shared

    mesh = mesh_of(telemetry("shop", "logs", "accessLogging: [{providers: [{name: envoy}]}]"))
    web = ProxyMeta("web-1.shop", namespace="shop", workload="web-1")
    outbound = [s for s in plan_shared(mesh, web) if s.type_url == LISTENER]
    inbound = [s for s in plan_inbound(mesh, web) if s.type_url == LISTENER]
    assert outbound and inbound
    for spec in (*outbound, *inbound):
        assert ("Telemetry", "logs") in {(r.kind, r.name) for r in spec.sources}, spec.name


@pytest.mark.envoy
def test_envoy_refuses_a_cel_filter_it_cannot_parse() -> None:
    """What pre-flight relies on to withhold such a Telemetry: Meshline's own Envoy rejects
    the listener, naming the expression."""
    import asyncio

    from controlplane.cache.resources import Resource
    from controlplane.envoycheck import EnvoyValidator
    from controlplane.localrun import envoy_binary

    good = mesh_of(telemetry("shop", "logs", "accessLogging: [{providers: [{name: envoy}], "
                                             "filter: {expression: 'response.code >= 400'}}]"))
    bad = mesh_of(telemetry("shop", "logs", "accessLogging: [{providers: [{name: envoy}], "
                                            "filter: {expression: 'response.code >='}}]"))
    web = ProxyMeta("web-1.shop", namespace="shop", workload="web-1")
    validator = EnvoyValidator(envoy_binary())
    for mesh, accepted in ((good, True), (bad, False)):
        specs = [s for s in plan_inbound(mesh, web) if s.type_url == LISTENER]
        resources = [Resource(s.type_url, s.name, s.make().SerializeToString(deterministic=True)) for s in specs]
        verdict, rejected = asyncio.run(validator.rejected(resources))
        assert verdict.ok is accepted, verdict.message
        assert accepted or "filter expression" in rejected[0][1]


def test_jwks_uri_on_a_static_service_entry_host_is_warned() -> None:
    entry = """
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: keys, namespace: shop}
    spec:
      hosts: [keys.internal]
      ports: [{number: 80, name: http, protocol: HTTP}]
      resolution: STATIC
      endpoints: [{address: 192.0.2.5}]
    """
    rule = RA.replace('jwksUri: "http://127.0.0.1:9999/jwks"', 'jwksUri: "http://keys.internal/jwks"')
    mesh = mesh_of(entry, rule)
    (issue,) = [i for i in mesh.issues if i.ref.kind == "RequestAuthentication"]
    assert issue.field == "spec.jwtRules[0].jwksUri" and issue.severity == "warning"
    assert "found by DNS" in issue.message and "STATIC" in issue.message
    assert not [i for i in mesh_of(rule).issues if i.ref.kind == "RequestAuthentication"]
    # Telemetry warnings come once each.
    mesh = mesh_of(telemetry("shop", "t", "accessLogging: [{providers: [{name: nope}]}]"))
    assert len([i for i in mesh.issues if i.ref.kind == "Telemetry"]) == 1


WAYPOINT = """
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop, labels: {meshline.io/use-waypoint: wp}}
spec: {clusterIP: 10.96.0.2, selector: {app: api}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: wp, namespace: shop}
spec: {clusterIP: 10.96.0.3, selector: {meshline.io/waypoint: wp}, ports: [{name: tunnel, port: 15008}]}
"""


def test_waypoint_access_logs_from_telemetry_attached_to_it_or_its_services() -> None:
    wp = ProxyMeta("wp-1.shop", mode="waypoint", namespace="shop", workload="wp-1", waypoint="wp")
    cfg = "extensionProviders: [{name: file, envoyFileAccessLog: {path: /var/log/wp.log}}]"
    for target in ("{kind: Gateway, group: gateway.networking.k8s.io, name: wp}", "{kind: Service, name: api}"):
        mesh = mesh_of(WAYPOINT, telemetry("shop", "wp-logs", f"targetRefs: [{target}]\n"
                                                              "accessLogging: [{providers: [{name: file}]}]"),
                       mesh_config=cfg)
        specs = plan_waypoint(mesh, wp)
        assert _access_logs(specs, "waypoint_80") == ["/var/log/wp.log"], target
        (spec,) = [s for s in specs if s.name == "waypoint_80" and s.type_url == LISTENER]
        assert ("Telemetry", "wp-logs") in {(r.kind, r.name) for r in spec.sources}
        # The namespace's sidecars do not take it.
        web = plan_inbound(mesh, ProxyMeta("web-1.shop", namespace="shop", workload="web-1"))
        assert not _access_logs(web, "inbound_10.0.0.1_8080")
    # The namespace level applies to the waypoint too; its own level overrides per provider.
    mesh = mesh_of(WAYPOINT, telemetry("shop", "ns", "accessLogging: [{providers: [{name: envoy}]}]"),
                   telemetry("shop", "wp-off", "targetRefs: [{kind: Service, name: api}]\n"
                                               "accessLogging: [{providers: [{name: envoy}], disabled: true}]"))
    assert not _access_logs(plan_waypoint(mesh, wp), "waypoint_80")
    assert _access_logs(plan_inbound(mesh, ProxyMeta("web-1.shop", namespace="shop", workload="web-1")),
                        "inbound_10.0.0.1_8080") == ["/dev/stdout"]


def test_jwt_conditions_without_a_request_authentication_are_warned() -> None:
    mesh = mesh_of(AP)
    (issue,) = [i for i in mesh.issues if i.ref.kind == "AuthorizationPolicy"]
    assert issue.field == "spec.rules[0]" and issue.severity == "warning" and "never match" in issue.message
    assert not [i for i in mesh_of(RA, AP).issues if i.ref.kind == "AuthorizationPolicy"]
