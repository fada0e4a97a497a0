"""A ServiceEntry of one namespace must not take a host away from the clients another
namespace's entry serves (issue 18, h8 review).

Istio builds each client namespace's registry from the services exported to it
(`servicesExportedToNamespace`), so an entry exported only to its own namespace
(`exportTo: ["."]`) never displaces, for other namespaces, another namespace's entry of the
same host. Meshline keeps one registry for every namespace; an entry visible to every
namespace therefore wins the host over one that is not.
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
    owner = mesh.services["api.external.example"]  # type: ignore[index]
    assert (owner.namespace, owner.name) == ("default", "ext")
    warned = [i for i in mesh.issues if i.ref.namespace == "aaa" and i.field == "spec.hosts[0]"]
    assert warned and "default/ext" in warned[0].message.replace("ServiceEntry/", ""), [i.format() for i in mesh.issues]


def test_of_two_public_entries_the_first_by_namespace_and_name_keeps_the_host() -> None:
    mesh = mesh_of(PODS, AAA, TOOL, se(SQUAT.replace('exportTo: ["."]', ""), name="squat", namespace="aaa"),
                   se(STATIC))
    assert mesh.services["api.external.example"].namespace == "aaa"  # type: ignore[index]
