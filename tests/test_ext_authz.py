"""CUSTOM AuthorizationPolicies with extension providers from `--mesh-config` (Istio's
MeshConfig `extensionProviders`): parsing, the fail-closed cases, the filters and clusters a
sidecar gets, and Envoy's own validation of them."""

from __future__ import annotations

import asyncio
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2

from controlplane.model.convert import convert
from controlplane.model.ir import Issue, ProxyMeta
from controlplane.model.mesh import Mesh
from controlplane.model.meshconfig import MeshConfig, parse_mesh_config
from controlplane.model.store import assemble
from controlplane.sources.yamlload import parse_documents
from controlplane.translate.plan import CLUSTER, LISTENER
from controlplane.translate.proxy import plan_proxy

MESH = """
apiVersion: v1
kind: Namespace
metadata: {name: foo}
---
apiVersion: v1
kind: Service
metadata: {name: httpbin, namespace: foo}
spec:
  clusterIP: 10.96.4.1
  selector: {app: httpbin}
  ports: [{name: http, port: 8000, targetPort: 8080}, {name: tcp-db, port: 5432}]
---
apiVersion: v1
kind: Pod
metadata: {name: httpbin-1, namespace: foo, labels: {app: httpbin}, annotations: {meshline.io/status: injected}}
spec: {serviceAccountName: httpbin, containers: [{name: httpbin, ports: [{containerPort: 8080}]}]}
status: {podIP: 10.0.4.1}
---
apiVersion: v1
kind: Service
metadata: {name: ext-authz, namespace: authz}
spec:
  clusterIP: 10.96.5.1
  selector: {app: ext-authz}
  ports: [{name: http, port: 8000}, {name: grpc, port: 9000}]
---
apiVersion: v1
kind: Pod
metadata: {name: ext-authz-1, namespace: authz, labels: {app: ext-authz}}
spec: {containers: [{name: authz}]}
status: {podIP: 10.0.5.1}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ext-authz-1, namespace: authz, labels: {kubernetes.io/service-name: ext-authz}}
addressType: IPv4
ports: [{name: http, port: 8000}, {name: grpc, port: 9000}]
endpoints: [{addresses: [10.0.5.1], targetRef: {kind: Pod, name: ext-authz-1, namespace: authz}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext-authz, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: CUSTOM
  provider: {name: PROVIDER}
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
"""

MESH_CONFIG = """
extensionProviders:
- name: http-authz
  envoyExtAuthzHttp:
    service: ext-authz.authz.svc.cluster.local
    port: 8000
    timeout: 2s
    pathPrefix: /check
    includeRequestHeadersInCheck: [x-ext-authz, "x-team-*"]
    includeAdditionalHeadersInCheck: {x-from: meshline}
    headersToUpstreamOnAllow: [x-user]
    headersToDownstreamOnDeny: [x-reason]
    statusOnError: "503"
- name: grpc-authz
  envoyExtAuthzGrpc: {service: authz/ext-authz, port: 9000, failOpen: true}
- name: tracer
  zipkin: {service: zipkin.istio-system.svc.cluster.local, port: 9411}
"""

SIDECAR = ProxyMeta("httpbin-1", namespace="foo", workload="httpbin-1", capture="intercept")


def mesh_with(provider: str, mesh_config: str | None = MESH_CONFIG, extra: str = "",
              operation: str = 'paths: ["/admin*"]') -> Mesh:
    text = MESH.replace("PROVIDER", provider).replace('paths: ["/admin*"]', operation) + extra
    objects, errors = parse_documents(textwrap.dedent(text), "mesh.yaml")
    assert not errors
    values = []
    for raw in objects:
        value, issues = convert(raw)
        assert not [i for i in issues if i.severity == "error"], issues
        values.append(value)
    config = parse_mesh_config(mesh_config, "mesh-config.yaml")[0] if mesh_config is not None else MeshConfig()
    return assemble(values, mesh_config=config)


def errors_of(mesh: Mesh) -> list[Issue]:
    return [i for i in mesh.issues if i.severity == "error"]


