"""Sidecarless (ambient) facts read off the mesh: which pods are ambient, which accept the
HBONE tunnel, which waypoint a service uses, which pods run on a node. Pure, no I/O.

- A pod is *ambient* when its label `meshline.io/dataplane-mode` says `ambient`, or it has
  no such label and its namespace's label says so; `none` (or `sidecar`) on the pod opts
  out. Host-network pods and pods running an injected sidecar are never ambient.
- A pod *accepts HBONE* (an HTTP/2 CONNECT tunnel over mTLS on 15008) when it is ambient
  (its node proxy listens in its network namespace) or runs an intercepting sidecar
  (`meshline.io/status: injected`), which listens on 15008 itself.
- A service uses a waypoint when it (label or annotation), or else its namespace, carries
  `meshline.io/use-waypoint: NAME`; `none` on the service opts out. The waypoint is the
  Service `NAME` of the same namespace (its pods run `meshline bootstrap --mode waypoint`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from controlplane.model.ir import Hostname, Issue, Labels, Service, SourceRef, Workload, labels_match
from controlplane.model.mesh import Mesh

DATAPLANE_MODE_LABEL = "meshline.io/dataplane-mode"
USE_WAYPOINT_LABEL = "meshline.io/use-waypoint"
STATUS_ANNOTATION = "meshline.io/status"  # "injected": the pod runs a Meshline sidecar
INJECT_ANNOTATION = "meshline.io/inject"  # "false" (annotation or label): opted out

DataplaneMode = Literal["ambient", "sidecar", "none"]


def _get(labels: Labels, key: str) -> str | None:
    for k, v in labels:
        if k == key:
            return v
    return None


def runs_sidecar(wl: Workload) -> bool:
    """True when the Pod's traffic goes through a Meshline sidecar that terminates mTLS."""
    if wl.host_network or _get(wl.annotations, STATUS_ANNOTATION) != "injected":
        return False
    return not any((_get(where, INJECT_ANNOTATION) or "").strip().lower() == "false"
                   for where in (wl.annotations, wl.labels))


def dataplane_mode(mesh: Mesh, wl: Workload) -> DataplaneMode:
    if runs_sidecar(wl):
        return "sidecar"
    if wl.host_network:
        return "none"
    own = _get(wl.labels, DATAPLANE_MODE_LABEL)
    if own is not None:
        return "ambient" if own == "ambient" else "none"
    ns = mesh.namespaces.get(wl.namespace)
    if ns is not None and _get(ns.labels, DATAPLANE_MODE_LABEL) == "ambient":
        return "ambient"
    return "none"


def is_ambient(mesh: Mesh, wl: Workload) -> bool:
    return dataplane_mode(mesh, wl) == "ambient"


def accepts_hbone(mesh: Mesh, wl: Workload) -> bool:
    return dataplane_mode(mesh, wl) in ("ambient", "sidecar")


def ambient_pods_on(mesh: Mesh, node: str) -> list[Workload]:
    """The ambient pods of `node` that a node proxy can serve (an IP and a known netns),
    sorted by (namespace, name)."""
    return [
        wl for key, wl in sorted(mesh.workloads.items())
        if wl.node == node and wl.ip and wl.netns and is_ambient(mesh, wl)
    ]


def unreachable_ambient_pods(mesh: Mesh, node: str) -> list[Workload]:
    """Ambient pods of `node` that a node proxy cannot serve yet (no IP or no netns)."""
    return [
        wl for key, wl in sorted(mesh.workloads.items())
        if wl.node == node and not (wl.ip and wl.netns) and is_ambient(mesh, wl)
    ]


def waypoint_name(mesh: Mesh, svc: Service) -> str | None:
    """The name of the waypoint `svc` uses, or None."""
    own = _get(svc.labels, USE_WAYPOINT_LABEL) or _get(svc.annotations, USE_WAYPOINT_LABEL)
    if own is not None:
        return None if own == "none" else own
    ns = mesh.namespaces.get(svc.namespace)
    name = _get(ns.labels, USE_WAYPOINT_LABEL) if ns is not None else None
    if name is None or name == "none":
        return None
    return name


def waypoint_service(mesh: Mesh, svc: Service) -> Service | None:
    """The waypoint Service `svc` is bound to, when it exists (a service is never bound to
    itself: the waypoint's own Service is reached directly)."""
    name = waypoint_name(mesh, svc)
    if name is None or name == svc.name:
        return None
    from controlplane.model.ir import service_fqdn

    return mesh.services.get(service_fqdn(name, svc.namespace))


