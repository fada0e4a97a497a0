"""Istio YAML means what it means in Istio (issue 16): the fields that used to be dropped in
silence (sourceLabels, destinationSubnets, match names, retry settings), DestinationRule
lookup order, PASSTHROUGH and source-IP hashing, Istio's labels as aliases, unsupported
kinds and the root namespace reported by name. Pure translation and validation, no I/O."""

from __future__ import annotations

import textwrap
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2

from controlplane.model.ambient import dataplane_mode, runs_sidecar, waypoint_name
from controlplane.model.convert import convert
from controlplane.model.ir import Issue, ProxyMeta, labels_of
from controlplane.model.mesh import Mesh
from controlplane.model.raw import RawObject
from controlplane.model.store import assemble
from controlplane.sources.yamlload import parse_documents
from controlplane.translate.plan import CLUSTER, ENDPOINT, LISTENER, ROUTE, build_all
from controlplane.translate.proxy import shared_key
from controlplane.translate.scope import proxy_scope, scope_key
from controlplane.translate.sidecar import plan_outbound

SERVICES = """
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec: {clusterIP: 10.96.0.10, selector: {app: reviews}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: mysql, namespace: default}
spec: {clusterIP: 10.96.0.20, selector: {app: mysql}, ports: [{name: tcp-mysql, port: 3306}]}
---
apiVersion: v1
kind: Pod
metadata: {name: productpage-1, namespace: default, labels: {app: productpage}}
spec: {containers: [{name: app, image: x}]}
status: {podIP: 10.1.2.1}
---
apiVersion: v1
kind: Pod
metadata: {name: ratings-1, namespace: default, labels: {app: ratings}}
spec: {containers: [{name: app, image: x}]}
status: {podIP: 10.1.2.3}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: mysql, namespace: default}
spec: {host: mysql, subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec: {host: reviews, subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]}
"""


def mesh_of(*texts: str, root_namespace: str = "meshline-system") -> tuple[Mesh, list[Issue]]:
    values: list[object] = []
    issues: list[Issue] = []
    for text in texts:
        objects, errors = parse_documents(textwrap.dedent(text), "t.yaml")
        assert not errors
        for raw in objects:
            value, found = convert(raw)
            issues += found
            assert not [i for i in found if i.severity == "error"], [i.format() for i in found]
            if value is not None:
                values.append(value)
    mesh = assemble(values, root_namespace=root_namespace)
    return mesh, issues + list(mesh.issues)


def proxy(workload: str | None, namespace: str = "default", capture: str = "intercept",
          labels: dict[str, str] | None = None) -> ProxyMeta:
    return ProxyMeta(node_id=workload or "p", namespace=namespace, workload=workload, capture=capture,  # type: ignore[arg-type]
                     labels=labels_of(labels))


def outbound(mesh: Mesh, p: ProxyMeta) -> dict[Any, dict[str, Any]]:
    return build_all(plan_outbound(mesh, p.namespace, p.capture, scope=proxy_scope(mesh, p)))


def routes_of(mesh: Mesh, p: ProxyMeta, config: str = "9080") -> list[Any]:
    rc = outbound(mesh, p)[ROUTE][config]
    vh = next(v for v in rc.virtual_hosts if v.name.startswith("reviews."))
    return list(vh.routes)


def tcp_proxy(mesh: Mesh, p: ProxyMeta, listener: str) -> tcp_proxy_pb2.TcpProxy:
    lst = outbound(mesh, p)[LISTENER][listener]
    t = tcp_proxy_pb2.TcpProxy()
    assert lst.filter_chains[-1].filters[-1].typed_config.Unpack(t)
    return t


def warnings(issues: list[Issue], field_part: str) -> list[str]:
    return [i.message for i in issues if i.severity == "warning" and field_part in i.field]


# --------------------------------------------------------------------------- sourceLabels


REVIEWS_VS = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - name: canary
    match:
    - {name: jason, headers: {end-user: {exact: jason}}}
    - {name: pp, sourceLabels: {app: productpage}}
    route: [{destination: {host: reviews, subset: v2}}]
  - route: [{destination: {host: reviews, subset: v1}}]