def inbound_http_filters(mesh: Mesh) -> list[tuple[str, Any]]:
    """(name, decoded config) of the HTTP filters of the sidecar's inbound port-8080 HTTP chain."""
    specs = plan_proxy(mesh, SIDECAR).specs()
    lst = next(s.make() for s in specs if s.type_url == LISTENER and s.name == "virtualInbound")
    chain = next(c for c in lst.filter_chains if c.name == "inbound_8080_http")
    hcm = hcm_pb2.HttpConnectionManager()
    chain.filters[0].typed_config.Unpack(hcm)
    out: list[tuple[str, Any]] = []
    for f in hcm.http_filters:
        cfg: Any
        if f.name == "envoy.filters.http.ext_authz":
            cfg = ext_authz_pb2.ExtAuthz()
        elif f.name == "envoy.filters.http.rbac":
            cfg = http_rbac_pb2.RBAC()
        else:
            cfg = None
        if cfg is not None:
            f.typed_config.Unpack(cfg)
        out.append((f.name, cfg))
    return out


# --------------------------------------------------------------------------- mesh config


def test_mesh_config_parses_istio_providers() -> None:
    config, issues = parse_mesh_config(MESH_CONFIG, "m.yaml")
    http, grpc = config.providers
    assert (http.name, http.protocol, http.service, http.port, http.timeout_ms) == (
        "http-authz", "http", "ext-authz.authz.svc.cluster.local", 8000, 2000)
    assert http.path_prefix == "/check" and http.status_on_error == 503 and not http.fail_open
    assert http.include_request_headers == ("x-ext-authz", "x-team-*")
    assert http.include_additional_headers == (("x-from", "meshline"),)
    assert (grpc.protocol, grpc.fail_open, grpc.timeout_ms) == ("grpc", True, 600_000)  # Istio's default timeout
    assert config.other_providers == ("tracer",)
    assert [(i.field, i.severity) for i in issues] == [("extensionProviders[2].zipkin", "warning")]


def test_mesh_config_from_an_istio_configmap() -> None:
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "istio", "namespace": "istio-system"},
          "data": {"mesh": MESH_CONFIG}}
    import yaml

    config, _ = parse_mesh_config(yaml.safe_dump(cm), "istio-cm.yaml")
    assert [p.name for p in config.providers] == ["http-authz", "grpc-authz"]


@pytest.mark.parametrize(("text", "field", "fragment"), [
    ("extensionProviders: [{name: a, envoyExtAuthzHttp: {service: s.ns, port: 80, color: red}}]",
     "extensionProviders[0].envoyExtAuthzHttp.color", "unknown field"),
    ("extensionProviders: [{name: a, envoyExtAuthzHttp: {service: s.ns}}]",
     "extensionProviders[0].envoyExtAuthzHttp.port", "is required"),
    ("extensionProviders: [{name: a, envoyExtAuthzGrpc: {service: s.ns, port: 1, pathPrefix: /x}}]",
     "extensionProviders[0].envoyExtAuthzGrpc.pathPrefix", "unknown field"),
    ("extensionProviders: [{name: a, envoyExtAuthzHttp: {service: s.ns, port: 80, statusOnError: 'teapot'}}]",
     "extensionProviders[0].envoyExtAuthzHttp.statusOnError", "not an HTTP status code"),
    ("extensionProviders: [{name: a, envoyExtAuthzHttp: {service: s.ns, port: 80}},"
     " {name: a, envoyExtAuthzGrpc: {service: s.ns, port: 81}}]",
     "extensionProviders[1].name", "used twice"),
    ("extensionProviders: [{name: a}]", "extensionProviders[0]", "exactly one provider type"),
    ("[1, 2]", "", "expected a mapping"),
    ("kind: ConfigMap\ndata: {}", "data.mesh", "needs `data.mesh`"),
])
def test_mesh_config_errors_name_the_field(text: str, field: str, fragment: str) -> None:
    config, issues = parse_mesh_config(text, "m.yaml")
    assert any(i.field == field and fragment in i.message and i.severity == "error" for i in issues), issues
    assert not config.providers  # a provider with an error is left out: its policies fail closed
    assert all(i.ref.kind == "MeshConfig" and i.ref.file == "m.yaml" for i in issues)


def test_other_meshconfig_fields_are_warned() -> None:
    _, issues = parse_mesh_config("rootNamespace: istio-system\nextensionProviders: []\n", "m.yaml")
    assert [(i.field, i.severity) for i in issues] == [("rootNamespace", "warning")]


# --------------------------------------------------------------------------- translation


