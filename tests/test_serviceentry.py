"""ServiceEntry and WorkloadEntry (issue 18): conversion and Istio's validation rules (errors
name the field, with file:line), the registry the rest of the model sees, and the clusters,
endpoints and listeners sidecars get for the entries' hosts."""

from __future__ import annotations

import textwrap
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2

from controlplane.model.convert import convert
from controlplane.model.ir import Issue, ProxyMeta, ServiceEntry, WorkloadEntry
from controlplane.model.mesh import Mesh
from controlplane.model.store import assemble
from controlplane.sources.yamlload import parse_documents
from controlplane.translate.plan import CLUSTER, ENDPOINT, LISTENER, ROUTE, build_all
from controlplane.translate.scope import proxy_scope
from controlplane.translate.sidecar import plan_outbound

pytestmark = pytest.mark.unit

PODS = """
apiVersion: v1
kind: Namespace
metadata: {name: default}
---
apiVersion: v1
kind: Namespace
metadata: {name: other}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default, labels: {app: client}}
spec: {containers: [{name: app, image: x}]}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: billing-1, namespace: default, labels: {app: billing, version: v2},
           annotations: {meshline.io/status: injected}}
spec: {serviceAccountName: billing, containers: [{name: app, image: x}]}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: billing-x, namespace: other, labels: {app: billing}}
spec: {containers: [{name: app, image: x}]}
status: {podIP: 10.0.0.3}
"""


def convert_one(text: str) -> tuple[object | None, tuple[Issue, ...]]:
    (raw,), errors = parse_documents(textwrap.dedent(text), "se.yaml")
    assert not errors
    return convert(raw)


def se(spec: str, name: str = "ext", namespace: str = "default") -> str:
    return (f"apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, "
            f"namespace: {namespace}}}\nspec:\n" + textwrap.indent(textwrap.dedent(spec), "  "))


def errors_of(text: str) -> dict[str, str]:
    value, issues = convert_one(text)
    errs = {i.field: i.message for i in issues if i.severity == "error"}
    assert (value is None) == bool(errs)
    return errs


def warnings_of(text: str) -> dict[str, str]:
    value, issues = convert_one(text)
    assert value is not None, [i.format() for i in issues]
    return {i.field: i.message for i in issues if i.severity == "warning"}


def mesh_of(*texts: str) -> Mesh:
    values: list[object] = []
    for text in texts:
        objects, errors = parse_documents(textwrap.dedent(text), "t.yaml")
        assert not errors
        for raw in objects:
            value, found = convert(raw)
            assert not [i for i in found if i.severity == "error"], [i.format() for i in found]
            if value is not None:
                values.append(value)
    return assemble(values)


def outbound(mesh: Mesh, namespace: str = "default", capture: str = "intercept",
             workload: str = "client") -> dict[Any, dict[str, Any]]:
    p = ProxyMeta(node_id=workload, namespace=namespace, workload=workload, capture=capture)  # type: ignore[arg-type]
    return build_all(plan_outbound(mesh, p.namespace, p.capture, scope=proxy_scope(mesh, p)))


def addresses(cla: Any) -> list[tuple[str, int]]:
    return sorted((e.endpoint.address.socket_address.address, e.endpoint.address.socket_address.port_value)
                  for group in cla.endpoints for e in group.lb_endpoints)


STATIC = """
hosts: [api.external.example]
location: MESH_EXTERNAL
ports: [{number: 8080, name: http, protocol: HTTP, targetPort: 18080}]
resolution: STATIC
endpoints:
- {address: 192.0.2.10, labels: {version: v1}, weight: 3, locality: us-east/zone-a}
- {address: 192.0.2.11, labels: {version: v2}, ports: {http: 19090}}
"""

# --------------------------------------------------------------------------- conversion


def test_a_service_entry_converts_with_every_field() -> None:
    value, issues = convert_one(se(STATIC + "exportTo: ['.']\nsubjectAltNames: [spiffe://x/y]\n"))
    assert issues == ()
    assert isinstance(value, ServiceEntry)
    assert value.hosts == ("api.external.example",)
    assert value.info.resolution == "STATIC" and value.info.mesh_external
    assert value.info.export_to == (".",) and value.info.subject_alt_names == ("spiffe://x/y",)
    (port,) = value.ports
    assert (port.name, port.port, port.target_port, port.protocol.value) == ("http", 8080, 18080, "http")
    assert [(e.address, e.ports, e.weight, e.locality) for e in value.endpoints] == [
        ("192.0.2.10", (), 3, "us-east/zone-a"), ("192.0.2.11", (("http", 19090),), None, None)]


