"""Gateway API Gateways of class meshline (issue 18, h24): HTTPS certificateRefs across
namespaces (ReferenceGrant), refused and missing references failing closed, TLS Passthrough
listeners with TLSRoutes, and gateway proxies receiving only the clusters their routes reach.

The mesh is the golden case `gwapi-gateway` (tests/golden/gwapi-gateway/in: gateway.yaml and
tls.yaml), so the translation asserted here is also the one the golden files pin down."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from google.protobuf import json_format

from controlplane.model.convert import convert
from controlplane.model.ir import Issue, ProxyMeta
from controlplane.model.mesh import Mesh
from controlplane.model.store import assemble
from controlplane.model.validate import check_mesh
from controlplane.sources.yamlload import parse_documents
from controlplane.translate.gateway import gateway_credentials, gateway_scope, plan_gateway_clusters
from controlplane.translate.plan import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET, ResourceSpec
from controlplane.translate.proxy import plan_proxy, plan_shared_hosts, shared_key
from tests.test_golden import GOLDEN, load_case, load_mesh

GW_KEY = ("Gateway.gateway.networking.k8s.io", "edge", "public")
PROXY = ProxyMeta(node_id="public-gw", mode="gateway", gateway="edge/public", namespace="edge", workload="public-1")
CASE_DIR = GOLDEN / "gwapi-gateway"


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    return load_mesh(CASE_DIR)


def with_yaml(extra: str, drop: tuple[tuple[str, str, str], ...] = ()) -> tuple[Mesh, list[Issue]]:
    """The golden mesh plus the objects of `extra`, minus those `drop` names (kind, ns, name)."""
    values: list[object] = []
    issues: list[Issue] = []
    texts = [p.read_text() for p in sorted((CASE_DIR / "in").glob("*.yaml"))] + [extra]
    for i, text in enumerate(texts):
        objects, errors = parse_documents(text, f"in{i}.yaml")
        assert not errors
        for raw in objects:
            if (raw.kind, raw.namespace, raw.name) in drop:
                continue
            value, found = convert(raw)
            issues += found
            if value is not None:
                values.append(value)
    m = assemble(values)
    return m, issues + list(check_mesh(m))


def listener_conditions(mesh: Mesh, name: str) -> dict[str, tuple[str, str]]:
    (ls,) = [ls for ls in mesh.gateway_status[GW_KEY].listeners if ls.name == name]
    return {c.type: (c.status, c.reason) for c in ls.conditions}


def plan(mesh: Mesh, meta: ProxyMeta = PROXY) -> dict[tuple[str, str], ResourceSpec]:
    return {(s.type_url, s.name): s for s in plan_proxy(mesh, meta).specs()}


def as_dict(spec: ResourceSpec) -> dict[str, Any]:
    return json.loads(json_format.MessageToJson(spec.make()))


# --------------------------------------------------------------------------- certificateRefs


def test_certificate_ref_to_another_namespace_is_served_when_a_reference_grant_allows_it(mesh: Mesh) -> None:
    assert listener_conditions(mesh, "partner") == {
        "Accepted": ("True", "Accepted"), "Programmed": ("True", "Programmed"),
        "ResolvedRefs": ("True", "ResolvedRefs")}
    (srv,) = [s for s in mesh.gateways["edge/public"].servers if s.name == "partner"]
    assert srv.tls is not None and (srv.tls.credential_namespace, srv.tls.credential_name) == ("certs", "partner-cert")
    lst = as_dict(plan(mesh)[(LISTENER, "0.0.0.0_8444")])
    (chain,) = lst["filterChains"]
    assert chain["filterChainMatch"]["serverNames"] == ["partner.example.com"]
    sds = chain["transportSocket"]["typedConfig"]["commonTlsContext"]["tlsCertificateSdsSecretConfigs"]
    assert [s["name"] for s in sds] == ["kubernetes-gateway://certs/partner-cert"]
    # the proxy proven to be the Gateway's pod receives that Secret's material (namespace certs)
    creds = {s.name: s for s in gateway_credentials(mesh, PROXY, "edge", "public", "/ca.pem")}
    secret = creds["kubernetes-gateway://certs/partner-cert"].make()
    assert secret.tls_certificate.certificate_chain.inline_bytes.decode() == mesh.credentials[
        ("certs", "partner-cert")].cert_pem
    same_ns = creds["kubernetes-gateway://edge/public-cert"].make()
    assert same_ns.tls_certificate.certificate_chain.inline_bytes.decode() == mesh.credentials[
        ("edge", "public-cert")].cert_pem


def test_a_proxy_that_is_not_the_gateways_pod_gets_stand_ins_not_the_other_namespaces_secret(mesh: Mesh) -> None:
    real = mesh.credentials[("certs", "partner-cert")].cert_pem
    for ns, sa in (("edge", "someone-else"), ("certs", "public")):
        creds = {s.name: s.make() for s in gateway_credentials(mesh, PROXY, ns, sa, "/ca.pem")}
        got = creds["kubernetes-gateway://certs/partner-cert"].tls_certificate.certificate_chain.inline_bytes.decode()
        assert got and got != real


def test_certificate_ref_without_a_reference_grant_fails_closed(mesh: Mesh) -> None:
    assert listener_conditions(mesh, "denied") == {
        "Accepted": ("True", "Accepted"), "Programmed": ("False", "Invalid"),
        "ResolvedRefs": ("False", "RefNotPermitted")}
    st = mesh.gateway_status[GW_KEY]
    assert {c.type: c.reason for c in st.conditions}["Accepted"] == "ListenersNotValid"
    specs = plan(mesh)
    assert (LISTENER, "0.0.0.0_8445") not in specs  # nothing listens: not even a TLS handshake
    vault = [s.make() for s in gateway_credentials(mesh, PROXY, "edge", "public", "/ca.pem") if "vault" in s.name]
    assert vault and all(v.tls_certificate.certificate_chain.inline_bytes.decode() != mesh.credentials[
        ("vault", "vault-cert")].cert_pem for v in vault if v.HasField("tls_certificate"))  # stand-ins only


def test_removing_the_reference_grant_withdraws_the_listener_and_its_secret() -> None:
    m, issues = with_yaml("", drop=(("ReferenceGrant", "certs", "edge-gateways"),))
    assert listener_conditions(m, "partner")["ResolvedRefs"] == ("False", "RefNotPermitted")
    assert (LISTENER, "0.0.0.0_8444") not in plan(m)
    creds = {s.name: s.make() for s in gateway_credentials(m, PROXY, "edge", "public", "/ca.pem")}
    held = creds["kubernetes-gateway://certs/partner-cert"].tls_certificate.certificate_chain.inline_bytes.decode()
    assert held != m.credentials[("certs", "partner-cert")].cert_pem  # a stand-in, never the Secret
    assert any(i.field == "spec.listeners[4]" and "RefNotPermitted" in i.message for i in issues)


def test_grant_for_another_secret_name_or_kind_does_not_permit() -> None:
    for to in ('[{group: "", kind: Secret, name: other-cert}]', '[{group: "", kind: Service}]'):
        grant = f"""apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {{name: edge-gateways, namespace: certs}}
