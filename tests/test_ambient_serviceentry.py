"""ServiceEntry hosts on node proxies (issue 18), in process: which entries ambient pods'
node proxies route (IP addresses, no CIDR; resolution NONE passes through), the cluster type per resolution, the MESH_INTERNAL tunnel authority at the
selected pod, a `use-waypoint` label binding an entry to a waypoint that reaches
its endpoints directly, and the warning naming an entry ambient pods will not use. Pure, no I/O."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2

from controlplane.model.ambient import waypoint_service
from controlplane.model.ir import Hostname, ProxyMeta
from controlplane.model.mesh import Mesh
from controlplane.model.validate import check_mesh
from controlplane.translate.ambient import plan_waypoint
from controlplane.translate.nodeproxy import plan_node
from controlplane.translate.plan import CLUSTER, ENDPOINT, LISTENER, build_all
from tests.test_serviceentry import mesh_of

NS = """apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {meshline.io/dataplane-mode: ambient}}
"""
CLIENT = """apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default, annotations: {meshline.io/netns: /var/run/netns/c}}
spec: {nodeName: n1, serviceAccountName: c}
status: {podIP: 10.0.0.2, phase: Running}
"""


def entry(name: str, body: str) -> str:
    return ("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n"
            f"metadata: {{name: {name}, namespace: default}}\nspec:\n"
            "  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}]\n" + body)


STATIC = entry("static", "  hosts: [s.example]\n  addresses: [240.0.0.1]\n  resolution: STATIC\n"
                         "  endpoints: [{address: 192.0.2.1}]\n")
DNS = entry("dns", "  hosts: [d.example]\n  addresses: [240.0.0.2]\n  resolution: DNS\n"
                   "  endpoints: [{address: backend.example}]\n")
RR = entry("rr", "  hosts: [rr.example]\n  addresses: [240.0.0.3]\n  resolution: DNS_ROUND_ROBIN\n")
NONE = entry("none", "  hosts: [n.example]\n  addresses: [240.0.0.4]\n  resolution: NONE\n")
PRIVATE = entry("private", "  hosts: [p.example]\n  addresses: [240.0.0.5]\n  resolution: STATIC\n"
                           "  exportTo: ['.']\n  endpoints: [{address: 192.0.2.5}]\n")
CIDR = entry("cidr", "  hosts: [c.example]\n  addresses: [240.0.1.0/24]\n  resolution: STATIC\n"
                     "  endpoints: [{address: 192.0.2.7}]\n")
NO_ADDRESS = entry("noaddr", "  hosts: [x.example]\n  resolution: DNS\n")


def built(mesh: Mesh) -> dict[str, dict[str, object]]:
    return build_all(plan_node(mesh, "n1"))  # type: ignore[return-value]


def scope_ranges(mesh: Mesh) -> set[str]:
    """The destination ranges the node's scope listener sends to service clusters."""
    spec = next(s for s in plan_node(mesh, "n1") if s.type_url == LISTENER and s.name == "ambient_outbound")
    return {c for route in spec.args[1] for c in route.ranges}


def ambient_warnings(mesh: Mesh) -> dict[str, str]:
    return {f"{i.ref.name}:{i.field}": i.message for i in check_mesh(mesh)
            if i.severity == "warning" and "ambient pods" in i.message}


def test_static_and_dns_entries_get_clusters_to_their_endpoints() -> None:
    mesh = mesh_of(NS, CLIENT, STATIC, DNS, RR)
    out = built(mesh)
    clusters = out[CLUSTER]
    static = clusters["ambient|240.0.0.1:80"]
    assert static.type == cluster_pb2.Cluster.EDS  # type: ignore[attr-defined]
    cla = out[ENDPOINT]["ambient|240.0.0.1:80"]
    assert [(e.endpoint.address.socket_address.address, e.endpoint.address.socket_address.port_value)
            for g in cla.endpoints for e in g.lb_endpoints] == [("192.0.2.1", 8080)]  # type: ignore[attr-defined]
    dns = clusters["ambient|240.0.0.2:80"]
    assert dns.type == cluster_pb2.Cluster.STRICT_DNS  # type: ignore[attr-defined]
    assert [e.endpoint.address.socket_address.address for g in dns.load_assignment.endpoints  # type: ignore[attr-defined]
            for e in g.lb_endpoints] == ["backend.example"]
    assert "ambient|240.0.0.2:80" not in out.get(ENDPOINT, {})  # a name in EDS would be NACKed
    rr = clusters["ambient|240.0.0.3:80"]  # no endpoints: the host itself is resolved
    assert rr.type == cluster_pb2.Cluster.LOGICAL_DNS  # type: ignore[attr-defined]
    assert [e.endpoint.address.socket_address.address for g in rr.load_assignment.endpoints  # type: ignore[attr-defined]
            for e in g.lb_endpoints] == ["rr.example"]
    assert scope_ranges(mesh) == {"240.0.0.1/32", "240.0.0.2/32", "240.0.0.3/32"}


