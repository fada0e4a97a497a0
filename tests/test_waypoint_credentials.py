"""DestinationRule `credentialName` on a waypoint (issue 18), pure: a waypoint that routes to
a ServiceEntry host whose DestinationRule originates MUTUAL TLS with `credentialName` gets
that Secret from its own namespace (as a sidecar there would), so its cluster has the
certificate it names; a waypoint of another namespace gets the fail-closed stand-ins, a
node proxy none. Before, waypoints received no credential Secret at all, and the cluster
waited for a certificate that never came."""

from __future__ import annotations

import base64

import pytest
from cryptography import x509
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

from controlplane.ca.identity import Identity
from controlplane.identityplan import credential_layer
from controlplane.model.ir import ProxyMeta
from controlplane.translate.ambient import plan_waypoint
from controlplane.translate.plan import CLUSTER, SECRET, build_all
from controlplane.translate.secrets import TRUSTS_NOTHING_CA, credential_ca_sds_name, credential_sds_name
from tests.e2e.test_locality_mutual_e2e import Pki
from tests.test_ambient_serviceentry import NS, STATIC
from tests.test_serviceentry import mesh_of

WAYPOINT = ("apiVersion: v1\nkind: Service\nmetadata: {name: wp, namespace: default}\n"
            "spec: {clusterIP: 10.96.0.20, selector: {app: wp}, ports: [{name: tunnel, port: 15008}]}\n")
BOUND = STATIC.replace("metadata: {name: static, namespace: default}",
                       "metadata: {name: static, namespace: default, labels: {istio.io/use-waypoint: wp}}")
DR = """apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: static, namespace: default}
spec:
  host: s.example
  trafficPolicy: {tls: {mode: MUTUAL, credentialName: cred}}
"""
OTHER_NS = "apiVersion: v1\nkind: Namespace\nmetadata: {name: other}\n"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def secret(pki: Pki, ns: str) -> str:
    data = {k: base64.b64encode(v.encode()).decode() for k, v in
            (("tls.crt", pki.client_pem), ("tls.key", pki.client_key), ("ca.crt", pki.ca_pem))}
    return ("apiVersion: v1\nkind: Secret\ntype: kubernetes.io/tls\n"
            f"metadata: {{name: cred, namespace: {ns}}}\n"
            f"data: {{tls.crt: {data['tls.crt']}, tls.key: {data['tls.key']}, ca.crt: {data['ca.crt']}}}\n")


def waypoint(ns: str = "default") -> ProxyMeta:
    return ProxyMeta(node_id="wp-1", mode="waypoint", namespace=ns, workload="wp", waypoint="wp")


def test_a_waypoint_gets_the_credential_its_cluster_names(pki: Pki) -> None:
    mesh = mesh_of(NS, WAYPOINT, BOUND, DR, secret(pki, "default"))
    cluster = build_all(plan_waypoint(mesh, waypoint()))[CLUSTER]["outbound|80||s.example"]
    ctx = tls_pb2.UpstreamTlsContext()
    assert cluster.transport_socket.typed_config.Unpack(ctx)  # type: ignore[attr-defined]
    named = {c.name for c in ctx.common_tls_context.tls_certificate_sds_secret_configs}
    assert named == {credential_sds_name("cred")}
    secrets = build_all(credential_layer(mesh, waypoint(), Identity("default", "wp")))[SECRET]
    assert set(secrets) == {credential_sds_name("cred"), credential_ca_sds_name("cred")}
    sent = secrets[credential_sds_name("cred")].tls_certificate.certificate_chain.inline_bytes  # type: ignore[attr-defined]
    want = x509.load_pem_x509_certificate(pki.client_pem.encode())
    assert x509.load_pem_x509_certificate(sent) == want


def test_a_waypoint_of_another_namespace_gets_stand_ins_and_a_node_proxy_nothing(pki: Pki) -> None:
    mesh = mesh_of(NS, OTHER_NS, WAYPOINT, BOUND, DR, secret(pki, "default"))
    other = build_all(credential_layer(mesh, waypoint("other"), Identity("other", "wp")))[SECRET]
    ca = other[credential_ca_sds_name("cred")].validation_context.trusted_ca.inline_bytes  # type: ignore[attr-defined]
    assert ca == TRUSTS_NOTHING_CA.encode()
    stand_in = other[credential_sds_name("cred")].SerializeToString()  # type: ignore[attr-defined]
    assert pki.client_pem.encode() not in stand_in and pki.client_key.encode() not in stand_in
    node = ProxyMeta(node_id="node-n1", mode="node", namespace="default", node="n1")
    assert credential_layer(mesh, node, Identity("default", "node")) == []
