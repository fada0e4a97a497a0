"""Gateway API routes attached to Services (GAMMA): conversion (every field translated or
named in an issue), resolution into the route table sidecars and waypoints apply
(precedence, parents, backends, ReferenceGrants, VirtualService conflicts), the route
status (`status.parents`) and its write-back plan, and the Gateway/Gateway key clash."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from controlplane.gwstatus import plan_route_updates, route_views
from controlplane.model.convert import convert
from controlplane.model.events import Upsert
from controlplane.model.ir import HTTPRoute, Issue
from controlplane.model.mesh import Mesh
from controlplane.model.raw import RawObject
from controlplane.model.store import MeshStore, assemble
from controlplane.sources.kube_informer import Resource, plan_resources
from controlplane.sources.yamlload import parse_documents

SERVICES = """
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec: {clusterIP: 10.96.0.1, selector: {app: reviews}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v1, namespace: default}
spec: {clusterIP: 10.96.0.2, selector: {app: reviews, version: v1}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v2, namespace: default}
spec: {clusterIP: 10.96.0.3, selector: {app: reviews, version: v2}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: other}
spec: {clusterIP: 10.96.0.4, selector: {app: ratings}, ports: [{name: http, port: 9080}]}
"""
HOST = "reviews.default.svc.cluster.local"


def raws(text: str) -> list[RawObject]:
    objects, errors = parse_documents(text, "test.yaml")
    assert not errors, [e.format() for e in errors]
    return objects


def build(*texts: str) -> tuple[Mesh, list[Issue]]:
    values: list[object] = []
    issues: list[Issue] = []
    for raw in raws("\n---\n".join((SERVICES, *texts))):
        value, found = convert(raw)
        issues.extend(found)
        if value is not None:
            values.append(value)
    mesh = assemble(values)
    return mesh, [*issues, *mesh.issues]


def route(name: str, rules: str, parents: str = "[{group: '', kind: Service, name: reviews, port: 9080}]",
          namespace: str = "default", kind: str = "HTTPRoute", version: str = "v1") -> str:
    return (f"apiVersion: gateway.networking.k8s.io/{version}\nkind: {kind}\n"
            f"metadata: {{name: {name}, namespace: {namespace}}}\n"
            f"spec:\n  parentRefs: {parents}\n  rules:\n{rules}")


def conditions(mesh: Mesh, name: str, kind: str = "HTTPRoute", namespace: str = "default") -> dict[str, tuple[str, str]]:
    (st,) = mesh.route_status[(kind, namespace, name)]
    return {c.type: (c.status, c.reason) for c in st.conditions}


def table(mesh: Mesh, host: str = HOST) -> tuple[HTTPRoute, ...]:
    return mesh.vs_by_host[host].http  # type: ignore[index]


SPLIT = """\
  - backendRefs:
    - {name: reviews-v1, port: 9080, weight: 80}
    - {name: reviews-v2, port: 9080, weight: 20}
"""


def test_split_route_attached_to_a_service_becomes_its_route_table() -> None:
    mesh, issues = build(route("split", SPLIT))
    assert not [i for i in issues if i.severity == "error"], issues
    (hr,) = table(mesh)
    assert [(d.destination.host, d.destination.port, d.weight) for d in hr.route] == [
        ("reviews-v1.default.svc.cluster.local", 9080, 80), ("reviews-v2.default.svc.cluster.local", 9080, 20)]
    assert hr.matches[0].port == 9080 and hr.matches[0].uri is not None and hr.matches[0].uri.value == "/"
    assert conditions(mesh, "split") == {"Accepted": ("True", "Accepted"), "ResolvedRefs": ("True", "ResolvedRefs")}


def test_precedence_across_routes_follows_the_gateway_api() -> None:
    a = route("a", """\
  - matches: [{path: {type: PathPrefix, value: /a}}]
    backendRefs: [{name: reviews-v1, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /a/longer}}, {path: {type: Exact, value: /x}}]
    backendRefs: [{name: reviews-v1, port: 9080}]
