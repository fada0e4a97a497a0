"""Core Kubernetes kinds -> IR: Namespace, Service, EndpointSlice, Endpoints, Pod. Pure, no I/O.

Kubernetes objects carry many fields Meshline does not use, so unknown fields are not
reported here (unlike the mesh CRDs); wrong types and invalid values of the fields that
are read still are. Each function receives the `Ctx` of the object and returns the IR
value or None when the object must be left out.

Istio's labels and annotations are aliases of Meshline's (`ISTIO_ALIASES`): the IR carries
the Meshline key too, so everything past conversion reads only Meshline's. A Meshline key
the object sets itself wins; when the two disagree the object gets a warning.
- Namespace labels: `istio.io/dataplane-mode` -> `meshline.io/dataplane-mode`;
  `istio-injection: enabled` (or, without it, `istio.io/rev`) -> `meshline.io/dataplane-mode:
  sidecar`; `istio.io/use-waypoint` -> `meshline.io/use-waypoint`.
- Pod labels: `istio.io/dataplane-mode`, `istio.io/use-waypoint` and `sidecar.istio.io/inject`
  (-> `meshline.io/inject`); Pod annotation `sidecar.istio.io/inject` -> `meshline.io/inject`.
- Service labels and annotations: `istio.io/use-waypoint` -> `meshline.io/use-waypoint`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from controlplane.model.convert_base import (
    Ctx,
    as_map,
    child,
    get_bool,
    get_labels,
    get_list,
    get_port,
    get_str,
    index,
    item_map,
    join,
)
from controlplane.model.ir import (
    ContainerPort,
    Endpoint,
    EndpointPort,
    EndpointSet,
    Labels,
    Namespace,
    PortProtocol,
    Service,
    ServicePort,
    Workload,
    service_fqdn,
)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"

_PROTOCOL_WORDS: Mapping[str, PortProtocol] = {
    "http": PortProtocol.HTTP,
    "http2": PortProtocol.HTTP2,
    "h2c": PortProtocol.HTTP2,
    "kubernetes.io/h2c": PortProtocol.HTTP2,
    "kubernetes.io/ws": PortProtocol.HTTP,
    "grpc": PortProtocol.GRPC,
    "grpc-web": PortProtocol.GRPC,
    "tcp": PortProtocol.TCP,
    "tls": PortProtocol.TCP,
    "https": PortProtocol.TCP,
    "kubernetes.io/wss": PortProtocol.TCP,
    "mongo": PortProtocol.TCP,
    "mysql": PortProtocol.TCP,
    "redis": PortProtocol.TCP,
}


def port_protocol(name: str, app_protocol: str | None) -> PortProtocol:
    """The application protocol of a service port, as Istio selects it: `appProtocol` when
    it names a known protocol, otherwise the port name's prefix before the first `-`
    (`http-web` -> HTTP, `grpc` -> GRPC, `tcp-db` -> TCP), otherwise UNKNOWN (sniffed)."""
    if app_protocol:
        proto = _PROTOCOL_WORDS.get(app_protocol.lower())
        if proto is not None:
            return proto
    lowered = name.lower()
    if lowered in _PROTOCOL_WORDS:
        return _PROTOCOL_WORDS[lowered]
    prefix = lowered.split("-", 1)[0]
    return _PROTOCOL_WORDS.get(prefix, PortProtocol.UNKNOWN)


def _spec(ctx: Ctx) -> Mapping[str, Any]:
    return as_map(ctx, ctx.raw.body.get("spec"), "spec") or {}


def _l4_protocol(ctx: Ctx, m: Mapping[str, Any], path: str) -> str | None:
    """The Kubernetes `protocol` field (TCP, UDP, SCTP); None when invalid."""
    proto = get_str(ctx, m, "protocol", path)
    if proto is None:
        return "TCP" if m.get("protocol") is None else None
    if proto.upper() not in ("TCP", "UDP", "SCTP"):
        ctx.error(join(path, "protocol"), f"unknown protocol {proto!r} (expected TCP, UDP or SCTP)")
        return None
    return proto.upper()


def _ip(ctx: Ctx, value: object, path: str) -> str | None:
    if not isinstance(value, str):
        ctx.error(path, f"expected an IP address string, got {value!r}")
        return None
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        ctx.error(path, f"{value!r} is not an IP address")
        return None


# --------------------------------------------------------------------------- Namespace


DATAPLANE_MODE = "meshline.io/dataplane-mode"
USE_WAYPOINT = "meshline.io/use-waypoint"
INJECT = "meshline.io/inject"
ISTIO_ALIASES: Mapping[str, str] = {
    "istio.io/dataplane-mode": DATAPLANE_MODE,
    "istio.io/use-waypoint": USE_WAYPOINT,
    "sidecar.istio.io/inject": INJECT,
}
"""Istio label/annotation key -> the Meshline key it stands for (same values)."""


def with_aliases(ctx: Ctx, pairs: Labels, field: str, aliases: Mapping[str, str] = ISTIO_ALIASES,
                 derived: Mapping[str, tuple[str, str]] | None = None) -> Labels:
    """`pairs` plus the Meshline keys that the Istio keys in it stand for (`aliases`: Istio
    key -> Meshline key, same value; `derived`: Meshline key -> (Istio key, value) computed
    by the caller). A Meshline key already present wins; a disagreement is warned about."""
    wanted: dict[str, tuple[str, str]] = {}
    for key, value in pairs:
        target = aliases.get(key)
        if target is not None:
            wanted.setdefault(target, (key, value))
    for target, source in (derived or {}).items():
        wanted.setdefault(target, source)
    if not wanted:
        return pairs
    given = dict(pairs)
    out = dict(pairs)
    for target, (key, value) in sorted(wanted.items()):
        own = given.get(target)
        if own is None:
            out[target] = value
        elif own != value:
            ctx.warn(f"{field}[{key}]", f"{key}: {value!r} disagrees with {target}: {own!r}; {target} wins")
    return tuple(sorted(out.items()))


def convert_namespace(ctx: Ctx, name: str, labels: Labels) -> Namespace:
    have = dict(labels)
    derived: dict[str, tuple[str, str]] = {}
    injection = have.get("istio-injection")
    revision = have.get("istio.io/rev")
    if "istio.io/dataplane-mode" not in have:
        if injection == "enabled":
            derived[DATAPLANE_MODE] = ("istio-injection", "sidecar")
        elif injection is None and revision:
            derived[DATAPLANE_MODE] = ("istio.io/rev", "sidecar")
    return Namespace(name=name, labels=with_aliases(ctx, labels, "metadata.labels", derived=derived))


# --------------------------------------------------------------------------- Service


_WAYPOINT_ALIAS: Mapping[str, str] = {"istio.io/use-waypoint": USE_WAYPOINT}
_INJECT_ALIAS: Mapping[str, str] = {"sidecar.istio.io/inject": INJECT}


def convert_service(
    ctx: Ctx, namespace: str, name: str, labels: Labels, annotations: Labels
) -> Service | None:
    spec = _spec(ctx)
    svc_type = get_str(ctx, spec, "type", "spec")
    if svc_type == "ExternalName":
        ctx.warn("spec.type", "ExternalName services are not supported yet; this Service is ignored")
        return None
    cluster_ip = get_str(ctx, spec, "clusterIP", "spec")
    if cluster_ip in ("None", ""):
        cluster_ip = None
    elif cluster_ip is not None:
        cluster_ip = _ip(ctx, cluster_ip, "spec.clusterIP")
    ports: list[ServicePort] = []
    seen: dict[int, int] = {}
    for i, item in enumerate(get_list(ctx, spec, "ports", "spec")):
        p = index("spec.ports", i)
        pm = item_map(ctx, item, p)
        if pm is None:
            continue
        proto = _l4_protocol(ctx, pm, p)
        number = get_port(ctx, pm, "port", p, required=True)
        port_name = get_str(ctx, pm, "name", p) or ""
        app = get_str(ctx, pm, "appProtocol", p)
        target = _target_port(ctx, pm, p, number)
        if proto is None or number is None or target is None:
            continue
        if proto != "TCP":
            ctx.warn(p, f"{proto} ports are not supported; port {number} is ignored")
            continue
        if number in seen:
            ctx.error(join(p, "port"), f"duplicate port {number} (also spec.ports[{seen[number]}])")
            continue
        seen[number] = i
        ports.append(ServicePort(port_name, number, target, port_protocol(port_name, app)))
    return Service(
        ref=ctx.raw.ref,
        namespace=namespace,
        name=name,
        hostname=service_fqdn(name, namespace),
        cluster_ip=cluster_ip,
        ports=tuple(ports),
        selector=get_labels(ctx, spec, "selector", "spec"),
        labels=with_aliases(ctx, labels, "metadata.labels", _WAYPOINT_ALIAS),
        annotations=with_aliases(ctx, annotations, "metadata.annotations", _WAYPOINT_ALIAS),
    )


def _target_port(ctx: Ctx, pm: Mapping[str, Any], path: str, number: int | None) -> int | str | None:
    value = pm.get("targetPort")
    p = join(path, "targetPort")
    if value is None:
        return number
    if isinstance(value, str):
        if value.isdigit():
            value = int(value)
        elif not value:
            ctx.error(p, "must not be empty")
            return None
        else:
            return value
    if isinstance(value, int) and not isinstance(value, bool):
        if not 1 <= value <= 65535:
            ctx.error(p, f"must be between 1 and 65535, got {value}")
            return None
        return value
    ctx.error(p, f"expected a port number or name, got {value!r}")
    return None


# --------------------------------------------------------------------------- EndpointSlice / Endpoints


def _endpoint_ports(ctx: Ctx, m: Mapping[str, Any], path: str, *, slice_ports: bool) -> list[EndpointPort]:
    out: list[EndpointPort] = []
    for i, item in enumerate(get_list(ctx, m, "ports", path)):
        p = index(join(path, "ports"), i)
        pm = item_map(ctx, item, p)
        if pm is None:
            continue
        proto = _l4_protocol(ctx, pm, p)
        name = get_str(ctx, pm, "name", p) or ""
        if slice_ports and pm.get("port") is None:
            ctx.warn(p, "a port without a number (all ports) is not supported; ignored")
            continue
        number = get_port(ctx, pm, "port", p, required=True)
        if proto is None or number is None:
            continue
        if proto != "TCP":
            continue  # UDP/SCTP endpoints are of no use to Envoy's TCP listeners
        out.append(EndpointPort(name, number))
    return out


def convert_endpoint_slice(ctx: Ctx, namespace: str, labels: Labels) -> EndpointSet | None:
    body = ctx.raw.body
    service = dict(labels).get(SERVICE_NAME_LABEL)
    if not service:
        ctx.error("metadata.labels", f"label {SERVICE_NAME_LABEL} is required (it names the Service)")
    address_type = get_str(ctx, body, "addressType", "")
    if address_type == "FQDN":
        ctx.warn("addressType", "FQDN EndpointSlices are not supported; ignored")
        return None
    if address_type is not None and address_type not in ("IPv4", "IPv6"):
        ctx.error("addressType", f"unknown addressType {address_type!r} (expected IPv4 or IPv6)")
    ports = _endpoint_ports(ctx, body, "", slice_ports=True)
    endpoints: list[Endpoint] = []
    for i, item in enumerate(get_list(ctx, body, "endpoints", "")):
        p = index("endpoints", i)
        em = item_map(ctx, item, p)
        if em is None:
            continue
        addresses = get_list(ctx, em, "addresses", p)
        if not addresses:
            ctx.error(join(p, "addresses"), "at least one address is required")
            continue
        # Like kube-proxy, use the first address: the others are fungible copies.
        address = _ip(ctx, addresses[0], index(join(p, "addresses"), 0))
        cond = child(ctx, em, "conditions", p) or {}
        ready = get_bool(ctx, cond, "ready", join(p, "conditions"))
        ref = child(ctx, em, "targetRef", p) or {}
        pod = _pod_ref(ctx, ref, join(p, "targetRef"))
        node = get_str(ctx, em, "nodeName", p)
        zone = get_str(ctx, em, "zone", p)
        if address is None:
            continue
        endpoints.append(Endpoint(address, ready is not False, pod, node, zone))
    if not service:
        return None
    return EndpointSet(ctx.raw.ref, namespace, service, tuple(ports), tuple(endpoints))


def _pod_ref(ctx: Ctx, ref: Mapping[str, Any], path: str) -> str | None:
    kind = get_str(ctx, ref, "kind", path)
    name = get_str(ctx, ref, "name", path)
    if kind not in (None, "Pod"):
        return None
    return name or None


def convert_endpoints(ctx: Ctx, namespace: str, name: str) -> tuple[EndpointSet, ...]:
    """Legacy v1 Endpoints: one EndpointSet per subset; `notReadyAddresses` become
    endpoints with ready=False."""
    out: list[EndpointSet] = []
    for i, item in enumerate(get_list(ctx, ctx.raw.body, "subsets", "")):
        p = index("subsets", i)
        sm = item_map(ctx, item, p)
        if sm is None:
            continue
        ports = _endpoint_ports(ctx, sm, p, slice_ports=False)
        endpoints: list[Endpoint] = []
        for key, ready in (("addresses", True), ("notReadyAddresses", False)):
            for j, addr in enumerate(get_list(ctx, sm, key, p)):
                ap = index(join(p, key), j)
                am = item_map(ctx, addr, ap)
                if am is None:
                    continue
                ip = get_str(ctx, am, "ip", ap, required=True)
                address = _ip(ctx, ip, join(ap, "ip")) if ip is not None else None
                node = get_str(ctx, am, "nodeName", ap)
                pod = _pod_ref(ctx, child(ctx, am, "targetRef", ap) or {}, join(ap, "targetRef"))
                if address is not None:
                    endpoints.append(Endpoint(address, ready, pod, node))
        out.append(EndpointSet(ctx.raw.ref, namespace, name, tuple(ports), tuple(endpoints)))
    return tuple(out)


# --------------------------------------------------------------------------- Pod


def convert_pod(ctx: Ctx, namespace: str, name: str, labels: Labels, annotations: Labels) -> Workload:
    spec = _spec(ctx)
    status = as_map(ctx, ctx.raw.body.get("status"), "status") or {}
    pod_ip = get_str(ctx, status, "podIP", "status")
    ip = _ip(ctx, pod_ip, "status.podIP") if pod_ip else None
    phase = get_str(ctx, status, "phase", "status")
    if phase in ("Succeeded", "Failed"):
        ip = None  # a finished pod's IP may already belong to another pod
    service_account = (
        get_str(ctx, spec, "serviceAccountName", "spec")
        or get_str(ctx, spec, "serviceAccount", "spec")
        or "default"
    )
    ports: list[ContainerPort] = []
    for i, container in enumerate(get_list(ctx, spec, "containers", "spec")):
        cp = index("spec.containers", i)
        cm = item_map(ctx, container, cp)
        if cm is None:
            continue
        for j, item in enumerate(get_list(ctx, cm, "ports", cp)):
            pp = index(join(cp, "ports"), j)
            pm = item_map(ctx, item, pp)
            if pm is None:
                continue
            proto = _l4_protocol(ctx, pm, pp)
            number = get_port(ctx, pm, "containerPort", pp, required=True)
            port_name = get_str(ctx, pm, "name", pp) or ""
            if number is not None and proto == "TCP":
                ports.append(ContainerPort(port_name, number))
    return Workload(
        ref=ctx.raw.ref,
        namespace=namespace,
        name=name,
        ip=ip,
        labels=with_aliases(ctx, labels, "metadata.labels"),
        annotations=with_aliases(ctx, annotations, "metadata.annotations", _INJECT_ALIAS),
        service_account=service_account,
        node=get_str(ctx, spec, "nodeName", "spec"),
        ports=tuple(ports),
        host_network=get_bool(ctx, spec, "hostNetwork", "spec") is True,
        netns=_netns_annotation(ctx, annotations),
    )


NETNS_ANNOTATION = "meshline.io/netns"


def _netns_annotation(ctx: Ctx, annotations: Labels) -> str | None:
    """`meshline.io/netns`: where a node proxy finds the pod's network namespace (directory
    mode and tests; in a cluster the node agent reports it)."""
    path = dict(annotations).get(NETNS_ANNOTATION)
    if path is None:
        return None
    if not path.startswith("/"):
        ctx.error(f"metadata.annotations[{NETNS_ANNOTATION}]", f"must be an absolute path, got {path!r}")
        return None
    return path
