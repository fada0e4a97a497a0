"""Per-object conversion and validation: raw Kubernetes YAML -> IR values plus issues."""

from __future__ import annotations

import copy
import textwrap
from typing import Any

import pytest
import yaml

from controlplane.model.convert import convert
from controlplane.model.convert_base import parse_duration_ms, resolve_host
from controlplane.model.convert_core import port_protocol
from controlplane.model.ir import (
    EndpointSet,
    Issue,
    Namespace,
    PortProtocol,
    Service,
    StringMatch,
    VirtualService,
    Workload,
)
from controlplane.model.raw import RawObject


def make_raw(text: str, field_lines: dict[str, int] | None = None) -> RawObject:
    return raw_of(yaml.safe_load(textwrap.dedent(text)), field_lines)


def raw_of(body: dict[str, Any], field_lines: dict[str, int] | None = None) -> RawObject:
    meta = body.get("metadata") or {}
    kind = body["kind"]
    namespace = "" if kind == "Namespace" else str(meta.get("namespace") or "default")
    return RawObject(
        kind, str(body.get("apiVersion", "")), namespace, str(meta.get("name") or ""), body, "t.yaml", 1,
        field_lines or {},
    )  # fmt: skip


def conv(text: str) -> tuple[Any, tuple[Issue, ...]]:
    return convert(make_raw(text))


def only(issues: tuple[Issue, ...], field: str, fragment: str = "", severity: str = "error") -> Issue:
    found = [i for i in issues if i.field == field and fragment in i.message and i.severity == severity]
    assert found, f"no {severity} on {field!r} containing {fragment!r} in {[i.format() for i in issues]}"
    return found[0]


def errors(issues: tuple[Issue, ...]) -> list[str]:
    return [i.format() for i in issues if i.severity == "error"]


def vs_text(spec: str, api: str = "networking.meshline.io/v1", ns: str = "default") -> str:
    return (
        f"apiVersion: {api}\nkind: VirtualService\nmetadata: {{name: reviews, namespace: {ns}}}\nspec:\n"
        + textwrap.indent(textwrap.dedent(spec), "  ")
    )


def route_text(*parts: str) -> str:
    """A VirtualService for host reviews with one http route built from `parts` (each
    dedented on its own, then joined)."""
    body = "".join(textwrap.dedent(p).lstrip("\n") for p in parts)
    return vs_text("hosts: [reviews]\nhttp:\n- " + textwrap.indent(body, "  ").lstrip())


def vs_ok(spec: str, **kw: str) -> VirtualService:
    value, issues = conv(vs_text(spec, **kw))
    assert not errors(issues), errors(issues)
    assert isinstance(value, VirtualService)
    return value


def route_ok(*parts: str) -> Any:
    value, issues = conv(route_text(*parts))
    assert not errors(issues), errors(issues)
    return value.http[0]


def route_issues(*parts: str) -> tuple[Issue, ...]:
    value, issues = conv(route_text(*parts))
    assert value is None
    return issues


DEST = "route:\n- destination: {host: reviews}\n"
ONE_ROUTE = "http:\n- route:\n  - destination: {host: reviews}\n"

# --------------------------------------------------------------------------- core kinds


def test_namespace_is_cluster_scoped_with_labels() -> None:
    value, issues = conv("""
        apiVersion: v1
        kind: Namespace
        metadata: {name: shop, labels: {meshline.io/dataplane-mode: ambient}}
    """)
    assert issues == ()
    assert value == Namespace("shop", (("meshline.io/dataplane-mode", "ambient"),))


SERVICE = """
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop, labels: {app: reviews}, annotations: {note: x}}
spec:
  clusterIP: 10.96.0.10
  selector: {app: reviews}
  ports:
  - {name: http-web, port: 9080, targetPort: 8080}
  - {name: grpc, port: 9090, targetPort: grpc-port}
  - {name: db, port: 3306, appProtocol: mysql}
  - {name: metrics, port: 9100}
  - {name: dns, port: 53, protocol: UDP}
"""


def test_service_ports_protocols_and_identity() -> None:
    value, issues = conv(SERVICE)
    assert isinstance(value, Service)
    assert value.hostname == "reviews.shop.svc.cluster.local"
    assert value.cluster_ip == "10.96.0.10"
    assert value.selector == (("app", "reviews"),)
    assert value.annotations == (("note", "x"),)
    assert [(p.port, p.target_port, p.protocol) for p in value.ports] == [
        (9080, 8080, PortProtocol.HTTP),
        (9090, "grpc-port", PortProtocol.GRPC),
        (3306, 3306, PortProtocol.TCP),
        (9100, 9100, PortProtocol.UNKNOWN),
    ]
    only(issues, "spec.ports[4]", "UDP", "warning")
    assert not errors(issues)


@pytest.mark.parametrize(
    ("name", "app", "expected"),
    [
        ("http", None, PortProtocol.HTTP),
        ("HTTP-api", None, PortProtocol.HTTP),
        ("http2-x", None, PortProtocol.HTTP2),
        ("h2c", None, PortProtocol.HTTP2),
        ("grpc-web", None, PortProtocol.GRPC),
        ("web", "grpc-web", PortProtocol.GRPC),
        ("tcp-x", None, PortProtocol.TCP),
        ("tls", None, PortProtocol.TCP),
        ("mongo-1", None, PortProtocol.TCP),
        ("redis", None, PortProtocol.TCP),
        ("web", "http", PortProtocol.HTTP),
        ("tcp", "kubernetes.io/h2c", PortProtocol.HTTP2),
        ("web", None, PortProtocol.UNKNOWN),
        ("", None, PortProtocol.UNKNOWN),
    ],
)
def test_port_protocol_follows_istio_rules(name: str, app: str | None, expected: PortProtocol) -> None:
    assert port_protocol(name, app) is expected


