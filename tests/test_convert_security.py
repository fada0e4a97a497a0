"""PeerAuthentication and AuthorizationPolicy conversion: Istio's schema in, IR out, every
problem an issue naming its field."""

from __future__ import annotations

import textwrap
from typing import Any

import pytest

from controlplane.model.ir import (
    AuthorizationPolicy,
    AuthzCondition,
    AuthzOperation,
    AuthzRule,
    AuthzSource,
    Issue,
    PeerAuthentication,
)
from tests.test_convert import conv, errors, only


def pa(spec: str, api: str = "security.meshline.io/v1", ns: str = "shop") -> tuple[Any, tuple[Issue, ...]]:
    return conv(f"apiVersion: {api}\nkind: PeerAuthentication\nmetadata: {{name: p, namespace: {ns}}}\nspec:\n"
                + textwrap.indent(textwrap.dedent(spec), "  "))


def ap(spec: str, api: str = "security.meshline.io/v1") -> tuple[Any, tuple[Issue, ...]]:
    return conv(f"apiVersion: {api}\nkind: AuthorizationPolicy\nmetadata: {{name: a, namespace: shop}}\nspec:\n"
                + textwrap.indent(textwrap.dedent(spec), "  "))


# --------------------------------------------------------------------------- PeerAuthentication


@pytest.mark.parametrize("api", ["security.meshline.io/v1", "security.istio.io/v1", "security.istio.io/v1beta1"])
def test_peer_authentication(api: str) -> None:
    value, issues = pa("""
        selector: {matchLabels: {app: web}}
        mtls: {mode: STRICT}
        portLevelMtls:
          "8080": {mode: PERMISSIVE}
          "9090": {}
    """, api)
    assert issues == ()
    assert value == PeerAuthentication(value.ref, "shop", "p", (("app", "web"),), "STRICT",
                                       ((8080, "PERMISSIVE"), (9090, "UNSET")))


def test_peer_authentication_defaults_and_empty_spec() -> None:
    value, issues = pa("{}")
    assert issues == () and value.mode == "UNSET" and value.selector == () and value.port_level == ()


def test_peer_authentication_errors() -> None:
    _, issues = pa("""
        mtls: {mode: STRICTER, extra: 1}
        portLevelMtls:
          "80": {mode: STRICT}
          "http": {mode: DISABLE}
          "70000": {mode: DISABLE}
    """)
    only(issues, "spec.mtls.mode", "unknown mTLS mode 'STRICTER'")
    only(issues, "spec.mtls.extra", "unknown field")
    only(issues, "spec.portLevelMtls", "needs a workload selector")
    only(issues, "spec.portLevelMtls.http", "not a port number")
    only(issues, "spec.portLevelMtls.70000", "not a port number")
    _, issues = pa("selector: {labels: {app: x}}")
    only(issues, "spec.selector.labels", "unknown field")
    value, issues = pa("mtls: {mode: STRICT}", api="security.istio.io/v1alpha1")
    assert value is None
    only(issues, "apiVersion", "security.meshline.io/v1")
    value, issues = conv("apiVersion: security.meshline.io/v1\nkind: PeerAuthentication\nmetadata: {name: p}\n")
    assert value is None
    only(issues, "spec", "required")


# --------------------------------------------------------------------------- AuthorizationPolicy


