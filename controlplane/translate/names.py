"""Names, client-visible domains and small value helpers shared by the sidecar translators.

Pure functions, no I/O. Cluster names follow Istio: `outbound|<port>|<subset>|<fqdn>` and
`inbound|<port>||`; route configurations are named after the service port number.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message

from controlplane.model.ir import (
    DOMAIN_SUFFIX,
    Destination,
    Hostname,
    RouteDestination,
    Service,
)
from controlplane.model.mesh import visible_to as visible_to  # exportTo: one owner, the model

PASSTHROUGH_CLUSTER = "PassthroughCluster"
INBOUND_PASSTHROUGH_CLUSTER = "InboundPassthroughCluster"
BLACKHOLE_CLUSTER = "BlackHoleCluster"
VIRTUAL_OUTBOUND = "virtualOutbound"
VIRTUAL_INBOUND = "virtualInbound"
OUTBOUND_CAPTURE_PORT = 15001
INBOUND_CAPTURE_PORT = 15006
HBONE_PORT = 15008
AMBIENT_MARK = 0x539
"""SO_MARK on the sockets a node proxy opens inside an ambient pod's network namespace (delivery
to the app): the pod's capture rules (`meshline iptables --ambient`) let marked traffic pass."""
APP_ADDRESS_ANNOTATION = "meshline.io/app-address"
DEFAULT_APP_ADDRESS = "127.0.0.1"


def outbound_cluster_name(port: int, host: str, subset: str | None = None) -> str:
    return f"outbound|{port}|{subset or ''}|{host}"


def inbound_cluster_name(port: int) -> str:
    return f"inbound|{port}||"


def route_config_name(port: int) -> str:
    return str(port)


def virtual_host_name(host: str, port: int) -> str:
    return f"{host}:{port}"


def service_domains(svc: Service, port: int, client_namespace: str) -> tuple[str, ...]:
    """Every Host a client in `client_namespace` may use to reach `svc` on `port`.

    The short name only resolves inside the service's own namespace, so it (and
    `name:port`) is offered only to clients there. Each form also comes with `:port`."""
    names: list[str] = []
    if svc.namespace == client_namespace:
        names.append(svc.name)
    names += [
        f"{svc.name}.{svc.namespace}",
        f"{svc.name}.{svc.namespace}.svc",
        str(svc.hostname),
    ]
    if not str(svc.hostname).endswith(DOMAIN_SUFFIX):
        # Non-Kubernetes hostnames have no short forms.
        names = [str(svc.hostname)]
    if svc.cluster_ip and svc.cluster_ip.lower() != "none":
        names.append(svc.cluster_ip)
    elif svc.entry is not None and svc.entry.addresses and not any("/" in a for a in svc.entry.addresses):
        names += svc.entry.addresses  # a ServiceEntry host with several IPs: each (Istio: one service per address)
    out: list[str] = []
    for n in names:
        out += [n, f"{n}:{port}"]
    return tuple(dict.fromkeys(out))


def dedupe_domains(groups: Iterable[Sequence[str]]) -> list[tuple[str, ...]]:
    """Drop domains already claimed by an earlier group (Envoy rejects a route config in
    which two virtual hosts share a domain). Order within each group is kept."""
    seen: set[str] = set()
    out: list[tuple[str, ...]] = []
    for group in groups:
        kept = []
        for d in group:
            key = d.lower()
            if key not in seen:
                seen.add(key)
                kept.append(d)
        out.append(tuple(kept))
    return out


def weighted_split(route: Sequence[RouteDestination]) -> tuple[RouteDestination, ...]:
    """The destinations that actually receive traffic: zero weights are dropped (Envoy
    requires positive weights); if every weight is zero the first destination takes all."""
    live = tuple(d for d in route if d.weight > 0)
    if live:
        return live
    if route:
        return (replace(route[0], weight=100),)
    return ()


def destination_port(dest: Destination, route_port: int, target: Service | None) -> int:
    """The service port a destination names: the explicit one; else the route's own port
    if the destination service has it; else its only port; else the route's port."""
    if dest.port:
        return dest.port
    if target is None:
        return route_port
    ports = [p.port for p in target.ports]
    if route_port in ports:
        return route_port
    if len(ports) == 1:
        return ports[0]
    return route_port


def destination_cluster(dest: Destination, route_port: int, services: Mapping[Hostname, Service]) -> str:
    port = destination_port(dest, route_port, services.get(dest.host))
    return outbound_cluster_name(port, dest.host, dest.subset)


def duration_ms(ms: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def pack(msg: Message) -> any_pb2.Any:
    """`msg` in an Any, serialized deterministically (map entries sorted by key), so that the
    same input gives the same bytes in every process."""
    out = any_pb2.Any()
    out.Pack(msg, deterministic=True)
    return out
