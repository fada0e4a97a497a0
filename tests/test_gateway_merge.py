"""A gateway proxy serves every Gateway whose selector its pod's labels include (issue 18), as
Istio: servers of several Gateways merge per port (plain HTTP: one route configuration with
the union of their virtual hosts; TLS: one SNI chain each), a conflicting server of a later
Gateway is dropped and warned; `--gateway` narrows the proxy to one Gateway; credentials
only for Gateways that select the authenticated pod. Without Envoy; Envoy accepts the result
in the golden case tests/golden/gateway-merge (tests/test_envoycheck.py)."""

from __future__ import annotations

from typing import Any

import pytest

from controlplane.model.ir import ProxyMeta
from controlplane.model.mesh import Mesh
from controlplane.model.validate import check_mesh
from controlplane.translate.gateway import gateway_credentials
from controlplane.translate.plan import LISTENER, ROUTE, build_all
from controlplane.translate.proxy import plan_proxy
from tests.gatewayfixtures import WEB_SERVICE, gateway_pod, load, namespace

pytestmark = pytest.mark.unit

MESH = "---\n".join([
    namespace("shop"),
    WEB_SERVICE,
    """\
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec: {clusterIP: 10.96.0.10, selector: {app: api}, ports: [{name: http, port: 8080}]}
""",
    gateway_pod("gw-1", "10.1.0.1"),
    gateway_pod("other-1", "10.1.0.2", "istio: other"),
    """\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: a, namespace: edge}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 8080, name: http, protocol: HTTP}
    hosts: ["*/web.example.com"]
  - port: {number: 8443, name: https, protocol: HTTPS}
    hosts: ["*/web.example.com"]
    tls: {mode: SIMPLE, credentialName: web-cert}
---
# Another namespace, same selector: served by the same proxy.
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: b, namespace: shop}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 8080, name: http, protocol: HTTP}
    hosts: ["*/api.example.com"]
  - port: {number: 9090, name: http-admin, protocol: HTTP}
    hosts: ["*/api.example.com"]
  - port: {number: 8443, name: https-api, protocol: HTTPS}
    hosts: ["*/api.example.com"]
    tls: {mode: SIMPLE, credentialName: api-cert}
  - port: {number: 8443, name: https-web, protocol: HTTPS}
    hosts: ["*/web.example.com"]
    tls: {mode: SIMPLE, credentialName: stolen-cert}
---
# Same selector, a TCP server on a port the others serve HTTP on: dropped.
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: c, namespace: shop}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 8080, name: tcp, protocol: TCP}
    hosts: ["*"]
---
# Another selector: not this proxy's.
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: elsewhere, namespace: edge}
spec:
  selector: {istio: other}
  servers:
  - port: {number: 7070, name: http, protocol: HTTP}
    hosts: ["*/*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: shop}
spec:
  hosts: [web.example.com]
  gateways: [edge/a]
  http:
  - route: [{destination: {host: web}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.example.com]
  gateways: [shop/b]
  http:
  - route: [{destination: {host: api}}]
"""])


def built(mesh: Mesh, meta: ProxyMeta) -> dict[Any, dict[str, Any]]:
    return build_all(plan_proxy(mesh, meta).specs())


def domains(rc: Any) -> dict[str, list[str]]:
    return {vh.name: sorted(vh.domains) for vh in rc.virtual_hosts}


GW = ProxyMeta("gw", mode="gateway", namespace="edge", workload="gw-1")


def test_two_gateways_on_one_http_port_share_one_route_configuration() -> None:
    mesh, issues = load(MESH)
    assert not [i for i in issues if i.severity == "error"], issues
    out = built(mesh, GW)
    # Port 8080: Gateway a's web.example.com and Gateway b's api.example.com, one RDS.
    assert domains(out[ROUTE]["http.8080"]) == {
        "shop/web:8080": ["web.example.com", "web.example.com:*"],
        "shop/api:8080": ["api.example.com", "api.example.com:*"]}
    # Port 9090 only Gateway b has; 7070 is another selector's Gateway.
    assert domains(out[ROUTE]["http.9090"]) == {"shop/api:9090": ["api.example.com", "api.example.com:*"]}
    assert sorted(out[LISTENER]) == ["0.0.0.0_8080", "0.0.0.0_8443", "0.0.0.0_9090"]
    # Gateway c's TCP server on 8080 is dropped: no tcp_proxy chain beside the HTTP one.
    assert [fc.name for fc in out[LISTENER]["0.0.0.0_8080"].filter_chains] == ["http.8080"]