""")
    b = route("b", """\
  - matches: [{path: {type: PathPrefix, value: /a}, method: GET}, {path: {type: RegularExpression, value: "/r.*"}}]
    backendRefs: [{name: reviews-v2, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /a}, headers: [{name: h1, value: "1"}, {name: h2, value: "2"}]}]
    backendRefs: [{name: reviews-v2, port: 9080}]
""")
    mesh, _ = build(a, b)
    order = [hr.name for hr in table(mesh)]
    assert order == [
        "httproute.default.a.1.1",  # Exact /x
        "httproute.default.b.0.1",  # RegularExpression (before prefixes)
        "httproute.default.a.1.0",  # longest prefix /a/longer
        "httproute.default.b.0.0",  # /a with a method match
        "httproute.default.b.1.0",  # /a with two header matches
        "httproute.default.a.0.0",  # /a alone
    ]


def test_a_route_beats_a_virtual_service_for_the_same_host_and_the_virtual_service_is_warned() -> None:
    vs = """apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http: [{route: [{destination: {host: reviews-v2}}]}]
"""
    mesh, issues = build(vs, route("split", SPLIT))
    assert mesh.vs_by_host[HOST].ref.kind == "HTTPRoute"
    warned = [i for i in issues if i.ref.kind == "VirtualService"]
    assert len(warned) == 1 and warned[0].severity == "warning" and "HTTPRoute default/split" in warned[0].message


def test_missing_parent_or_port_is_no_matching_parent() -> None:
    mesh, issues = build(route("nosvc", SPLIT, parents="[{group: '', kind: Service, name: nope}]"),
                         route("noport", SPLIT, parents="[{group: '', kind: Service, name: reviews, port: 1}]"))
    assert conditions(mesh, "nosvc")["Accepted"] == ("False", "NoMatchingParent")
    assert conditions(mesh, "noport")["Accepted"] == ("False", "NoMatchingParent")
    assert HOST not in mesh.vs_by_host
    assert any("has no port 1" in i.message and i.field == "spec.parentRefs[0]" for i in issues)


def test_cross_namespace_backend_needs_a_reference_grant() -> None:
    cross = route("cross", """\
  - backendRefs: [{name: reviews-v1, port: 9080, weight: 50}, {name: ratings, namespace: other, port: 9080, weight: 50}]
""")
    mesh, issues = build(cross)
    assert conditions(mesh, "cross")["ResolvedRefs"] == ("False", "RefNotPermitted")
    (hr,) = table(mesh)
    # The refused backend's share fails (no cluster has that host); it never reaches ratings.
    hosts = [d.destination.host for d in hr.route]
    assert hosts[0] == "reviews-v1.default.svc.cluster.local" and hosts[1].endswith("invalid-backend.meshline")
    assert any("ReferenceGrant" in i.message for i in issues if i.ref.name == "cross")
    grant = """apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: allow, namespace: other}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: default}]
  to: [{group: "", kind: Service}]
"""
    mesh, _ = build(cross, grant)
    assert conditions(mesh, "cross")["ResolvedRefs"] == ("True", "ResolvedRefs")
    assert table(mesh)[0].route[1].destination.host == "ratings.other.svc.cluster.local"


def test_invalid_backends_answer_500() -> None:
    rules = """\
  - matches: [{path: {value: /kind}}]
    backendRefs: [{group: example.com, kind: Bucket, name: b}]
  - matches: [{path: {value: /gone}}]
    backendRefs: [{name: gone, port: 9080}]
  - matches: [{path: {value: /zero}}]
    backendRefs: [{name: reviews-v1, port: 9080, weight: 0}]
  - matches: [{path: {value: /none}}]
