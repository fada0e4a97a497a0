"""Sidecar (per-proxy config scoping): conversion with field-path errors, cross-object
validation, which Sidecar applies to a proxy, what its egress hosts let through, and that
proxies with the same effective Sidecar still share one outbound layer."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path
from typing import Any

import pytest

from controlplane.model.convert import convert
from controlplane.model.ir import EgressHost, Issue, ProxyMeta, Sidecar, SidecarEgress, labels_of
from controlplane.model.mesh import Mesh
from controlplane.model.scope import proxy_sidecar
from controlplane.model.store import assemble
from controlplane.runtime import Runtime, Settings
from controlplane.sources.directory import DirectorySource
from controlplane.sources.yamlload import parse_documents
from controlplane.translate.plan import CLUSTER, LISTENER, ROUTE, build_all
from controlplane.translate.scope import proxy_scope, scope_key
from controlplane.translate.sidecar import plan_outbound
from controlplane.xds.server import Connection
from controlplane.xds.stream import AdsStream
from tests.meshgen import service_yaml
from tests.test_convert import conv, errors, only


def sidecar(spec: str, api: str = "networking.meshline.io/v1", ns: str = "shop",
            name: str = "s") -> tuple[Any, tuple[Issue, ...]]:
    return conv(f"apiVersion: {api}\nkind: Sidecar\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n"
                + textwrap.indent(textwrap.dedent(spec), "  "))


# --------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("api", ["networking.meshline.io/v1", "networking.istio.io/v1",
                                 "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3"])
def test_sidecar_converts(api: str) -> None:
    value, issues = sidecar("""
        workloadSelector: {labels: {app: web}}
        egress:
        - port: {number: 9080, protocol: http, name: http-reviews}
          hosts: [./reviews.shop.svc.cluster.local, "*/*.Example.com"]
        - hosts: ["./*", meshline-system/*, "~/*", "./*"]
    """, api)
    assert issues == ()
    assert value == Sidecar(value.ref, "shop", "s", (("app", "web"),), (
        SidecarEgress((EgressHost(".", "reviews.shop.svc.cluster.local"), EgressHost("*", "*.example.com")),
                      9080, "HTTP", "http-reviews"),
        SidecarEgress((EgressHost(".", "*"), EgressHost("meshline-system", "*"), EgressHost("~", "*"))),
    ))


@pytest.mark.parametrize(("spec", "field", "fragment"), [
    ("egress: [{hosts: [reviews]}]", "spec.egress[0].hosts[0]", "namespace/dnsName"),
    ("egress: [{hosts: [./a/b]}]", "spec.egress[0].hosts[0]", "one '/' only"),
    ("egress: [{hosts: [Shop/*]}]", "spec.egress[0].hosts[0]", "namespace 'Shop'"),
    ("egress: [{hosts: [~/reviews.shop.svc.cluster.local]}]", "spec.egress[0].hosts[0]", "write '~/*'"),
    ("egress: [{hosts: ['*/foo.*.com']}]", "spec.egress[0].hosts[0]", "wildcard"),
    ("egress: [{hosts: ['./bad..name']}]", "spec.egress[0].hosts[0]", "not a valid host name"),
    ("egress: [{hosts: [1]}]", "spec.egress[0].hosts[0]", "expected a string"),
    ("egress: [{hosts: []}]", "spec.egress[0].hosts", "at least one host"),
    ("egress: [{port: {number: 80}}]", "spec.egress[0].hosts", "at least one host"),
    ("egress: [{hosts: [./*], hostz: [./*]}]", "spec.egress[0].hostz", "unknown field (did you mean 'hosts'?)"),
    ("egres: [{hosts: [./*]}]", "spec.egres", "unknown field (did you mean 'egress'?)"),
    ("egress: [{hosts: [./*], port: {numbr: 80}}]", "spec.egress[0].port.numbr", "unknown field"),
    ("egress: [{hosts: [./*], port: {number: 0}}]", "spec.egress[0].port.number", "between 1 and 65535"),
    ("egress: [{hosts: [./*], port: {name: http}}]", "spec.egress[0].port.number", "is required"),
    ("egress: [{hosts: [./*], port: {number: 80, protocol: QUIC}}]", "spec.egress[0].port.protocol",
     "unknown protocol"),
    ("egress: [{hosts: [./*], port: {number: 80, name: Web_1}}]", "spec.egress[0].port.name", "port name"),
    ("egress: [{hosts: [./*], port: {number: 80}}, {hosts: [./*], port: {number: 80}}]",
     "spec.egress[1].port.number", "already used by spec.egress[0]"),
    ("egress: [{hosts: [./*]}, {hosts: [./*]}]", "spec.egress[1]", "only one egress listener may omit the port"),
    ("egress: [{hosts: [./*]}, {hosts: [./*], port: {number: 80}}]", "spec.egress[0]", "must be the last one"),
    ("workloadSelector: {labels: {}}\negress: [{hosts: [./*]}]", "spec.workloadSelector.labels",
     "at least one label"),
    ("workloadSelector: {matchLabels: {app: x}}\negress: [{hosts: [./*]}]", "spec.workloadSelector.matchLabels",
     "unknown field"),
    ("{}", "spec", "empty Sidecar"),
    ("egress: {hosts: [./*]}", "spec.egress", "expected a list"),
])
def test_sidecar_errors_name_their_field(spec: str, field: str, fragment: str) -> None:
    value, issues = sidecar(spec)
    assert value is None
    only(issues, field, fragment)