def test_headless_service_and_external_name() -> None:
    value, _ = conv(
        "apiVersion: v1\nkind: Service\nmetadata: {name: db}\nspec: {clusterIP: None, ports: [{port: 5432}]}"
    )
    assert value.cluster_ip is None and value.namespace == "default"
    value, issues = conv("apiVersion: v1\nkind: Service\nmetadata: {name: ext}\nspec: {type: ExternalName}")
    assert value is None
    only(issues, "spec.type", "ExternalName", "warning")
    assert not errors(issues)


def test_service_type_errors_do_not_raise() -> None:
    value, issues = conv("""
        apiVersion: v1
        kind: Service
        metadata: {name: bad}
        spec:
          ports:
          - {name: http, port: "80"}
          - {name: http, port: 70000}
          - 12
          - {port: 81}
          - {port: 81}
    """)
    assert value is None
    only(issues, "spec.ports[0].port", "expected an integer, got a string")
    only(issues, "spec.ports[1].port", "between 1 and 65535")
    only(issues, "spec.ports[2]", "expected a map")
    only(issues, "spec.ports[4].port", "duplicate port 81")


ENDPOINT_SLICE = """
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: reviews-abc, namespace: shop, labels: {kubernetes.io/service-name: reviews}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 53, protocol: UDP}]
endpoints:
- addresses: [10.0.0.1]
  targetRef: {kind: Pod, name: reviews-1, namespace: shop}
  nodeName: node-a
  zone: zone-1
- addresses: [10.0.0.2]
  conditions: {ready: false}
"""


def test_endpoint_slice() -> None:
    value, issues = conv(ENDPOINT_SLICE)
    assert issues == ()
    assert isinstance(value, EndpointSet)
    assert (value.namespace, value.service) == ("shop", "reviews")
    assert [(p.name, p.port) for p in value.ports] == [("http", 8080)]
    first, second = value.endpoints
    assert (first.address, first.ready, first.pod, first.node, first.zone) == (
        "10.0.0.1", True, "reviews-1", "node-a", "zone-1",
    )  # fmt: skip
    assert (second.address, second.ready, second.pod) == ("10.0.0.2", False, None)


def test_endpoint_slice_errors() -> None:
    text = ENDPOINT_SLICE.replace("labels: {kubernetes.io/service-name: reviews}", "labels: {}")
    value, issues = conv(text.replace("[10.0.0.2]", "[not-an-ip]"))
    assert value is None
    only(issues, "metadata.labels", "kubernetes.io/service-name")
    only(issues, "endpoints[1].addresses[0]", "not an IP address")
    value, issues = conv(ENDPOINT_SLICE.replace("IPv4", "FQDN"))
    assert value is None and not errors(issues)
    only(issues, "addressType", "FQDN", "warning")


def test_legacy_endpoints_one_set_per_subset() -> None:
    value, issues = conv("""
        apiVersion: v1
        kind: Endpoints
        metadata: {name: reviews, namespace: shop}
        subsets:
        - addresses: [{ip: 10.0.0.1, nodeName: n1, targetRef: {kind: Pod, name: reviews-1}}]
          notReadyAddresses: [{ip: 10.0.0.2}]
          ports: [{name: http, port: 8080}]
        - addresses: [{ip: 10.0.0.3}]
          ports: [{name: admin, port: 9901}]
    """)
    assert issues == ()
    assert isinstance(value, tuple) and len(value) == 2
    a, b = value
    assert all(isinstance(s, EndpointSet) and s.service == "reviews" for s in value)
    assert [(e.address, e.ready, e.pod, e.node) for e in a.endpoints] == [
        ("10.0.0.1", True, "reviews-1", "n1"),
        ("10.0.0.2", False, None, None),
    ]
    assert [p.port for p in b.ports] == [9901]


def test_pod_becomes_workload() -> None:
    value, issues = conv("""
        apiVersion: v1
        kind: Pod
        metadata: {name: reviews-1, namespace: shop, labels: {app: reviews, version: v1}}
        spec:
          serviceAccountName: bookinfo-reviews
          nodeName: node-a
          containers:
          - name: app
            ports: [{name: http, containerPort: 9080}, {containerPort: 53, protocol: UDP}]
          - name: side
            ports: [{containerPort: 15000}]
        status: {podIP: 10.0.0.1, phase: Running}
    """)
    assert issues == ()
    assert isinstance(value, Workload)
    assert (value.ip, value.service_account, value.node) == ("10.0.0.1", "bookinfo-reviews", "node-a")
    assert value.labels == (("app", "reviews"), ("version", "v1"))
    assert [(p.name, p.port) for p in value.ports] == [("http", 9080), ("", 15000)]


def test_pod_defaults_and_bad_label_type() -> None:
    value, _ = conv("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: []}")
    assert (value.namespace, value.service_account, value.ip) == ("default", "default", None)
    value, issues = conv("apiVersion: v1\nkind: Pod\nmetadata: {name: p, labels: {version: 1}}\nspec: {}")
    assert value is None
    only(issues, "metadata.labels.version", "expected a string value")


def test_metadata_and_api_version_errors() -> None:
    value, issues = conv("apiVersion: v1\nkind: Service\nmetadata: {namespace: x}\nspec: {}")
    assert value is None
    only(issues, "metadata.name", "required")
    value, issues = conv("apiVersion: apps/v1\nkind: Pod\nmetadata: {name: p}\nspec: {}")
    assert value is None
    only(issues, "apiVersion", "unsupported apiVersion 'apps/v1'")
    value, issues = conv(ENDPOINT_SLICE.replace("discovery.k8s.io/v1", "discovery.k8s.io/v1beta1"))
    assert value is None
    only(issues, "apiVersion", "discovery.k8s.io/v1")


def test_other_kinds_are_ignored_and_mesh_kinds_warned() -> None:
    assert conv("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec: {}") == (None, ())
    value, issues = conv(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata: {name: s}\nspec: {}"
    )
    assert value is None
    only(issues, "kind", "WorkloadGroup", "warning")


# --------------------------------------------------------------------------- VirtualService basics