"""
    mesh, _ = build(route("bad", rules))
    assert conditions(mesh, "bad")["ResolvedRefs"] == ("False", "InvalidKind")
    by_path = {hr.matches[0].uri.value: hr for hr in table(mesh) if hr.matches[0].uri is not None}
    for path in ("/kind", "/gone", "/zero", "/none"):
        assert by_path[path].direct_response is not None and by_path[path].direct_response.status == 500, path
        assert not by_path[path].route
    msg = {c.type: c.message for c in mesh.route_status[("HTTPRoute", "default", "bad")][0].conditions}
    assert "Service default/gone does not exist" in msg["ResolvedRefs"]


def test_filters_timeouts_and_grpc_matches_translate_to_the_route_ir() -> None:
    rules = """\
  - matches: [{path: {type: PathPrefix, value: /api/}}]
    filters:
    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: X-A, value: "1"}], remove: [x-b]}}
    - {type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: x-c, value: "2"}]}}
    - {type: URLRewrite, urlRewrite: {hostname: h.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: reviews-v2, port: 9080}, fraction: {numerator: 1, denominator: 4}}}
    backendRefs: [{name: reviews-v1, port: 9080}]
    timeouts: {request: 5s, backendRequest: 1s}
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - {type: RequestRedirect, requestRedirect: {scheme: https, port: 8443, path: {type: ReplaceFullPath, replaceFullPath: /new}}}
"""
    mesh, issues = build(route("f", rules))
    assert not [i for i in issues if i.severity == "error"], issues
    api = next(hr for hr in table(mesh) if hr.name.endswith(".0.0"))
    assert api.matches[0].uri is not None and (api.matches[0].uri.kind, api.matches[0].uri.value) == ("path_prefix", "/api")
    assert api.headers is not None and api.headers.request.set == (("x-a", "1"),) and api.headers.request.remove == ("x-b",)
    assert api.headers.response.add == (("x-c", "2"),)
    assert api.rewrite is not None and (api.rewrite.uri, api.rewrite.authority) == ("/v2", "h.example")
    assert [(m.destination.host, m.percentage) for m in api.mirrors] == [("reviews-v2.default.svc.cluster.local", 25.0)]
    assert api.timeout_ms == 5000 and api.retries is not None and api.retries.per_try_timeout_ms == 1000
    old = next(hr for hr in table(mesh) if hr.name.endswith(".1.0"))
    assert old.redirect is not None and (old.redirect.uri, old.redirect.port, old.redirect.scheme,
                                         old.redirect.redirect_code) == ("/new", 8443, "https", 302)
    grpc = route("g", """\
  - matches: [{method: {service: pkg.Svc, method: Get}}, {method: {service: pkg.Svc}}]
    backendRefs: [{name: reviews-v1, port: 9080}]
""", kind="GRPCRoute")
    mesh, issues = build(grpc)
    uris = [(hr.matches[0].uri.kind, hr.matches[0].uri.value) for hr in table(mesh) if hr.matches[0].uri is not None]
    assert uris == [("exact", "/pkg.Svc/Get"), ("prefix", "/pkg.Svc/")]


@pytest.mark.parametrize(("rules", "field", "text"), [
    ("  - matches: [{path: {type: RegularExpression, value: '(unclosed'}}]\n    backendRefs: [{name: reviews-v1, port: 9080}]\n",
     "spec.rules[0].matches[0].path.value", "invalid regex"),
    ("  - backendRefs: [{name: reviews-v1}]\n", "spec.rules[0].backendRefs[0].port", "is required"),
    ("  - matches: [{path: {type: Exact, value: /x}}]\n    filters: [{type: URLRewrite, urlRewrite: {path: "
     "{type: ReplacePrefixMatch, replacePrefixMatch: /y}}}]\n    backendRefs: [{name: reviews-v1, port: 9080}]\n",
     "spec.rules[0].filters[0].urlRewrite.path", "PathPrefix"),
    ("  - filters: [{type: RequestRedirect, requestRedirect: {hostname: a}}, {type: URLRewrite, urlRewrite: {hostname: b}}]\n",
     "spec.rules[0].filters", "cannot both be set"),
    ("  - matches: [{path: {value: /x}, bogus: 1}]\n    backendRefs: [{name: reviews-v1, port: 9080}]\n",
     "spec.rules[0].matches[0].bogus", "unknown field"),
    ("  - matches: [{method: FETCH}]\n    backendRefs: [{name: reviews-v1, port: 9080}]\n",
     "spec.rules[0].matches[0].method", "unsupported method"),
    ("  - backendRefs: [{name: reviews-v1, port: 9080}]\n    timeouts: {request: 1s, backendRequest: 2s}\n",
     "spec.rules[0].timeouts.backendRequest", "must not be longer"),
    ("  - backendRefs: [{name: reviews-v1, port: 9080}]\n  hostnames: [ok.example.com, 'bad host', 10.0.0.1]\n",
     "spec.hostnames[1]", "not a valid hostname"),
])
def test_invalid_routes_are_errors_naming_the_field(rules: str, field: str, text: str) -> None:
    (raw,) = raws(route("bad", rules))
    value, issues = convert(raw)
    assert value is None
    assert any(i.severity == "error" and i.field == field and text in i.message for i in issues), \
        [i.format() for i in issues]
    assert all(i.line is not None for i in issues)  # file:line for directory mode


def test_unsupported_filters_are_warned_by_name_and_their_rule_answers_500() -> None:
    rules = """\
  - filters: [{type: ExtensionRef, extensionRef: {group: example.com, kind: Auth, name: a}}]
    backendRefs: [{name: reviews-v1, port: 9080}]