@pytest.mark.parametrize(("spec", "field", "fragment"), [
    ("ports: [{number: 80, name: http, protocol: HTTP}]\n", "spec.hosts", "at least one host"),
    ("hosts: ['*']\n", "spec.hosts[0]", "not a valid ServiceEntry host"),
    ("hosts: ['a*.example.com']\n", "spec.hosts[0]", "leading '*.'"),
    ("hosts: [a.example.com, A.example.com]\n", "spec.hosts[1]", "duplicate host"),
    ("hosts: [a.example.com]\naddresses: [10.0.0.0/24]\nresolution: DNS\n", "spec.addresses", "CIDR"),
    ("hosts: [a.example.com]\naddresses: [not-an-ip]\n", "spec.addresses[0]", "not an IP"),
    ("hosts: [a.example.com]\nresolution: STATIC\nendpoints: [{address: 1.2.3.4}]\nworkloadSelector: {labels: {a: b}}\n",
     "spec.workloadSelector", "only one of"),
    ("hosts: [a.example.com]\nresolution: NONE\nendpoints: [{address: 1.2.3.4}]\n", "spec.endpoints",
     "resolution NONE"),
    ("hosts: [a.example.com]\nresolution: STATIC\nendpoints: [{address: db.example.com}]\n",
     "spec.endpoints[0].address", "needs IPs"),
    ("hosts: ['*.example.com']\nresolution: DNS\n", "spec.hosts[0]", "no wildcard"),
    ("hosts: [192.0.2.1]\nresolution: DNS\n", "spec.hosts[0]", "IP address"),
    ("hosts: [a.example.com]\nresolution: DNS_ROUND_ROBIN\nendpoints: [{address: a.x.com}, {address: b.x.com}]\n",
     "spec.endpoints", "0 or 1 endpoint"),
    ("hosts: [a.example.com, b.example.com]\nresolution: DNS\nports: [{number: 3306, name: db, protocol: TCP}]\n",
     "spec.hosts", "neither HTTP nor TLS"),
    ("hosts: [a.example.com]\nresolution: STATIC\nports: [{number: 80, name: http, protocol: HTTP}]\n"
     "endpoints: [{address: 1.2.3.4, ports: {web: 8080}}]\n", "spec.endpoints[0].ports.web", "not defined"),
    ("hosts: [a.example.com]\nports: [{number: 80, name: a, protocol: HTTP}, {number: 80, name: b, protocol: HTTP}]\n",
     "spec.ports[1].number", "already defined"),
    ("hosts: [a.example.com]\nresolution: MAGIC\n", "spec.resolution", "unsupported resolution"),
    ("hosts: [a.example.com]\nlocation: MESH_SOMEWHERE\n", "spec.location", "unknown location"),
    ("hosts: [a.example.com]\nexportTo: [Bad_NS]\n", "spec.exportTo[0]", "namespace"),
    ("hosts: [a.example.com]\nport: 80\n", "spec.port", "unknown field"),
    ("hosts: [a.example.com]\nports: [{number: 80, name: http, protocol: SPDY}]\n", "spec.ports[0].protocol",
     "unrecognized protocol"),
    ("hosts: [a.example.com]\nports: [{number: 80, name: Web_1, protocol: HTTP}]\n", "spec.ports[0].name",
     "invalid port name"),
    ("hosts: [a.example.com]\nports: [{number: 80, protocol: HTTP}]\n", "spec.ports[0].name", "invalid port name"),
])
def test_istio_validation_rules_name_the_field(spec: str, field: str, fragment: str) -> None:
    errs = errors_of(se(spec))
    assert field in errs and fragment in errs[field], errs


def test_an_error_carries_file_and_line() -> None:
    _, issues = convert_one(se("hosts:\n- ok.example.com\n- '*'\n"))
    (err,) = [i for i in issues if i.severity == "error"]
    assert err.format().startswith("se.yaml:7: ServiceEntry/default/ext: spec.hosts[1]: ")