@pytest.mark.parametrize(
    "api",
    [
        "networking.meshline.io/v1",
        "networking.istio.io/v1",
        "networking.istio.io/v1beta1",
        "networking.istio.io/v1alpha3",
    ],
)
def test_virtual_service_api_versions(api: str) -> None:
    vs = vs_ok("hosts: [reviews]\n" + ONE_ROUTE, api=api)
    assert vs.hosts == ("reviews.default.svc.cluster.local",)


def test_virtual_service_bad_api_version() -> None:
    value, issues = conv(vs_text("hosts: [reviews]\n" + ONE_ROUTE, api="networking.istio.io/v2"))
    assert value is None
    only(issues, "apiVersion", "networking.istio.io/v2")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("reviews", "reviews.shop.svc.cluster.local"),
        ("reviews.other", "reviews.other.svc.cluster.local"),
        ("reviews.other.svc", "reviews.other.svc.cluster.local"),
        ("reviews.other.svc.cluster.local", "reviews.other.svc.cluster.local"),
        ("api.example.co.uk", "api.example.co.uk"),
        ("Reviews.", "reviews.shop.svc.cluster.local"),
    ],
)
def test_host_resolution(name: str, expected: str) -> None:
    assert resolve_host(name, "shop") == expected


def test_hosts_wildcards_gateways_and_export() -> None:
    value, issues = conv(
        vs_text(
            """
            hosts: [reviews, "*.example.com", reviews.other, reviews.shop.svc]
            gateways: [mesh, shop/ingress]
            exportTo: [".", other]
            http:
            - route:
              - destination: {host: ratings.other}
            """,
            ns="shop",
        )
    )
    assert not errors(issues)
    assert value.hosts == ("reviews.shop.svc.cluster.local", "reviews.other.svc.cluster.local")
    assert value.export_to == (".", "other")
    assert value.http[0].route[0].destination.host == "ratings.other.svc.cluster.local"
    only(issues, "spec.hosts[1]", "wildcard", "warning")
    only(issues, "spec.hosts[3]", "duplicate", "warning")
    # Bound to mesh and to Gateway shop/ingress; the wildcard host is kept for the gateway.
    assert value.gateways == ("mesh", "shop/ingress")
    assert value.host_patterns == ("reviews.shop.svc.cluster.local", "*.example.com",
                                   "reviews.other.svc.cluster.local", "reviews.other")


def test_gateway_only_virtual_service_keeps_its_binding() -> None:
    """A VirtualService bound only to a Gateway converts (for that gateway; the store keeps it
    away from sidecars: tests/test_gateway.py). `name` alone is in the VS's namespace, the
    legacy FQDN form is ns/name."""
    value, issues = conv(vs_text("hosts: ['*']\ngateways: [ingress, edge.infra.svc.cluster.local]\n" + ONE_ROUTE))
    assert not issues
    assert value.gateways == ("default/ingress", "infra/edge") and value.host_patterns == ("*",)
    value, issues = conv(vs_text("hosts: [reviews]\ngateways: ['a/b/c']\n" + ONE_ROUTE))
    only(issues, "spec.gateways[0]", "not 'mesh'")


def test_missing_hosts_and_routes() -> None:
    value, issues = conv(vs_text("exportTo: ['*']"))
    assert value is None
    only(issues, "spec.hosts", "at least one host")
    only(issues, "spec", "at least one http, tcp or tls route")


def test_tls_routes_warn() -> None:
    """tls routes are for gateways (PASSTHROUGH servers: tests/test_gateway.py); on a
    VirtualService bound to mesh they are warned about, and a route needs a destination."""
    value, issues = conv(vs_text("hosts: [reviews]\ntls:\n- match: [{sniHosts: [reviews]}]\n"
                                 "  route: [{destination: {host: reviews}}]\n" + ONE_ROUTE))
    assert value is not None and value.tls[0].matches[0].sni_hosts == ("reviews",)
    only(issues, "spec.tls", "sidecars and waypoints ignore them", "warning")
    value, issues = conv(vs_text("hosts: [reviews]\ntls:\n- match: [{sniHosts: [reviews]}]\n" + ONE_ROUTE))
    only(issues, "spec.tls[0].route", "at least one destination")


# --------------------------------------------------------------------------- http matches


def test_http_match_every_field() -> None:
    route = route_ok(
        """
        match:
        - name: m1
          uri: {prefix: /api}
          ignoreUriCase: true
          scheme: {exact: https}
          method: {regex: "GET|HEAD"}
          authority: {prefix: reviews}
          headers: {End-User: {exact: jason}, x-present: {}}
          withoutHeaders: {x-skip: {}}
          queryParams: {debug: {exact: "1"}, Trace: {regex: "[0-9]+"}}
          port: 9080
          sourceLabels: {app: productpage}
          sourceNamespace: shop
          gateways: [mesh]
        - uri: {exact: /health}
        """,
        DEST,
    )
    m, second = route.matches
    assert (m.name, m.uri, m.ignore_uri_case, m.port) == ("m1", StringMatch("prefix", "/api"), True, 9080)
    assert m.scheme == StringMatch("exact", "https")
    assert m.method == StringMatch("regex", "GET|HEAD")
    assert m.authority == StringMatch("prefix", "reviews")
    assert [(h.name, h.match) for h in m.headers] == [
        ("end-user", StringMatch("exact", "jason")),
        ("x-present", None),
    ]
    assert [(h.name, h.match) for h in m.without_headers] == [("x-skip", None)]
    assert [(q.name, q.match) for q in m.query_params] == [
        ("Trace", StringMatch("regex", "[0-9]+")),
        ("debug", StringMatch("exact", "1")),
    ]
    assert m.source_labels == (("app", "productpage"),)
    assert m.source_namespace == "shop"
    assert second.uri == StringMatch("exact", "/health")


def test_string_match_errors() -> None:
    issues = route_issues(
        """
        match:
        - uri: {}
        - uri: {exact: /a, prefix: /b}
        - uri: {prefixx: /a}
        - method: GET
        - gateways: []
        """,
        DEST,
    )
    only(issues, "spec.http[0].match[0].uri", "one of exact, prefix or regex")
    only(issues, "spec.http[0].match[1].uri", "only one of")
    only(issues, "spec.http[0].match[2].uri.prefixx", "unknown field (did you mean 'prefix'?)")
    only(issues, "spec.http[0].match[3].method", "expected a map, got a string")
    only(issues, "spec.http[0].match[4].gateways", "must not be empty")