"""
    mesh, issues = build(route("ext", rules))
    warned = [i for i in issues if i.ref.name == "ext" and i.severity == "warning"]
    assert any(i.field == "spec.rules[0].filters[0].type" and "ExtensionRef" in i.message for i in warned)
    (hr,) = table(mesh)
    assert hr.direct_response is not None and hr.direct_response.status == 500 and not hr.route
    assert conditions(mesh, "ext")["ResolvedRefs"] == ("False", "InvalidKind")


def test_cors_filter_becomes_the_route_cors_policy() -> None:
    rules = """\
  - filters:
    - type: CORS
      cors: {allowOrigins: ["https://app.example.com", "https://*.example.org"], allowMethods: [GET, POST],
             allowCredentials: true, maxAge: 600}
    backendRefs: [{name: reviews-v1, port: 9080}]
"""
    mesh, issues = build(route("cors", rules))
    assert not [i for i in issues if i.ref.name == "cors"], issues
    (hr,) = table(mesh)
    assert hr.cors is not None and hr.cors.allow_credentials is True and hr.cors.max_age_s == 600
    assert [(o.kind, o.value) for o in hr.cors.allow_origins] == [
        ("exact", "https://app.example.com"), ("regex", "https://.*\\.example\\.org")]


def test_analyze_reports_route_status_problems(tmp_path: Any) -> None:
    from controlplane.analyze import analyze_paths

    (tmp_path / "mesh.yaml").write_text(SERVICES + "\n---\n" + route("r", """\
  - backendRefs: [{name: missing, port: 9080}]
"""))
    lines = [i.format() for i in analyze_paths([str(tmp_path)])]
    assert any("HTTPRoute/default/r" in line and "BackendNotFound" in line for line in lines), lines


def test_consumer_routes_apply_to_their_namespace_and_producer_routes_to_the_others() -> None:
    consumer = route("mine", SPLIT, namespace="other",
                     parents="[{group: '', kind: Service, name: reviews, namespace: default}]")
    mesh, _ = build(consumer)
    assert mesh.vs_by_host[HOST].export_to == ("other",)  # applies to clients in `other` only
    assert conditions(mesh, "mine", namespace="other")["Accepted"] == ("True", "Accepted")
    mesh, _ = build(consumer, route("producer", SPLIT))
    assert mesh.vs_by_host[HOST].name == "producer" and mesh.vs_by_host[HOST].export_to == ()
    # GEP-1426: both apply, each to its clients (issue 18, h23)
    assert conditions(mesh, "mine", namespace="other")["Accepted"] == ("True", "Accepted")
    assert mesh.virtual_service(HOST, "other").name == "mine"  # type: ignore[union-attr]
    assert mesh.virtual_service(HOST, "third").name == "producer"  # type: ignore[union-attr]


def test_tcp_route_splits_tcp_traffic_and_needs_a_tcp_port() -> None:
    db = """apiVersion: v1