def test_unsupported_parts_are_warnings_and_ignored() -> None:
    value, issues = sidecar("""
        ingress: [{port: {number: 9080, protocol: HTTP, name: http}, defaultEndpoint: "127.0.0.1:8080"}]
        outboundTrafficPolicy: {mode: REGISTRY_ONLY}
        inboundConnectionPool: {tcp: {maxConnections: 10}}
        egress:
        - port: {number: 9080, targetPort: 9090}
          bind: 127.0.0.1
          captureMode: NONE
          hosts: [./reviews]
    """)
    assert errors(issues) == []
    for field in ("spec.ingress", "spec.inboundConnectionPool", "spec.egress[0].bind",
                  "spec.egress[0].captureMode", "spec.egress[0].port.targetPort"):
        only(issues, field, "not supported yet", "warning")
    # REGISTRY_ONLY is enforced, ServiceEntry hosts included (issue 18): nothing to warn about.
    assert not [i for i in issues if i.field.startswith("spec.outboundTrafficPolicy")]
    only(issues, "spec.egress[0].hosts[0]", "not fully qualified", "warning")
    assert value.egress == (SidecarEgress((EgressHost(".", "reviews"),), 9080),)


def test_sidecar_without_egress_inherits_with_a_warning() -> None:
    value, issues = sidecar("ingress: [{port: {number: 80}}]")
    assert value is not None and value.egress == ()
    only(issues, "spec.egress", "inherit", "warning")


# --------------------------------------------------------------------------- meshes


def mesh_of(text: str) -> Mesh:
    objects, parse_errors = parse_documents(textwrap.dedent(text), "m.yaml")
    assert not parse_errors
    values = []
    for raw in objects:
        value, issues = convert(raw)
        assert not errors(issues), errors(issues)
        if value is not None:
            values.append(value)
    return assemble(values)


def svc(name: str, ns: str, port: int = 8080, port_name: str = "http") -> str:
    return service_yaml(name, ns, port, [], port_name=port_name)


def sc(name: str, ns: str, egress: str, selector: str = "") -> str:
    sel = f"  workloadSelector: {{labels: {selector}}}\n" if selector else ""
    return (f"apiVersion: networking.meshline.io/v1\nkind: Sidecar\nmetadata: {{name: {name}, namespace: {ns}}}\n"
            f"spec:\n{sel}  egress: {egress}\n")


SERVICES = "---\n".join([
    svc("web", "shop"), svc("reviews", "shop", 9080), svc("db", "shop", 5432, "tcp"),
    svc("catalog", "other"), svc("api", "ext", 8443), svc("telemetry", "meshline-system"),
])


def proxy(ns: str, labels: dict[str, str] | None = None, capture: str = "bind", node: str = "p") -> ProxyMeta:
    return ProxyMeta(node, namespace=ns, labels=labels_of(labels or {"app": "client"}),
                     capture=capture)  # type: ignore[arg-type]


def hosts(scope: frozenset[tuple[str, int]] | None) -> list[str]:
    assert scope is not None
    return sorted(f"{h.split('.svc')[0]}:{p}" for h, p in scope)