def test_tls_servers_of_two_gateways_on_one_port_keep_their_own_sni_chain() -> None:
    mesh, _ = load(MESH)
    lst = built(mesh, GW)[LISTENER]["0.0.0.0_8443"]
    chains = {fc.name: list(fc.filter_chain_match.server_names) for fc in lst.filter_chains}
    # a's web.example.com, b's api.example.com; b's second claim on web.example.com is dropped
    # (Envoy would refuse two chains for one name).
    assert chains == {"https.8443.https.a.edge": ["web.example.com"],
                      "https.8443.https-api.b.shop": ["api.example.com"]}


def test_dropped_servers_are_warned_naming_the_gateway_and_field() -> None:
    mesh, _ = load(MESH)
    warned = {(i.ref.name, i.field): i.message for i in check_mesh(mesh) if "not served by the gateway" in i.message}
    assert set(warned) == {("b", "spec.servers[3]"), ("c", "spec.servers[0]")}, warned
    assert "web.example.com" in warned[("b", "spec.servers[3]")] and "edge/a" in warned[("b", "spec.servers[3]")]
    assert "TCP" in warned[("c", "spec.servers[0]")]


def test_gateway_option_narrows_to_one_gateway() -> None:
    mesh, _ = load(MESH)
    out = built(mesh, ProxyMeta("gw", mode="gateway", namespace="edge", workload="gw-1", gateway="shop/b"))
    assert sorted(out[LISTENER]) == ["0.0.0.0_8080", "0.0.0.0_8443", "0.0.0.0_9090"]
    assert list(domains(out[ROUTE]["http.8080"])) == ["shop/api:8080"]
    # Alone, b's web.example.com server is not in conflict: it is served.
    names = {fc.name for fc in out[LISTENER]["0.0.0.0_8443"].filter_chains}
    assert names == {"https.8443.https-api.b.shop", "https.8443.https-web.b.shop"}
    # A pod another selector picks serves only that Gateway.
    other = built(mesh, ProxyMeta("o", mode="gateway", namespace="edge", workload="other-1"))
    assert sorted(other[LISTENER]) == ["0.0.0.0_7070"]


def test_credentials_of_every_selected_gateway_only_to_the_selected_pod() -> None:
    from tests.e2e.test_gateway_e2e import issue, make_ca

    ca = make_ca("ca")
    secrets = ""
    keys = {}
    for name, host in (("web-cert", "web.example.com"), ("api-cert", "api.example.com")):
        pem = issue(ca, host, client=False)
        keys[name] = pem.key.encode()
        cert, key = (v.replace("\n", "\\n") for v in (pem.cert, pem.key))
        secrets += (f"---\napiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: edge}}\n"
                    f'type: kubernetes.io/tls\nstringData: {{tls.crt: "{cert}", tls.key: "{key}"}}\n')
    mesh, _ = load(MESH + secrets)

    def material(specs: list[Any]) -> dict[str, bytes]:
        return {s.name: s.make().tls_certificate.private_key.inline_bytes for s in specs
                if not s.name.endswith("-cacert")}

    # Gateway a's (namespace edge) and Gateway b's (namespace shop) certificates, both from
    # the proxy's namespace, reach the pod both select, proven by its identity.
    got = material(gateway_credentials(mesh, GW, "edge", "gw", "/ca.pem"))
    assert got["kubernetes://web-cert"] == keys["web-cert"] and got["kubernetes://api-cert"] == keys["api-cert"]
    # The same pod named by a proxy with another identity: stand-ins only.
    got = material(gateway_credentials(mesh, GW, "edge", "default", "/ca.pem"))
    assert set(got) >= {"kubernetes://web-cert", "kubernetes://api-cert"}
    assert not set(keys.values()) & set(got.values())
    # Narrowed to Gateway b by a pod b does not select (authenticated as that pod): stand-ins.
    other = ProxyMeta("o", mode="gateway", namespace="edge", workload="other-1", gateway="shop/b")
    got = material(gateway_credentials(mesh, other, "edge", "gw", "/ca.pem"))
    assert got and not set(keys.values()) & set(got.values())
    # A pod whose only Gateway names no credential gets none.
    assert gateway_credentials(mesh, ProxyMeta("o", mode="gateway", namespace="edge", workload="other-1"),
                               "edge", "gw", "/ca.pem") == []


