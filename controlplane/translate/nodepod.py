"""A node proxy's per-pod inbound side and the identities it holds. Pure, no I/O.

Per ambient pod P on a node with an IP and a known network namespace
(`controlplane.model.ambient`), P's inbound side (`pod_inbound`):
- `ambient_hbone_<ns>_<pod>`: 15008 inside P's netns, terminating tunnels with P's
  certificate for exactly P's IP:port and its services' VIP:port authorities, enforcing P's
  AuthorizationPolicies at L4, delivering inside P's netns. Its routes (those authorities and
  policies) are the RouteConfiguration of the same name, over RDS: a changed policy applies to
  the next tunnel, also on an HBONE connection pooled before the change.
- `ambient_plain_<ns>_<pod>`: 15006 inside P's netns for plaintext callers, per target port
  only where P's PeerAuthentication is not STRICT.
Certificates: one SDS secret per identity running on the node, named by its SPIFFE URI (the
runtime sends only those; see `node_identities`).
"""

from __future__ import annotations

from controlplane.model.ambient import ambient_pods_on, identities
from controlplane.model.ir import ProxyMeta, Workload
from controlplane.model.mesh import Mesh
from controlplane.translate.hbone import (
    PlainPort,
    build_delivery_cluster,
    build_hbone_inbound,
    build_hbone_routes,
    build_plain_inbound,
)
from controlplane.translate.inbound import inbound_ports, inbound_security
from controlplane.translate.names import BLACKHOLE_CLUSTER
from controlplane.translate.plan import CLUSTER, LISTENER, ROUTE, ResourceSpec
from controlplane.translate.security import spiffe_uri
from controlplane.translate.tunnel import tunnel_targets


def identity_secret(trust_domain: str, namespace: str, service_account: str) -> str:
    """The SDS name of an identity's certificate on a node proxy: its SPIFFE URI."""
    return spiffe_uri(trust_domain, namespace, service_account)


def node_identities(mesh: Mesh, node: str) -> list[tuple[str, str]]:
    """The (namespace, service account) pairs a node proxy of `node` holds certificates for."""
    return identities(ambient_pods_on(mesh, node))


def pod_meta(wl: Workload) -> ProxyMeta:
    """The pod as a workload (the view a sidecar of it would have: its Sidecar scope applies)."""
    return ProxyMeta(node_id="", mode="sidecar", namespace=wl.namespace, workload=wl.name, labels=wl.labels,
                     service_account=wl.service_account)


def pod_inbound(mesh: Mesh, wl: Workload) -> list[ResourceSpec]:
    """P's inbound side on its node proxy (see the module docstring)."""
    assert wl.ip is not None
    td = mesh.trust_domain
    key = f"{wl.namespace}_{wl.name}"
    meta = pod_meta(wl)
    ports = inbound_ports(mesh, meta, wl)
    sec, sec_sources = inbound_security(mesh, meta, wl)
    port_modes = dict(sec.ports)
    authz = sec.authz
    sources = tuple(dict.fromkeys((wl.ref, *sec_sources, *(r for ib in ports for r in ib.sources))))
    specs: list[ResourceSpec] = []
    clusters: dict[int, str] = {}
    for ib in ports:
        tp = ib.port.port
        name = f"inbound_ambient|{tp}|{wl.namespace}/{wl.name}"
        clusters[tp] = name
        specs.append(ResourceSpec(CLUSTER, name, build_delivery_cluster, (name, wl.ip, tp, wl.netns), ib.sources))
    cert = identity_secret(td, wl.namespace, wl.service_account)
    hb = f"ambient_hbone_{key}"
    # Routes (targets, policies) over RDS: a policy change reaches tunnels on pooled connections.
    specs.append(ResourceSpec(LISTENER, hb, build_hbone_inbound, (hb, wl.netns, cert, td, None, ()), (wl.ref,)))
    specs.append(ResourceSpec(ROUTE, hb, build_hbone_routes, (hb, td, tunnel_targets(mesh, wl, clusters), authz),
                              sources))
    plain = tuple(PlainPort(tp, clusters[tp], port_modes.get(tp, sec.mode) not in ("STRICT",))
                  for tp in sorted(clusters))
    pl = f"ambient_plain_{key}"
    specs.append(ResourceSpec(LISTENER, pl, build_plain_inbound,
                              (pl, wl.netns, plain, BLACKHOLE_CLUSTER, td, authz), sources))
    return specs