def test_selection_selector_then_namespace_default_then_mesh_default() -> None:
    m = mesh_of("---\n".join([
        SERVICES,
        sc("default", "shop", '[{hosts: ["./*"]}]'),
        sc("special", "shop", '[{hosts: ["other/*"]}]', "{app: special}"),
        sc("inherits", "shop", "[]", "{app: plain}"),
        sc("mesh", "meshline-system", '[{hosts: ["./*", "meshline-system/*"]}]'),
    ]))
    assert scope_key(m, proxy("shop")) == ("shop", "default")
    assert scope_key(m, proxy("shop", {"app": "special", "v": "1"})) == ("shop", "special")
    assert scope_key(m, proxy("shop", {"app": "plain"})) == ("shop", "default")  # no egress: inherited
    assert scope_key(m, proxy("other")) == ("meshline-system", "mesh")
    assert scope_key(m, ProxyMeta("n", mode="node", namespace="shop")) is None
    assert hosts(proxy_scope(m, proxy("shop"))) == ["db.shop:5432", "reviews.shop:9080", "web.shop:8080"]
    assert hosts(proxy_scope(m, proxy("shop", {"app": "special"}))) == ["catalog.other:8080"]
    # The mesh default's `.` is the proxy's own namespace.
    assert hosts(proxy_scope(m, proxy("other"))) == ["catalog.other:8080", "telemetry.meshline-system:8080"]


def test_unscoped_without_any_sidecar() -> None:
    m = mesh_of(SERVICES)
    assert proxy_sidecar(m, proxy("shop")) is None and proxy_scope(m, proxy("shop")) is None
    assert plan_outbound(m, "shop", "bind", scope=None) == plan_outbound(m, "shop", "bind")


@pytest.mark.parametrize(("egress", "expected"), [
    ('[{hosts: ["*/*"]}]', ["api.ext:8443", "catalog.other:8080", "db.shop:5432", "reviews.shop:9080",
                             "telemetry.meshline-system:8080", "web.shop:8080"]),
    ('[{hosts: ["~/*"]}]', []),
    ('[{hosts: ["./reviews.shop.svc.cluster.local", "other/catalog.other.svc.cluster.local"]}]',
     ["catalog.other:8080", "reviews.shop:9080"]),
    ('[{hosts: ["*/*.other.svc.cluster.local", "*/*.ext.svc.cluster.local"]}]', ["api.ext:8443", "catalog.other:8080"]),
    ('[{hosts: ["ext/*.svc.cluster.local"]}]', ["api.ext:8443"]),
    ('[{port: {number: 8080}, hosts: ["*/*"]}]', ["catalog.other:8080", "telemetry.meshline-system:8080",
                                                   "web.shop:8080"]),
    ('[{port: {number: 9080}, hosts: ["./*"]}, {hosts: ["ext/*"]}]', ["api.ext:8443", "reviews.shop:9080"]),
])
def test_egress_hosts(egress: str, expected: list[str]) -> None:
    m = mesh_of("---\n".join([SERVICES, sc("default", "shop", egress)]))
    assert hosts(proxy_scope(m, proxy("shop"))) == expected


def test_virtual_service_destinations_are_imported() -> None:
    vs = """apiVersion: networking.meshline.io/v1
kind: VirtualService
metadata: {name: web, namespace: shop}
spec:
  hosts: [web]
  http:
  - match: [{uri: {prefix: /cat}}]
    route: [{destination: {host: catalog.other.svc.cluster.local}}]
    mirror: {host: api.ext.svc.cluster.local, port: {number: 8443}}
  - route: [{destination: {host: web}}]
"""
    m = mesh_of("---\n".join([SERVICES, vs, sc("default", "shop", '[{hosts: ["./web.shop.svc.cluster.local"]}]')]))
    assert hosts(proxy_scope(m, proxy("shop"))) == ["api.ext:8443", "catalog.other:8080", "web.shop:8080"]


def test_scoped_plan_has_only_the_allowed_services() -> None:
    m = mesh_of("---\n".join([SERVICES, sc("default", "shop", '[{hosts: ["./*", "meshline-system/*"]}]')]))
    scoped = build_all(plan_outbound(m, "shop", "intercept", scope=proxy_scope(m, proxy("shop"))))
    everything = build_all(plan_outbound(m, "shop", "intercept"))
    assert sorted(scoped[CLUSTER]) == [
        "PassthroughCluster", "outbound|5432||db.shop.svc.cluster.local",
        "outbound|8080||telemetry.meshline-system.svc.cluster.local", "outbound|8080||web.shop.svc.cluster.local",
        "outbound|9080||reviews.shop.svc.cluster.local"]
    assert len(everything[CLUSTER]) == 7
    vhosts = [v.name for v in scoped[ROUTE]["8080"].virtual_hosts]  # type: ignore[attr-defined]
    assert vhosts == ["allow_any", "telemetry.meshline-system.svc.cluster.local:8080",
                      "web.shop.svc.cluster.local:8080"]
    assert "8443" not in scoped[ROUTE] and "0.0.0.0_8443" not in scoped[LISTENER]
    assert "0.0.0.0_8443" in everything[LISTENER]


