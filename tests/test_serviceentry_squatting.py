"""A ServiceEntry of one namespace must not take a host away from the clients another
namespace's entry serves (issue 18, h8 review), and a namespace's own entry applies to its
own clients (issue 18, h23).

Istio builds each client namespace's registry from the services exported to it
(`servicesExportedToNamespace`: private to the namespace, exported to it by name, public),
keeping the first of one hostname (`SidecarScope.appendSidecarServices`). So an entry
exported only to its own namespace (`exportTo: ["."]`) never displaces, for other
namespaces, another namespace's entry of the same host, and it wins for its own clients.
Meshline does the same lookup (`Mesh.service`); the private entry's clusters get their own
name, and the public entry is warned for the namespace it loses.
"""

from __future__ import annotations

import pytest

from controlplane.translate.plan import CLUSTER, ENDPOINT
from tests.test_serviceentry import PODS, STATIC, addresses, mesh_of, outbound, se

pytestmark = pytest.mark.unit

CLUSTER_NAME = "outbound|8080||api.external.example"
SQUAT = """
hosts: [api.external.example]
location: MESH_EXTERNAL
ports: [{number: 8080, name: http, protocol: HTTP}]
resolution: STATIC
endpoints: [{address: 203.0.113.66}]
exportTo: ["."]
"""
TOOL = """
apiVersion: v1
kind: Pod
metadata: {name: tool, namespace: other}
spec: {containers: [{name: app, image: x}]}
status: {podIP: 10.0.0.9}
"""
AAA = """
apiVersion: v1
kind: Namespace
metadata: {name: aaa}
"""


def test_a_private_entry_of_an_earlier_namespace_does_not_hide_a_public_one() -> None:
    mesh = mesh_of(PODS, AAA, TOOL, se(SQUAT, name="squat", namespace="aaa"), se(STATIC))
    for ns, wl in (("default", "client"), ("other", "tool")):
        got = outbound(mesh, namespace=ns, workload=wl)
        assert CLUSTER_NAME in got[CLUSTER], f"clients in {ns} lost the host"
        assert ("203.0.113.66", 8080) not in addresses(got[ENDPOINT][CLUSTER_NAME])
        assert addresses(got[ENDPOINT][CLUSTER_NAME]) == [("192.0.2.10", 18080), ("192.0.2.11", 19090)]
        assert not [n for n in got[CLUSTER] if "~aaa/" in n]
    owner = mesh.services["api.external.example"]  # type: ignore[index]
    assert (owner.namespace, owner.name) == ("default", "ext")
    # aaa's own clients get aaa's entry, under its own cluster name (never the public name).
    got = outbound(mesh, namespace="aaa", workload="tool")
    own = "outbound|8080||api.external.example~aaa/squat"
    assert CLUSTER_NAME not in got[CLUSTER] and addresses(got[ENDPOINT][own]) == [("203.0.113.66", 8080)]
    warned = [i for i in mesh.issues if i.ref.kind == "ServiceEntry" and i.field == "spec.hosts[0]"]
    assert len(warned) == 1 and warned[0].ref.name == "ext", [i.format() for i in mesh.issues]
    assert "ServiceEntry/aaa/squat for clients in namespace aaa" in warned[0].message


def test_of_two_public_entries_the_first_by_namespace_and_name_keeps_the_host() -> None:
    mesh = mesh_of(PODS, AAA, TOOL, se(SQUAT.replace('exportTo: ["."]', ""), name="squat", namespace="aaa"),
                   se(STATIC))
    assert mesh.services["api.external.example"].namespace == "aaa"  # type: ignore[index]
