"""Shared setup of the ambient (node proxy / waypoint) unit tests (tests/test_ambient_model.py,
tests/test_waypoint_ext_authz.py): building a mesh from YAML and the ambient `api` workload
they both start from."""

from __future__ import annotations

import textwrap

from controlplane.model.convert import convert
from controlplane.model.ir import Issue
from controlplane.model.mesh import Mesh
from controlplane.model.meshconfig import MeshConfig
from controlplane.model.store import assemble
from controlplane.sources.yamlload import parse_documents

# shop/api (cluster IP 10.96.0.1, port 80 -> 8080) and its pod api-1 on node n1 with a known netns.
API = """\
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec: {clusterIP: 10.96.0.1, selector: {app: api}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: api-1, namespace: shop, labels: {app: api}, annotations: {meshline.io/netns: /run/netns/api-1}}
spec: {nodeName: n1, serviceAccountName: api, containers: [{name: c}]}
status: {podIP: 10.0.0.1}
"""


def mesh_of(*texts: str, mesh_config: MeshConfig | None = None) -> Mesh:
    """The mesh of these YAML texts; they must parse and convert without errors (warnings are kept)."""
    values = []
    issues: list[Issue] = []
    for text in texts:
        objects, errors = parse_documents(textwrap.dedent(text), "in.yaml")
        assert not errors
        for raw in objects:
            value, found = convert(raw)
            assert not [i for i in found if i.severity == "error"], [i.format() for i in found]
            values.append(value)
            issues += found
    kept = [v for v in values if v is not None]
    if mesh_config is None:
        return assemble(kept, tuple(issues))
    return assemble(kept, tuple(issues), mesh_config=mesh_config)

# shop/api bound to the waypoint `wp` (cluster IP 10.96.0.2), and the waypoint's own Service.
WAYPOINT_API = """\
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop, labels: {meshline.io/use-waypoint: wp}}
spec: {clusterIP: 10.96.0.2, selector: {app: api}, ports: [{name: http, port: 80, targetPort: 8080}]}
"""
WAYPOINT_SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: wp, namespace: shop}
spec: {clusterIP: 10.96.0.3, selector: {meshline.io/waypoint: wp}, ports: [{name: tunnel, port: 15008}]}
"""