# --------------------------------------------------------------------------- cross-object validation


def test_duplicate_namespace_default_is_an_error_and_the_first_wins() -> None:
    m = mesh_of("---\n".join([SERVICES, sc("a-first", "shop", '[{hosts: ["./*"]}]'),
                              sc("b-second", "shop", '[{hosts: ["*/*"]}]')]))
    (issue,) = [i for i in m.issues if i.ref.kind == "Sidecar"]
    assert (issue.ref.name, issue.severity, issue.field) == ("b-second", "error", "spec.workloadSelector")
    assert "Sidecar shop/a-first is already the default of namespace shop" in issue.message
    assert scope_key(m, proxy("shop")) == ("shop", "a-first")
    m2 = mesh_of("---\n".join([sc("x", "meshline-system", '[{hosts: ["./*"]}]'),
                               sc("y", "meshline-system", '[{hosts: ["./*"]}]')]))
    assert [(i.ref.name, i.severity) for i in m2.issues] == [("y", "error")]
    assert "default of the mesh" in m2.issues[0].message


def test_competing_selectors_and_unknown_hosts_are_warnings() -> None:
    pod = """apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web, tier: front}}
spec: {containers: [{name: app}]}
"""
    m = mesh_of("---\n".join([SERVICES, pod, sc("a", "shop", '[{hosts: ["./*"]}]', "{app: web}"),
                              sc("b", "shop", '[{hosts: ["./*"]}]', "{tier: front}"),
                              sc("c", "shop", '[{hosts: ["./nosuch.shop.svc.cluster.local"]}, ]', "{app: x}"),
                              sc("d", "shop", '[{port: {number: 1234}, hosts: ["other/catalog.other.svc.cluster.local"]}]',
                                 "{app: y}")]))
    found = sorted((i.ref.name, i.field, i.severity, i.message) for i in m.issues if i.ref.kind == "Sidecar")
    assert [f[:3] for f in found] == [("b", "spec.workloadSelector", "warning"),
                                      ("c", "spec.egress[0].hosts[0]", "warning"),
                                      ("d", "spec.egress[0].port.number", "warning")]
    assert "already selects Pod shop/web-1 (Sidecar a wins)" in found[0][3]
    assert "no Service matches ./nosuch.shop.svc.cluster.local" in found[1][3]
    assert scope_key(m, ProxyMeta("p", namespace="shop", workload="web-1")) == ("shop", "a")


# --------------------------------------------------------------------------- sharing in the runtime


def test_proxies_with_the_same_sidecar_share_one_outbound_layer(tmp_path: Path) -> None:
    (tmp_path / "mesh.yaml").write_text("---\n".join([
        SERVICES, sc("default", "shop", '[{hosts: ["./*"]}]'),
        sc("special", "shop", '[{hosts: ["other/*"]}]', "{app: special}"),
    ]))
    src = DirectorySource([tmp_path])
    rt = Runtime(Settings(config_dirs=(tmp_path,)), [src])
    asyncio.run(rt.sink([*src.initial()]))
    rt._synced.add(src.name)
    metas = [proxy("shop", {"app": "a"}, node="a"), proxy("shop", {"app": "b"}, node="b"),
             proxy("shop", {"app": "special"}, node="s"), proxy("other", {"app": "a"}, node="o1"),
             proxy("other", {"app": "b"}, node="o2")]
    for i, meta in enumerate(metas):
        rt.xds.connections[i] = Connection(meta, AdsStream("delta", i))
    rt.rebuild_now()
    snaps = {c.meta.node_id: c.stream.target for c in rt.xds.connections.values()}
    clusters = {n: s.types[CLUSTER] for n, s in snaps.items() if s is not None}
    assert clusters["a"] is clusters["b"]  # one shared layer, not two equal ones
    assert clusters["o1"] is clusters["o2"]
    assert sorted(clusters["a"].items) == [f"outbound|{p}||{h}.shop.svc.cluster.local"
                                           for p, h in ((5432, "db"), (8080, "web"), (9080, "reviews"))]
    assert sorted(clusters["s"].items) == ["outbound|8080||catalog.other.svc.cluster.local"]
    assert len(clusters["o1"].items) == 6  # unscoped: everything
    # Removing the Sidecar scopes nothing any more.
    (tmp_path / "mesh.yaml").write_text(SERVICES)
    asyncio.run(rt.sink([*src.initial()]))
    rt.rebuild_now()
    assert all(len(c.stream.target.types[CLUSTER].items) == 6 for c in rt.xds.connections.values())  # type: ignore[union-attr]