def test_authorization_policy_in_full() -> None:
    value, issues = ap("""
        selector: {matchLabels: {app: web}}
        action: DENY
        rules:
        - from:
          - source:
              principals: [cluster.local/ns/a/sa/b, "*"]
              notPrincipals: ["*/sa/evil"]
              namespaces: ["prod-*"]
              notNamespaces: [prod-test]
              serviceAccounts: [batch, ops/cron]
              notServiceAccounts: [ops/x]
              ipBlocks: [10.1.2.3/8, 192.168.0.1]
              notIpBlocks: ["2001:db8::/32"]
              remoteIpBlocks: [203.0.113.0/24]
              notRemoteIpBlocks: [203.0.113.7]
          to:
          - operation:
              hosts: [web, "*.example.com"]
              notHosts: [evil]
              ports: ["8080"]
              notPorts: ["9090"]
              methods: [GET]
              notMethods: [DELETE]
              paths: ["/api/*"]
              notPaths: ["*/private"]
          when:
          - {key: "request.headers[X-User]", values: [alice]}
          - {key: source.ip, notValues: [10.0.0.1]}
          - {key: destination.port, values: ["80"]}
        - {}
    """)
    assert errors(issues) == [] and issues == ()
    assert isinstance(value, AuthorizationPolicy)
    assert value.action == "DENY" and value.selector == (("app", "web"),)
    assert value.rules == (
        AuthzRule(
            sources=(AuthzSource(
                principals=("cluster.local/ns/a/sa/b", "*"), not_principals=("*/sa/evil",),
                namespaces=("prod-*",), not_namespaces=("prod-test",),
                service_accounts=("shop/batch", "ops/cron"), not_service_accounts=("ops/x",),
                ip_blocks=("10.0.0.0/8", "192.168.0.1/32"), not_ip_blocks=("2001:db8::/32",),
                remote_ip_blocks=("203.0.113.0/24",), not_remote_ip_blocks=("203.0.113.7/32",),
            ),),
            operations=(AuthzOperation(
                hosts=("web", "*.example.com"), not_hosts=("evil",), ports=(8080,), not_ports=(9090,),
                methods=("GET",), not_methods=("DELETE",), paths=("/api/*",), not_paths=("*/private",),
            ),),
            conditions=(
                AuthzCondition("request.headers[x-user]", ("alice",)),
                AuthzCondition("source.ip", (), ("10.0.0.1/32",)),
                AuthzCondition("destination.port", ("80",)),
            ),
        ),
        AuthzRule(),
    )


def test_allow_nothing_and_allow_all() -> None:
    value, issues = ap("{}")
    assert issues == () and value.action == "ALLOW" and value.rules == ()
    value, issues = ap("rules: [{}]")
    assert issues == () and value.rules == (AuthzRule(),)


@pytest.mark.parametrize(("spec", "field", "fragment"), [
    ("action: PERMIT", "spec.action", "unknown action 'PERMIT'"),
    ("rules: [{from: [{source: {ipBlocks: [10.0.0.0/33]}}]}]", "spec.rules[0].from[0].source.ipBlocks[0]",
     "not an IP address or CIDR"),
    ("rules: [{from: [{source: {notIpBlocks: [nope]}}]}]", "spec.rules[0].from[0].source.notIpBlocks[0]",
     "not an IP address"),
    ("rules: [{to: [{operation: {ports: ['0']}}]}]", "spec.rules[0].to[0].operation.ports[0]", "not a port number"),
    ("rules: [{to: [{operation: {notPorts: [http]}}]}]", "spec.rules[0].to[0].operation.notPorts[0]",
     "not a port number"),
    ("rules: [{to: [{operation: {ports: [8080]}}]}]", "spec.rules[0].to[0].operation.ports[0]", "expected a string"),
    ("rules: [{when: [{key: request.size, values: ['1']}]}]", "spec.rules[0].when[0].key",
     "unknown or unsupported key 'request.size'"),
    ("rules: [{when: [{key: 'request.headers[]', values: [a]}]}]", "spec.rules[0].when[0].key", "header name"),
    ("rules: [{when: [{key: source.ip, values: [x]}]}]", "spec.rules[0].when[0].values[0]", "not an IP address"),
    ("rules: [{when: [{key: destination.port, notValues: ['99999']}]}]", "spec.rules[0].when[0].notValues[0]",
     "not a port number"),
    ("rules: [{when: [{key: source.ip}]}]", "spec.rules[0].when[0]", "set values or notValues"),
    ("rules: [{when: [{values: [a]}]}]", "spec.rules[0].when[0].key", "required"),
    ("rules: [{from: [{}]}]", "spec.rules[0].from[0].source", "required"),
    ("rules: [{from: [{source: {}}]}]", "spec.rules[0].from[0].source", "at least one field"),
    ("rules: [{to: [{operation: {}}]}]", "spec.rules[0].to[0].operation", "at least one field"),
    ("rules: [{to: [{operation: {paths: ['/a*b']}}]}]", "spec.rules[0].to[0].operation.paths[0]",
     "only allowed alone, at the start or at the end"),
    ("rules: [{from: [{source: {principals: ['']}}]}]", "spec.rules[0].from[0].source.principals[0]",
     "must not be empty"),
    ("rules: [{from: [{source: {serviceAccounts: [a/b/c]}}]}]", "spec.rules[0].from[0].source.serviceAccounts[0]",
     "not a service account"),
    ("rules: [{from: [{source: {principal: [x]}}]}]", "spec.rules[0].from[0].source.principal",
     "unknown field (did you mean 'principals'?)"),
    ("rules: [{to: [{operation: {path: [/x]}}]}]", "spec.rules[0].to[0].operation.path", "unknown field"),
    ("rules: [{fromm: []}]", "spec.rules[0].fromm", "unknown field"),
    ("provider: {name: x}", "spec.provider", "only valid with action CUSTOM"),
    ("selector: {matchLabels: {app: x}}\ntargetRefs: [{kind: Service, name: x}]", "spec",
     "at most one of selector, targetRef and targetRefs"),
])
def test_authorization_policy_errors(spec: str, field: str, fragment: str) -> None:
    value, issues = ap(spec)
    assert value is None
    only(issues, field, fragment)