def test_none_resolution_passes_through_and_unusable_entries_are_warned() -> None:
    mesh = mesh_of(NS, CLIENT, NONE, CIDR, NO_ADDRESS)
    out = built(mesh)
    assert not [n for n in out[CLUSTER] if n.startswith("ambient|")]
    assert scope_ranges(mesh) == set()  # the passthrough default takes them
    warned = ambient_warnings(mesh)
    assert set(warned) == {"cidr:spec.hosts[0]", "noaddr:spec.hosts[0]"}
    assert "c.example" in warned["cidr:spec.hosts[0]"] and "CIDR 240.0.1.0/24" in warned["cidr:spec.hosts[0]"]
    assert "spec.addresses" in warned["noaddr:spec.hosts[0]"]


def test_no_ambient_warning_without_ambient_pods() -> None:
    ns = NS.replace("labels: {meshline.io/dataplane-mode: ambient}", "labels: {}")
    assert ambient_warnings(mesh_of(ns, CLIENT, PRIVATE, NO_ADDRESS)) == {}


def test_mesh_internal_entry_tunnels_to_ambient_pods_and_they_accept_its_address() -> None:
    server = CLIENT.replace("name: client", "name: api").replace("10.0.0.2", "10.0.0.3").replace(
        "annotations:", "labels: {app: api}, annotations:").replace("serviceAccountName: c", "serviceAccountName: api")
    internal = entry("internal", "  hosts: [api.internal]\n  addresses: [240.0.0.6]\n  resolution: STATIC\n"
                                 "  location: MESH_INTERNAL\n  workloadSelector: {labels: {app: api}}\n")
    kube = ("apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: default}\n"
            "spec: {clusterIP: 10.96.0.9, selector: {app: api}, ports: [{name: http, port: 80, targetPort: 8080}]}\n")
    out = built(mesh_of(NS, CLIENT, server, internal, kube))
    cla = str(out[ENDPOINT]["ambient|240.0.0.6:80"])
    assert "spiffe://cluster.local/ns/default/sa/api" in cla and "10.0.0.3:15008" in cla
    routes = str(out["type.googleapis.com/envoy.config.route.v3.RouteConfiguration"]["ambient_hbone_default_api"])
    assert "240.0.0.6:80" in routes


def test_use_waypoint_label_binds_an_entry_and_the_waypoint_reaches_its_endpoints_directly() -> None:
    waypoint = ("apiVersion: v1\nkind: Service\nmetadata: {name: wp, namespace: default}\n"
                "spec: {clusterIP: 10.96.0.20, selector: {app: wp}, ports: [{name: tunnel, port: 15008}]}\n")
    bound = STATIC.replace("metadata: {name: static, namespace: default}",
                           "metadata: {name: static, namespace: default, labels: {istio.io/use-waypoint: wp}}")
    mesh = mesh_of(NS, CLIENT, waypoint, bound)
    svc = mesh.services[Hostname("s.example")]
    assert waypoint_service(mesh, svc) is not None
    scope = next(s for s in plan_node(mesh, "n1") if s.type_url == LISTENER and s.name == "ambient_outbound")
    assert [(w.chain, [r.ranges for r in w.routes]) for w in scope.args[2]] == [
        ("waypoint|wp.default.svc.cluster.local", [("240.0.0.1/32",)])]
    out = build_all(plan_waypoint(mesh, ProxyMeta(node_id="wp-1", mode="waypoint", namespace="default",
                                                  workload="wp", waypoint="wp")))
    cluster = out[CLUSTER]["outbound|80||s.example"]
    assert cluster.type == cluster_pb2.Cluster.EDS  # type: ignore[attr-defined]
    cla = out[ENDPOINT]["outbound|80||s.example"]
    assert [e.endpoint.address.socket_address.address for g in cla.endpoints  # type: ignore[attr-defined]
            for e in g.lb_endpoints] == ["192.0.2.1"]


def test_none_entry_bound_to_a_waypoint_is_warned_for_ambient_pods() -> None:
    waypoint = ("apiVersion: v1\nkind: Service\nmetadata: {name: wp, namespace: default}\n"
                "spec: {clusterIP: 10.96.0.20, selector: {app: wp}, ports: [{name: tunnel, port: 15008}]}\n")
    bound = NONE.replace("metadata: {name: none, namespace: default}",
                         "metadata: {name: none, namespace: default, labels: {istio.io/use-waypoint: wp}}")
    warned = ambient_warnings(mesh_of(NS, CLIENT, waypoint, bound))
    assert list(warned) == ["none:spec.hosts[0]"] and "through its waypoint" in warned["none:spec.hosts[0]"]