def test_http_provider_gets_shadow_rbac_and_ext_authz_before_deny_and_allow() -> None:
    allow = """---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: foo}
spec: {rules: [{}]}
"""
    mesh = mesh_with("http-authz", extra=allow)
    assert not errors_of(mesh), errors_of(mesh)
    filters = inbound_http_filters(mesh)
    names = [n for n, _ in filters]
    assert names == ["envoy.filters.http.rbac", "envoy.filters.http.ext_authz", "envoy.filters.http.rbac",
                     "envoy.filters.http.router"]
    shadow = filters[0][1]
    assert not shadow.HasField("rules") and shadow.shadow_rules_stat_prefix == "istio_ext_authz_"
    assert list(shadow.shadow_rules.policies) == ["istio-ext-authz-ns[foo]-policy[ext-authz]-rule[0]"]
    assert shadow.shadow_rules.action == 1  # DENY: the metadata is set when a CUSTOM rule matches
    ext: ext_authz_pb2.ExtAuthz = filters[1][1]
    assert ext.http_service.server_uri.cluster == "outbound|8000||ext-authz.authz.svc.cluster.local"
    assert ext.http_service.server_uri.timeout.seconds == 2 and ext.http_service.path_prefix == "/check"
    assert [p.exact for p in ext.allowed_headers.patterns] == ["x-ext-authz", ""]
    assert ext.allowed_headers.patterns[1].prefix == "x-team-"
    assert ext.status_on_error.code == 503 and not ext.failure_mode_allow
    assert ext.filter_enabled_metadata.filter == "envoy.filters.http.rbac"
    assert [p.key for p in ext.filter_enabled_metadata.path] == ["istio_ext_authz_shadow_effective_policy_id"]
    assert ext.filter_enabled_metadata.value.string_match.prefix == "istio-ext-authz"
    allow_rbac = filters[2][1]
    assert list(allow_rbac.rules.policies) == ["ns[foo]-policy[allow-all]-rule[0]"]  # the CUSTOM one is not there


def test_authorizer_cluster_is_added_when_the_sidecar_scope_lacks_it() -> None:
    scoped = """---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: foo}
spec: {egress: [{hosts: ["./*"]}]}
"""
    mesh = mesh_with("http-authz", extra=scoped)
    names = {s.name for s in plan_proxy(mesh, SIDECAR).specs() if s.type_url == CLUSTER}
    assert "outbound|8000||ext-authz.authz.svc.cluster.local" in names
    assert "outbound|9000||ext-authz.authz.svc.cluster.local" not in names  # only the provider's port


@pytest.mark.parametrize(("provider", "mesh_config", "fragment"), [
    ("nope", MESH_CONFIG, "unknown extension provider 'nope' (the mesh config mesh-config.yaml defines: "
                          "http-authz, grpc-authz)"),
    ("http-authz", None, "no mesh config was given"),
    ("tracer", MESH_CONFIG, "is not an external authorizer"),
    ("gone", "extensionProviders: [{name: gone, envoyExtAuthzHttp: {service: gone.authz, port: 80}}]",
     "service 'gone.authz' is not in the mesh"),
    ("p", "extensionProviders: [{name: p, envoyExtAuthzHttp: {service: ext-authz.authz, port: 81}}]",
     "has no port 81"),
])
def test_unusable_provider_is_an_error_and_fails_closed(provider: str, mesh_config: str | None,
                                                        fragment: str) -> None:
    mesh = mesh_with(provider, mesh_config)
    errs = errors_of(mesh)
    assert len(errs) == 1 and errs[0].field == "spec.provider.name" and fragment in errs[0].message, errs
    assert errs[0].ref.display == "AuthorizationPolicy/foo/ext-authz" and "fails closed" in errs[0].message
    filters = inbound_http_filters(mesh)
    assert [n for n, _ in filters] == ["envoy.filters.http.rbac", "envoy.filters.http.router"]
    deny = filters[0][1]
    assert deny.rules.action == 1 and list(deny.rules.policies) == ["ns[foo]-policy[ext-authz]-rule[0]"]


def test_two_providers_on_one_workload_fail_closed() -> None:
    second = """---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: second, namespace: foo}
spec:
  action: CUSTOM
  provider: {name: grpc-authz}
  rules: [{to: [{operation: {paths: ["/other"]}}]}]
"""
    filters = inbound_http_filters(mesh_with("http-authz", extra=second))
    assert [n for n, _ in filters] == ["envoy.filters.http.rbac", "envoy.filters.http.router"]
    assert set(filters[0][1].rules.policies) == {"ns[foo]-policy[ext-authz]-rule[0]",
                                                 "ns[foo]-policy[second]-rule[0]"}


