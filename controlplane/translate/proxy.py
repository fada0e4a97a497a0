"""The one entry point of translation: which planner a proxy gets. Pure, no I/O.

`plan_proxy(mesh, proxy)` returns a proxy's plan in two layers, the way the runtime's
snapshot builder keeps them:
- `shared`: what every proxy with an equal `shared_key` receives, and the only part that
  reads endpoints: a sidecar's outbound side (`sidecar.plan_outbound`, per namespace, capture,
  bind address and Sidecar scope); a node proxy's service clusters and their endpoints
  (`nodeproxy.plan_node_shared`, per set of imported services); nothing for a waypoint;
- `own`: the rest (a sidecar's inbound side, a node proxy's per-pod and per-identity
  resources, a waypoint's everything, a gateway's listeners and routes: `translate.gateway`,
  whose clusters and endpoints, scoped to what its routes reach, are its shared layer), kept
  as it is on endpoint-only changes.
`plan_shared_hosts` re-plans just the shared resources that depend on some hosts' endpoints
(an endpoint-only change patches those). Certificates are not translation: the runtime's
identity planner adds them to the own layer from the CA's material.

The runtime, the golden tests and the benches all plan through here, so the golden files
are the production path's output.
"""

from __future__ import annotations

from dataclasses import dataclass

from controlplane.model.ir import Hostname, ProxyMeta, SourceRef
from controlplane.model.mesh import Mesh
from controlplane.model.telemetry import access_logs_for
from controlplane.translate import nodeproxy
from controlplane.translate.accesslog import AccessLogSink, resolve
from controlplane.translate.ambient import plan_waypoint
from controlplane.translate.gateway import gateway_scope, plan_gateway, plan_gateway_clusters
from controlplane.translate.locality import ClientLocalities, client_locality, failover_priority_keys
from controlplane.translate.plan import ResourceSpec
from controlplane.translate.scope import proxy_scope, scope_key
from controlplane.translate.sidecar import plan_inbound, plan_outbound, plan_outbound_hosts


@dataclass(frozen=True, slots=True)
class ProxyPlan:
    """A proxy's resources as two layers (see the module docstring)."""

    shared: tuple[ResourceSpec, ...]
    own: tuple[ResourceSpec, ...]

    def specs(self) -> list[ResourceSpec]:
        """Both layers as the proxy receives them, sorted by (type, name); a name in both is
        the own layer's (as the snapshot builder combines them)."""
        merged = {(s.type_url, s.name): s for s in (*self.shared, *self.own)}
        return [merged[k] for k in sorted(merged)]

    def overlaps(self) -> list[tuple[str, str]]:
        """(type URL, name) pairs planned in both layers (each should have one owner)."""
        shared = {(s.type_url, s.name) for s in self.shared}
        return sorted(k for k in ((s.type_url, s.name) for s in self.own) if k in shared)


def plan_proxy(mesh: Mesh, proxy: ProxyMeta) -> ProxyPlan:
    """`proxy`'s resources (without certificates) for `mesh`."""
    return ProxyPlan(tuple(plan_shared(mesh, proxy)), tuple(plan_own(mesh, proxy)))


def plan_shared(mesh: Mesh, meta: ProxyMeta) -> list[ResourceSpec]:
    """The endpoint-dependent layer proxies of one class share: a sidecar's outbound side; a
    node proxy's service clusters and their endpoints (shared by node proxies whose pods import
    the same services)."""
    if meta.mode == "node":
        return nodeproxy.plan_node_shared(mesh, meta.node) if meta.node else []
    if meta.mode == "gateway":
        return plan_gateway_clusters(mesh, meta.namespace, scope=gateway_scope(mesh, meta))
    if meta.mode != "sidecar":
        return []
    logs, log_sources = _client_logs(mesh, meta)
    return plan_outbound(mesh, meta.namespace, meta.capture, meta.outbound_address, proxy_scope(mesh, meta),
                         client_locality(mesh, meta, failover_priority_keys(mesh)), logs, log_sources)


def _client_logs(mesh: Mesh, meta: ProxyMeta) -> tuple[tuple[AccessLogSink, ...], tuple[SourceRef, ...]]:
    if not mesh.telemetries:
        return (), ()
    wl = mesh.workload(meta.namespace, meta.workload)
    logs, refs = access_logs_for(mesh, meta.namespace, wl.labels if wl is not None else meta.labels, "CLIENT")
    return resolve(logs, mesh.mesh_config), refs


def outbound_access_logs(mesh: Mesh, meta: ProxyMeta) -> tuple[AccessLogSink, ...]:
    """What a sidecar's outbound listeners log (Telemetry accessLogging, CLIENT): part of
    its shared key, so sidecars a workload-level Telemetry selects get their own layer."""
    return _client_logs(mesh, meta)[0]


def plan_shared_hosts(mesh: Mesh, meta: ProxyMeta, hosts: frozenset[str]) -> list[ResourceSpec] | None:
    """Just the shared resources that depend on the endpoints of `hosts` (an endpoint-only
    change patches those), or None when the proxy class is planned in full."""
    if meta.mode == "node":
        return nodeproxy.plan_node_shared_hosts(mesh, meta.node, hosts) if meta.node else []
    if meta.mode == "gateway":
        return plan_gateway_clusters(mesh, meta.namespace, hosts, gateway_scope(mesh, meta))
    if meta.mode != "sidecar":
        return None
    return plan_outbound_hosts(mesh, meta.namespace, meta.capture, [Hostname(h) for h in hosts],
                               proxy_scope(mesh, meta), client_locality(mesh, meta, failover_priority_keys(mesh)))


def plan_own(mesh: Mesh, meta: ProxyMeta) -> list[ResourceSpec]:
    """A proxy's own layer, which reads no endpoints (kept as it is on endpoint-only changes)."""
    if meta.mode == "node":
        return nodeproxy.plan_node_own(mesh, meta.node) if meta.node else []
    if meta.mode == "waypoint":
        return plan_waypoint(mesh, meta)
    if meta.mode == "gateway":
        return plan_gateway(mesh, meta)
    return plan_inbound(mesh, meta)


def shared_key(mesh: Mesh, meta: ProxyMeta, localities: ClientLocalities | None = None) -> object:
    """Proxies with equal keys share one layer: sidecars of the same mode, namespace, capture
    (and bind address), effective Sidecar (or none) and locality (locality load balancing);
    node proxies whose pods import the same services. `localities` remembers the mesh's
    failoverPriority keys between calls (a runtime keeps one)."""
    if meta.mode == "node":
        return ("node", nodeproxy.node_shared_key(mesh, meta.node or ""))
    if meta.mode == "gateway":  # the clusters its routes reach, as a sidecar of its namespace sees them
        return ("gateway", meta.namespace, gateway_scope(mesh, meta))
    locality = (localities or ClientLocalities())(mesh, meta) if meta.mode == "sidecar" else None
    logs = outbound_access_logs(mesh, meta) if meta.mode == "sidecar" else ()
    return (meta.mode, meta.namespace, meta.capture, meta.outbound_address if meta.capture == "bind" else "",
            scope_key(mesh, meta), locality, *((logs,) if logs else ()))
