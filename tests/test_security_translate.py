"""Which PeerAuthentication mode and AuthorizationPolicies reach a workload's inbound
listeners, and how outbound clusters decide between mesh mTLS, TLS and plaintext."""

from __future__ import annotations

import pytest
import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

from controlplane.model.ambient import runs_sidecar
from controlplane.model.convert import convert
from controlplane.model.ir import ClientTLS, PortProtocol, ProxyMeta, Workload
from controlplane.model.mesh import Mesh
from controlplane.model.policy import authorization_policies_for, effective_mtls
from controlplane.model.raw import RawObject
from controlplane.model.store import assemble
from controlplane.sources.kube_informer import resources
from controlplane.translate.plan import CLUSTER, ENDPOINT, LISTENER, build_all
from controlplane.translate.security import upstream_tls
from controlplane.translate.sidecar import inbound_security, plan_inbound, plan_outbound


def mesh_of(text: str, **settings: str) -> Mesh:
    values = []
    for doc in yaml.safe_load_all(text):
        meta = doc["metadata"]
        raw = RawObject(doc["kind"], doc["apiVersion"], meta.get("namespace", ""), meta["name"], doc)
        value, issues = convert(raw)
        assert not [i for i in issues if i.severity == "error"], [i.format() for i in issues]
        values.append(value)
    return assemble(values, **settings)


def peer(name: str, ns: str, spec: str) -> str:
    return f"---\napiVersion: security.meshline.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, " \
           f"namespace: {ns}}}\nspec: {spec}\n"


LABELS = (("app", "web"),)


# --------------------------------------------------------------------------- PeerAuthentication


def test_default_is_permissive() -> None:
    assert effective_mtls(mesh_of(peer("x", "other", "{mtls: {mode: STRICT}}")), "shop", LABELS).mode == "PERMISSIVE"


def test_workload_beats_namespace_beats_mesh_and_unset_inherits() -> None:
    text = (peer("mesh", "meshline-system", "{mtls: {mode: STRICT}}")
            + peer("ns", "shop", "{mtls: {mode: DISABLE}}")
            + peer("web", "shop", "{selector: {matchLabels: {app: web}}, mtls: {mode: PERMISSIVE}}"))
    m = mesh_of(text)
    assert effective_mtls(m, "shop", LABELS).mode == "PERMISSIVE"
    assert effective_mtls(m, "shop", (("app", "api"),)).mode == "DISABLE"
    assert effective_mtls(m, "other", LABELS).mode == "STRICT"
    unset = mesh_of(peer("mesh", "meshline-system", "{mtls: {mode: STRICT}}")
                    + peer("ns", "shop", "{mtls: {mode: UNSET}}")
                    + peer("web", "shop", "{selector: {matchLabels: {app: web}}}"))
    policy = effective_mtls(unset, "shop", LABELS)
    assert policy.mode == "STRICT" and [r.name for r in policy.sources] == ["web", "ns", "mesh"]


def test_port_level_modes_come_from_the_workload_policy() -> None:
    m = mesh_of(peer("ns", "shop", "{mtls: {mode: STRICT}}") + peer(
        "web", "shop", '{selector: {matchLabels: {app: web}}, portLevelMtls: {"80": {mode: DISABLE}, "81": {}}}'))
    policy = effective_mtls(m, "shop", LABELS)
    assert policy.mode == "STRICT" and policy.ports == ((80, "DISABLE"), (81, "STRICT"))
    assert policy.for_port(80) == "DISABLE" and policy.for_port(82) == "STRICT"


def test_root_namespace_is_configurable() -> None:
    text = peer("mesh", "istio-system", "{mtls: {mode: STRICT}}")
    assert effective_mtls(mesh_of(text), "shop", LABELS).mode == "PERMISSIVE"
    assert effective_mtls(mesh_of(text, root_namespace="istio-system"), "shop", LABELS).mode == "STRICT"
    # A selector in the root namespace only selects workloads there.
    sel = peer("mesh", "meshline-system", "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}}")
    assert effective_mtls(mesh_of(sel), "shop", LABELS).mode == "PERMISSIVE"
    assert effective_mtls(mesh_of(sel), "meshline-system", LABELS).mode == "STRICT"