"""


def test_http_source_labels_apply_only_to_matching_workloads() -> None:
    mesh, _ = mesh_of(SERVICES, REVIEWS_VS)
    pp = [r.name for r in routes_of(mesh, proxy("productpage-1"))]
    other = [r.name for r in routes_of(mesh, proxy("ratings-1"))]
    assert pp == ["canary.jason", "canary.pp", "reviews.default.1"]
    assert other == ["canary.jason", "reviews.default.1"]
    # Bootstrap labels count when the Pod is unknown.
    assert [r.name for r in routes_of(mesh, proxy(None, labels={"app": "productpage", "v": "1"}))] == pp


def test_source_label_classes_keep_unlabelled_proxies_sharing_one_layer() -> None:
    mesh, _ = mesh_of(SERVICES, REVIEWS_VS)
    plain_a, plain_b, pp = proxy("ratings-1"), proxy(None, labels={"app": "x"}), proxy("productpage-1")
    assert scope_key(mesh, plain_a) is None and proxy_scope(mesh, plain_a) is None  # unchanged for them
    assert shared_key(mesh, plain_a) == shared_key(mesh, plain_b)
    assert shared_key(mesh, pp) != shared_key(mesh, plain_a)
    assert scope_key(mesh, pp) == (None, ((("app", "productpage"),),))
    # A node proxy or waypoint never matches sourceLabels.
    assert scope_key(mesh, ProxyMeta("n", mode="node", namespace="default", labels=labels_of({"app": "productpage"}))) \
        is None
    # The class-scoped layer holds every service, as an unscoped one does.
    assert {k for k in outbound(mesh, pp)[CLUSTER]} == {k for k in outbound(mesh, plain_a)[CLUSTER]}


def test_source_labels_with_a_sidecar_scope_keep_both() -> None:
    sidecar = """
    apiVersion: networking.istio.io/v1
    kind: Sidecar
    metadata: {name: default, namespace: default}
    spec: {egress: [{hosts: ["./reviews.default.svc.cluster.local"]}]}
    """
    mesh, _ = mesh_of(SERVICES, REVIEWS_VS, sidecar)
    pp = proxy("productpage-1")
    assert scope_key(mesh, pp) == (("default", "default"), ((("app", "productpage"),),))
    scope = proxy_scope(mesh, pp)
    assert scope is not None and {h for h, _ in scope} == {"reviews.default.svc.cluster.local"}
    assert "canary.pp" in [r.name for r in routes_of(mesh, pp)]


def test_tcp_source_labels_and_destination_subnets() -> None:
    vs = """
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: mysql, namespace: default}
    spec:
      hosts: [mysql]
      tcp:
      - match: [{sourceLabels: {app: productpage}}]
        route: [{destination: {host: mysql, subset: v2}}]
      - match: [{destinationSubnets: [192.168.0.0/16]}]
        route: [{destination: {host: mysql, subset: v2}}]
      - match: [{destinationSubnets: [10.96.0.20]}]
        route: [{destination: {host: mysql, subset: v1}}]
    """
    mesh, issues = mesh_of(SERVICES, vs)
    for capture, name in (("intercept", "10.96.0.20_3306"), ("bind", "127.0.0.1_3306")):
        assert tcp_proxy(mesh, proxy("productpage-1", capture=capture), name).cluster == \
            "outbound|3306|v2|mysql.default.svc.cluster.local"
        assert tcp_proxy(mesh, proxy("ratings-1", capture=capture), name).cluster == \
            "outbound|3306|v1|mysql.default.svc.cluster.local"
    assert warnings(issues, "spec.tcp[1].match[0].destinationSubnets") == [
        "192.168.0.0/16 contains none of the cluster IPs of this VirtualService's hosts (10.96.0.20 (default/mysql)): "
        "this match never applies"]
    assert not warnings(issues, "spec.tcp[2].match[0].destinationSubnets")


def test_source_labels_no_pod_has_and_headless_subnets_are_warned() -> None:
    vs = """
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: mysql, namespace: default}
    spec:
      hosts: [headless]
      tcp:
      - match: [{sourceLabels: {app: nobody}, destinationSubnets: [10.0.0.0/8]}]
        route: [{destination: {host: headless}}]
    """
    headless = """
    apiVersion: v1
    kind: Service
    metadata: {name: headless, namespace: default}
    spec: {clusterIP: None, selector: {app: h}, ports: [{name: tcp, port: 1234}]}
    """
    _, issues = mesh_of(SERVICES, vs, headless)
    assert warnings(issues, "sourceLabels") == ["no Pod has the labels app=nobody: this match applies to no client"]
    assert "headless (no cluster IP)" in warnings(issues, "destinationSubnets")[0]


# --------------------------------------------------------------------------- retries


def test_retry_fields_follow_istio() -> None:
    vs = """
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: reviews, namespace: default}
    spec:
      hosts: [reviews]
      http:
      - match: [{name: a, uri: {prefix: /a}}]
        route: [{destination: {host: reviews}}]
        retries: {attempts: 3, retryRemoteLocalities: true, backoff: 50ms, retryIgnorePreviousHosts: false}
      - route: [{destination: {host: reviews}}]
        retries: {attempts: 1}
    """
    mesh, issues = mesh_of(SERVICES, vs)
    assert not warnings(issues, "retries")
    first, second = routes_of(mesh, proxy("ratings-1"))
    assert first.name == "reviews.default.0.a"
    rp = first.route.retry_policy
    assert rp.retry_priority.name == "envoy.retry_priorities.previous_priorities"
    assert rp.retry_back_off.base_interval.ToMilliseconds() == 50
    assert not rp.retry_host_predicate
    assert [p.name for p in second.route.retry_policy.retry_host_predicate] == [
        "envoy.retry_host_predicates.previous_hosts"]
    assert not second.route.retry_policy.HasField("retry_priority")


# --------------------------------------------------------------------------- DestinationRule


DR_LOOKUP = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: r, namespace: default}
spec: {host: reviews.default.svc.cluster.local, trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: r, namespace: frontend}
spec: {host: reviews.default.svc.cluster.local, trafficPolicy: {loadBalancer: {simple: RANDOM}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: m, namespace: meshline-system}
spec: {host: mysql.default.svc.cluster.local, trafficPolicy: {loadBalancer: {simple: RANDOM}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: m, namespace: default}
spec: {host: mysql.default.svc.cluster.local, exportTo: ["."], trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}}
"""