spec:
  from: [{{group: gateway.networking.k8s.io, kind: Gateway, namespace: edge}}]
  to: {to}
"""
        m, _ = with_yaml(grant, drop=(("ReferenceGrant", "certs", "edge-gateways"),))
        assert listener_conditions(m, "partner")["ResolvedRefs"] == ("False", "RefNotPermitted"), to


def test_missing_secret_is_an_invalid_certificate_ref_and_the_listener_is_not_served() -> None:
    m, issues = with_yaml("", drop=(("Secret", "certs", "partner-cert"),))
    assert listener_conditions(m, "partner") == {
        "Accepted": ("True", "Accepted"), "Programmed": ("False", "Invalid"),
        "ResolvedRefs": ("False", "InvalidCertificateRef")}
    assert (LISTENER, "0.0.0.0_8444") not in plan(m)
    assert any("Secret certs/partner-cert was not found" in i.message for i in issues)


# --------------------------------------------------------------------------- TLS passthrough


def test_tls_passthrough_listener_routes_sni_to_the_tlsroute_backend(mesh: Mesh) -> None:
    lst = as_dict(plan(mesh)[(LISTENER, "0.0.0.0_9443")])
    assert [f["name"] for f in lst["listenerFilters"]] == ["envoy.filters.listener.tls_inspector"]
    (chain,) = lst["filterChains"]
    assert chain["filterChainMatch"]["serverNames"] == ["pg.db.example.com"]
    assert "transportSocket" not in chain  # not terminated: the backend's own certificate is seen
    (tcp,) = chain["filters"]
    assert tcp["typedConfig"]["cluster"] == "outbound|8443||vault.shop.svc.cluster.local"
    (st,) = mesh.route_status[("TLSRoute", "shop", "pg")]
    assert {c.type: (c.status, c.reason) for c in st.conditions} == {
        "Accepted": ("True", "Accepted"), "ResolvedRefs": ("True", "ResolvedRefs")}
    (ls,) = [ls for ls in mesh.gateway_status[GW_KEY].listeners if ls.name == "tls"]
    assert (ls.supported_kinds, ls.attached_routes) == (("TLSRoute",), 1)


TLS_ROUTE = """apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {{name: {name}, namespace: shop, creationTimestamp: "{created}"}}
spec:
  parentRefs: [{parents}]
  hostnames: [{hosts}]
  rules:
  - backendRefs: [{{name: {backend}, port: {port}}}]
