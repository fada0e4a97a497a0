"""Istio Gateways and the VirtualService `gateways:` binding (issue 18), without Envoy: the
converter's errors, Istio's binding and host-intersection rules, what a gateway proxy is
planned and which credentials it may hold. Real Envoy: tests/e2e/test_gateway_e2e.py and the
golden case tests/golden/gateway."""

from __future__ import annotations

import textwrap
from typing import Any

import pytest
from click.testing import CliRunner
from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2

from controlplane.cli import main
from controlplane.model.gateways import bound_view, intersect_host
from controlplane.model.ir import ProxyMeta
from controlplane.model.mesh import Mesh
from controlplane.translate.gateway import gateway_credentials
from controlplane.translate.plan import CLUSTER, ENDPOINT, LISTENER, ROUTE, build_all
from controlplane.translate.proxy import plan_proxy
from controlplane.translate.secrets import TRUSTS_NOTHING_CA
from controlplane.xds.server import proxy_meta_from_node
from tests.gatewayfixtures import WEB_SERVICE, gateway_pod, load, namespace

pytestmark = pytest.mark.unit


def gw_issues(spec: str) -> list[str]:
    _, issues = load("apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: g, namespace: ns}\n"
                     "spec:\n" + textwrap.indent(textwrap.dedent(spec), "  "))
    return [f"{i.severity}:{i.field}: {i.message}" for i in issues]


def has(issues: list[str], prefix: str, fragment: str) -> None:
    assert any(i.startswith(prefix) and fragment in i for i in issues), issues


def test_gateway_fields_are_checked_by_name() -> None:
    issues = gw_issues("""
        selector: {istio: ingressgateway}
        servers:
        - port: {number: 443, name: https, protocol: HTTPS}
          hosts: [a.example.com]
        - port: {number: 8443, name: m, protocol: HTTPS}
          hosts: [a.example.com]
          tls: {mode: MUTUAL, serverCertificate: /c.pem, privateKey: /k.pem}
        - port: {number: 9443, name: x, protocol: HTTPS}
          hosts: ["a/b/c"]
          tls: {mode: AUTO_PASSTHROUGH}
        - port: {number: 80, name: http, protocol: HTTP}
          hosts: ["*"]
          defaultEndpoint: 127.0.0.1:8080
        - port: {number: 80, name: tcp, protocol: TCP}
          hosts: ["*"]
        - port: {number: 81, protocol: QUIC}
          hosts: ["*.a.*"]
          tls: {mode: SIMPLE, credentialName: c, minProtocolVersion: TLSV9}
        """)
    has(issues, "error:spec.servers[0].tls", "is required for protocol HTTPS")
    has(issues, "error:spec.servers[1].tls.caCertificates", "is required for mode MUTUAL")
    has(issues, "error:spec.servers[2].tls.mode", "AUTO_PASSTHROUGH is not supported")
    has(issues, "warning:spec.servers[3].defaultEndpoint", "ignored")
    has(issues, "error:spec.servers[4].port.protocol", "port 80 is already HTTP")
    has(issues, "error:spec.servers[5].port.protocol", "'QUIC' is not one of")
    has(issues, "error:spec.servers[5].hosts[0]", "not a valid host name")
    has(issues, "error:spec.servers[5].tls.minProtocolVersion", "'TLSV9'")
    assert not gw_issues("""
        selector: {istio: ingressgateway}
        servers:
        - port: {number: 443, name: https, protocol: HTTPS}
          hosts: [./a.example.com, "*/*.b.example.com"]
          tls: {mode: SIMPLE, credentialName: c, minProtocolVersion: TLSV1_3, cipherSuites: [ECDHE-ECDSA-AES128-GCM-SHA256]}
        """)


MESH = "---\n".join([
    namespace("shop"),
    WEB_SERVICE,
    gateway_pod("gw-1", "10.1.0.1"),
    gateway_pod("impostor", "10.1.0.2", "app: other"),
    """\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: public, namespace: edge}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 8443, name: https, protocol: HTTPS}
    hosts: ["shop/*.example.com"]
    tls: {mode: SIMPLE, credentialName: shop-cert}
  - port: {number: 8080, name: http, protocol: HTTP}
    hosts: ["*/web.example.com", "edge/*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: both, namespace: shop}
spec:
  hosts: ["*.example.com", web]
  gateways: [mesh, edge/public]
  http:
  - match: [{uri: {prefix: /edge-only}, gateways: [edge/public]}, {uri: {prefix: /mesh-only}, gateways: [mesh]}]
    route: [{destination: {host: web}}]
  - route: [{destination: {host: web}}]
    timeout: 3s
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: other-ns, namespace: edge}
spec:
  hosts: [internal.example.com]
  gateways: [public]
  http:
  - route: [{destination: {host: web.shop.svc.cluster.local}}]
"""])