kind: Service
metadata: {name: db, namespace: default}
spec: {clusterIP: 10.96.0.9, selector: {app: db}, ports: [{name: tcp, port: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: db-replica, namespace: default}
spec: {clusterIP: 10.96.0.8, selector: {app: db, role: replica}, ports: [{name: tcp, port: 5432}]}
"""
    rules = "  - backendRefs: [{name: db, port: 5432, weight: 3}, {name: db-replica, port: 5432, weight: 1}]\n"
    tcp = route("t", rules, parents="[{group: '', kind: Service, name: db}]", kind="TCPRoute", version="v1alpha2")
    mesh, _ = build(db, tcp)
    (tr,) = mesh.vs_by_host["db.default.svc.cluster.local"].tcp
    assert [d.weight for d in tr.route] == [3, 1] and not tr.matches
    # On an HTTP port a TCPRoute has no effect (and an HTTPRoute none on a TCP port): said so.
    mesh, issues = build(db, route("t", rules, kind="TCPRoute", version="v1alpha2"),
                         route("h", SPLIT, parents="[{group: '', kind: Service, name: db}]"))
    assert conditions(mesh, "t", kind="TCPRoute")["Accepted"] == ("False", "UnsupportedValue")
    assert conditions(mesh, "h")["Accepted"] == ("False", "UnsupportedValue")
    assert any("cannot apply to TCP port(s) 5432" in i.message for i in issues)


def test_gateway_parents_are_left_to_their_controller() -> None:
    mesh, issues = build(route("gw", SPLIT, parents="[{name: some-gateway}]"))
    assert ("HTTPRoute", "default", "gw") not in mesh.route_status
    assert HOST not in mesh.vs_by_host
    assert not [i for i in issues if i.ref.name == "gw"]


# --------------------------------------------------------------------------- status write-back


def _raw_with_status(text: str, status: dict[str, Any] | None) -> RawObject:
    (raw,) = raws(text)
    body = dict(raw.body)
    body["metadata"] = {**body["metadata"], "generation": 3}
    if status is not None:
        body["status"] = status
    return RawObject(raw.kind, raw.api_version, raw.namespace, raw.name, body, raw.file, raw.line, raw.field_lines)


def test_status_plan_writes_our_parents_keeps_others_and_transition_times() -> None:
    text = route("split", SPLIT)
    other = {"parentRef": {"name": "gw"}, "controllerName": "example.com/gateway", "conditions": []}
    raw = _raw_with_status(text, {"parents": [other]})
    store = MeshStore()
    store.apply([Upsert("t", r) for r in raws(SERVICES)] + [Upsert("t", raw)])
    mesh = store.mesh()
    plan = plan_route_updates({raw.key: raw}, mesh.route_status, store.issues_by_key(), "T1")
    parents = plan[raw.key]
    assert parents[0] == other
    ours = parents[1]
    assert ours["controllerName"] == "meshline.io/mesh-controller"
    assert ours["parentRef"] == {"group": "", "kind": "Service", "name": "reviews", "port": 9080}
    assert {(c["type"], c["status"], c["reason"], c["observedGeneration"], c["lastTransitionTime"])
            for c in ours["conditions"]} == {("Accepted", "True", "Accepted", 3, "T1"),
                                              ("ResolvedRefs", "True", "ResolvedRefs", 3, "T1")}
    # Once the object carries it, nothing more is written (no hot loop), whatever the time.
    written = _raw_with_status(text, {"parents": parents})
    assert plan_route_updates({raw.key: written}, mesh.route_status, store.issues_by_key(), "T2") == {}
    assert route_views(mesh)[0]["parents"][0]["conditions"][0]["type"] == "Accepted"


def test_status_of_an_invalid_route_says_so() -> None:
    text = route("bad", "  - backendRefs: [{name: reviews-v1}]\n")
    raw = _raw_with_status(text, None)
    store = MeshStore()
    store.apply([Upsert("t", r) for r in raws(SERVICES)] + [Upsert("t", raw)])
    plan = plan_route_updates({raw.key: raw}, store.mesh().route_status, store.issues_by_key(), "T")
    (entry,) = plan[raw.key]
    accepted = next(c for c in entry["conditions"] if c["type"] == "Accepted")
    assert accepted["status"] == "False" and "port: is required" in accepted["message"]


# --------------------------------------------------------------------------- store keys, Kubernetes


def test_istio_gateway_and_gateway_api_gateway_of_one_name_are_distinct_objects() -> None:
    docs = """apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw, namespace: default}
spec: {gatewayClassName: other, listeners: [{name: http, port: 80, protocol: HTTP}]}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: default}
spec: {selector: {istio: ingressgateway}, servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ["*"]}]}
"""
    objects = raws(docs)
    assert len({o.key for o in objects}) == 2
    store = MeshStore()
    store.apply([Upsert("t", o) for o in objects])
    assert {k[0] for k in store.objects()} == {"Gateway", "Gateway.gateway.networking.k8s.io"}
    assert not [i for i in store.mesh().issues if "also defined in" in i.message]


def test_served_gateway_api_route_kinds_are_watched_as_translated() -> None:
    found = [Resource("HTTPRoute", "gateway.networking.k8s.io", "v1", "httproutes"),
             Resource("TCPRoute", "gateway.networking.k8s.io", "v1alpha2", "tcproutes"),
             Resource("TLSRoute", "gateway.networking.k8s.io", "v1alpha2", "tlsroutes"),
             Resource("UDPRoute", "gateway.networking.k8s.io", "v1alpha2", "udproutes")]
    watched, _, unsupported = plan_resources(found, istio_api=False)
    assert {r.kind for r in unsupported} == {"UDPRoute"}
    assert {(r.kind, r.version, r.priority) for r in watched if r.kind in ("HTTPRoute", "TCPRoute", "TLSRoute")} == {
        ("HTTPRoute", "v1", 0), ("TCPRoute", "v1alpha2", 0), ("TLSRoute", "v1alpha2", 0)}


def test_golden_like_yaml_round_trip() -> None:
    """The route status in `/v1/routes` form is plain data (JSON/YAML serialisable)."""
    mesh, _ = build(route("split", SPLIT))
    assert yaml.safe_load(yaml.safe_dump(route_views(mesh)))[0]["name"] == "split"


# --------------------------------------------------------------------------- Gateways of class meshline

GATEWAY = """apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: meshline}
spec: {controllerName: meshline.io/gateway-controller}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: edge, namespace: default, generation: 2}
spec:
  gatewayClassName: meshline
  listeners:
  - {name: http, port: 8080, protocol: HTTP, hostname: "*.example.com"}
  - {name: udp, port: 5353, protocol: UDP}
  - {name: tcp, port: 9000, protocol: TCP}