@pytest.mark.parametrize(
    ("where", "regex", "reason"),
    [
        ("match:\n- uri: {regex: '/api/(v1|v2'}\n", "uri.regex", "missing )"),
        ("match:\n- headers: {x-id: {regex: '(?=a)b'}}\n", "headers.x-id.regex", "invalid perl operator"),
        (
            "match:\n- queryParams: {q: {regex: 'a{1001}'}}\n",
            "queryParams.q.regex",
            "invalid repetition size",
        ),
        ("match:\n- authority: {regex: '[z-a]'}\n", "authority.regex", "invalid character class range"),
        ("match:\n- method: {regex: '(a'}\n", "method.regex", "missing )"),
    ],
)
def test_invalid_regexes_report_the_re2_reason(where: str, regex: str, reason: str) -> None:
    issues = route_issues(where + DEST)
    issue = only(issues, f"spec.http[0].match[0].{regex}", reason)
    assert "invalid regex" in issue.message


def test_regex_too_complex_for_envoy() -> None:
    issues = route_issues("match:\n- uri: {regex: '(abc|def|ghi){1,20}'}\n" + DEST)
    only(issues, "spec.http[0].match[0].uri.regex", "program size")


def test_cors_and_rewrite_regexes_are_checked() -> None:
    issues = route_issues(
        "corsPolicy: {allowOrigins: [{regex: '(x'}]}\nrewrite: {uriRegexRewrite: {match: '[', rewrite: /}}\n"
        + DEST
    )
    only(issues, "spec.http[0].corsPolicy.allowOrigins[0].regex", "missing )")
    only(issues, "spec.http[0].rewrite.uriRegexRewrite.match", "missing ]")


# --------------------------------------------------------------------------- destinations and weights


def test_weights() -> None:
    single = route_ok("route:\n- destination: {host: reviews, subset: v1, port: {number: 9080}}\n")
    (rd,) = single.route
    assert (rd.weight, rd.destination.subset, rd.destination.port) == (100, "v1", 9080)
    split = route_ok(
        "route:\n- destination: {host: reviews, subset: v1}\n  weight: 80\n- destination: {host: reviews, subset: v2}\n"
    )
    assert [r.weight for r in split.route] == [80, 0]


@pytest.mark.parametrize(
    ("route", "field", "fragment"),
    [
        (
            "- destination: {host: a}\n  weight: 0\n- destination: {host: b}\n",
            "spec.http[0].route",
            "all weights are 0",
        ),
        ("- destination: {host: a}\n  weight: 0\n", "spec.http[0].route", "all weights are 0"),
        ("- destination: {host: a}\n  weight: -5\n", "spec.http[0].route[0].weight", "negative"),
        ("- destination: {host: a}\n  weight: '50'\n", "spec.http[0].route[0].weight", "expected an integer"),
        ("- destination: {host: '*.a.com'}\n", "spec.http[0].route[0].destination.host", "wildcard"),
        ("- weight: 100\n", "spec.http[0].route[0].destination", "required"),
        (
            "- destination: {host: a, port: 9080}\n",
            "spec.http[0].route[0].destination.port",
            "expected a map",
        ),
        (
            "- destination: {host: a, port: {number: 0}}\n",
            "spec.http[0].route[0].destination.port.number",
            "between",
        ),
    ],
)
def test_route_errors(route: str, field: str, fragment: str) -> None:
    only(route_issues("route:\n" + route), field, fragment)


def test_route_needs_exactly_one_action() -> None:
    only(route_issues("name: nothing\n"), "spec.http[0]", "needs one of route, redirect or directResponse")
    issues = route_issues(DEST + "redirect: {uri: /x}\n")
    only(issues, "spec.http[0]", "only one of route, redirect or directResponse")
    only(route_issues("delegate: {name: x}\n"), "spec.http[0].delegate", "not supported")


def test_redirect_direct_response_and_rewrite() -> None:
    r = route_ok("redirect: {uri: /new, authority: other, port: 8443, scheme: https, redirectCode: 308}\n")
    assert (r.redirect.uri, r.redirect.authority, r.redirect.port, r.redirect.scheme) == (
        "/new",
        "other",
        8443,
        "https",
    )
    assert r.redirect.redirect_code == 308
    assert route_ok("redirect: {uri: /new}\n").redirect.redirect_code == 301
    d = route_ok("directResponse: {status: 503, body: {string: unavailable}}\n").direct_response
    assert (d.status, d.body) == (503, "unavailable")
    assert (
        route_ok("directResponse: {status: 200, body: {bytes: aGVsbG8=}}\n").direct_response.body == "hello"
    )
    rw = route_ok("rewrite: {uri: /v2, authority: new-host}\n" + DEST).rewrite
    assert (rw.uri, rw.authority, rw.uri_regex) == ("/v2", "new-host", None)
    rw = route_ok("rewrite: {uriRegexRewrite: {match: '^/v1/(.*)$', rewrite: '/v2/\\1'}}\n" + DEST).rewrite
    assert rw.uri_regex == ("^/v1/(.*)$", "/v2/\\1")


@pytest.mark.parametrize(
    ("body", "field", "fragment"),
    [
        ("redirect: {uri: /x, redirectCode: 305}\n", "spec.http[0].redirect.redirectCode", "301, 302, 303, 307, 308"),
        ("directResponse: {status: 99}\n", "spec.http[0].directResponse.status", "between 200 and 599"),
        ("directResponse: {body: {string: x}}\n", "spec.http[0].directResponse.status", "required"),
        ("rewrite: {uri: /a, uriRegexRewrite: {match: a, rewrite: b}}\n" + DEST, "spec.http[0].rewrite.uriRegexRewrite", "not both"),
        ("redirect: {uri: /x}\nrewrite: {uri: /y}\n", "spec.http[0].rewrite", "cannot be combined"),
    ],
)  # fmt: skip
def test_action_errors(body: str, field: str, fragment: str) -> None:
    only(route_issues(body), field, fragment)


