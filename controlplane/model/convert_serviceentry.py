"""ServiceEntry and WorkloadEntry (Istio's networking v1 schema) -> IR values. Pure, no I/O.

Validation follows Istio's (`pkg/config/validation`, ValidateServiceEntry / ValidateWorkloadEntry):
- `hosts` is required; `*` is not a host; a wildcard is a `*.` prefix only; duplicates are
  errors. `addresses` are IPs or CIDRs, and CIDRs need resolution NONE or STATIC.
- ports: number required, names and numbers unique; `targetPort` a valid port.
- resolution NONE: no `endpoints` (a `workloadSelector` is warned about: it has no effect).
- STATIC: every endpoint address is an IP (unix domain sockets are refused: not supported).
  Without endpoints and without a workloadSelector the service has no endpoints at all
  (valid in Istio; warned, every request fails 503).
- DNS / DNS_ROUND_ROBIN: without endpoints every host must be a DNS name (not a wildcard,
  not an IP: the host is what is resolved); endpoint addresses are IPs or DNS names;
  DNS_ROUND_ROBIN takes at most one endpoint.
- an endpoint's ports name ports of the entry; `workloadSelector` and `endpoints` exclude
  each other; several hosts with a port that is neither HTTP nor TLS need resolution NONE
  (nothing else tells the hosts apart).
- an endpoint's (or WorkloadEntry's) `network` is warned about and ignored: Meshline has a
  single network.

Ports' `protocol` maps to Meshline's port protocols as Istio's names do: HTTP, HTTP2, GRPC
(and GRPC-WEB) are routed as HTTP; HTTPS, TLS, TCP, MONGO, MYSQL, REDIS are proxied as TCP
(warned for several hosts: Meshline does not route TLS by SNI); an unset protocol is
sniffed, an unknown one refused; UDP ports are dropped with a warning (Envoy sidecars
proxy no UDP). Port names are DNS labels (Istio's ValidatePortName).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from controlplane.model.convert_base import (
    Ctx,
    as_map,
    check_fields,
    child,
    get_export_to,
    get_int,
    get_labels,
    get_list,
    get_port,
    get_str,
    get_str_list,
    host_problem,
    index,
    is_dns_label,
    item_map,
    join,
)
from controlplane.model.convert_core import USE_WAYPOINT, port_protocol, with_aliases
from controlplane.model.ir import (
    Hostname,
    Labels,
    PortProtocol,
    Resolution,
    ServiceEntry,
    ServiceEntryInfo,
    ServicePort,
    WorkloadEntry,
)

_SE_FIELDS = ("hosts", "addresses", "ports", "location", "resolution", "endpoints", "workloadSelector",
              "exportTo", "subjectAltNames")
_WE_FIELDS = ("address", "ports", "labels", "network", "locality", "weight", "serviceAccount")
_RESOLUTIONS: tuple[Resolution, ...] = ("NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN")
_TLS_PROTOCOLS = frozenset({"HTTPS", "TLS"})
_TCP_PROTOCOLS = frozenset({"TCP", "HTTPS", "TLS", "MONGO", "MYSQL", "REDIS"})
_HTTP_PROTOCOLS = frozenset({"HTTP", "HTTP2", "GRPC", "GRPC-WEB", "H2C"})
NETWORK_WARNING = ("network is not supported (Meshline has a single network): the endpoint is reached "
                   "directly, as if it were on the proxy's network")


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _port_protocol(ctx: Ctx, proto: str | None, path: str) -> PortProtocol | None:
    """The port protocol; None for a port that is dropped (UDP) or refused (unknown)."""
    if not proto:
        return PortProtocol.UNKNOWN
    upper = proto.upper()
    if upper == "UDP":
        ctx.warn(path, "UDP is not proxied by Envoy sidecars: this port is ignored")
        return None
    if upper in _HTTP_PROTOCOLS:
        return port_protocol("", upper.lower())
    if upper in _TCP_PROTOCOLS:
        return PortProtocol.TCP
    ctx.error(path, f"unrecognized protocol {proto!r} (expected HTTP, HTTPS, HTTP2, GRPC, GRPC-WEB, TCP, TLS, "
                    "MONGO, MYSQL, REDIS or UDP; unset: sniffed)")
    return None


def _ports(ctx: Ctx, spec: Mapping[str, Any]) -> tuple[tuple[ServicePort, ...], dict[str, str]]:
    """(ports, port name -> protocol word as written)."""
    out: list[ServicePort] = []
    names: dict[str, str] = {}
    numbers: set[int] = set()
    for i, item in enumerate(get_list(ctx, spec, "ports", "spec")):
        p = index("spec.ports", i)
        m = item_map(ctx, item, p)
        if m is None:
            continue
        check_fields(ctx, m, p, ("number", "protocol", "name", "targetPort"))
        number = get_port(ctx, m, "number", p, required=True)
        proto_text = get_str(ctx, m, "protocol", p)
        name = get_str(ctx, m, "name", p) or ""
        if not is_dns_label(name):
            ctx.error(join(p, "name"), f"invalid port name {name!r} (a DNS label: lower-case letters, digits, '-')")
        target = get_port(ctx, m, "targetPort", p) if m.get("targetPort") not in (None, 0) else None
        if name in names:
            ctx.error(join(p, "name"), f"port name {name!r} already defined")
        if number is not None and number in numbers:
            ctx.error(join(p, "number"), f"port {number} already defined")
        names[name] = (proto_text or "").upper()
        if number is None:
            continue
        numbers.add(number)
        proto = _port_protocol(ctx, proto_text, join(p, "protocol"))
        if proto is None:
            continue
        out.append(ServicePort(name, number, target or number, proto))
    return tuple(sorted(out, key=lambda sp: sp.port)), names


def _hosts(ctx: Ctx, spec: Mapping[str, Any]) -> tuple[Hostname, ...]:
    hosts: list[Hostname] = []
    if not spec.get("hosts"):
        ctx.error("spec.hosts", "a ServiceEntry must have at least one host")
    for i, h in enumerate(get_str_list(ctx, spec, "hosts", "spec")):
        p = index("spec.hosts", i)
        host = h.strip().rstrip(".").lower()
        if host == "*":
            ctx.error(p, "'*' is not a valid ServiceEntry host (name the hosts, or a '*.' wildcard suffix)")
            continue
        rest = host[2:] if host.startswith("*.") else host
        if "*" in rest:
            ctx.error(p, f"{h!r}: a wildcard is only allowed as a leading '*.' label")
            continue
        problem = host_problem(rest)
        if problem is not None:
            ctx.error(p, problem)
            continue
        if Hostname(host) in hosts:
            ctx.error(p, f"duplicate host {h!r}")
            continue
        hosts.append(Hostname(host))
    return tuple(hosts)


def _addresses(ctx: Ctx, spec: Mapping[str, Any]) -> tuple[str, ...]:
    out: list[str] = []
    for i, a in enumerate(get_str_list(ctx, spec, "addresses", "spec")):
        try:
            net = ipaddress.ip_network(a, strict=False) if "/" in a else None
            if net is None:
                ipaddress.ip_address(a)
        except ValueError:
            ctx.error(index("spec.addresses", i), f"{a!r} is not an IP address or CIDR block")
            continue
        out.append(a)
    return tuple(out)


def convert_workload_entry_body(ctx: Ctx, m: Mapping[str, Any], path: str, namespace: str, name: str,
                                inline: bool, port_names: Mapping[str, str] | None = None) -> WorkloadEntry | None:
    """A WorkloadEntry spec (or a ServiceEntry `endpoints[]` item at `path`)."""
    check_fields(ctx, m, path, _WE_FIELDS)
    address = (get_str(ctx, m, "address", path) or "").strip()
    network = get_str(ctx, m, "network", path) or None
    if network:
        ctx.warn(join(path, "network"), NETWORK_WARNING)
    if not address:
        ctx.error(join(path, "address"), "is required" if not network else
                  "is required (an endpoint reached through its network's gateway is not supported)")
    ports: list[tuple[str, int]] = []
    pm = child(ctx, m, "ports", path) or {}
    for pname in pm:
        pp = join(join(path, "ports"), str(pname))
        if port_names is not None and pname not in port_names:
            ctx.error(pp, f"endpoint port {pname!r} is not defined by the service entry")
        number = get_port(ctx, pm, str(pname), join(path, "ports"))
        if number is not None:
            ports.append((str(pname), number))
    labels = get_labels(ctx, m, "labels", path)
    sa = get_str(ctx, m, "serviceAccount", path) or None
    locality = get_str(ctx, m, "locality", path) or None
    if locality is not None and locality.count("/") > 2:
        ctx.error(join(path, "locality"), f"{locality!r} is not region/zone/subzone")
    weight = get_int(ctx, m, "weight", path, lo=0, hi=2**32 - 1)
    return WorkloadEntry(ctx.raw.ref, namespace, name, address, tuple(sorted(ports)), labels, sa, locality,
                         weight or None, network, inline)


def convert_workload_entry(ctx: Ctx, namespace: str, name: str) -> WorkloadEntry | None:
    check_fields(ctx, ctx.raw.body, "", ("apiVersion", "kind", "metadata", "spec", "status"))
    spec = as_map(ctx, ctx.raw.body.get("spec"), "spec") or {}
    return convert_workload_entry_body(ctx, spec, "spec", namespace, name, inline=False)


_USE_WAYPOINT_ALIAS: Mapping[str, str] = {"istio.io/use-waypoint": USE_WAYPOINT}


def convert_service_entry(ctx: Ctx, namespace: str, name: str, labels: Labels = ()) -> ServiceEntry | None:
    check_fields(ctx, ctx.raw.body, "", ("apiVersion", "kind", "metadata", "spec", "status"))
    spec = as_map(ctx, ctx.raw.body.get("spec"), "spec") or {}
    check_fields(ctx, spec, "spec", _SE_FIELDS)
    hosts = _hosts(ctx, spec)
    addresses = _addresses(ctx, spec)
    ports, port_words = _ports(ctx, spec)
    location = get_str(ctx, spec, "location", "spec") or "MESH_EXTERNAL"
    if location not in ("MESH_EXTERNAL", "MESH_INTERNAL"):
        ctx.error("spec.location", f"unknown location {location!r} (expected MESH_EXTERNAL or MESH_INTERNAL)")
    res_text = get_str(ctx, spec, "resolution", "spec") or "NONE"
    resolution: Resolution = "NONE"
    if res_text not in _RESOLUTIONS:
        ctx.error("spec.resolution", f"unsupported resolution {res_text!r} (expected NONE, STATIC, DNS or "
                                     "DNS_ROUND_ROBIN)")
    else:
        resolution = next(r for r in _RESOLUTIONS if r == res_text)
    if any("/" in a for a in addresses) and resolution not in ("NONE", "STATIC"):
        ctx.error("spec.addresses", "CIDR addresses are allowed only when resolution is NONE or STATIC")
    selector: Labels | None = None
    ws = child(ctx, spec, "workloadSelector", "spec")
    if ws is not None:
        check_fields(ctx, ws, "spec.workloadSelector", ("labels",))
        selector = get_labels(ctx, ws, "labels", "spec.workloadSelector")
    raw_eps = get_list(ctx, spec, "endpoints", "spec")
    if selector is not None and raw_eps:
        ctx.error("spec.workloadSelector", "only one of workloadSelector or endpoints is allowed")
    endpoints: list[WorkloadEntry] = []
    for i, item in enumerate(raw_eps):
        p = index("spec.endpoints", i)
        m = item_map(ctx, item, p)
        if m is None:
            continue
        we = convert_workload_entry_body(ctx, m, p, namespace, name, inline=True, port_names=port_words)
        if we is None or not we.address:
            continue
        if resolution == "STATIC" and not is_ip(we.address):
            what = "a unix domain socket (not supported)" if we.address.startswith("unix://") else "not an IP address"
            ctx.error(join(p, "address"), f"endpoint address {we.address!r} is {what}; resolution STATIC needs IPs")
        elif resolution in ("DNS", "DNS_ROUND_ROBIN") and not is_ip(we.address) and (
                "*" in we.address or host_problem(we.address) is not None):
            ctx.error(join(p, "address"), f"endpoint address {we.address!r} is not a valid FQDN or an IP address")
        endpoints.append(we)
    if resolution == "NONE":
        if raw_eps:
            ctx.error("spec.endpoints", "no endpoints should be provided for resolution NONE")
        if selector is not None:
            ctx.warn("spec.workloadSelector", "has no effect with resolution NONE (connections go to the address "
                                              "the client dialled)")
    elif resolution == "STATIC" and not raw_eps and selector is None:
        ctx.warn("spec.resolution", "STATIC without endpoints or workloadSelector: the hosts have no endpoints, "
                                    "every request to them fails (503)")
    elif resolution in ("DNS", "DNS_ROUND_ROBIN"):
        if not raw_eps and selector is None:
            for i, h in enumerate(hosts):
                if h.startswith("*."):
                    ctx.error(index("spec.hosts", i), f"{h!r}: hosts must be DNS names (no wildcard) when "
                                                      f"resolution {resolution} has no endpoints to resolve")
                elif is_ip(h):
                    ctx.error(index("spec.hosts", i), f"{h!r} is an IP address: with resolution {resolution} and "
                                                      "no endpoints the hosts are the DNS names resolved")
        if resolution == "DNS_ROUND_ROBIN" and len(raw_eps) > 1:
            ctx.error("spec.endpoints", "there must only be 0 or 1 endpoint for resolution DNS_ROUND_ROBIN")
    if resolution != "NONE" and len(hosts) > 1:
        opaque = [sp for sp in ports if not sp.protocol.is_http and port_words.get(sp.name) not in _TLS_PROTOCOLS]
        if opaque:
            ctx.error("spec.hosts", f"multiple hosts with a port that is neither HTTP nor TLS ({opaque[0].port}): "
                                    "nothing tells the hosts apart (use resolution NONE, or one host per entry)")
        elif any(port_words.get(sp.name) in _TLS_PROTOCOLS for sp in ports):
            ctx.warn("spec.ports", "TLS/HTTPS ports are proxied as TCP (Meshline does not route by SNI): on such a "
                                   "port only the first of these hosts is reachable")
    opaque_ports = [sp.port for sp in ports if not sp.protocol.is_http]
    if opaque_ports and not addresses:
        ctx.warn("spec.addresses", f"addresses are required for TCP (or unset-protocol) ports (Istio): without them "
                                   f"intercepting sidecars send every TCP connection to port {opaque_ports[0]} that "
                                   "no other service's address claims to this entry")
    elif opaque_ports and any("/" in a for a in addresses):
        ctx.warn("spec.addresses", f"CIDR addresses are not matched by prefix yet: intercepting sidecars send every TCP "
                                   f"connection to port {opaque_ports[0]} that no other address claims to this entry")
    export_to = get_export_to(ctx, spec, "spec")
    sans = get_str_list(ctx, spec, "subjectAltNames", "spec")
    info = ServiceEntryInfo(resolution, location != "MESH_INTERNAL", addresses, export_to, sans)
    # `istio.io/use-waypoint` (or Meshline's key) binds the entry's hosts to a waypoint, as a Service's.
    waypoint = tuple((k, v) for k, v in with_aliases(ctx, labels, "metadata.labels", _USE_WAYPOINT_ALIAS)
                     if k == USE_WAYPOINT)
    meta = ctx.raw.body.get("metadata")
    created = meta.get("creationTimestamp") if isinstance(meta, dict) else None
    return ServiceEntry(ctx.raw.ref, namespace, name, hosts, ports, info, tuple(endpoints), selector, waypoint,
                        str(created) if created is not None else "")