def test_authorization_policy_warnings() -> None:
    value, issues = ap("action: CUSTOM\nprovider: {name: opa}\nrules: [{to: [{operation: {paths: [/admin]}}]}]")
    assert value is not None and not issues
    # The provider is kept; the action is the fail-closed stand-in (DENY with the same rules)
    # every enforcement point uses unless it can ask the provider's authorizer.
    assert value.action == "DENY" and value.provider == "opa" and value.rules[0].operations[0].paths == ("/admin",)
    value, issues = ap("action: CUSTOM\nrules: [{}]")
    assert value is None
    only(issues, "spec.provider", "is required with action CUSTOM")
    value, issues = ap("action: CUSTOM\nprovider: {name: opa, kind: x}\nrules: [{}]")
    only(issues, "spec.provider.kind", "unknown field")
    value, issues = ap("targetRefs: [{kind: Service, group: '', name: web}, {kind: Gateway, "
                       "group: gateway.networking.k8s.io, name: wp}]\nrules: [{}]")
    assert value is not None and not issues
    assert value.target_refs == (("Gateway", "wp"), ("Service", "web"))
    value, issues = ap("targetRefs: [{kind: Deployment, name: web}]\nrules: [{}]")
    assert value is None
    only(issues, "spec.targetRefs[0].kind", "unsupported target kind 'Deployment'")
    value, issues = ap("""
        rules:
        - from: [{source: {requestPrincipals: ["*"], notRequestPrincipals: [x/y]}}]
          when: [{key: "request.auth.claims[iss]", values: [me]}]
    """, api="security.istio.io/v1beta1")
    # JWT attributes are enforced (RequestAuthentication, issue 18): no warning.
    assert value is not None and not issues
    assert value.rules[0].sources[0].request_principals == ("*",)
    assert value.rules[0].conditions[0].key == "request.auth.claims[iss]"
    value, issues = ap("rules: [{when: [{key: 'request.auth.claims[]', values: [a]}]}]")
    assert value is None
    only(issues, "spec.rules[0].when[0].key", "expected request.auth.claims[NAME]")
    value, issues = ap("rules: [{when: [{key: 'request.auth.subject', values: [a]}]}]")
    assert value is None
    only(issues, "spec.rules[0].when[0].key", "unknown or unsupported key")


def test_field_lines_point_at_the_offending_value() -> None:
    from controlplane.model.convert import convert
    from controlplane.sources.yamlload import parse_documents

    text = """apiVersion: security.meshline.io/v1
kind: AuthorizationPolicy
metadata: {name: a, namespace: shop}
spec:
  rules:
  - from:
    - source:
        ipBlocks:
        - 10.0.0.0/8
        - not-a-cidr
"""
    (raw,), errs = parse_documents(text, "ap.yaml")
    assert not errs
    _, issues = convert(raw)
    issue = only(issues, "spec.rules[0].from[0].source.ipBlocks[1]", "not an IP address")
    assert issue.format().startswith("ap.yaml:10: AuthorizationPolicy/shop/a: ")