@pytest.mark.parametrize(("spec", "field", "fragment"), [
    ("hosts: [a.example.com]\nresolution: STATIC\n", "spec.resolution", "no endpoints"),
    ("hosts: [a.example.com]\nresolution: STATIC\nports: [{number: 80, name: http, protocol: HTTP}]\n"
     "endpoints: [{address: 1.2.3.4, network: net2}]\n", "spec.endpoints[0].network", "single network"),
    ("hosts: [a.example.com]\nports: [{number: 53, name: dns, protocol: UDP}]\n", "spec.ports[0].protocol", "UDP"),
    ("hosts: [a.example.com]\nports: [{number: 5432, name: pg, protocol: TCP}]\n", "spec.addresses", "required"),
    ("hosts: [a.example.com]\nresolution: NONE\nworkloadSelector: {labels: {a: b}}\n", "spec.workloadSelector",
     "no effect"),
    ("hosts: [a.example.com, b.example.com]\nresolution: DNS\nports: [{number: 443, name: https, protocol: TLS}]\n",
     "spec.ports", "SNI"),
])
def test_warnings_name_what_is_not_done(spec: str, field: str, fragment: str) -> None:
    warns = warnings_of(se(spec))
    assert field in warns and fragment in warns[field], warns


def test_workload_entry_converts_and_requires_an_address() -> None:
    text = ("apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: vm, namespace: default}\n"
            "spec: {address: 192.0.2.20, labels: {app: billing}, serviceAccount: vm, locality: r/z, weight: 2, "
            "ports: {http: 9090}}\n")
    value, issues = convert_one(text)
    assert issues == () and isinstance(value, WorkloadEntry)
    assert (value.address, value.ports, value.service_account, value.weight) == ("192.0.2.20", (("http", 9090),),
                                                                                 "vm", 2)
    errs = errors_of(text.replace("address: 192.0.2.20, ", ""))
    assert errs == {"spec.address": "is required"}
    assert "spec.ports.http" in errors_of(text.replace("9090", "70000"))


# --------------------------------------------------------------------------- the registry


def test_hosts_become_registry_services_that_routing_and_rules_find() -> None:
    mesh = mesh_of(PODS, se(STATIC), """
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: ext, namespace: default}
    spec:
      host: api.external.example
      subsets: [{name: v1, labels: {version: v1}}]
    """)
    svc = mesh.services["api.external.example"]
    assert svc.entry is not None and svc.namespace == "default" and svc.ref.kind == "ServiceEntry"
    dr = mesh.destination_rule(svc.hostname, "other")  # the entry's namespace is the service's
    assert dr is not None and dr.name == "ext"
    built = outbound(mesh)
    assert addresses(built[ENDPOINT]["outbound|8080|v1|api.external.example"]) == [("192.0.2.10", 18080)]
    assert addresses(built[ENDPOINT]["outbound|8080||api.external.example"]) == [("192.0.2.10", 18080),
                                                                                 ("192.0.2.11", 19090)]
    weights = [e.load_balancing_weight.value for g in built[ENDPOINT]["outbound|8080||api.external.example"].endpoints
               for e in g.lb_endpoints]
    assert sorted(weights) == [0, 3]
    assert [m for m in mesh.issues if m.ref.kind == "ServiceEntry"] == []


def test_a_kubernetes_service_and_an_earlier_entry_win_a_host() -> None:
    svc = """
    apiVersion: v1
    kind: Service
    metadata: {name: web, namespace: default}
    spec: {clusterIP: 10.96.0.5, ports: [{name: http, port: 80}]}
    """
    mesh = mesh_of(PODS, svc, se("hosts: [web.default.svc.cluster.local, a.example.com]\n"
                                 "ports: [{number: 80, name: http, protocol: HTTP}]\n", name="b"),
                   se("hosts: [a.example.com]\nports: [{number: 80, name: http, protocol: HTTP}]\n", name="c"))
    assert mesh.services["web.default.svc.cluster.local"].ref.kind == "Service"
    assert mesh.services["a.example.com"].ref.name == "b"
    warned = {(i.ref.name, i.field): i.message for i in mesh.issues if i.ref.kind == "ServiceEntry"}
    assert "Kubernetes Service" in warned[("b", "spec.hosts[0]")]
    assert "ServiceEntry/default/b" in warned[("c", "spec.hosts[0]")]