def test_binding_matches_and_host_intersection() -> None:
    mesh, issues = load(MESH)
    assert not [i for i in issues if i.severity == "error"], issues
    # Sidecars see the mesh view: the edge-only match is gone, the mesh-only one stays.
    (vs,) = mesh.virtual_services
    assert [m.uri.value for m in vs.http[0].matches if m.uri] == ["/mesh-only"]
    assert {v.name for v in mesh.gateway_virtual_services} == {"both", "other-ns"}
    full = next(v for v in mesh.gateway_virtual_services if v.name == "both")
    edge = bound_view(full, "edge/public")
    assert edge is not None and [m.uri.value for m in edge.http[0].matches if m.uri] == ["/edge-only"]
    assert bound_view(full, "edge/other") is None
    assert intersect_host("*.example.com", "a.example.com") == "a.example.com"
    assert intersect_host("a.example.com", "*") == "a.example.com"
    assert intersect_host("*.a.example.com", "*.example.com") == "*.a.example.com"
    assert intersect_host("a.example.com", "b.example.com") is None
    assert intersect_host("*.example.com", "example.com") is None


def routes_of(mesh: Mesh, meta: ProxyMeta) -> dict[str, list[str]]:
    built = build_all(plan_proxy(mesh, meta).specs())
    out: dict[str, list[str]] = {}
    for name, rc in built.get(ROUTE, {}).items():
        out[name] = sorted(d for vh in rc.virtual_hosts for d in vh.domains)  # type: ignore[attr-defined]
    return out


def test_gateway_virtual_hosts_are_vs_hosts_within_server_hosts() -> None:
    mesh, _ = load(MESH)
    meta = ProxyMeta("gw", mode="gateway", namespace="edge", workload="gw-1", gateway="edge/public")
    routes = routes_of(mesh, meta)
    # HTTP server: web.example.com from any namespace, anything from namespace edge.
    assert routes["http.8080"] == ["internal.example.com", "internal.example.com:*", "web.example.com",
                                   "web.example.com:*"]
    # HTTPS server: *.example.com of namespace shop only (not edge's internal.example.com).
    assert routes["https.8443.https.public.edge"] == ["*.example.com", "*.example.com:*"]
    listeners = build_all(plan_proxy(mesh, meta).specs())[LISTENER]
    assert sorted(listeners) == ["0.0.0.0_8080", "0.0.0.0_8443"]
    # A proxy naming a Gateway that does not exist gets no listener or route (and no error),
    # only the mesh's clusters, as in Istio.
    plan = plan_proxy(mesh, ProxyMeta("x", mode="gateway", namespace="edge", gateway="edge/none"))
    assert plan.own == () and {s.type_url for s in plan.shared} <= {CLUSTER, ENDPOINT}


def test_credentials_only_for_the_selected_pod_with_its_identity() -> None:
    cert = """
apiVersion: v1
kind: Secret
metadata: {name: shop-cert, namespace: edge}
type: kubernetes.io/tls
stringData: {tls.crt: "%s", tls.key: "%s"}
"""
    from tests.e2e.test_gateway_e2e import issue, make_ca

    pem = issue(make_ca("ca"), "web.example.com", client=False)
    mesh, _ = load(MESH + "---\n" + cert % (pem.cert.replace("\n", "\\n"), pem.key.replace("\n", "\\n")))
    meta = ProxyMeta("gw", mode="gateway", namespace="edge", workload="gw-1", gateway="edge/public")
    def material(specs: list[Any]) -> dict[str, bytes]:
        out = {}
        for spec in specs:
            msg = spec.make()
            out[spec.name] = (msg.tls_certificate.private_key.inline_bytes
                              or msg.validation_context.trusted_ca.inline_bytes)
        return out

    got = material(gateway_credentials(mesh, meta, "edge", "gw", "/ca.pem"))
    assert got["kubernetes://shop-cert"] == pem.key.encode()
    # No CA in the Secret: the CA slot is the stand-in that trusts nothing (never a default CA).
    assert got["kubernetes://shop-cert-cacert"] == TRUSTS_NOTHING_CA.encode()
    # Wrong service account for that pod, a pod the selector does not pick, another namespace
    # (its Secrets are not this one's), no pod named: stand-ins only, never the key.
    impostor = ProxyMeta("gw", mode="gateway", namespace="edge", workload="impostor", gateway="edge/public")
    nameless = ProxyMeta("gw", mode="gateway", namespace="edge", gateway="edge/public")
    for m, ns, sa in ((meta, "edge", "default"), (impostor, "edge", "gw"), (meta, "shop", "gw"), (nameless, "edge", "gw")):
        got = material(gateway_credentials(mesh, m, ns, sa, "/ca.pem"))
        assert set(got) == {"kubernetes://shop-cert", "kubernetes://shop-cert-cacert"}
        assert pem.key.encode() not in got.values() and b"BEGIN" in got["kubernetes://shop-cert"]
    # A proxy of a Gateway that does not exist: nothing.
    other = ProxyMeta("gw", mode="gateway", namespace="edge", workload="gw-1", gateway="edge/none")
    assert gateway_credentials(mesh, other, "edge", "gw", "/ca.pem") == []