@pytest.mark.parametrize(("client", "reviews", "mysql"), [
    ("frontend", "RANDOM", "RANDOM"),          # own namespace; mysql: root (service's is not exported)
    ("default", "LEAST_REQUEST", "LEAST_REQUEST"),  # the service's namespace
    ("batch", "LEAST_REQUEST", "RANDOM"),      # service's namespace; root
])
def test_destination_rule_lookup_order(client: str, reviews: str, mysql: str) -> None:
    base = SERVICES.replace("---\napiVersion: networking.istio.io/v1\nkind: DestinationRule", "---\nkind: Skip", 2)
    base = base.split("---\nkind: Skip")[0]
    mesh, _ = mesh_of(base, DR_LOOKUP)
    clusters = outbound(mesh, proxy(None, namespace=client, capture="bind"))[CLUSTER]
    policy = cluster_pb2.Cluster.LbPolicy.Name
    assert policy(clusters["outbound|9080||reviews.default.svc.cluster.local"].lb_policy) == reviews
    assert policy(clusters["outbound|3306||mysql.default.svc.cluster.local"].lb_policy) == mysql


def test_a_rule_in_a_third_namespace_applies_only_there() -> None:
    third = """
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: r, namespace: batch}
    spec: {host: ratings.other.svc.cluster.local, trafficPolicy: {loadBalancer: {simple: RANDOM}}}
    ---
    apiVersion: v1
    kind: Service
    metadata: {name: ratings, namespace: other}
    spec: {clusterIP: 10.96.3.1, ports: [{name: http, port: 9080}]}
    """
    mesh, _ = mesh_of(third)
    name = "outbound|9080||ratings.other.svc.cluster.local"
    assert outbound(mesh, proxy(None, "batch", "bind"))[CLUSTER][name].lb_policy == cluster_pb2.Cluster.RANDOM
    assert outbound(mesh, proxy(None, "web", "bind"))[CLUSTER][name].lb_policy == cluster_pb2.Cluster.ROUND_ROBIN