"""


def tls_route(name: str, hosts: str, backend: str = "vault", port: int = 8443, created: str = "2026-01-02T00:00:00Z",
              parents: str = "{name: public, namespace: edge, sectionName: tls}") -> str:
    return TLS_ROUTE.format(name=name, hosts=hosts, backend=backend, port=port, created=created, parents=parents)


def test_the_oldest_tlsroute_keeps_a_hostname_and_each_name_gets_its_chain() -> None:
    extra = "---\n".join([
        tls_route("newer", "pg.db.example.com, mysql.db.example.com", backend="db", port=5432,
                  created="2026-03-01T00:00:00Z"),
        tls_route("outside", "www.example.com"),
        tls_route("wildcard", "'*.db.example.com'", backend="db", port=5432, created="2026-04-01T00:00:00Z")])
    m, _ = with_yaml(extra)
    chains = {tuple(c.get("filterChainMatch", {}).get("serverNames", ())): c["filters"][0]["typedConfig"]["cluster"]
              for c in as_dict(plan(m)[(LISTENER, "0.0.0.0_9443")])["filterChains"]}
    assert chains == {("pg.db.example.com",): "outbound|8443||vault.shop.svc.cluster.local",  # pg (no timestamp)
                      ("mysql.db.example.com",): "outbound|5432||db.shop.svc.cluster.local",
                      ("*.db.example.com",): "outbound|5432||db.shop.svc.cluster.local"}
    (st,) = m.route_status[("TLSRoute", "shop", "outside")]
    assert st.condition("Accepted") is not None and st.condition("Accepted").reason == "NoMatchingListenerHostname"  # type: ignore[union-attr]


def test_tlsroute_backend_problems_are_reported_and_its_connections_fail() -> None:
    m, _ = with_yaml(tls_route("nowhere", "x.db.example.com", backend="missing"))
    (st,) = m.route_status[("TLSRoute", "shop", "nowhere")]
    assert {c.type: (c.status, c.reason) for c in st.conditions}["ResolvedRefs"] == ("False", "BackendNotFound")
    chains = as_dict(plan(m)[(LISTENER, "0.0.0.0_9443")])["filterChains"]
    (bad,) = [c for c in chains if c.get("filterChainMatch", {}).get("serverNames") == ["x.db.example.com"]]
    cluster = bad["filters"][0]["typedConfig"]["cluster"]
    assert cluster.endswith("invalid-backend.meshline") and (CLUSTER, cluster) not in plan(m)


def test_http_routes_do_not_attach_to_a_tls_listener_nor_tlsroutes_to_https() -> None:
    http = """apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: wrong, namespace: shop}
spec:
  parentRefs: [{name: public, namespace: edge, sectionName: tls}]
  rules: [{backendRefs: [{name: web, port: 8080}]}]
"""
    m, _ = with_yaml(http + "---\n" + tls_route("onhttps", "partner.example.com",
                                                 parents="{name: public, namespace: edge, sectionName: partner}"))
    for kind, name in (("HTTPRoute", "wrong"), ("TLSRoute", "onhttps")):
        (st,) = m.route_status[(kind, "shop", name)]
        assert st.condition("Accepted").reason == "NotAllowedByListeners", kind  # type: ignore[union-attr]


def test_tlsroute_with_a_service_parent_is_warned_and_changes_no_mesh_routing() -> None:
    m, issues = with_yaml(tls_route("mesh", "pg.db.example.com", parents="{group: '', kind: Service, name: web}"))
    assert any(i.field == "spec.parentRefs" and "TLSRoute attached to a Service" in i.message for i in issues)
    base = load_mesh(CASE_DIR)
    assert m.vs_by_host == base.vs_by_host and ("TLSRoute", "shop", "mesh") not in m.route_status


def test_tls_listener_conversion_errors_name_the_field() -> None:
    gw = """apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: t, namespace: edge}
spec:
  gatewayClassName: meshline
  listeners:
  - {name: b, port: 9444, protocol: TLS, tls: {mode: Terminate, certificateRefs: [{name: public-cert}]}}
  - {name: c, port: 9445, protocol: HTTPS, tls: {mode: Passthrough}}
