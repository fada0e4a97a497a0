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
from controlplane.model.mesh import Mesh, visible_to

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
    """The services bound to waypoint `name` of `namespace`, sorted by hostname: also a
    ServiceEntry host of `namespace` that another entry of the host holds in `mesh.services`
    (`Mesh.entry_candidates`: the namespaces resolving the host to it reach it through this
    waypoint)."""
    out = [
        svc for svc in mesh.services_by_namespace.get(namespace, ())
        if svc.name != name and waypoint_name(mesh, svc) == name
    ]
    if mesh.entry_candidates:
        held = {(s.hostname, s.ref) for s in out}
        out += [svc for host, cands in mesh.entry_candidates.items() for svc in cands
                if svc.namespace == namespace and svc is not mesh.services.get(host) and (host, svc.ref) not in held
                and waypoint_name(mesh, svc) == name]
        out.sort(key=lambda s: (s.hostname, s.name))
    return out


def identities(pods: Iterable[Workload]) -> list[tuple[str, str]]:
    """The distinct (namespace, service account) pairs of `pods`, sorted."""
    return sorted({(wl.namespace, wl.service_account) for wl in pods})


# --------------------------------------------------------------------------- ServiceEntry hosts


def node_addresses(svc: Service) -> tuple[str, ...]:
    """The destination addresses node proxies match `svc` by: a Kubernetes Service's cluster
    IP; each IP of a ServiceEntry host's `spec.addresses` (none when one of them is a CIDR)."""
    if svc.entry is None:
        ip = svc.cluster_ip
        return (ip,) if ip and ip.lower() != "none" else ()
    if any("/" in a for a in svc.entry.addresses):
        return ()
    return tuple(dict.fromkeys(svc.entry.addresses))


def entry_not_for_ambient(svc: Service) -> str | None:
    """Why ambient pods' node proxies do not route to the ServiceEntry host `svc`, or None
    when they do (always None for a Kubernetes Service). A node proxy matches connections by
    destination address, so the entry needs IPs in `addresses` (each gets its own cluster,
    named by the dialled address; a CIDR cannot name one); resolution NONE needs no routing
    (the connection passes through to where it was dialled, as Istio's ztunnel does). Which
    namespaces' pods use it follows its exportTo (`namespace_entries`)."""
    entry = svc.entry
    if entry is None or entry.resolution == "NONE":
        return None
    if not entry.addresses:
        return "it has no IP in spec.addresses: node proxies match connections by destination address"
    cidr = next((a for a in entry.addresses if "/" in a), None)
    if cidr is not None:
        return (f"spec.addresses has the CIDR {cidr}: node proxies route by destination address to a cluster "
                "named after the dialled IP:port (ambient|IP:port), one per address, which a range cannot give")
    return None


def routed_by_node_proxy(svc: Service) -> bool:
    """Whether node proxies send connections to `svc`'s address to its endpoints (Kubernetes
    Services with a VIP; ServiceEntry hosts per `entry_not_for_ambient`, NONE excluded: those
    pass through)."""
    return svc.entry is None or (svc.entry.resolution != "NONE" and entry_not_for_ambient(svc) is None)


def exported_everywhere(svc: Service) -> bool:
    """A Kubernetes Service, or a ServiceEntry host exported to every namespace."""
    return svc.entry is None or not svc.entry.export_to or "*" in svc.entry.export_to


def node_registry(mesh: Mesh) -> list[tuple[Hostname, Service]]:
    """(registry key, Service) of every Service node proxies may route to by address: each
    host's, and the other ServiceEntries of a host several entries declare (each has its own
    address and endpoints: `Mesh.registry_key`), sorted by key."""
    out = [(h, mesh.services[h]) for h in mesh.services]
    for host, candidates in mesh.entry_candidates.items():
        out += [(k, s) for s in candidates if (k := mesh.registry_key(s)) != host]
    return sorted(out, key=lambda kv: kv[0])


EntryView = tuple[tuple[Hostname, Hostname | None], ...]


def namespace_entries(mesh: Mesh, namespace: str) -> EntryView:
    """How the ServiceEntry hosts node proxies route for pods of `namespace` differ from the
    mesh-wide set (every entry exported to every namespace): per host that has an entry not
    exported everywhere but visible to `namespace`, (host, the registry key of the entry the
    namespace resolves it to, `Mesh.service`). Empty: the namespace sees the mesh-wide set.
    The other entries of such a host are not routed for it (as its sidecars would not)."""
    hosts: set[Hostname] = set()
    for se in mesh.service_entries:
        export = se.info.export_to
        if export and "*" not in export and visible_to(export, se.namespace, namespace):
            hosts.update(se.hosts)
    out = []
    for host in sorted(hosts):
        held = mesh.services.get(host)
        if held is None or held.entry is None:  # a Kubernetes Service holds the host
            continue
        svc = mesh.service(host, namespace)
        out.append((host, mesh.registry_key(svc) if svc is not None else None))
    return tuple(out)


def view_services(mesh: Mesh, view: EntryView) -> list[tuple[Hostname, Service]]:
    """(registry key, Service) of `node_registry` that pods with entry view `view` see."""
    over = dict(view)
    keep = {k for k in over.values() if k is not None}
    return [(k, s) for k, s in node_registry(mesh)
            if k in keep or (s.hostname not in over and exported_everywhere(s))]


def address_owners(mesh: Mesh) -> dict[str, tuple[Hostname, Service]]:
    """Address -> (registry key, Service) whose `ambient|<address>:<port>` clusters node
    proxies hold: a node proxy names a cluster by the dialled address, so of the entries
    routed at one address it keeps one: a Kubernetes Service, else an entry exported to every
    namespace, else the first by registry key (host, then namespace/name)."""
    out: dict[str, tuple[Hostname, Service]] = {}
    ranked = sorted(((k, s) for k, s in node_registry(mesh) if routed_by_node_proxy(s)),
                    key=lambda kv: (kv[1].entry is not None, not exported_everywhere(kv[1]), kv[0]))
    for key, svc in ranked:
        for ip in node_addresses(svc):
            out.setdefault(ip, (key, svc))
    return out


def ambient_entry_issues(mesh: Mesh) -> list[Issue]:
    """A warning on each ServiceEntry host ambient pods will not use (or not at one of its
    addresses), when the mesh has ambient pods."""
    if not mesh.service_entries or not any(is_ambient(mesh, wl) for wl in mesh.workloads.values()):
        return []
    out: list[Issue] = []
    owners = address_owners(mesh)
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
            if why is not None or se.info.resolution == "NONE":
                continue
            for j, ip in enumerate(se.info.addresses):
                owner = owners.get(ip)
                if owner is None or owner[1].ref == se.ref:
                    continue
                out.append(Issue(se.ref, f"spec.addresses[{j}]", f"ambient pods (node proxies) will not use {host} "
                                 f"at {ip}: {owner[1].ref.display} ({owner[1].hostname}) has the same address, and "
                                 f"a node proxy names the cluster by the dialled address (ambient|{ip}:<port>), so "
                                 "it keeps one per address: a Kubernetes Service, else an entry exported to every "
                                 "namespace, else the first by host and namespace/name; sidecars use both",
                                 "warning", se.ref.line))
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
