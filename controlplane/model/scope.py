"""Which Sidecar scopes a proxy's outbound configuration, and what its egress hosts match.
Pure, no I/O.

Selection, as in Istio: a Sidecar with a `workloadSelector` matching the workload's labels
(in the workload's namespace; the first by name when several match), else the namespace's
default (the first selector-less Sidecar by name; extra ones are reported by validation),
else the mesh default (a selector-less Sidecar in the root namespace). A Sidecar without
egress inherits the egress of the next one in that order; with none at all the proxy is
unscoped and receives every service.

Egress host `namespace/dnsName`: `.` is the proxy's own namespace (also for the mesh
default, which applies to every namespace), `*` every namespace, `~` none; dnsName `*`
matches every host, `*.suffix` every host ending in `.suffix`, anything else exactly.
"""

from __future__ import annotations

from controlplane.model.ir import EgressHost, Labels, ProxyMeta, Service, Sidecar, labels_match
from controlplane.model.mesh import Mesh


def namespace_default(mesh: Mesh, namespace: str) -> Sidecar | None:
    """The selector-less Sidecar of `namespace` that applies (the first by name)."""
    for sc in mesh.sidecars_by_namespace.get(namespace, ()):
        if not sc.selector:
            return sc
    return None


def selecting_sidecar(mesh: Mesh, namespace: str, labels: Labels) -> Sidecar | None:
    """The Sidecar of `namespace` whose workloadSelector picks `labels` (the first by name)."""
    for sc in mesh.sidecars_by_namespace.get(namespace, ()):
        if sc.selector and labels_match(sc.selector, labels):
            return sc
    return None


def sidecar_for(mesh: Mesh, namespace: str, labels: Labels) -> Sidecar | None:
    """The Sidecar whose egress scopes a workload with `labels` in `namespace`; None when
    nothing scopes it."""
    if not mesh.sidecars:
        return None
    for sc in (
        selecting_sidecar(mesh, namespace, labels),
        namespace_default(mesh, namespace),
        namespace_default(mesh, mesh.root_namespace),
    ):
        if sc is not None and sc.egress:
            return sc
    return None


def proxy_labels(mesh: Mesh, proxy: ProxyMeta) -> Labels:
    """The labels a proxy is selected by: its Pod's, else what its bootstrap says."""
    wl = mesh.workload(proxy.namespace, proxy.workload)
    return wl.labels if wl is not None else proxy.labels


def proxy_sidecar(mesh: Mesh, proxy: ProxyMeta) -> Sidecar | None:
    """The Sidecar scoping `proxy` (only sidecar-mode proxies are scoped)."""
    if proxy.mode != "sidecar" or not mesh.sidecars:
        return None
    return sidecar_for(mesh, proxy.namespace, proxy_labels(mesh, proxy))


def egress_host_matches(entry: EgressHost, svc: Service, proxy_namespace: str) -> bool:
    ns = entry.namespace
    if ns == "~":
        return False
    if ns == ".":
        if svc.namespace != proxy_namespace:
            return False
    elif ns != "*" and svc.namespace != ns:
        return False
    host = entry.host
    if host == "*":
        return True
    name = svc.hostname.lower()
    if host.startswith("*."):
        return name.endswith(host[1:])
    return name == host