"""
    m, issues = with_yaml(gw + "---\n" + gw.replace("name: t,", "name: u,").replace(
        "  - {name: b,", "  - {name: a, port: 9443, protocol: TLS}\n  - {name: b,"))
    assert any(i.ref.name == "u" and i.field == "spec.listeners[0].tls" and i.severity == "error" for i in issues)
    assert ("Gateway.gateway.networking.k8s.io", "edge", "u") not in m.gateway_status  # an invalid object
    st = m.gateway_status[("Gateway.gateway.networking.k8s.io", "edge", "t")]
    reasons = {ls.name: {c.type: c.reason for c in ls.conditions}["Accepted"] for ls in st.listeners}
    assert reasons == {"b": "UnsupportedProtocol", "c": "UnsupportedProtocol"}


# --------------------------------------------------------------------------- scoping


def referenced_clusters(specs: dict[tuple[str, str], ResourceSpec]) -> set[str]:
    """Every cluster named by the proxy's route configurations and listeners (routes, weighted
    clusters, mirrors, tcp_proxy)."""
    out: set[str] = set()

    def walk(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "cluster" and isinstance(v, str):
                    yield v
                elif k == "weightedClusters":
                    yield from (c["name"] for c in v.get("clusters", ()))
                else:
                    yield from walk(v)
        elif isinstance(node, list):
            for v in node:
                yield from walk(v)

    for (t, _), spec in specs.items():
        if t in (LISTENER, ROUTE):
            out.update(walk(as_dict(spec)))
    return out


@pytest.mark.parametrize("case_name", ["gateway", "gateway-merge", "gwapi-gateway", "istio-131-fields"])
def test_gateway_proxies_get_exactly_the_clusters_their_routes_reach(case_name: str) -> None:
    case = load_case(case_name)
    for meta in (p for p in case.proxies if p.mode == "gateway"):
        specs = plan(case.mesh, meta)
        clusters = {n for t, n in specs if t == CLUSTER}
        endpoints = {n for t, n in specs if t == ENDPOINT}
        wanted = {c for c in referenced_clusters(specs) if c != "BlackHoleCluster"
                  and not c.endswith("invalid-backend.meshline")}
        service_clusters = {c for c in clusters if c.startswith("outbound|")}
        assert wanted <= clusters, (meta.node_id, wanted - clusters)  # no route to a missing cluster
        # nothing beyond what routes reach (subsets of a reached port come with it)
        assert {c.split("|")[1] + "|" + c.split("|")[3] for c in service_clusters} == {
            c.split("|")[1] + "|" + c.split("|")[3] for c in wanted if c.startswith("outbound|")}, meta.node_id
        assert endpoints <= clusters


def test_scoped_gateway_layer_omits_services_nothing_routes_to(mesh: Mesh) -> None:
    scope = gateway_scope(mesh, PROXY)
    assert sorted(scope) == [("api.shop.svc.cluster.local", 9090), ("db.shop.svc.cluster.local", 5432),
                             ("vault.shop.svc.cluster.local", 8443), ("web-canary.shop.svc.cluster.local", 8080),
                             ("web.shop.svc.cluster.local", 8080)]
    everything = {s.name for s in plan_gateway_clusters(mesh, "edge") if s.type_url == CLUSTER}
    scoped = {s.name for s in plan_gateway_clusters(mesh, "edge", scope=scope) if s.type_url == CLUSTER}
    assert "outbound|8080||ledger.shop.svc.cluster.local" in everything - scoped
    # an endpoint-only change of a host outside the scope patches nothing of the gateway
    assert plan_shared_hosts(mesh, PROXY, frozenset({"ledger.shop.svc.cluster.local"})) == []
    got = plan_shared_hosts(mesh, PROXY, frozenset({"web.shop.svc.cluster.local"}))
    assert got is not None and {s.name for s in got if s.type_url == ENDPOINT} == {
        "outbound|8080||web.shop.svc.cluster.local"}


def test_a_new_route_widens_the_scope_and_the_shared_key(mesh: Mesh) -> None:
    route = """apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: ledger, namespace: shop}
spec:
  parentRefs: [{name: public, namespace: edge, sectionName: partner}]
  hostnames: [partner.example.com]
  rules:
  - matches: [{path: {type: PathPrefix, value: /ledger}}]
    backendRefs: [{name: ledger, port: 8080}]