def services_of_waypoint(mesh: Mesh, namespace: str, name: str) -> list[Service]:
    """The services bound to waypoint `name` of `namespace`, sorted by hostname."""
    return [
        svc for svc in mesh.services_by_namespace.get(namespace, ())
        if svc.name != name and waypoint_name(mesh, svc) == name
    ]


def identities(pods: Iterable[Workload]) -> list[tuple[str, str]]:
    """The distinct (namespace, service account) pairs of `pods`, sorted."""
    return sorted({(wl.namespace, wl.service_account) for wl in pods})


# --------------------------------------------------------------------------- ServiceEntry hosts


def entry_not_for_ambient(svc: Service) -> str | None:
    """Why ambient pods' node proxies do not route to the ServiceEntry host `svc`, or None
    when they do (always None for a Kubernetes Service). A node proxy matches connections by
    destination address, so the entry needs exactly one IP in `addresses` (no CIDR: the
    endpoint cluster is named by the dialled address); resolution NONE needs no routing (the
    connection passes through to where it was dialled, as Istio's ztunnel does); and its
    listener is shared by pods of every namespace, so the entry must be exported to all."""
    entry = svc.entry
    if entry is None or entry.resolution == "NONE":
        return None
    if len(entry.addresses) != 1 or "/" in entry.addresses[0]:
        return ("it has no single IP in spec.addresses (no address, a CIDR or several): node proxies match "
                "connections by destination address")
    if entry.export_to and "*" not in entry.export_to:
        return "it is not exported to every namespace (spec.exportTo): node proxies share one listener across namespaces"
    return None


def routed_by_node_proxy(svc: Service) -> bool:
    """Whether node proxies send connections to `svc`'s address to its endpoints (Kubernetes
    Services with a VIP; ServiceEntry hosts per `entry_not_for_ambient`, NONE excluded: those
    pass through)."""
    return svc.entry is None or (svc.entry.resolution != "NONE" and entry_not_for_ambient(svc) is None)


def ambient_entry_issues(mesh: Mesh) -> list[Issue]:
    """A warning on each ServiceEntry host ambient pods will not use, when the mesh has ambient pods."""
    if not mesh.service_entries or not any(is_ambient(mesh, wl) for wl in mesh.workloads.values()):
        return []
    out: list[Issue] = []
    for se in mesh.service_entries:
        for i, host in enumerate(se.hosts):
            svc = entry_service(mesh, host, se.ref)
            if svc is None:
                continue
            why = entry_not_for_ambient(svc)
            if why is not None:
                out.append(Issue(se.ref, f"spec.hosts[{i}]", f"ambient pods (node proxies) will not use {host}: {why}; "
                                 "sidecars do", "warning", se.ref.line))
            elif se.info.resolution == "NONE" and waypoint_service(mesh, svc) is not None:
                out.append(Issue(se.ref, f"spec.hosts[{i}]", f"ambient pods (node proxies) will not use {host} through "
                                 f"its waypoint: with resolution NONE their connections pass through to the dialled "
                                 "address at L4", "warning", se.ref.line))
    return out


def entry_services_selecting(mesh: Mesh, wl: Workload) -> list[Service]:
    """The registry services of MESH_INTERNAL ServiceEntries of `wl`'s namespace whose
    workloadSelector picks `wl` (the hosts it defines), by hostname: a tunnel to `wl` may
    name their address."""
    out: dict[str, Service] = {}
    for se in mesh.service_entries:
        if (se.namespace != wl.namespace or se.workload_selector is None or se.info.mesh_external
                or not labels_match(se.workload_selector, wl.labels)):
            continue
        for host in se.hosts:
            svc = entry_service(mesh, host, se.ref)
            if svc is not None:
                out[host] = svc
    return [out[h] for h in sorted(out)]


def entry_service(mesh: Mesh, host: Hostname, ref: SourceRef) -> Service | None:
    """The registry Service the ServiceEntry `ref` defines for `host` (None: a Kubernetes
    Service holds the host), also when another entry of the host is the one `mesh.services`
    holds (`Mesh.entry_candidates`)."""
    held = mesh.services.get(host)
    return next((s for s in mesh.entry_candidates.get(host, (held,)) if s is not None and s.ref == ref), None)
