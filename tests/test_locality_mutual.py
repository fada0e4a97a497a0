"""Locality load balancing and MUTUAL TLS origination, translated as Istio does (issue 16).
Pure: conversion, planning and built Envoy messages."""

from __future__ import annotations

import textwrap

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2

from controlplane.model.convert import convert
from controlplane.model.ir import ProxyMeta
from controlplane.model.store import assemble
from controlplane.sources.yamlload import parse_documents
from controlplane.translate.locality import client_locality, failover_priority_keys, labels_locality
from controlplane.translate.plan import CLUSTER, ENDPOINT
from controlplane.translate.proxy import shared_key
from controlplane.translate.sidecar import plan_outbound

NAME = "outbound|80||hello.ns.svc.cluster.local"


def _pod(name: str, ip: str, region: str, zone: str) -> str:
    return f"""---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: ns, labels: {{app: {name.split('-')[0]},
  topology.kubernetes.io/region: {region}, topology.kubernetes.io/zone: {zone}}}}}
spec: {{containers: [{{name: c, image: x}}]}}
status: {{podIP: {ip}}}
"""


def mesh_of(dr: str) -> tuple[object, list[str]]:
    text = """apiVersion: v1
kind: Service
metadata: {name: hello, namespace: ns}
spec: {selector: {app: hello}, ports: [{name: http, port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: hello, namespace: ns, labels: {kubernetes.io/service-name: hello}}
ports: [{name: http, port: 80}]
endpoints:
- {addresses: [10.0.0.1], targetRef: {kind: Pod, name: hello-a}}
- {addresses: [10.0.0.2], targetRef: {kind: Pod, name: hello-b}}
- {addresses: [10.0.0.3], targetRef: {kind: Pod, name: hello-c}}
- {addresses: [10.0.0.4], targetRef: {kind: Pod, name: hello-d}}
"""
    text += _pod("hello-a", "10.0.0.1", "region1", "zone1") + _pod("hello-b", "10.0.0.2", "region1", "zone2")
    text += _pod("hello-c", "10.0.0.3", "region2", "zone3") + _pod("hello-d", "10.0.0.4", "region3", "zone4")
    text += _pod("client-1", "10.0.1.1", "region1", "zone1") + _pod("client-2", "10.0.1.2", "region2", "zone3")
    text += "---\n" + textwrap.dedent(dr)
    objs, errs = parse_documents(text, "t.yaml")
    assert not errs
    values, issues = [], []
    for o in objs:
        v, iss = convert(o)
        issues += [i.format() for i in iss]
        if v is not None:
            values.append(v)
    mesh = assemble(values)
    return mesh, issues + [i.format() for i in mesh.issues]


def cla(mesh: object, workload: str) -> dict[str, tuple[int, int]]:
    """endpoint address -> (priority, locality weight) in `workload`'s load assignment."""
    meta = ProxyMeta(workload, namespace="ns", workload=workload)
    client = client_locality(mesh, meta, failover_priority_keys(mesh))  # type: ignore[arg-type]
    (spec,) = [s for s in plan_outbound(mesh, "ns", "bind", client=client)  # type: ignore[arg-type]
               if s.type_url == ENDPOINT and s.name == NAME]
    msg = spec.make()
    assert isinstance(msg, endpoint_pb2.ClusterLoadAssignment)
    return {lb.endpoint.address.socket_address.address: (g.priority, g.load_balancing_weight.value)
            for g in msg.endpoints for lb in g.lb_endpoints}


FAILOVER = """apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: hello, namespace: ns}
spec:
  host: hello.ns.svc.cluster.local
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 1}
    loadBalancer: {localityLbSetting: {failover: [{from: region1, to: region2}]}}
"""


def test_priorities_follow_istios_failover_table() -> None:
    mesh, issues = mesh_of(FAILOVER)
    assert not issues
    # region1/zone1 client: same zone 0, same region 1 (no subzones), failover region 2, other 3.
    assert {a: p for a, (p, _) in cla(mesh, "client-1").items()} == {
        "10.0.0.1": 0, "10.0.0.2": 1, "10.0.0.3": 2, "10.0.0.4": 3}
    # region2 client (no failover rule from region2): its zone, then every other region.
    assert {a: p for a, (p, _) in cla(mesh, "client-2").items()} == {
        "10.0.0.3": 0, "10.0.0.1": 1, "10.0.0.2": 1, "10.0.0.4": 1}


def test_clients_of_one_locality_share_one_load_assignment() -> None:
    mesh, _ = mesh_of(FAILOVER)
    a = ProxyMeta("x", namespace="ns", workload="client-1")
    b = ProxyMeta("y", namespace="ns", labels=(("topology.kubernetes.io/region", "region1"),
                                                ("topology.kubernetes.io/zone", "zone1")))
    c = ProxyMeta("z", namespace="ns", workload="client-2")
    assert shared_key(mesh, a) == shared_key(mesh, b) != shared_key(mesh, c)  # type: ignore[arg-type]