def test_passthrough_is_the_original_destination_when_intercepting() -> None:
    dr = """
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: reviews, namespace: default}
    spec: {host: reviews, trafficPolicy: {loadBalancer: {simple: PASSTHROUGH}}}
    """
    base = SERVICES.split("---\napiVersion: networking.istio.io/v1\nkind: DestinationRule")[0]
    mesh, _ = mesh_of(base, dr)
    name = "outbound|9080||reviews.default.svc.cluster.local"
    intercept = outbound(mesh, proxy("ratings-1"))
    assert intercept[CLUSTER][name].type == cluster_pb2.Cluster.ORIGINAL_DST
    assert intercept[CLUSTER][name].lb_policy == cluster_pb2.Cluster.CLUSTER_PROVIDED
    assert name not in intercept.get(ENDPOINT, {})
    bind = outbound(mesh, proxy("ratings-1", capture="bind"))
    assert bind[CLUSTER][name].type == cluster_pb2.Cluster.EDS and name in bind[ENDPOINT]


def test_source_ip_hash_on_a_tcp_port_reaches_the_tcp_proxy() -> None:
    dr = """
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: mysql, namespace: default}
    spec: {host: mysql, trafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true}}}}
    ---
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: reviews, namespace: default}
    spec: {host: mysql.default.svc.cluster.local, trafficPolicy: {portLevelSettings: [{port: {number: 3306},
           loadBalancer: {consistentHash: {httpHeaderName: x-user}}}]}}
    """
    base = SERVICES.split("---\napiVersion: networking.istio.io/v1\nkind: DestinationRule")[0]
    mesh, issues = mesh_of(base, dr.split("---")[0])
    t = tcp_proxy(mesh, proxy("ratings-1"), "10.96.0.20_3306")
    assert [h.WhichOneof("policy_specifier") for h in t.hash_policy] == ["source_ip"]
    _, issues = mesh_of(base, dr.split("---")[1].replace("name: reviews", "name: other"))
    assert "httpHeaderName hashing needs HTTP requests" in warnings(issues, "consistentHash.httpHeaderName")[0]


# --------------------------------------------------------------------------- kinds, labels, root namespace


def raw(kind: str, api: str, body: dict[str, Any], ns: str = "default", name: str = "x") -> RawObject:
    meta = {"name": name, **({"namespace": ns} if ns else {}), **body.pop("metadata", {})}
    return RawObject(kind=kind, api_version=api, namespace=ns, name=name,
                     body={"apiVersion": api, "kind": kind, "metadata": meta, **body})


@pytest.mark.parametrize(("kind", "api"), [
    ("WasmPlugin", "extensions.istio.io/v1alpha1"),
    ("EnvoyFilter", "networking.istio.io/v1alpha3"),
    ("WorkloadGroup", "networking.istio.io/v1"),
    ("ProxyConfig", "networking.istio.io/v1beta1"),
    ("UDPRoute", "gateway.networking.k8s.io/v1alpha2"),
    ("BackendTLSPolicy", "gateway.networking.k8s.io/v1"), ("Something", "install.istio.io/v1alpha1"),
])
def test_unsupported_mesh_kinds_are_named_in_a_warning(kind: str, api: str) -> None:
    value, issues = convert(raw(kind, api, {"spec": {}}))
    assert value is None
    assert [(i.severity, i.field) for i in issues] == [("warning", "kind")]
    assert issues[0].message.startswith(f"{kind} ({api}) is not supported by Meshline and is ignored: ")


def test_other_kinds_stay_silent() -> None:
    assert convert(raw("Deployment", "apps/v1", {"spec": {}})) == (None, ())


