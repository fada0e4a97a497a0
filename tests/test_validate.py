"""Cross-object checks: conflicts, dangling hosts, subsets, ports and pod selection."""

from __future__ import annotations

import textwrap

import yaml

from controlplane.model.convert import convert
from controlplane.model.ir import (
    Hostname,
    Issue,
)
from controlplane.model.mesh import Mesh
from controlplane.model.raw import RawObject
from controlplane.model.store import mesh_of as store_mesh_of
from controlplane.model.validate import check_mesh

BASE = """
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080}, {name: grpc, port: 9090}]
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: default}
spec:
  ports: [{name: http, port: 9080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ratings-1, namespace: default, labels: {kubernetes.io/service-name: ratings}}
addressType: IPv4
ports: [{name: http, port: 9080}]
endpoints:
- addresses: [10.0.1.1]
  targetRef: {kind: Pod, name: ratings-1}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-1, namespace: default, labels: {app: reviews, version: v1}}
spec: {}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-2, namespace: default, labels: {app: reviews, version: v2}}
spec: {}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: ratings-1, namespace: default, labels: {app: ratings, version: v1}}
spec: {}
status: {podIP: 10.0.1.1}
---
apiVersion: networking.meshline.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""


def vs(name: str, spec: str, namespace: str = "default") -> str:
    return (
        f"apiVersion: networking.meshline.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: {namespace}}}\n"
        "spec:\n" + textwrap.indent(textwrap.dedent(spec).lstrip("\n"), "  ")
    )


def dr(name: str, spec: str, namespace: str = "default") -> str:
    return (
        f"apiVersion: networking.meshline.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: {namespace}}}\n"
        "spec:\n" + textwrap.indent(textwrap.dedent(spec).lstrip("\n"), "  ")
    )


def mesh_of(*texts: str) -> Mesh:
    """Convert every document (all must be valid) and assemble a Mesh the way the store does
    (without its cross-object checks: those are what these tests call)."""
    values: list[object] = []
    for text in texts:
        for doc in yaml.safe_load_all(text):
            meta = doc["metadata"]
            ns = "" if doc["kind"] == "Namespace" else meta.get("namespace", "default")
            raw = RawObject(doc["kind"], doc["apiVersion"], ns, meta["name"], doc, "mesh.yaml", 1)
            value, issues = convert(raw)
            assert value is not None and not [i for i in issues if i.severity == "error"], issues
            values.append(value)
    return store_mesh_of(values)


def find(issues: tuple[Issue, ...], name: str, field: str, fragment: str, severity: str = "error") -> Issue:
    found = [
        i
        for i in issues
        if i.ref.name == name and i.field == field and fragment in i.message and i.severity == severity
    ]
    assert found, (
        f"no {severity} for {name} on {field!r} containing {fragment!r}: {[i.format() for i in issues]}"
    )
    return found[0]


REVIEWS_ROUTE = """
hosts: [reviews]
http:
- route:
  - destination: {host: reviews, subset: v1, port: {number: 9080}}
    weight: 50
  - destination: {host: reviews, subset: v2}
    weight: 50
"""


def test_consistent_mesh_has_no_issues() -> None:
    assert check_mesh(mesh_of(BASE, vs("reviews", REVIEWS_ROUTE))) == ()


def test_second_virtual_service_for_a_host_is_an_error_naming_the_winner() -> None:
    mesh = mesh_of(BASE, vs("b-reviews", REVIEWS_ROUTE), vs("a-reviews", REVIEWS_ROUTE))
    issues = check_mesh(mesh)
    issue = find(issues, "b-reviews", "spec.hosts", "already claimed by VirtualService default/a-reviews")
    assert "reviews.default.svc.cluster.local" in issue.message
    assert issue.ref.file == "mesh.yaml"
    assert not [i for i in issues if i.ref.name == "a-reviews"]
    assert mesh.vs_by_host[Hostname("reviews.default.svc.cluster.local")].name == "a-reviews"


def test_hosts_without_a_service_warn() -> None:
    issues = check_mesh(
        mesh_of(
            BASE,
            vs("ghost", "hosts: [ghost]\nhttp:\n- route:\n  - destination: {host: ghost}\n"),
            dr("phantom", "host: phantom.other"),
        )
    )
    find(
        issues,
        "ghost",
        "spec.hosts",
        "no Service is known for host ghost.default.svc.cluster.local",
        "warning",
    )
    find(issues, "ghost", "spec.http[0].route[0].destination.host", "no Service", "warning")
    find(issues, "phantom", "spec.host", "phantom.other.svc.cluster.local", "warning")
    assert all(i.severity == "warning" for i in issues)


def test_undefined_subsets_are_errors() -> None:
    issues = check_mesh(
        mesh_of(
            BASE,
            vs(
                "reviews",
                """
                hosts: [reviews]
                http:
                - route:
                  - destination: {host: reviews, subset: v3}
                  mirrors:
                  - destination: {host: ratings, subset: v1}
                """,
            ),
            vs("tcp", "hosts: [ratings]\ntcp:\n- route:\n  - destination: {host: reviews, subset: v9}\n"),
        )
    )
    issue = find(issues, "reviews", "spec.http[0].route[0].destination.subset", "subset 'v3'")
    assert "DestinationRule default/reviews" in issue.message and "v1, v2" in issue.message
    assert "503" in issue.message
    find(issues, "reviews", "spec.http[0].mirrors[0].destination.subset", "no DestinationRule exists")
    find(issues, "tcp", "spec.tcp[0].route[0].destination.subset", "subset 'v9'")


def test_destination_port_must_exist_on_the_service() -> None:
    issues = check_mesh(
        mesh_of(
            BASE,
            vs(
                "reviews",
                "hosts: [reviews]\nhttp:\n- route:\n  - destination: {host: reviews, port: {number: 8080}}\n",
            ),
        )
    )
    issue = find(issues, "reviews", "spec.http[0].route[0].destination.port", "has no port 8080")
    assert "9080, 9090" in issue.message


def test_subset_selecting_no_pod_warns() -> None:
    rule = dr(
        "ratings",
        "host: ratings\nsubsets:\n- {name: v1, labels: {version: v1}}\n- {name: v2, labels: {version: v2}}\n",
    )
    issues = check_mesh(mesh_of(BASE, rule))
    issue = find(issues, "ratings", "spec.subsets[1]", "subset 'v2' (version=v2) selects no Pod", "warning")
    assert "default/ratings" in issue.message
    # v1 selects ratings-1 through the EndpointSlice (ratings has no selector); reviews' subsets
    # select pods through the Service selector.
    assert [i.field for i in issues] == ["spec.subsets[1]"]


def test_two_destination_rules_for_one_host_in_one_namespace() -> None:
    issues = check_mesh(
        mesh_of(
            BASE,
            dr("reviews-extra", "host: reviews.default.svc.cluster.local"),
            dr("reviews-elsewhere", "host: reviews.default", namespace="other"),
        )
    )
    find(issues, "reviews-extra", "spec.host", "DestinationRule default/reviews already configures")
    assert not [i for i in issues if i.ref.name in ("reviews", "reviews-elsewhere") and i.severity == "error"]