TELEMETRY = """
---
# Workload level for the gateway pod: CLIENT logs of errors (a gateway's traffic is CLIENT to Istio).
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: gw-logs, namespace: edge}
spec:
  selector: {matchLabels: {istio: ingressgateway}}
  accessLogging:
  - providers: [{name: envoy}]
    match: {mode: CLIENT}
    filter: {expression: "response.code >= 400"}
---
# Namespace level: SERVER only, which a gateway does not write.
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: server-only, namespace: edge}
spec:
  accessLogging:
  - providers: [{name: envoy}]
    match: {mode: SERVER}
"""


def _logs(lst: Any) -> list[tuple[str, str, str]]:
    """(chain, logger path, CEL filter) of every HCM and tcp_proxy of a built listener."""
    from envoy.extensions.access_loggers.file.v3 import file_pb2
    from envoy.extensions.access_loggers.filters.cel.v3 import cel_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
    from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2

    out = []
    for fc in lst.filter_chains:
        for f in fc.filters:
            msg: Any = hcm.HttpConnectionManager() if "http_connection_manager" in f.name else tcp_proxy_pb2.TcpProxy()
            f.typed_config.Unpack(msg)
            for log in msg.access_log:
                path, cel = file_pb2.FileAccessLog(), cel_pb2.ExpressionFilter()
                log.typed_config.Unpack(path)
                if log.filter.HasField("extension_filter"):
                    log.filter.extension_filter.typed_config.Unpack(cel)
                out.append((fc.name, path.path, cel.expression))
    return out


def test_telemetry_access_logs_at_gateways_are_client_mode_by_the_pod_labels() -> None:
    mesh, issues = load(MESH + TELEMETRY)
    assert not [i for i in issues if i.severity == "error"], issues
    listeners = built(mesh, GW)[LISTENER]
    # Every HTTP chain (plain and TLS-terminating) logs the failed requests to stdout.
    assert _logs(listeners["0.0.0.0_8443"]) == [("https.8443.https.a.edge", "/dev/stdout", "response.code >= 400"),
                                                ("https.8443.https-api.b.shop", "/dev/stdout", "response.code >= 400")]
    assert _logs(listeners["0.0.0.0_8080"]) == [("http.8080", "/dev/stdout", "response.code >= 400")]
    # TCP chains log per connection (Gateway c alone: its TCP server, nothing bound: blackhole).
    only_c = built(mesh, ProxyMeta("gw", mode="gateway", namespace="edge", workload="gw-1", gateway="shop/c"))
    assert _logs(only_c[LISTENER]["0.0.0.0_8080"]) == [("blackhole", "/dev/stdout", "response.code >= 400")]
    # The other pod: only the namespace level applies, SERVER only: a gateway writes nothing.
    other = built(mesh, ProxyMeta("o", mode="gateway", namespace="edge", workload="other-1"))
    assert _logs(other[LISTENER]["0.0.0.0_7070"]) == []
    # Without Telemetry nothing is logged.
    plain, _ = load(MESH)
    assert _logs(built(plain, GW)[LISTENER]["0.0.0.0_8080"]) == []


def test_a_host_two_gateways_route_on_one_http_port_is_served_by_the_first_and_warned() -> None:
    mesh, _ = load(MESH + """
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: a2, namespace: edge}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 8080, name: http, protocol: HTTP}
    hosts: ["*/api.example.com"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api-first, namespace: edge}
spec:
  hosts: [api.example.com]
  gateways: [edge/a2]
  http:
  - route: [{destination: {host: web.shop.svc.cluster.local}}]
""")
    rc = built(mesh, GW)[ROUTE]["http.8080"]
    assert domains(rc) == {"edge/api-first:8080": ["api.example.com", "api.example.com:*"],
                           "shop/web:8080": ["web.example.com", "web.example.com:*"]}
    warned = [i for i in check_mesh(mesh) if i.ref.name == "api" and "served by VirtualService" in i.message]
    assert len(warned) == 1 and warned[0].field == "spec.hosts", warned
    assert "edge/api-first" in warned[0].message and "edge/a2" in warned[0].message and "8080" in warned[0].message