# --------------------------------------------------------------------------- durations, retries, faults


@pytest.mark.parametrize(
    ("text", "ms"),
    [("1.5s", 1500), ("100ms", 100), ("1m30s", 90_000), ("2h", 7_200_000), ("500us", 1), ("0", 0), ("0s", 0),
     ("1h2m3.5s", 3_723_500), ("250000ns", 1), (".5s", 500), ("3s", 3000)],
)  # fmt: skip
def test_parse_duration(text: str, ms: int) -> None:
    assert parse_duration_ms(text) == ms


@pytest.mark.parametrize("text", ["1.5", "-1s", "1d", "", "s", "1 s", "10sec", "1.2.3s"])
def test_parse_duration_rejects(text: str) -> None:
    assert isinstance(parse_duration_ms(text), str)


def test_bad_durations_name_the_field() -> None:
    issues = route_issues("timeout: 10x\nretries: {attempts: 2, perTryTimeout: 5}\n" + DEST)
    only(issues, "spec.http[0].timeout", "invalid duration '10x'")
    only(issues, "spec.http[0].retries.perTryTimeout", "expected a duration string")
    assert route_ok("timeout: 1m30s\n" + DEST).timeout_ms == 90_000


def test_retries() -> None:
    r = route_ok(
        "retries: {attempts: 3, perTryTimeout: 2s, retryOn: '5xx, 503,connect-failure,504', retryRemoteLocalities: true}\n"
        + DEST
    ).retries
    assert (r.attempts, r.per_try_timeout_ms, r.retry_remote_localities) == (3, 2000, True)
    assert r.retry_on == ("5xx", "connect-failure", "retriable-status-codes")
    assert r.retriable_status_codes == (503, 504)
    default = route_ok("retries: {attempts: 2}\n" + DEST).retries
    assert "connect-failure" in default.retry_on and default.retriable_status_codes == (503,)
    assert route_ok("retries: {attempts: 0}\n" + DEST).retries.attempts == 0


def test_retry_errors() -> None:
    issues = route_issues("retries: {attemps: 3, retryOn: '5xx,bogus', attempts: -1}\n" + DEST)
    only(issues, "spec.http[0].retries.attemps", "unknown field (did you mean 'attempts'?)")
    only(issues, "spec.http[0].retries.retryOn", "unknown retry condition 'bogus'")
    only(issues, "spec.http[0].retries.attempts", "at least 0")
    only(route_issues("retries: [attempts]\n" + DEST), "spec.http[0].retries", "expected a map, got a list")


def test_fault() -> None:
    f = route_ok(
        "fault:\n  delay: {fixedDelay: 5s, percentage: {value: 12.5}}\n  abort: {grpcStatus: UNAVAILABLE}\n"
        + DEST
    ).fault
    assert (f.delay.fixed_delay_ms, f.delay.percentage) == (5000, 12.5)
    assert (f.abort.grpc_status, f.abort.http_status, f.abort.percentage) == (14, None, 100.0)
    f = route_ok(
        "fault:\n  delay: {fixedDelay: 1s, percent: 30}\n  abort: {httpStatus: 503, percentage: {value: 1}}\n"
        + DEST
    ).fault
    assert (f.delay.percentage, f.abort.http_status, f.abort.percentage) == (30.0, 503, 1.0)


@pytest.mark.parametrize(
    ("fault", "field", "fragment"),
    [
        ("{abort: {httpStatus: 600}}", "spec.http[0].fault.abort.httpStatus", "between 200 and 599"),
        ("{abort: {grpcStatus: NOPE}}", "spec.http[0].fault.abort.grpcStatus", "unknown gRPC status"),
        ("{abort: {percentage: {value: 5}}}", "spec.http[0].fault.abort", "httpStatus or grpcStatus"),
        (
            "{abort: {httpStatus: 503, percentage: {value: 150}}}",
            "spec.http[0].fault.abort.percentage.value",
            "between",
        ),
        ("{delay: {percentage: {value: 5}}}", "spec.http[0].fault.delay.fixedDelay", "required"),
        ("{delay: {fixedDelay: soon}}", "spec.http[0].fault.delay.fixedDelay", "invalid duration"),
        ("{}", "spec.http[0].fault", "delay or an abort"),
    ],
)
def test_fault_errors(fault: str, field: str, fragment: str) -> None:
    only(route_issues(f"fault: {fault}\n" + DEST), field, fragment)


# --------------------------------------------------------------------------- mirrors, headers, CORS


def test_mirrors() -> None:
    r = route_ok("mirror: {host: shadow, subset: v1}\nmirrorPercentage: {value: 5}\n" + DEST)
    (m,) = r.mirrors
    assert (m.destination.host, m.destination.subset, m.percentage) == (
        "shadow.default.svc.cluster.local",
        "v1",
        5.0,
    )
    r = route_ok(
        "mirrors:\n- destination: {host: a}\n  percentage: {value: 50}\n- destination: {host: b}\n" + DEST
    )
    assert [(m.destination.host.split(".")[0], m.percentage) for m in r.mirrors] == [("a", 50.0), ("b", None)]
    issues = route_issues("mirror: {host: a}\nmirrors: [{destination: {host: b}}]\n" + DEST)
    only(issues, "spec.http[0].mirrors", "not both")


def test_headers() -> None:
    r = route_ok(
        """
        headers:
          request: {set: {X-Route: a}, add: {x-seen: "1"}, remove: [X-Internal]}
          response: {remove: [server]}
        route:
        - destination: {host: reviews}
          headers: {response: {set: {x-served-by: v1}}}
        """
    )
    assert r.headers.request.set == (("x-route", "a"),)
    assert r.headers.request.add == (("x-seen", "1"),)
    assert r.headers.request.remove == ("x-internal",)
    assert r.headers.response.remove == ("server",)
    assert r.route[0].headers.response.set == (("x-served-by", "v1"),)
    issues = route_issues("headers: {request: {set: {host: x, ':path': /y, ok: 5}, sett: {}}}\n" + DEST)
    only(issues, "spec.http[0].headers.request.set.host", "does not allow")
    only(issues, "spec.http[0].headers.request.set.:path", "pseudo-header")
    only(issues, "spec.http[0].headers.request.set.ok", "expected a string value")
    only(issues, "spec.http[0].headers.request.sett", "unknown field")


