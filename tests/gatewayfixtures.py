"""Shared setup of the gateway unit tests (tests/test_gateway.py, tests/test_gateway_merge.py,
tests/test_gateway_authz.py): loading a mesh from YAML and the YAML documents they all start
from (the `web` Service in `shop`, a gateway pod in `edge`)."""

from __future__ import annotations

import textwrap
from typing import Any

from controlplane.model.convert import convert
from controlplane.model.ir import Issue
from controlplane.model.mesh import Mesh
from controlplane.model.store import assemble
from controlplane.sources.yamlload import parse_documents

WEB_SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.9, selector: {app: web}, ports: [{name: http, port: 8080}]}
"""


def namespace(name: str) -> str:
    return f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}}}\n"


def gateway_pod(name: str, ip: str, labels: str = "istio: ingressgateway") -> str:
    """A Pod in `edge` (service account `gw`) with these labels."""
    return (f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: edge, labels: {{{labels}}}}}\n"
            f"spec: {{serviceAccountName: gw, containers: [{{name: envoy, image: x}}]}}\n"
            f"status: {{podIP: {ip}}}\n")


def load(text: str) -> tuple[Mesh, list[Issue]]:
    """The mesh of these YAML documents and the converter's issues; the YAML must parse."""
    objs, errs = parse_documents(textwrap.dedent(text), "t.yaml")
    assert not errs
    values: list[Any] = []
    issues: list[Issue] = []
    for o in objs:
        v, iss = convert(o)
        issues += iss
        if v is not None:
            values.append(v)
    return assemble(values), issues