def tcp_filter_names(mesh: Mesh) -> list[str]:
    specs = plan_proxy(mesh, SIDECAR).specs()
    lst = next(s.make() for s in specs if s.type_url == LISTENER and s.name == "virtualInbound")
    chain = next(c for c in lst.filter_chains if c.name == "inbound_5432_tcp")
    out = [f.name for f in chain.filters]
    if out[0] == "envoy.filters.network.rbac":
        cfg = network_rbac_pb2.RBAC()
        chain.filters[0].typed_config.Unpack(cfg)
        out[0] += ".shadow" if cfg.HasField("shadow_rules") else ".enforce"
    return out


def test_tcp_uses_network_ext_authz_for_grpc_providers_and_denies_for_http_ones() -> None:
    # A rule without HTTP attributes, so that it applies to TCP too.
    assert tcp_filter_names(mesh_with("grpc-authz", operation="ports: ['5432']")) == [
        "envoy.filters.network.rbac.shadow", "envoy.filters.network.ext_authz", "envoy.filters.network.tcp_proxy"]
    # Istio asks an HTTP provider nothing about TCP connections: its rules deny them.
    assert tcp_filter_names(mesh_with("http-authz", operation="ports: ['5432']")) == [
        "envoy.filters.network.rbac.enforce", "envoy.filters.network.tcp_proxy"]


def test_withheld_custom_policy_denies_everything() -> None:
    from dataclasses import replace

    from controlplane.model.ir import AuthorizationPolicy
    from controlplane.model.store import withheld_value

    mesh = mesh_with("http-authz")
    ap = next(a for a in mesh.authorization_policies if a.provider)
    held = withheld_value(ap, None)
    assert isinstance(held, AuthorizationPolicy) and held.provider is None and held.action == "DENY"
    assert replace(held, provider="x") != held


# --------------------------------------------------------------------------- Envoy accepts it


def _envoy() -> str | None:
    here = Path(sys.executable).parent / "envoy"
    return str(here) if here.exists() else shutil.which("envoy")


@pytest.mark.parametrize("provider", ["http-authz", "grpc-authz"])
def test_envoy_validates_the_sidecar_config(provider: str) -> None:
    from controlplane.cache.resources import Resource
    from controlplane.envoycheck import EnvoyValidator

    binary = _envoy()
    if binary is None:
        pytest.skip("no envoy binary")
    mesh = mesh_with(provider, MESH_CONFIG.replace("timeout: 2s", "timeout: 2s\n    includeRequestBodyInCheck: "
                                                   "{maxRequestBytes: 4096, allowPartialMessage: true}"))
    specs = plan_proxy(mesh, SIDECAR).specs()
    assert any(s.name == "outbound|9000||ext-authz.authz.svc.cluster.local" for s in specs)
    resources = [Resource(s.type_url, s.name, s.make().SerializeToString(deterministic=True), s.sources)
                 for s in specs]
    verdict = asyncio.run(EnvoyValidator(binary).check(resources))
    assert verdict.ok is True, verdict


def test_ambient_authorizer_outside_the_sidecar_scope_is_reached_through_the_tunnel() -> None:
    """An authorizer whose pods are ambient accepts mesh traffic only over HBONE: the added
    `outbound|8000||...` cluster is the hop into the tunnel, so the tunnel's listener and
    HBONE cluster must come with it (else every check fails, and CUSTOM rules deny)."""
    extra = """---
apiVersion: v1
kind: Namespace
metadata: {name: authz, labels: {meshline.io/dataplane-mode: ambient}}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: foo}
spec: {egress: [{hosts: ["./*"]}]}
"""
    mesh = mesh_with("http-authz", extra=extra)
    specs = {(s.type_url, s.name) for s in plan_proxy(mesh, SIDECAR).specs()}
    host = "ext-authz.authz.svc.cluster.local"
    assert (CLUSTER, f"outbound|8000||{host}") in specs
    assert (LISTENER, f"tunnel|8000||{host}") in specs, sorted(n for t, n in specs if host in n)
    assert any(t == CLUSTER and n.startswith(f"hbone|8000||{host}|") for t, n in specs)
    assert not any("|9000|" in n and host in n for _, n in specs)  # only the provider's port