def test_cors_policy() -> None:
    c = route_ok(
        """
        corsPolicy:
          allowOrigins: [{exact: "https://a.com"}, {regex: "https://.*\\\\.b\\\\.com"}]
          allowMethods: [GET, POST]
          allowHeaders: [authorization]
          exposeHeaders: [x-trace]
          maxAge: 24h
          allowCredentials: true
        """,
        DEST,
    ).cors
    assert c.allow_origins == (
        StringMatch("exact", "https://a.com"),
        StringMatch("regex", "https://.*\\.b\\.com"),
    )
    assert (c.allow_methods, c.allow_headers, c.expose_headers) == (
        ("GET", "POST"),
        ("authorization",),
        ("x-trace",),
    )
    assert (c.max_age_s, c.allow_credentials) == (86400, True)
    only(
        route_issues("corsPolicy: {allowMethods: GET}\n" + DEST),
        "spec.http[0].corsPolicy.allowMethods",
        "list",
    )


# --------------------------------------------------------------------------- tcp and generic errors


def test_tcp_routes() -> None:
    vs = vs_ok(
        """
        hosts: [mysql]
        tcp:
        - match: [{port: 3306, destinationSubnets: [10.0.0.0/8, 10.1.2.3], sourceLabels: {app: web}, sourceNamespace: shop}]
          route:
          - destination: {host: mysql, subset: v1}
            weight: 90
          - destination: {host: mysql, subset: v2}
            weight: 10
        """
    )
    (t,) = vs.tcp
    (m,) = t.matches
    assert (m.port, m.destination_subnets, m.source_labels) == (
        3306,
        ("10.0.0.0/8", "10.1.2.3/32"),
        (("app", "web"),),
    )
    assert m.source_namespace == "shop"
    assert [(r.destination.subset, r.weight) for r in t.route] == [("v1", 90), ("v2", 10)]
    _, issues = conv(vs_text("hosts: [mysql]\ntcp:\n- match: [{destinationSubnets: [nope]}]\n  route: []"))
    only(issues, "spec.tcp[0].match[0].destinationSubnets[0]", "CIDR")
    only(issues, "spec.tcp[0].route", "at least one destination")


def test_unknown_fields_everywhere() -> None:
    text = vs_text("hosts: [reviews]\nhttpp: []\n" + ONE_ROUTE + "    extra: 1\n") + "statuz: {}\n"
    value, issues = conv(text)
    assert value is None
    only(issues, "spec.httpp", "unknown field (did you mean 'http'?)")
    only(issues, "spec.http[0].route[0].extra", "unknown field")
    only(issues, "statuz", "unknown field (did you mean 'status'?)")


@pytest.mark.parametrize(
    ("spec", "field", "fragment"),
    [
        ("hosts: reviews\nhttp: []", "spec.hosts", "expected a list, got a string"),
        ("hosts: [reviews]\nhttp: {route: []}", "spec.http", "expected a list, got a map"),
        ("hosts: [reviews]\nhttp: [[1]]", "spec.http[0]", "expected a map, got a list"),
        ("hosts: [7]\nhttp: []", "spec.hosts[0]", "expected a string"),
        ("hosts: [reviews]\n" + ONE_ROUTE + "  match: {uri: {exact: /}}", "spec.http[0].match", "expected a list"),
        ("hosts: ['bad host!']\nhttp: []", "spec.hosts[0]", "not a valid host name"),
    ],
)  # fmt: skip
def test_type_errors(spec: str, field: str, fragment: str) -> None:
    value, issues = conv(vs_text(spec))
    assert value is None
    only(issues, field, fragment)


def test_issue_lines_come_from_field_lines() -> None:
    raw = make_raw(
        route_text("timeout: nope\n" + DEST), {"spec": 4, "spec.http[0]": 6, "spec.http[0].timeout": 7}
    )
    _, issues = convert(raw)
    issue = only(issues, "spec.http[0].timeout", "invalid duration")
    assert issue.line == 7
    assert issue.ref.kind == "VirtualService" and issue.ref.file == "t.yaml"
    assert issue.format().startswith("t.yaml:7: VirtualService/default/reviews: spec.http[0].timeout:")


# --------------------------------------------------------------------------- robustness

FULL_VS = route_text(
    """
    match:
    - uri: {prefix: /a}
      headers: {x: {exact: y}}
      queryParams: {q: {}}
      sourceLabels: {app: a}
      port: 80
    route:
    - destination: {host: reviews, subset: v1, port: {number: 9080}}
      weight: 50
      headers: {request: {set: {a: b}}}
    - destination: {host: reviews, subset: v2}
      weight: 50
    retries: {attempts: 1, perTryTimeout: 1s, retryOn: 5xx}
    fault: {delay: {fixedDelay: 1s, percentage: {value: 1}}, abort: {httpStatus: 500}}
    mirror: {host: shadow}
    mirrorPercentage: {value: 1}
    corsPolicy: {allowOrigins: [{exact: x}], maxAge: 1s}
    headers: {response: {remove: [a]}}
    timeout: 1s
    rewrite: {uri: /b}
    """
)