def test_no_priorities_without_outlier_detection_and_a_warning_names_the_field() -> None:
    mesh, issues = mesh_of(FAILOVER.replace("    outlierDetection: {consecutive5xxErrors: 1}\n", ""))
    assert {p for p, _ in cla(mesh, "client-1").values()} == {0}
    assert any("localityLbSetting.failover" in i and "outlierDetection" in i for i in issues), issues


def test_enabled_false_turns_locality_balancing_off() -> None:
    mesh, _ = mesh_of(FAILOVER.replace("{failover:", "{enabled: false, failover:"))
    assert {p for p, _ in cla(mesh, "client-1").values()} == {0}
    (c,) = [s.make() for s in plan_outbound(mesh, "ns", "bind") if s.type_url == CLUSTER]  # type: ignore[arg-type]
    assert isinstance(c, cluster_pb2.Cluster) and not c.common_lb_config.HasField("locality_weighted_lb_config")


def test_distribute_weights_localities_and_drops_the_rest() -> None:
    mesh, issues = mesh_of(FAILOVER.replace("{failover: [{from: region1, to: region2}]}",
                                            '{distribute: [{from: "region1/zone1/*", to: {"region1/*": 80, '
                                            '"region2/*": 20}}]}'))
    assert not issues
    # region1 holds two localities of one endpoint each: 80 split by size; region3 is left out.
    assert {a: w for a, (_, w) in cla(mesh, "client-1").items()} == {"10.0.0.1": 40, "10.0.0.2": 40,
                                                                    "10.0.0.3": 20}


def test_failover_priority_ranks_labels_first() -> None:
    mesh, _ = mesh_of(FAILOVER.replace("{failover: [{from: region1, to: region2}]}",
                                       "{failoverPriority: [topology.kubernetes.io/region]}"))
    assert {a: p for a, (p, _) in cla(mesh, "client-1").items()} == {
        "10.0.0.1": 0, "10.0.0.2": 0, "10.0.0.3": 1, "10.0.0.4": 1}


def test_istio_locality_label() -> None:
    assert labels_locality((("istio-locality", "us-east.zone1.rack2"),)) == ("us-east", "zone1", "rack2")


def test_locality_setting_errors() -> None:
    _, issues = mesh_of(FAILOVER.replace("to: region2", "to: region1"))
    assert any("failover[0]" in i and "different regions" in i for i in issues), issues
    _, issues = mesh_of(FAILOVER.replace("{failover: [{from: region1, to: region2}]}",
                                         '{distribute: [{from: region1, to: {"region1/*": 70}}]}'))
    assert any("distribute[0].to" in i and "100" in i for i in issues), issues


MUTUAL = """apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: hello, namespace: ns}
spec:
  host: hello.ns.svc.cluster.local
  trafficPolicy: {tls: TLS}
"""


def _tls_context(mesh: object) -> str:
    (c,) = [s.make() for s in plan_outbound(mesh, "ns", "bind") if s.type_url == CLUSTER]  # type: ignore[arg-type]
    assert isinstance(c, cluster_pb2.Cluster)
    from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

    ctx = tls_pb2.UpstreamTlsContext()
    c.transport_socket.typed_config.Unpack(ctx)
    return str(ctx)


def test_mutual_files_are_read_by_envoy() -> None:
    mesh, issues = mesh_of(MUTUAL.replace("TLS", "{mode: MUTUAL, clientCertificate: /c.pem, privateKey: /k.pem, "
                                                 "caCertificates: /ca.pem, sni: a.example}"))
    assert not issues
    text = _tls_context(mesh)
    assert 'filename: "/c.pem"' in text and 'filename: "/k.pem"' in text and 'filename: "/ca.pem"' in text


def test_mutual_credential_name_goes_over_sds() -> None:
    mesh, issues = mesh_of(MUTUAL.replace("TLS", "{mode: MUTUAL, credentialName: cred}"))
    text = _tls_context(mesh)
    assert 'name: "kubernetes://cred"' in text and 'name: "kubernetes://cred-cacert"' in text
    # No such Secret: an error names the rule and the field (the cluster stays TLS: fail closed).
    assert any("DestinationRule/ns/hello" in i and "tls.credentialName" in i and "not found" in i
               for i in issues), issues


def test_mutual_errors_name_the_field() -> None:
    _, issues = mesh_of(MUTUAL.replace("TLS", "{mode: MUTUAL, privateKey: /k.pem}"))
    assert any("tls.clientCertificate" in i and "required" in i for i in issues), issues
    _, issues = mesh_of(MUTUAL.replace("TLS", "{mode: MUTUAL, credentialName: c, clientCertificate: /c.pem}"))
    assert any("tls.clientCertificate" in i and "not both" in i for i in issues), issues
    _, issues = mesh_of(MUTUAL.replace("TLS", "{mode: SIMPLE, caCertificates: ca.pem}"))
    assert any("tls.caCertificates" in i and "absolute" in i for i in issues), issues