def test_workload_selector_picks_pods_and_workload_entries_of_its_namespace() -> None:
    mesh = mesh_of(PODS, se("""
    hosts: [billing.internal.example]
    location: MESH_INTERNAL
    ports: [{number: 7070, name: http, protocol: HTTP, targetPort: 8080}]
    resolution: STATIC
    workloadSelector: {labels: {app: billing}}
    subjectAltNames: [spiffe://cluster.local/ns/default/sa/legacy]
    """, name="billing"), """
    apiVersion: networking.istio.io/v1
    kind: WorkloadEntry
    metadata: {name: vm, namespace: default}
    spec: {address: 192.0.2.20, labels: {app: billing, version: v1}, serviceAccount: vm, ports: {http: 9090}}
    ---
    apiVersion: networking.istio.io/v1
    kind: WorkloadEntry
    metadata: {name: vm-plain, namespace: default}
    spec: {address: 192.0.2.21, labels: {app: billing}}
    """)
    built = outbound(mesh)
    name = "outbound|7070||billing.internal.example"
    cla = built[ENDPOINT][name]
    assert addresses(cla) == [("10.0.0.2", 8080), ("192.0.2.20", 9090), ("192.0.2.21", 8080)]  # not billing-x
    mtls = {e.endpoint.address.socket_address.address: bool(e.metadata.filter_metadata)
            for g in cla.endpoints for e in g.lb_endpoints}
    assert mtls == {"10.0.0.2": True, "192.0.2.20": True, "192.0.2.21": False}  # sidecar Pod, serviceAccount
    sans = str(built[CLUSTER][name])
    for uri in ("spiffe://cluster.local/ns/default/sa/billing", "spiffe://cluster.local/ns/default/sa/vm",
                "spiffe://cluster.local/ns/default/sa/legacy"):
        assert uri in sans


def test_mesh_external_endpoints_get_no_mesh_mtls() -> None:
    mesh = mesh_of(PODS, se("""
    hosts: [billing.external.example]
    ports: [{number: 7070, name: http, protocol: HTTP}]
    resolution: STATIC
    workloadSelector: {labels: {app: billing}}
    """))
    cluster = outbound(mesh)[CLUSTER]["outbound|7070||billing.external.example"]
    assert not cluster.transport_socket_matches and not cluster.HasField("transport_socket")


# --------------------------------------------------------------------------- clusters and listeners


@pytest.mark.parametrize(("resolution", "capture", "expected"), [
    ("STATIC", "intercept", cluster_pb2.Cluster.EDS),
    ("DNS", "intercept", cluster_pb2.Cluster.STRICT_DNS),
    ("DNS_ROUND_ROBIN", "intercept", cluster_pb2.Cluster.LOGICAL_DNS),
    ("NONE", "intercept", cluster_pb2.Cluster.ORIGINAL_DST),
    ("NONE", "bind", cluster_pb2.Cluster.LOGICAL_DNS),  # bind capture: the host is resolved
])
def test_cluster_type_follows_resolution(resolution: str, capture: str, expected: int) -> None:
    eps = "endpoints: [{address: 192.0.2.10}]\n" if resolution == "STATIC" else ""
    mesh = mesh_of(PODS, se(f"hosts: [a.example.com]\nports: [{{number: 80, name: http, protocol: HTTP}}]\n"
                            f"resolution: {resolution}\n{eps}"))
    built = outbound(mesh, capture=capture)
    c = built[CLUSTER]["outbound|80||a.example.com"]
    assert c.type == expected
    assert ("outbound|80||a.example.com" in built.get(ENDPOINT, {})) == (expected == cluster_pb2.Cluster.EDS)
    if expected in (cluster_pb2.Cluster.STRICT_DNS, cluster_pb2.Cluster.LOGICAL_DNS):
        assert addresses(c.load_assignment) == [("a.example.com", 80)]
        assert c.dns_lookup_family == cluster_pb2.Cluster.V4_PREFERRED


def test_a_wildcard_none_host_has_no_endpoints_in_bind_capture() -> None:
    mesh = mesh_of(PODS, se("hosts: ['*.example.com']\nports: [{number: 80, name: http, protocol: HTTP}]\n"))
    c = outbound(mesh, capture="bind")[CLUSTER]["outbound|80||*.example.com"]
    assert c.type == cluster_pb2.Cluster.STATIC and addresses(c.load_assignment) == []
    domains = [list(v.domains) for v in outbound(mesh, capture="bind")[ROUTE]["80"].virtual_hosts]
    assert ["*.example.com", "*.example.com:80"] in domains