def _paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(node, dict):
        for k, v in node.items():
            out.extend(_paths(v, (*path, k)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.extend(_paths(v, (*path, i)))
    return out


FULL_DR = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {consistentHash: {httpCookie: {name: a, ttl: 1s}, ringHash: {minimumRingSize: 8}}}
    connectionPool: {tcp: {maxConnections: 1, connectTimeout: 1s}, http: {idleTimeout: 1s, maxRetries: 1}}
    outlierDetection: {interval: 1s, maxEjectionPercent: 1, splitExternalLocalOriginErrors: true}
    tls: {mode: SIMPLE, subjectAltNames: [a]}
    portLevelSettings: [{port: {number: 80}, loadBalancer: {simple: RANDOM}}]
  subsets: [{name: v1, labels: {version: v1}, trafficPolicy: {loadBalancer: {simple: RANDOM}}}]
"""


@pytest.mark.parametrize("junk", [None, 7, -1, 2.5, "x", True, [], [1, "a"], {}, {"q": []}, float("nan")])
@pytest.mark.parametrize("doc", [FULL_VS, FULL_DR])
def test_garbage_anywhere_never_raises(doc: str, junk: Any) -> None:
    body = yaml.safe_load(doc)
    value, issues = convert(make_raw(doc))
    assert value is not None and not errors(issues), errors(issues)
    for path in _paths(body["spec"]):
        mutated = copy.deepcopy(body)
        node = mutated["spec"]
        for key in path[:-1]:
            node = node[key]
        if path:
            node[path[-1]] = junk
        else:
            mutated["spec"] = junk
        raw = RawObject(body["kind"], mutated["apiVersion"], "default", "reviews", mutated)
        _, issues = convert(raw)
        assert not any("internal error" in i.message for i in issues), (path, [i.format() for i in issues])


# --------------------------------------------------------------------------- DestinationRule


def dr_text(spec: str, api: str = "networking.istio.io/v1beta1") -> str:
    return (
        f"apiVersion: {api}\nkind: DestinationRule\nmetadata: {{name: reviews, namespace: shop}}\nspec:\n"
        + textwrap.indent(textwrap.dedent(spec).lstrip("\n"), "  ")
    )


def dr_ok(spec: str) -> Any:
    value, issues = conv(dr_text(spec))
    assert not errors(issues), errors(issues)
    return value


def dr_issues(spec: str) -> tuple[Issue, ...]:
    value, issues = conv(dr_text(spec))
    assert value is None
    return issues


def test_destination_rule_every_field() -> None:
    dr = dr_ok("""
        host: reviews
        exportTo: ["."]
        trafficPolicy:
          loadBalancer: {simple: LEAST_CONN}
          connectionPool:
            tcp: {maxConnections: 100, connectTimeout: 30ms}
            http: {http1MaxPendingRequests: 10, http2MaxRequests: 1000, maxRequestsPerConnection: 5,
                   maxRetries: 3, idleTimeout: 1h, maxConcurrentStreams: 64}
          outlierDetection: {consecutive5xxErrors: 5, consecutiveGatewayErrors: 3, consecutiveLocalOriginFailures: 2,
                             splitExternalLocalOriginErrors: true, interval: 10s, baseEjectionTime: 30s,
                             maxEjectionPercent: 50, minHealthPercent: 20}
          tls: {mode: SIMPLE, sni: reviews.example.com, subjectAltNames: [spiffe://a/b]}
          portLevelSettings:
          - port: {number: 9443}
            tls: {mode: ISTIO_MUTUAL}
          - port: {number: 9080}
            loadBalancer: {simple: RANDOM}
        subsets:
        - name: v1
          labels: {version: v1}
        - name: v2
          labels: {version: v2}
          trafficPolicy:
            loadBalancer:
              consistentHash: {httpCookie: {name: session, path: /, ttl: 60s}, ringHash: {minimumRingSize: 1024}}
    """)
    assert dr.host == "reviews.shop.svc.cluster.local" and dr.export_to == (".",)
    tp = dr.traffic_policy
    assert tp.load_balancer.simple == "LEAST_REQUEST"
    cp = tp.connection_pool
    assert (cp.max_connections, cp.connect_timeout_ms, cp.http1_max_pending_requests, cp.http2_max_requests) == (
        100, 30, 10, 1000,
    )  # fmt: skip
    assert (cp.max_requests_per_connection, cp.max_retries, cp.idle_timeout_ms, cp.max_concurrent_streams) == (
        5, 3, 3_600_000, 64,
    )  # fmt: skip
    od = tp.outlier_detection
    assert (
        od.consecutive_5xx_errors,
        od.consecutive_gateway_errors,
        od.consecutive_local_origin_failures,
    ) == (5, 3, 2)
    assert (od.split_external_local_origin_errors, od.interval_ms, od.base_ejection_time_ms) == (
        True,
        10_000,
        30_000,
    )
    assert (od.max_ejection_percent, od.min_health_percent) == (50, 20)
    assert (tp.tls.mode, tp.tls.sni, tp.tls.subject_alt_names) == (
        "SIMPLE",
        "reviews.example.com",
        ("spiffe://a/b",),
    )
    assert [(p.port, p.tls.mode if p.tls else None) for p in tp.port_level] == [
        (9080, None),
        (9443, "ISTIO_MUTUAL"),
    ]
    assert tp.port_level[0].load_balancer.simple == "RANDOM"
    v1, v2 = dr.subsets
    assert (v1.name, v1.labels, v1.traffic_policy) == ("v1", (("version", "v1"),), None)
    ch = v2.traffic_policy.load_balancer.consistent_hash
    assert (ch.http_cookie_name, ch.http_cookie_path, ch.http_cookie_ttl_ms, ch.minimum_ring_size) == (
        "session", "/", 60_000, 1024,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("hash_spec", "expected"),
    [
        ("{httpHeaderName: x-user}", {"http_header_name": "x-user"}),
        ("{useSourceIp: true, minimumRingSize: 2048}", {"use_source_ip": True, "minimum_ring_size": 2048}),
        ("{httpQueryParameterName: user}", {"http_query_parameter_name": "user"}),
        ("{httpHeaderName: x, maglev: {tableSize: 65537}}", {"maglev": True, "maglev_table_size": 65537}),
        ("{httpHeaderName: x, maglev: {}}", {"maglev": True, "maglev_table_size": None}),
    ],
)
def test_consistent_hash_variants(hash_spec: str, expected: dict[str, Any]) -> None:
    ch = dr_ok(
        f"host: reviews\ntrafficPolicy: {{loadBalancer: {{consistentHash: {hash_spec}}}}}"
    ).traffic_policy
    for attr, value in expected.items():
        assert getattr(ch.load_balancer.consistent_hash, attr) == value


@pytest.mark.parametrize(
    ("policy", "field", "fragment"),
    [
        ("loadBalancer: {simple: FASTEST}", "loadBalancer.simple", "unknown value 'FASTEST'"),
        ("loadBalancer: {simple: RANDOM, consistentHash: {useSourceIp: true}}", "loadBalancer", "not both"),
        ("loadBalancer: {consistentHash: {}}", "loadBalancer.consistentHash", "is required"),
        ("loadBalancer: {consistentHash: {httpHeaderName: a, useSourceIp: true}}", "loadBalancer.consistentHash", "only one"),
        ("loadBalancer: {consistentHash: {httpHeaderName: a, maglev: {tableSize: 1000}}}",
         "loadBalancer.consistentHash.maglev.tableSize", "prime"),
        ("loadBalancer: {consistentHash: {httpHeaderName: a, ringHash: {}, maglev: {}}}",
         "loadBalancer.consistentHash.maglev", "not both"),
        ("loadBalancer: {consistentHash: {httpCookie: {path: /}}}", "loadBalancer.consistentHash.httpCookie.name", "required"),
        ("connectionPool: {tcp: {maxConnections: lots}}", "connectionPool.tcp.maxConnections", "expected an integer"),
        ("connectionPool: {tcp: {connectTimeout: 0s}}", "connectionPool.tcp.connectTimeout", "at least 1ms"),
        ("connectionPool: {http: {idleTimeout: 5 minutes}}", "connectionPool.http.idleTimeout", "invalid duration"),
        ("outlierDetection: {maxEjectionPercent: 101}", "outlierDetection.maxEjectionPercent", "between 0 and 100"),
        ("outlierDetection: {interval: 1}", "outlierDetection.interval", "duration string"),
        ("outlierDetection: {consecutive5xxErrorz: 1}", "outlierDetection.consecutive5xxErrorz", "did you mean"),
        ("tls: {mode: STRICT}", "tls.mode", "unknown TLS mode"),
        ("portLevelSettings: [{loadBalancer: {simple: RANDOM}}]", "portLevelSettings[0].port", "required"),
        ("portLevelSettings: [{port: {number: 80}}, {port: {number: 80}}]", "portLevelSettings[1].port", "duplicate port 80"),
        ("portLevelSettings: [{port: {number: 99999}}]", "portLevelSettings[0].port.number", "between 1 and 65535"),
        ("loadBalancr: {simple: RANDOM}", "loadBalancr", "did you mean 'loadBalancer'"),
    ],
)  # fmt: skip
def test_traffic_policy_errors(policy: str, field: str, fragment: str) -> None:
    issues = dr_issues(f"host: reviews\ntrafficPolicy: {{{policy}}}")
    only(issues, f"spec.trafficPolicy.{field}", fragment)


def test_accepted_but_ignored_fields_warn() -> None:
    value, issues = conv(
        dr_text("""
            host: reviews
            workloadSelector: {matchLabels: {app: a}}
            trafficPolicy:
              tls: {mode: MUTUAL, credentialName: cert}
              loadBalancer: {simple: ROUND_ROBIN, localityLbSetting: {enabled: true}}
              connectionPool: {tcp: {tcpKeepalive: {time: 1s}}}
        """)
    )
    assert value is not None and not errors(issues)
    assert value.workload_selector == (("app", "a"),)  # translated now (issue 16): no warning
    assert not [i for i in issues if i.field.startswith("spec.workloadSelector")]
    # MUTUAL credentials and localityLbSetting are translated now (issue 16): no warning
    assert not [i for i in issues if i.field.startswith(("spec.trafficPolicy.tls", "spec.trafficPolicy.loadBalancer"))]
    only(issues, "spec.trafficPolicy.connectionPool.tcp.tcpKeepalive", "not supported", "warning")


def test_subset_errors_and_host_rules() -> None:
    issues = dr_issues("""
        host: reviews.other
        subsets:
        - {name: v1, labels: {version: v1}}
        - {name: v1, labels: {version: v2}}
        - {labels: {version: v3}}
        - {name: V_4}
        - {name: v5, labels: {version: 5}}
    """)
    only(issues, "spec.subsets[1].name", "duplicate subset name 'v1'")
    only(issues, "spec.subsets[2].name", "required")
    only(issues, "spec.subsets[3].name", "not a valid subset name")
    only(issues, "spec.subsets[4].labels.version", "expected a string value")
    assert dr_ok("host: reviews.other.svc").host == "reviews.other.svc.cluster.local"
    value, issues = conv(dr_text("host: '*.example.com'"))
    assert value is None and not errors(issues)
    only(issues, "spec.host", "wildcard", "warning")
    only(dr_issues("trafficPolicy: {}"), "spec.host", "required")
    only(dr_issues("host: reviews\nextra: 1"), "spec.extra", "unknown field")
    value, issues = conv(dr_text("host: reviews", api="networking.istio.io/v1beta2"))
    assert value is None
    only(issues, "apiVersion", "networking.meshline.io/v1")


def test_golden_inputs_convert_cleanly() -> None:
    from pathlib import Path

    # Cases that exist to show a warned behaviour: (case, field) of the warnings they must have.
    # a TLS port without addresses (Istio warns too)
    expected = {("serviceentry", "spec.addresses"), ("gamma-namespaces", "spec.addresses")}
    files = sorted(Path(__file__).parent.glob("golden/*/in/*.yaml"))
    assert files
    for path in files:
        case = path.parent.parent.name
        for doc in yaml.load_all(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
            if not doc:
                continue
            value, issues = convert(raw_of(doc))
            unexpected = [i for i in issues if i.severity == "error" or (case, i.field) not in expected]
            assert value is not None and unexpected == [], (path, [i.format() for i in unexpected])