def test_istio_labels_are_aliases_of_meshlines() -> None:
    mesh, issues = mesh_of("""
    apiVersion: v1
    kind: Namespace
    metadata: {name: amb, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp}}
    ---
    apiVersion: v1
    kind: Namespace
    metadata: {name: side, labels: {istio-injection: enabled}}
    ---
    apiVersion: v1
    kind: Namespace
    metadata: {name: rev, labels: {istio.io/rev: canary}}
    ---
    apiVersion: v1
    kind: Pod
    metadata: {name: a, namespace: amb, labels: {app: a}}
    spec: {containers: [{name: app, image: x}]}
    ---
    apiVersion: v1
    kind: Pod
    metadata: {name: out, namespace: amb, labels: {app: a, istio.io/dataplane-mode: none}}
    spec: {containers: [{name: app, image: x}]}
    ---
    apiVersion: v1
    kind: Pod
    metadata:
      name: opted-out
      namespace: side
      annotations: {meshline.io/status: injected, sidecar.istio.io/inject: "false"}
    spec: {containers: [{name: app, image: x}]}
    ---
    apiVersion: v1
    kind: Service
    metadata: {name: svc, namespace: side, labels: {istio.io/use-waypoint: gw}}
    spec: {ports: [{name: http, port: 80}]}
    """)
    assert not issues
    assert dataplane_mode(mesh, mesh.workloads[("amb", "a")]) == "ambient"
    assert dataplane_mode(mesh, mesh.workloads[("amb", "out")]) == "none"
    assert not runs_sidecar(mesh.workloads[("side", "opted-out")])
    assert dict(mesh.namespaces["side"].labels)["meshline.io/dataplane-mode"] == "sidecar"
    assert dict(mesh.namespaces["rev"].labels)["meshline.io/dataplane-mode"] == "sidecar"
    assert waypoint_name(mesh, mesh.services["svc.side.svc.cluster.local"]) == "gw"
    assert dict(mesh.namespaces["amb"].labels)["meshline.io/use-waypoint"] == "wp"


def test_meshline_labels_win_over_istio_aliases_with_a_warning() -> None:
    value, issues = convert(raw("Namespace", "v1", {"metadata": {"labels": {
        "istio.io/dataplane-mode": "ambient", "meshline.io/dataplane-mode": "sidecar"}}}, ns=""))
    assert dict(value.labels)["meshline.io/dataplane-mode"] == "sidecar"  # type: ignore[attr-defined]
    assert [(i.severity, i.field) for i in issues] == [("warning", "metadata.labels[istio.io/dataplane-mode]")]