def test_node_metadata_and_bootstrap_cli() -> None:
    node = base_pb2.Node(id="gw")
    node.metadata.CopyFrom(struct_pb2.Struct())
    node.metadata.update({"mode": "gateway", "namespace": "edge", "gateway": "public"})
    assert proxy_meta_from_node(node).gateway == "edge/public"
    node.metadata.update({"gateway": "other/public"})
    assert proxy_meta_from_node(node).gateway == "other/public"
    r = CliRunner().invoke(main, ["bootstrap", "--mode", "gateway", "--node-id", "g", "--namespace", "edge"])
    assert r.exit_code != 0 and "--gateway" in r.output
    r = CliRunner().invoke(main, ["bootstrap", "--mode", "gateway", "--node-id", "g", "--namespace", "edge",
                                  "--gateway", "public"])
    assert r.exit_code == 0 and "gateway: public" in r.output


def test_cross_object_warnings_name_the_field() -> None:
    mesh, _ = load(MESH + """
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: lost, namespace: shop}
spec:
  hosts: [a.b.com]
  gateways: [nowhere, edge/public]
  http: [{route: [{destination: {host: web}}]}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: orphan, namespace: edge}
spec:
  selector: {app: nothing}
  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ["*"]}]
""")
    found = {(i.ref.name, i.field): i.message for i in mesh.issues if i.severity == "warning"}
    assert "shop/nowhere does not exist" in found[("lost", "spec.gateways[0]")]
    assert "no server of Gateway edge/public" in found[("lost", "spec.hosts")]
    assert "no TLS Secret edge/shop-cert" in found[("public", "spec.servers[0].tls.credentialName")]
    assert "selects no Pod" in found[("orphan", "spec.selector")]
    # A second VirtualService for internal.example.com on edge/public is told it is not used.
    mesh, _ = load(MESH + """
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: zz-late, namespace: edge}
spec:
  hosts: [internal.example.com]
  gateways: [public]
  http: [{route: [{destination: {host: web.shop.svc.cluster.local}}]}]
""")
    (late,) = [i for i in mesh.issues if i.ref.name == "zz-late"]
    assert "served by VirtualService edge/other-ns" in late.message and late.field == "spec.hosts"


def test_servers_sharing_a_port_get_distinct_chains() -> None:
    """Two HTTPS servers of one port with the same port name keep distinct route configurations;
    one that repeats an earlier server's SNI names is ignored with a warning (Envoy would
    refuse the listener)."""
    issues = gw_issues("""
        selector: {istio: ingressgateway}
        servers:
        - port: {number: 443, name: https, protocol: HTTPS}
          hosts: [a.example.com]
          tls: {mode: SIMPLE, credentialName: a}
        - port: {number: 443, name: https, protocol: HTTPS}
          hosts: [b.example.com]
          tls: {mode: SIMPLE, credentialName: b}
        - port: {number: 443, name: https, protocol: HTTPS}
          hosts: [b.example.com, c.example.com]
          tls: {mode: SIMPLE, credentialName: c}
        """)
    has(issues, "warning:spec.servers[2].hosts", "b.example.com on port 443 is already served by servers[1]")
    mesh, _ = load(MESH + """
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: two, namespace: edge}
spec:
  selector: {istio: ingressgateway}
  servers:
  - {port: {number: 443, name: https, protocol: HTTPS}, hosts: [a.example.com], tls: {mode: SIMPLE, credentialName: a}}
  - {port: {number: 443, name: https, protocol: HTTPS}, hosts: [b.example.com], tls: {mode: SIMPLE, credentialName: b}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: two-routes, namespace: edge}
spec:
  hosts: ["*.example.com"]
  gateways: [two]
  http: [{route: [{destination: {host: web.shop.svc.cluster.local}}]}]
""")
    meta = ProxyMeta("gw", mode="gateway", namespace="edge", workload="gw-1", gateway="edge/two")
    routes = routes_of(mesh, meta)
    assert routes == {"https.443.https.0.two.edge": ["a.example.com", "a.example.com:*"],
                      "https.443.https.1.two.edge": ["b.example.com", "b.example.com:*"]}