"""
    m, _ = with_yaml(route)
    assert shared_key(m, PROXY) != shared_key(mesh, PROXY)
    assert (CLUSTER, "outbound|8080||ledger.shop.svc.cluster.local") in plan(m)
    other = replace(PROXY, gateway="edge/none", node_id="other")
    assert shared_key(mesh, other) != shared_key(mesh, PROXY)
    assert not [n for t, n in plan(mesh, other) if t == CLUSTER]  # serves nothing: no cluster of the mesh


def test_secret_names_of_istio_and_gateway_api_servers_never_collide(mesh: Mesh) -> None:
    creds = gateway_credentials(mesh, PROXY, "edge", "public", "/ca.pem")
    assert all(s.type_url == SECRET for s in creds)
    assert {s.name for s in creds} == {"kubernetes-gateway://edge/public-cert",
                                      "kubernetes-gateway://edge/public-cert-cacert",
                                      "kubernetes-gateway://certs/partner-cert",
                                      "kubernetes-gateway://certs/partner-cert-cacert",
                                      # the refused listener's: stand-ins (test above)
                                      "kubernetes-gateway://vault/vault-cert",
                                      "kubernetes-gateway://vault/vault-cert-cacert"}


def test_routes_of_another_kind_claim_no_host_of_a_listener() -> None:
    """The TCPRoute's table (host `*`) and the TLSRoute's (pg.db.example.com) take no host
    from the HTTPS listener partner.example.com or the HTTP one: no shared-host warning."""
    _, issues = with_yaml(tls_route("also-http", "pg.db.example.com") + """---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: pg-http, namespace: shop}
spec:
  parentRefs: [{name: public, namespace: edge, sectionName: https}]
  hostnames: [pg.db.example.com]
  rules: [{backendRefs: [{name: web, port: 8080}]}]
""")
    assert not [i.format() for i in issues if i.field == "spec.hosts"]


def test_tlsroute_status_is_planned_for_write_back() -> None:
    from controlplane.gwstatus import ROUTE_PLURALS, plan_route_updates
    from controlplane.model.events import Upsert
    from controlplane.model.store import MeshStore

    objects = []
    for path in sorted((CASE_DIR / "in").glob("*.yaml")):
        found, errors = parse_documents(path.read_text(), path.name)
        assert not errors
        objects += found
    store = MeshStore()
    store.apply([Upsert("t", r) for r in objects])
    by_key = {o.key: o for o in objects}
    key = ("TLSRoute", "shop", "pg")
    plan_ = plan_route_updates({key: by_key[key]}, store.mesh().route_status, store.issues_by_key(), "T1")
    (entry,) = plan_[key]
    assert entry["controllerName"] == "meshline.io/gateway-controller"
    assert entry["parentRef"] == {"name": "public", "namespace": "edge", "sectionName": "tls"}
    assert {c["type"]: c["status"] for c in entry["conditions"]} == {"Accepted": "True", "ResolvedRefs": "True"}
    assert ROUTE_PLURALS["TLSRoute"] == "tlsroutes"  # the status subresource it is written to (RBAC: tlsroutes/status)


def test_https_and_tls_passthrough_listeners_share_a_port_by_sni() -> None:
    gw = """apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: pub2, namespace: edge}
spec:
  gatewayClassName: meshline
  listeners:
  - {name: https, port: 443, protocol: HTTPS, hostname: www.example.com,
     tls: {certificateRefs: [{name: public-cert}]}, allowedRoutes: {namespaces: {from: All}}}
  - {name: tls, port: 443, protocol: TLS, hostname: "*.db.example.com", tls: {mode: Passthrough},
     allowedRoutes: {namespaces: {from: All}}}
"""
    m, _ = with_yaml(gw + "---\n" + tls_route("p2", "pg.db.example.com",
                                               parents="{name: pub2, namespace: edge, sectionName: tls}"))
    lst = as_dict(plan(m, replace(PROXY, gateway="edge/pub2"))[(LISTENER, "0.0.0.0_443")])
    chains = {tuple(c["filterChainMatch"]["serverNames"]): "transportSocket" in c for c in lst["filterChains"]}
    assert chains == {("www.example.com",): True, ("pg.db.example.com",): False}  # terminated / passed through


# Two TLS Passthrough listeners of one Gateway on one port, told apart by hostname (issue 18,
# h27; found by an adversarial review). Gateway API listener isolation: a connection goes to the
# listener whose hostname matches its SNI most specifically, and only that listener's routes see
# it. A TLSRoute of namespace `other`, allowed only on the catch-all listener `wide`, claims
# pg.db.example.com, a name of listener `narrow` that only routes of namespace edge may use: it
# must neither take the name nor make Envoy refuse the listener (two chains matching alike).
MULTI = """apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: multi, namespace: edge}
spec:
  gatewayClassName: meshline
  listeners:
  - {name: wide, port: 9500, protocol: TLS, tls: {mode: Passthrough}, allowedRoutes: {namespaces: {from: All}}}
  - {name: narrow, port: 9500, protocol: TLS, hostname: "*.db.example.com", tls: {mode: Passthrough},
     allowedRoutes: {namespaces: {from: Same}}}