MESH_WIDE = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny, namespace: istio-system}
spec: {action: DENY, rules: [{to: [{operation: {paths: [/admin]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: one, namespace: istio-system}
spec: {selector: {matchLabels: {app: gw}}, action: DENY, rules: [{}]}
"""


def test_mesh_wide_objects_in_istio_system_are_warned_unless_it_is_the_root() -> None:
    _, issues = mesh_of(MESH_WIDE)
    named = sorted((i.ref.kind, i.ref.name) for i in issues if i.message.startswith("NOT MESH-WIDE"))
    assert named == [("AuthorizationPolicy", "deny"), ("PeerAuthentication", "default")]
    msg = next(i.message for i in issues if i.ref.name == "default")
    assert "applies only to namespace istio-system" in msg and "--root-namespace istio-system" in msg
    _, issues = mesh_of(MESH_WIDE, root_namespace="istio-system")
    assert not [i for i in issues if i.message.startswith("NOT MESH-WIDE")]


def test_istio_system_as_root_makes_the_policies_mesh_wide() -> None:
    from controlplane.model.policy import authorization_policies_for, effective_mtls

    mesh, _ = mesh_of(MESH_WIDE, root_namespace="istio-system")
    assert effective_mtls(mesh, "shop", ()).mode == "STRICT"
    assert [p.name for p in authorization_policies_for(mesh, "shop", ())] == ["deny"]


def test_sidecar_egress_protocol_that_differs_is_warned() -> None:
    sc = """
    apiVersion: networking.istio.io/v1
    kind: Sidecar
    metadata: {name: default, namespace: default}
    spec:
      egress:
      - {port: {number: 9080, protocol: TCP, name: reviews}, hosts: ["./*"]}
      - {port: {number: 3306, protocol: TCP, name: db}, hosts: ["./*"]}
    """
    _, issues = mesh_of(SERVICES, sc)
    assert [i.field for i in issues if "protocol" in i.field] == ["spec.egress[0].port.protocol"]
    assert "default/reviews (http)" in warnings(issues, "spec.egress[0].port.protocol")[0]


def test_destination_rule_workload_selector_applies_to_selected_clients_of_its_namespace() -> None:
    rules = """
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: all, namespace: default}
    spec: {host: mysql.default.svc.cluster.local, trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}}
    ---
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: pp-only, namespace: default}
    spec:
      host: mysql.default.svc.cluster.local
      workloadSelector: {matchLabels: {app: productpage}}
      trafficPolicy: {loadBalancer: {simple: RANDOM}}
    """
    base = SERVICES.split("---\napiVersion: networking.istio.io/v1\nkind: DestinationRule")[0]
    mesh, issues = mesh_of(base, rules)
    assert not [i for i in issues if i.ref.kind == "DestinationRule"]
    name = "outbound|3306||mysql.default.svc.cluster.local"

    def lb(p: ProxyMeta) -> int:
        return outbound(mesh, p)[CLUSTER][name].lb_policy

    assert lb(proxy("productpage-1")) == cluster_pb2.Cluster.RANDOM
    assert lb(proxy("ratings-1")) == cluster_pb2.Cluster.LEAST_REQUEST
    # Other namespaces never see it (the rule without a selector is the service namespace's).
    assert lb(proxy(None, "other", labels={"app": "productpage"})) == cluster_pb2.Cluster.LEAST_REQUEST
    assert shared_key(mesh, proxy("productpage-1")) != shared_key(mesh, proxy("ratings-1"))
    _, issues = mesh_of(base, rules.replace("app: productpage", "app: nobody"))
    assert warnings(issues, "workloadSelector") == [
        "no Pod of namespace default has the labels app=nobody: this rule applies to no client (a workloadSelector "
        "never reaches other namespaces)"]


def test_validating_webhook_passes_istio_kind_warnings_through() -> None:
    from webhook.validate import validate_object

    verdict = validate_object({"apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin",
                               "metadata": {"name": "t", "namespace": "default"}, "spec": {}})
    assert verdict.allowed and not verdict.errors
    assert verdict.warnings[0].startswith("kind: WasmPlugin (extensions.istio.io/v1alpha1) is not supported by "
                                          "Meshline")
    ok = validate_object({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
                          "metadata": {"name": "r", "namespace": "default"},
                          "spec": {"hosts": ["reviews"], "http": [{"match": [{"name": "m", "sourceLabels": {"a": "b"}}],
                                   "route": [{"destination": {"host": "reviews"}}],
                                   "retries": {"attempts": 2, "retryRemoteLocalities": True}}]}})
    assert ok.allowed and ok.warnings == ()


def test_sidecar_registry_only_blocks_destinations_outside_the_scope() -> None:
    from controlplane.translate.names import BLACKHOLE_CLUSTER, PASSTHROUGH_CLUSTER, VIRTUAL_OUTBOUND

    sc = """
    apiVersion: networking.istio.io/v1
    kind: Sidecar
    metadata: {name: default, namespace: default}
    spec:
      egress: [{hosts: ["./*"]}]
      outboundTrafficPolicy: {mode: REGISTRY_ONLY}
    """
    mesh, issues = mesh_of(SERVICES, sc)
    assert [i.field for i in issues if i.ref.kind == "Sidecar"] == []  # ServiceEntry hosts can be admitted now
    built = outbound(mesh, proxy("ratings-1"))
    lst = built[LISTENER][VIRTUAL_OUTBOUND]
    t = tcp_proxy_pb2.TcpProxy()
    assert lst.default_filter_chain.filters[0].typed_config.Unpack(t)
    assert t.cluster == BLACKHOLE_CLUSTER and PASSTHROUGH_CLUSTER not in built[CLUSTER]
    hosts = {v.name: v for v in built[ROUTE]["9080"].virtual_hosts}
    assert "allow_any" not in hosts and hosts["block_all"].routes[0].direct_response.status == 502
    # ALLOW_ANY (the default) keeps the passthrough; other namespaces are not scoped by it.
    mesh, _ = mesh_of(SERVICES, sc.replace("REGISTRY_ONLY", "ALLOW_ANY"))
    assert PASSTHROUGH_CLUSTER in outbound(mesh, proxy("ratings-1"))[CLUSTER]
    bad = textwrap.dedent(sc.replace("{mode: REGISTRY_ONLY}", "{mode: REGISTRY_ONLY, egressProxy: {host: x}}"))
    (raw_sc,), _ = parse_documents(bad, "t.yaml")
    value, found = convert(raw_sc)
    assert value is None and [i.field for i in found if i.severity == "error"] == ["spec.outboundTrafficPolicy.egressProxy"]