"""


def gw_route(name: str, parent: str, hostnames: str = "[www.example.com]", namespace: str = "default") -> str:
    return route(name, SPLIT, parents=f"[{parent}]", namespace=namespace).replace(
        "spec:\n", f"spec:\n  hostnames: {hostnames}\n", 1)


def test_gateway_of_class_meshline_serves_attached_routes_and_reports_status() -> None:
    mesh, issues = build(GATEWAY, gw_route("www", "{name: edge}"),
                         gw_route("elsewhere", "{name: edge}", hostnames="[www.example.org]"),
                         gw_route("nolistener", "{name: edge, sectionName: https}"),
                         gw_route("foreign", "{name: edge, namespace: default}", namespace="other"))
    gw = mesh.gateways["default/edge"]
    assert gw.selector == (("gateway.networking.k8s.io/gateway-name", "edge"),)
    assert [(s.port, s.protocol, s.hosts) for s in gw.servers] == [(8080, "HTTP", (("*", "*.example.com"),)),
                                                                   (9000, "TCP", (("*", "*"),))]
    (vs,) = mesh.gateway_virtual_services
    assert vs.gateways == ("default/edge",) and vs.host_patterns == ("www.example.com",)
    assert [d.weight for d in vs.http[0].route] == [80, 20] and vs.http[0].matches[0].port == 8080
    assert HOST not in mesh.vs_by_host  # a Gateway's routes are not mesh routes
    reasons = {name: conditions(mesh, name, namespace=ns)["Accepted"] for name, ns in (
        ("www", "default"), ("elsewhere", "default"), ("nolistener", "default"), ("foreign", "other"))}
    assert reasons == {"www": ("True", "Accepted"), "elsewhere": ("False", "NoMatchingListenerHostname"),
                       "nolistener": ("False", "NoMatchingParent"), "foreign": ("False", "NotAllowedByListeners")}
    st = mesh.gateway_status[("Gateway.gateway.networking.k8s.io", "default", "edge")]
    assert {c.type: (c.status, c.reason) for c in st.conditions} == {
        "Accepted": ("True", "ListenersNotValid"), "Programmed": ("True", "Programmed")}
    assert [(ls.name, ls.attached_routes, ls.supported_kinds) for ls in st.listeners] == [
        ("http", 1, ("HTTPRoute", "GRPCRoute")), ("udp", 0, ()), ("tcp", 0, ("TCPRoute",))]
    assert any(i.field == "spec.listeners[1]" and "UnsupportedProtocol" in i.message for i in issues)
    (cls,) = [v for k, v in mesh.gateway_status.items() if k[0] == "GatewayClass"]
    assert cls.conditions[0].status == "True"


def test_gateways_of_other_classes_and_istio_gateways_of_the_same_name() -> None:
    other = GATEWAY.replace("gatewayClassName: meshline", "gatewayClassName: someone-else")
    mesh, _ = build(other, gw_route("www", "{name: edge}"))
    assert "default/edge" not in mesh.gateways and ("HTTPRoute", "default", "www") not in mesh.route_status
    istio = """apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: edge, namespace: default}