---
apiVersion: v1
kind: Service
metadata: {name: thief, namespace: other}
spec: {clusterIP: 10.96.9.1, selector: {app: thief}, ports: [{name: tls, port: 8443}]}
---
apiVersion: v1
kind: Service
metadata: {name: legit, namespace: edge}
spec: {clusterIP: 10.96.9.2, selector: {app: legit}, ports: [{name: tls, port: 8443}]}
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {name: steal, namespace: other, creationTimestamp: "2020-01-01T00:00:00Z"}
spec:
  parentRefs: [{name: multi, namespace: edge, sectionName: wide}]
  hostnames: [STEAL_HOSTS]
  rules: [{backendRefs: [{name: thief, port: 8443}]}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {name: legit, namespace: edge, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  parentRefs: [{name: multi, namespace: edge, sectionName: narrow}]
  hostnames: [pg.db.example.com]
  rules: [{backendRefs: [{name: legit, port: 8443}]}]
"""
MULTI_PROXY = ProxyMeta(node_id="multi-gw", mode="gateway", gateway="edge/multi", namespace="edge", workload="multi-1")
THIEF = "outbound|8443||thief.other.svc.cluster.local"
LEGIT = "outbound|8443||legit.edge.svc.cluster.local"


def sni_chains(m: Mesh, meta: ProxyMeta, listener: str) -> list[tuple[tuple[str, ...], str]]:
    lst = as_dict(plan(m, meta)[(LISTENER, listener)])
    return [(tuple(c.get("filterChainMatch", {}).get("serverNames", ())), c["filters"][-1]["typedConfig"]["cluster"])
            for c in lst["filterChains"]]


def test_the_most_specific_listener_keeps_its_name_and_each_sni_has_one_chain() -> None:
    m, issues = with_yaml(MULTI.replace("STEAL_HOSTS", "pg.db.example.com"))
    chains = sni_chains(m, MULTI_PROXY, "0.0.0.0_9500")
    assert chains == [(("pg.db.example.com",), LEGIT)]  # was: the name twice, both to other's backend
    # the route that lost its name is still attached (Accepted), and says which name it lost and why
    (st,) = m.route_status[("TLSRoute", "other", "steal")]
    acc = st.condition("Accepted")
    assert acc is not None and acc.status == "True" and "pg.db.example.com on listener wide" in acc.message
    (legit,) = m.route_status[("TLSRoute", "edge", "legit")]
    assert "not served" not in legit.condition("Accepted").message  # type: ignore[union-attr]
    warned = [i for i in issues if i.ref.kind == "TLSRoute"]
    assert [(i.ref.namespace, i.ref.name, i.field, i.severity) for i in warned] == [
        ("other", "steal", "spec.hostnames", "warning")]
    assert "listener narrow's hostname *.db.example.com is more specific" in warned[0].message


def test_a_catch_all_route_does_not_get_the_narrower_listeners_other_names() -> None:
    """The wide listener's route without hostnames takes every SNI but the narrow listener's:
    a name under *.db.example.com that no route of narrow has is refused (a black-hole chain
    on the narrow hostname), not sent to the other namespace's backend."""
    m, issues = with_yaml(MULTI.replace("STEAL_HOSTS", ""))
    assert sorted(sni_chains(m, MULTI_PROXY, "0.0.0.0_9500")) == [
        ((), THIEF), (("*.db.example.com",), "BlackHoleCluster"), (("pg.db.example.com",), LEGIT)]
    assert not [i for i in issues if i.ref.kind == "TLSRoute"]


def test_a_name_of_an_older_route_on_the_same_listener_is_reported_to_the_newer_one() -> None:
    m, issues = with_yaml(tls_route("newer", "pg.db.example.com, mysql.db.example.com", created="2026-03-01T00:00:00Z"))
    (st,) = m.route_status[("TLSRoute", "shop", "newer")]
    assert "hostname pg.db.example.com on listener tls (TLSRoute shop/pg, the older route, has it)" in \
        st.condition("Accepted").message  # type: ignore[union-attr]
    assert [(i.ref.name, i.field) for i in issues if i.ref.kind == "TLSRoute"] == [("newer", "spec.hostnames")]
    assert dict(sni_chains(m, PROXY, "0.0.0.0_9443")) == {
        ("pg.db.example.com",): "outbound|8443||vault.shop.svc.cluster.local",
        ("mysql.db.example.com",): "outbound|8443||vault.shop.svc.cluster.local"}


ISTIO_TWO_PASSTHROUGH = """apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: sni, namespace: edge}
spec:
  selector: {app: sni-gw}
  servers:
  - port: {number: 9600, name: tls-all, protocol: TLS}
    hosts: ["*"]
    tls: {mode: PASSTHROUGH}
  - port: {number: 9600, name: tls-db, protocol: TLS}
    hosts: ["*.db.example.com"]
    tls: {mode: PASSTHROUGH}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: pg, namespace: edge}
spec:
  hosts: [pg.db.example.com]
  gateways: [sni]
  tls:
  - match: [{sniHosts: [pg.db.example.com]}]
    route: [{destination: {host: legit.edge.svc.cluster.local, port: {number: 8443}}}]
"""


def test_an_istio_gateway_with_two_passthrough_servers_of_one_port_has_one_chain_per_name() -> None:
    """Both servers' hosts cover the VirtualService's SNI name: one chain (was one per server:
    a listener Envoy refuses)."""
    m, _ = with_yaml(MULTI.replace("STEAL_HOSTS", "x.example.com") + "---\n" + ISTIO_TWO_PASSTHROUGH)
    meta = replace(MULTI_PROXY, gateway="edge/sni", node_id="sni-gw", workload="sni-1")
    assert sni_chains(m, meta, "0.0.0.0_9600") == [(("pg.db.example.com",), LEGIT)]


@pytest.mark.e2e
@pytest.mark.parametrize("steal", ["pg.db.example.com", "", "'*.example.com'", "http"])
def test_envoy_accepts_the_multi_listener_gateway(steal: str) -> None:
    """`envoy --mode validate` (the bundled Envoy, controlplane.envoycheck) accepts every resource
    of the gateway proxy of edge/multi: its listener on 9500 and the clusters it names (and, for
    `http`, also the HTTP listeners on 9700 with the catch-all route: the 404 virtual host)."""
    import asyncio

    from controlplane.cache.resources import Resource
    from controlplane.envoycheck import EnvoyValidator
    from controlplane.localrun import envoy_binary

    if steal == "http":
        m, _ = with_yaml(HTTP_MULTI.replace("hostnames: [pg.db.example.com, www.example.com]", "hostnames: []"))
    else:
        m, _ = with_yaml(MULTI.replace("STEAL_HOSTS", steal))
    resources = [Resource(s.type_url, s.name, s.make().SerializeToString(deterministic=True))
                 for s in plan_proxy(m, MULTI_PROXY).specs() if s.type_url in (LISTENER, CLUSTER, ROUTE)]
    assert (LISTENER, "0.0.0.0_9700" if steal == "http" else "0.0.0.0_9500") in {(r.type_url, r.name) for r in resources}
    verdict, rejected = asyncio.run(EnvoyValidator(envoy_binary()).rejected(resources))
    assert verdict.ok is True, verdict.message
    assert rejected == []


HTTP_MULTI = """apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: multi, namespace: edge}
spec:
  gatewayClassName: meshline
  listeners:
  - {name: wide, port: 9700, protocol: HTTP, allowedRoutes: {namespaces: {from: All}}}
  - {name: narrow, port: 9700, protocol: HTTP, hostname: "*.db.example.com", allowedRoutes: {namespaces: {from: Same}}}
---
apiVersion: v1
kind: Service
metadata: {name: thief, namespace: other}
spec: {clusterIP: 10.96.9.1, selector: {app: thief}, ports: [{name: http, port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: legit, namespace: edge}
spec: {clusterIP: 10.96.9.2, selector: {app: legit}, ports: [{name: http, port: 8080}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: steal, namespace: other, creationTimestamp: "2020-01-01T00:00:00Z"}
spec:
  parentRefs: [{name: multi, namespace: edge, sectionName: wide}]
  hostnames: [pg.db.example.com, www.example.com]
  rules: [{backendRefs: [{name: thief, port: 8080}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: legit, namespace: edge, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  parentRefs: [{name: multi, namespace: edge, sectionName: narrow}]
  hostnames: [pg.db.example.com]
  rules: [{backendRefs: [{name: legit, port: 8080}]}]
"""


def test_an_http_listener_keeps_its_names_from_a_route_of_the_catch_all_listener() -> None:
    """The same isolation for HTTP listeners of one port (one route table: by Host): the
    other namespace's route keeps www.example.com, and pg.db.example.com is edge's route's."""
    m, issues = with_yaml(HTTP_MULTI)
    rc = as_dict(plan(m, MULTI_PROXY)[(ROUTE, "http.9700")])
    clusters = {d: {r["route"]["cluster"] for r in vh["routes"]} for vh in rc["virtualHosts"] for d in vh["domains"]}
    assert clusters["pg.db.example.com"] == {"outbound|8080||legit.edge.svc.cluster.local"}
    assert clusters["www.example.com"] == {"outbound|8080||thief.other.svc.cluster.local"}
    assert [(i.ref.name, i.field) for i in issues if i.ref.kind == "HTTPRoute" and i.ref.name in ("steal", "legit")
            ] == [("steal", "spec.hostnames")]


def test_a_catch_all_http_route_gets_no_request_for_the_narrower_listeners_names() -> None:
    """The other namespace's route without hostnames serves every Host but those within
    *.db.example.com: pg.db.example.com is edge's route's, any other name there is a 404
    (a virtual host without routes), not the catch-all route's."""
    m, issues = with_yaml(HTTP_MULTI.replace("hostnames: [pg.db.example.com, www.example.com]", "hostnames: []"))
    rc = as_dict(plan(m, MULTI_PROXY)[(ROUTE, "http.9700")])
    clusters = {d: {r["route"]["cluster"] for r in vh.get("routes", [])} for vh in rc["virtualHosts"]
                for d in vh["domains"]}
    assert clusters == {"*": {"outbound|8080||thief.other.svc.cluster.local"},
                        "pg.db.example.com": {"outbound|8080||legit.edge.svc.cluster.local"},
                        "pg.db.example.com:*": {"outbound|8080||legit.edge.svc.cluster.local"},
                        "*.db.example.com": set(), "*.db.example.com:*": set()}
    assert not [i for i in issues if i.ref.kind == "HTTPRoute" and i.ref.name in ("steal", "legit")]


def test_a_refused_reference_gets_a_stand_in_so_a_key_held_before_is_overwritten() -> None:
    m, _ = with_yaml("", drop=(("ReferenceGrant", "certs", "edge-gateways"),))
    assert m.gateways["edge/public"].withheld_credentials == (("certs", "partner-cert"), ("vault", "vault-cert"))
    creds = {s.name: s.make() for s in gateway_credentials(m, PROXY, "edge", "public", "/ca.pem")}
    real = m.credentials[("certs", "partner-cert")].cert_pem
    got = creds["kubernetes-gateway://certs/partner-cert"].tls_certificate.certificate_chain.inline_bytes.decode()
    assert got and got != real  # the stand-in, never the Secret
    assert "kubernetes-gateway://certs/partner-cert-cacert" in creds


# A pod of another namespace carrying the Gateway's name label (found by an adversarial review):
# a Gateway API Gateway configures, and gives its Secrets to, gateway proxies of its own
# namespace only, as Istio applies it to the instances of its Service in its namespace.
TENANT_POD = """apiVersion: v1
kind: Pod
metadata:
  name: evil-1
  namespace: tenant
  labels: {gateway.networking.k8s.io/gateway-name: public}
spec: {serviceAccountName: evil, containers: [{name: proxy}]}
status: {podIP: 10.0.9.9}
"""
TENANT_GATEWAY = """apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: public, namespace: tenant}
spec:
  gatewayClassName: meshline
  listeners:
  - {name: grab, port: 9999, protocol: HTTP, allowedRoutes: {namespaces: {from: Same}}}
"""


@pytest.mark.parametrize("named", [True, False], ids=["--gateway edge/public", "by label"])
def test_a_pod_of_another_namespace_with_the_gateway_name_label_gets_no_key(named: bool) -> None:
    m, _ = with_yaml(TENANT_POD)
    evil = ProxyMeta(node_id="evil", mode="gateway", gateway="edge/public" if named else None,
                     namespace="tenant", workload="evil-1")
    creds = {s.name: s.make() for s in gateway_credentials(m, evil, "tenant", "evil", "/ca.pem")}
    keys = {c.key_pem for c in m.credentials.values() if c.key_pem}
    assert keys and not any(s.tls_certificate.private_key.inline_bytes.decode() in keys  # type: ignore[attr-defined]
                            for s in creds.values())
    assert not [n for t, n in plan(m, evil) if t == LISTENER]  # edge's listeners are not its to serve
    # edge's own gateway pod still gets its real key
    mine = {s.name: s.make() for s in gateway_credentials(m, PROXY, "edge", "public", "/ca.pem")}
    assert any(s.tls_certificate.private_key.inline_bytes.decode() in keys for s in mine.values())  # type: ignore[attr-defined]


def test_a_gateway_of_the_same_name_in_another_namespace_adds_nothing_to_edges_proxy() -> None:
    m, _ = with_yaml(TENANT_GATEWAY)
    by_label = ProxyMeta(node_id="public-gw", mode="gateway", namespace="edge", workload="public-1")
    listeners = {n for t, n in plan(m, by_label) if t == LISTENER}
    assert listeners and "0.0.0.0_9999" not in listeners