def test_competing_policies_first_by_name_wins_and_validation_says_so() -> None:
    m = mesh_of(peer("a", "shop", "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}}")
                + peer("b", "shop", "{selector: {matchLabels: {app: web}}, mtls: {mode: DISABLE}}")
                + peer("c", "shop", "{mtls: {mode: STRICT}}") + peer("d", "shop", "{mtls: {mode: DISABLE}}")
                + """---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {containers: [{name: web}]}
""")
    assert effective_mtls(m, "shop", LABELS).mode == "STRICT"
    assert effective_mtls(m, "shop", ()).mode == "STRICT"
    warnings = {(i.ref.name, i.field) for i in m.issues if i.severity == "warning"}
    assert warnings == {("b", "spec.selector"), ("d", "spec")}


# --------------------------------------------------------------------------- AuthorizationPolicy scope


def test_authorization_policies_for_a_workload() -> None:
    def policy(name: str, ns: str, selector: str = "") -> str:
        sel = f"selector: {{matchLabels: {{{selector}}}}}, " if selector else ""
        return f"---\napiVersion: security.meshline.io/v1\nkind: AuthorizationPolicy\n" \
               f"metadata: {{name: {name}, namespace: {ns}}}\nspec: {{{sel}rules: [{{}}]}}\n"

    m = mesh_of(policy("ns-wide", "shop") + policy("web", "shop", "app: web") + policy("api", "shop", "app: api")
                + policy("mesh", "meshline-system") + policy("mesh-web", "meshline-system", "app: web")
                + policy("other", "other"))
    names = [p.name for p in authorization_policies_for(m, "shop", LABELS)]
    assert names == ["mesh", "mesh-web", "ns-wide", "web"]


def test_inbound_security_carries_mode_trust_domain_and_policies() -> None:
    m = mesh_of(peer("ns", "shop", "{mtls: {mode: STRICT}}") + """---
apiVersion: security.meshline.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: shop}
spec: {}
""", trust_domain="example.org")
    sec, sources = inbound_security(m, ProxyMeta("n", namespace="shop", labels=LABELS), None)
    assert (sec.mode, sec.trust_domain, [p.name for p in sec.authz]) == ("STRICT", "example.org", ["p"])
    assert [(s.kind, s.name) for s in sources] == [("PeerAuthentication", "ns"), ("AuthorizationPolicy", "p")]


# --------------------------------------------------------------------------- outbound


def workload(**kw: object) -> Workload:
    base: dict[str, object] = {"ref": None, "namespace": "shop", "name": "w", "ip": "10.0.0.1",
                               "annotations": (("meshline.io/status", "injected"),)}
    base.update(kw)
    return Workload(**base)  # type: ignore[arg-type]


def test_which_pods_run_a_sidecar() -> None:
    assert runs_sidecar(workload())
    assert not runs_sidecar(workload(annotations=()))
    assert not runs_sidecar(workload(host_network=True))
    assert not runs_sidecar(workload(labels=(("meshline.io/inject", "false"),)))
    assert not runs_sidecar(workload(annotations=(("meshline.io/inject", "False"), ("meshline.io/status", "injected"))))


PEERS = (("spiffe://td/ns/shop/sa/web",), ("spiffe://td/ns/shop/sa/legacy", "spiffe://td/ns/shop/sa/web"))


@pytest.mark.parametrize(("tls", "mesh_eps", "expected"), [
    (None, False, None),
    (None, True, ("auto", "sni", PEERS[0], ("http/1.1",))),
    (ClientTLS("DISABLE"), True, None),
    (ClientTLS("ISTIO_MUTUAL"), False, ("mesh", "sni", PEERS[1], ("http/1.1",))),
    (ClientTLS("ISTIO_MUTUAL", "custom", ("spiffe://x",)), False, ("mesh", "custom", ("spiffe://x",), ("http/1.1",))),
    (ClientTLS("SIMPLE", "api.example.com"), True, ("simple", "api.example.com", ("api.example.com",), ())),
    (ClientTLS("MUTUAL", None, ("a.example.com",)), True, ("simple", "", ("a.example.com",), ())),
])
def test_upstream_tls_modes(tls: ClientTLS | None, mesh_eps: bool, expected: tuple[object, ...] | None) -> None:
    got = upstream_tls(tls, mesh_eps, "sni", PEERS, "td", PortProtocol.HTTP)
    assert (None if got is None else (got.mode, got.sni, got.sans, got.alpn)) == expected