def test_export_to_hides_the_host_from_other_namespaces() -> None:
    mesh = mesh_of(PODS, se(STATIC + "exportTo: ['.']\n"), """
    apiVersion: v1
    kind: Pod
    metadata: {name: tool, namespace: other}
    spec: {containers: [{name: app, image: x}]}
    status: {podIP: 10.0.0.9}
    """)
    assert "outbound|8080||api.external.example" in outbound(mesh)[CLUSTER]
    other = outbound(mesh, namespace="other", workload="tool")
    assert "outbound|8080||api.external.example" not in other[CLUSTER]
    assert "0.0.0.0_8080" not in other.get(LISTENER, {})


def test_tcp_ports_listen_on_each_address() -> None:
    mesh = mesh_of(PODS, se("hosts: [db.example.com]\naddresses: [192.0.2.50, 192.0.2.51]\n"
                            "ports: [{number: 5432, name: pg, protocol: TCP}]\nresolution: DNS\n"))
    listeners = outbound(mesh)[LISTENER]
    assert {"192.0.2.50_5432", "192.0.2.51_5432"} <= set(listeners) and "0.0.0.0_5432" not in listeners


def test_registry_only_admits_the_entry_the_scope_imports() -> None:
    from controlplane.translate.names import BLACKHOLE_CLUSTER

    mesh = mesh_of(PODS, se(STATIC), """
    apiVersion: networking.istio.io/v1
    kind: Sidecar
    metadata: {name: default, namespace: default}
    spec:
      egress: [{hosts: ["./api.external.example"]}]
      outboundTrafficPolicy: {mode: REGISTRY_ONLY}
    """)
    built = outbound(mesh)
    assert BLACKHOLE_CLUSTER in built[CLUSTER] and "outbound|8080||api.external.example" in built[CLUSTER]
    hosts = {v.name: list(v.domains) for v in built[ROUTE]["8080"].virtual_hosts}
    assert any("api.external.example" in d for d in hosts.values()) and "allow_any" not in hosts
    assert [i for i in mesh.issues if i.ref.kind == "Sidecar"] == []


def test_two_label_names_in_routing_rules_mean_the_entry_host() -> None:
    mesh = mesh_of(PODS, se("hosts: [httpbin.org]\nports: [{number: 80, name: http, protocol: HTTP}]\n"
                            "resolution: DNS\n"), """
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: httpbin, namespace: default}
    spec:
      hosts: [httpbin.org]
      http: [{timeout: 3s, route: [{destination: {host: httpbin.org}}]}]
    ---
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: httpbin, namespace: default}
    spec:
      host: httpbin.org
      trafficPolicy: {tls: {mode: SIMPLE}}
    """)
    assert [i.format() for i in mesh.issues] == []
    built = outbound(mesh)
    (vh,) = [v for v in built[ROUTE]["80"].virtual_hosts if "httpbin.org" in v.domains]
    assert vh.routes[0].route.timeout.seconds == 3 and vh.routes[0].route.cluster == "outbound|80||httpbin.org"
    assert built[CLUSTER]["outbound|80||httpbin.org"].HasField("transport_socket")  # the rule's TLS origination
    # A Kubernetes Service `httpbin` in namespace `org` keeps the name (Meshline's reading of `a.b`).
    mesh = mesh_of(PODS, "apiVersion: v1\nkind: Namespace\nmetadata: {name: org}\n---\napiVersion: v1\n"
                   "kind: Service\nmetadata: {name: httpbin, namespace: org}\nspec: {ports: [{name: http, port: 80}]}\n",
                   se("hosts: [httpbin.org]\nports: [{number: 80, name: http, protocol: HTTP}]\nresolution: DNS\n"),
                   "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: h, namespace: default}\n"
                   "spec: {host: httpbin.org}\n")
    assert [dr.host for dr in mesh.destination_rules] == ["httpbin.org.svc.cluster.local"]


def test_a_passthrough_rule_makes_an_entry_cluster_original_dst() -> None:
    mesh = mesh_of(PODS, se(STATIC), """
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: ext, namespace: default}
    spec: {host: api.external.example, trafficPolicy: {loadBalancer: {simple: PASSTHROUGH}}}
    """)
    assert outbound(mesh)[CLUSTER]["outbound|8080||api.external.example"].type == cluster_pb2.Cluster.ORIGINAL_DST
    assert outbound(mesh, capture="bind")[CLUSTER]["outbound|8080||api.external.example"].type == \
        cluster_pb2.Cluster.EDS