def test_export_to_limits_which_gateway_proxies_apply_a_virtual_service() -> None:
    """As Istio: a VirtualService bound to a Gateway applies on a gateway proxy only when it is
    exported to that proxy's namespace."""
    private = MESH.replace("  gateways: [public]\n", "  gateways: [public]\n  exportTo: [shop]\n")
    meta = ProxyMeta("gw", mode="gateway", namespace="edge", workload="gw-1", gateway="edge/public")
    assert "internal.example.com" in routes_of(load(MESH)[0], meta)["http.8080"]
    assert "internal.example.com" not in routes_of(load(private)[0], meta)["http.8080"]


def test_endpoint_only_changes_patch_a_gateways_clusters() -> None:
    """Gateway proxies share their clusters per namespace (the layer that reads endpoints), so
    an endpoint-only change re-plans just those hosts and keeps the listeners and routes."""
    from controlplane.cache.snapshot import SnapshotBuilder
    from controlplane.model.mesh import EndpointDelta
    from controlplane.translate.proxy import plan_own, plan_shared, plan_shared_hosts, shared_key

    eps = """
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints: [{addresses: [%s], conditions: {ready: true}}]
"""
    before, _ = load(MESH + eps % "10.1.5.1")
    after, _ = load(MESH + eps % "10.1.5.2")
    meta = ProxyMeta("gw", mode="gateway", namespace="edge", workload="gw-1", gateway="edge/public")
    b = SnapshotBuilder(plan_shared, plan_own, lambda m: shared_key(before, m), plan_shared_hosts)
    (first,) = b.rebuild(before, [meta]).values()
    (second,) = b.rebuild(after, [meta], EndpointDelta(before, frozenset({"web.shop.svc.cluster.local"}))).values()
    assert b.incremental_rebuilds == 1
    assert second.types[LISTENER] is first.types[LISTENER] and second.types[ROUTE] is first.types[ROUTE]
    cla = second.types[ENDPOINT].items["outbound|8080||web.shop.svc.cluster.local"]
    assert b"10.1.5.2" in cla.body and b"10.1.5.1" not in cla.body


def test_tls_routes_route_passthrough_servers_by_sni() -> None:
    """Istio's PASSTHROUGH: the bound VirtualServices' `tls` routes, one SNI chain per match
    (sniHosts within the server's hosts), the bytes forwarded untouched; sidecars ignore tls
    routes (warned when the VirtualService is bound to mesh)."""
    mesh, issues = load(MESH + """
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: sni, namespace: edge}
spec:
  selector: {istio: ingressgateway}
  servers:
  - {port: {number: 443, name: tls, protocol: TLS}, hosts: ["*.example.com"], tls: {mode: PASSTHROUGH}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: sni-routes, namespace: edge}
spec:
  hosts: ["*.example.com"]
  gateways: [sni, mesh]
  tls:
  - match: [{sniHosts: [a.example.com, b.other.com], port: 443}]
    route: [{destination: {host: web.shop.svc.cluster.local, port: {number: 8080}}}]
  - match: [{sniHosts: [a.example.com, c.example.com]}]
    route: [{destination: {host: web.shop.svc.cluster.local, port: {number: 8080}}}]
""")
    assert "spec.tls" in [i.field for i in issues if i.ref.name == "sni-routes"]  # sidecars ignore it
    meta = ProxyMeta("gw", mode="gateway", namespace="edge", workload="gw-1", gateway="edge/sni")
    (lst,) = build_all(plan_proxy(mesh, meta).specs())[LISTENER].values()
    chains = {c.name: list(c.filter_chain_match.server_names) for c in lst.filter_chains}  # type: ignore[attr-defined]
    assert chains == {"tls.443.tls.edge.sni-routes.0.0": ["a.example.com"],
                      "tls.443.tls.edge.sni-routes.1.0": ["c.example.com"]}
    assert not any(c.transport_socket.name for c in lst.filter_chains)  # type: ignore[attr-defined]
    _, bad = load("""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: v, namespace: edge}
spec:
  hosts: [a.example.com]
  gateways: [sni]
  tls: [{match: [{sniHosts: []}], route: [{destination: {host: x}}]}]
""")
    assert any(i.field == "spec.tls[0].match[0].sniHosts" and i.severity == "error" for i in bad), bad