spec: {selector: {app: istio-edge}, servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ["*"]}]}
"""
    mesh, _ = build(GATEWAY, istio)
    assert mesh.gateways["default/edge"].selector == (("app", "istio-edge"),)  # the Istio Gateway keeps the name
    st = mesh.gateway_status[("Gateway.gateway.networking.k8s.io", "default", "edge")]
    assert st.conditions[0].status == "False" and "rename" in st.conditions[0].message


def test_gateway_status_plan_renders_listeners_and_keeps_transition_times() -> None:
    from controlplane.gwstatus import plan_object_updates

    store = MeshStore()
    objects = raws(SERVICES + "\n---\n" + GATEWAY)
    store.apply([Upsert("t", r) for r in objects])
    mesh = store.mesh()
    by_key = {o.key: o for o in objects}
    plan = plan_object_updates(by_key, mesh.gateway_status, "T1")
    gw_key = ("Gateway.gateway.networking.k8s.io", "default", "edge")
    body = plan[gw_key]
    first = body["listeners"][0]
    assert (first["name"], first["attachedRoutes"], first["supportedKinds"]) == (
        "http", 0, [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute"},
                    {"group": "gateway.networking.k8s.io", "kind": "GRPCRoute"}])
    assert all(c["observedGeneration"] == 2 and c["lastTransitionTime"] == "T1" for c in body["conditions"])
    raw = by_key[gw_key]
    written = RawObject(raw.kind, raw.api_version, raw.namespace, raw.name, {**raw.body, "status": body})
    assert gw_key not in plan_object_updates({gw_key: written}, mesh.gateway_status, "T2")


def test_a_status_only_change_of_a_route_does_not_rebuild() -> None:
    """Our own status write-back comes back through the watch: it must not rebuild the mesh."""
    text = route("split", SPLIT)
    store = MeshStore()
    store.apply([Upsert("k", r) for r in raws(SERVICES)] + [Upsert("k", _raw_with_status(text, None))])
    store.mesh()
    with_status = _raw_with_status(text, {"parents": [{"controllerName": "meshline.io/mesh-controller"}]})
    assert store.apply([Upsert("k", with_status)]) is False
    changed = raws(route("split", SPLIT.replace("weight: 80", "weight: 70")))[0]
    assert store.apply([Upsert("k", changed)]) is True
    assert [d.weight for d in table(store.mesh())[0].route] == [70, 20]