def test_alpn_follows_the_cluster_protocol() -> None:
    alpn = {p: upstream_tls(None, True, "s", PEERS, "td", p).alpn for p in PortProtocol}  # type: ignore[union-attr]
    assert alpn == {PortProtocol.HTTP: ("http/1.1",), PortProtocol.HTTP2: ("h2",), PortProtocol.GRPC: ("h2",),
                    PortProtocol.TCP: (), PortProtocol.UNKNOWN: ()}


MIXED = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {selector: {app: web}, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Endpoints
metadata: {name: web, namespace: shop}
subsets:
- addresses:
  - {ip: 10.0.0.1, targetRef: {kind: Pod, name: web-1}}
  - {ip: 10.0.0.2, targetRef: {kind: Pod, name: web-2}}
  ports: [{name: http, port: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}, annotations: {meshline.io/status: injected}}
spec: {serviceAccountName: web, containers: [{name: web}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: shop, labels: {app: web}}
spec: {containers: [{name: web}]}
"""


def test_mixed_endpoints_get_mtls_only_where_a_sidecar_runs() -> None:
    built = build_all(plan_outbound(mesh_of(MIXED, trust_domain="example.org"), "shop", "bind"))
    c = built[CLUSTER]["outbound|80||web.shop.svc.cluster.local"]
    assert isinstance(c, cluster_pb2.Cluster)
    mtls, plain = c.transport_socket_matches
    assert dict(mtls.match.fields) and mtls.match.fields["tlsMode"].string_value == "meshline"
    assert not plain.match.fields and plain.transport_socket.name == "envoy.transport_sockets.raw_buffer"
    ctx = tls_pb2.UpstreamTlsContext()
    assert mtls.transport_socket.typed_config.Unpack(ctx)
    assert ctx.sni == "outbound_.80_._.web.shop.svc.cluster.local"
    sans = ctx.common_tls_context.combined_validation_context.default_validation_context.match_typed_subject_alt_names
    assert [s.matcher.exact for s in sans] == ["spiffe://example.org/ns/shop/sa/web"]
    assert [s.name for s in ctx.common_tls_context.tls_certificate_sds_secret_configs] == ["default"]
    assert ctx.common_tls_context.combined_validation_context.validation_context_sds_secret_config.name == "ROOTCA"
    cla = built[ENDPOINT]["outbound|80||web.shop.svc.cluster.local"]
    marked = {lb.endpoint.address.socket_address.address: dict(lb.metadata.filter_metadata)
              for lb in cla.endpoints[0].lb_endpoints}  # type: ignore[attr-defined]
    assert marked["10.0.0.1"]["envoy.transport_socket_match"].fields["tlsMode"].string_value == "meshline"
    assert marked["10.0.0.2"] == {}


def test_inbound_listeners_are_permissive_by_default_with_both_chains() -> None:
    m = mesh_of(MIXED.replace("spec: {serviceAccountName: web, containers: [{name: web}]}",
                              "spec: {serviceAccountName: web, containers: [{name: web}]}\nstatus: {podIP: 10.0.0.1}"))
    built = build_all(plan_inbound(m, ProxyMeta("n", namespace="shop", workload="web-1")))
    (lst,) = built[LISTENER].values()
    assert [fc.name for fc in lst.filter_chains] == ["inbound_80_http", "inbound_80_mtls_http"]  # type: ignore[attr-defined]
    assert [lf.name for lf in lst.listener_filters] == ["envoy.filters.listener.tls_inspector"]  # type: ignore[attr-defined]


def test_kubernetes_source_watches_the_security_kinds() -> None:
    kinds = {(r.kind, r.group) for r in resources()}
    assert {("PeerAuthentication", "security.meshline.io"), ("AuthorizationPolicy", "security.meshline.io")} <= kinds
    istio = {(r.kind, r.group, r.priority) for r in resources(istio_api=True)} - {(k, g, 0) for k, g in kinds}
    assert {("PeerAuthentication", "security.istio.io", 1), ("AuthorizationPolicy", "security.istio.io", 1)} <= istio
