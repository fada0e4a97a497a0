"""Envoy Listeners for sidecars: outbound per-port listeners, the capture listeners
`virtualOutbound` (15001) and `virtualInbound` (15006), and bind-mode inbound listeners.

Pure functions, no I/O. Each `build_*` function is a cache builder; its arguments are small
frozen values describing exactly one listener.

Ports whose protocol is unknown are sniffed with the http_inspector listener filter: HTTP/1.1
and h2c go to the HTTP connection manager, anything else to tcp_proxy. Like Istio's historic
default, sniffing waits at most 100 ms for the client's first bytes and then falls back to
TCP (so server-first protocols still work on such ports).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.cors.v3 import cors_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.http_inspector.v3 import http_inspector_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2

from controlplane.model.ir import PortProtocol
from controlplane.translate.names import (
    INBOUND_CAPTURE_PORT,
    OUTBOUND_CAPTURE_PORT,
    VIRTUAL_INBOUND,
    VIRTUAL_OUTBOUND,
    duration_ms,
    pack,
)

HCM_FILTER = "envoy.filters.network.http_connection_manager"
TCP_PROXY_FILTER = "envoy.filters.network.tcp_proxy"
SNIFFED_PROTOCOLS = ("http/1.1", "h2c")
SNIFF_TIMEOUT_MS = 100


@dataclass(frozen=True, slots=True)
class WeightedCluster:
    name: str
    weight: int = 100


@dataclass(frozen=True, slots=True)
class OutboundListener:
    """One outbound listener. HTTP only: `route_name` set; TCP only: `tcp` set; both: the
    protocol is sniffed."""

    name: str
    address: str
    port: int
    bind_to_port: bool
    route_name: str | None = None
    tcp: tuple[WeightedCluster, ...] = ()


@dataclass(frozen=True, slots=True)
class InboundPort:
    """A port the workload serves: traffic to it goes to `cluster` (the application)."""

    port: int
    cluster: str
    protocol: PortProtocol


# --------------------------------------------------------------------------- network filters


def _hcm(stat_prefix: str, rds_name: str | None, route_config: route_pb2.RouteConfiguration | None) -> Any:
    h = hcm_pb2.HttpConnectionManager(stat_prefix=stat_prefix, codec_type=hcm_pb2.HttpConnectionManager.AUTO)
    if rds_name is not None:
        h.rds.config_source.ads.SetInParent()
        h.rds.route_config_name = rds_name
        filters: tuple[tuple[str, Any], ...] = (
            ("envoy.filters.http.cors", cors_pb2.Cors()),
            ("envoy.filters.http.fault", fault_pb2.HTTPFault()),
        )
    else:
        h.route_config.CopyFrom(route_config)
        filters = ()
    h.use_remote_address.value = False
    for name, cfg in (*filters, ("envoy.filters.http.router", router_pb2.Router())):
        h.http_filters.add(name=name).typed_config.CopyFrom(pack(cfg))
    f = listener_components_pb2.Filter(name=HCM_FILTER)
    f.typed_config.CopyFrom(pack(h))
    return f


def _tcp_proxy(stat_prefix: str, clusters: Sequence[WeightedCluster]) -> Any:
    t = tcp_proxy_pb2.TcpProxy(stat_prefix=stat_prefix)
    if len(clusters) == 1:
        t.cluster = clusters[0].name
    else:
        for wc in clusters:
            t.weighted_clusters.clusters.add(name=wc.name, weight=wc.weight)
    f = listener_components_pb2.Filter(name=TCP_PROXY_FILTER)
    f.typed_config.CopyFrom(pack(t))
    return f


def _listener(name: str, address: str, port: int, direction: int) -> listener_pb2.Listener:
    lst = listener_pb2.Listener(name=name, traffic_direction=direction)
    sa = lst.address.socket_address
    sa.address = address
    sa.port_value = port
    return lst


def _add_listener_filter(lst: listener_pb2.Listener, name: str, cfg: Any) -> Any:
    lf = lst.listener_filters.add(name=name)
    lf.typed_config.CopyFrom(pack(cfg))
    return lf


def _sniffing(lst: listener_pb2.Listener) -> Any:
    lf = _add_listener_filter(
        lst, "envoy.filters.listener.http_inspector", http_inspector_pb2.HttpInspector()
    )
    lst.listener_filters_timeout.CopyFrom(duration_ms(SNIFF_TIMEOUT_MS))
    lst.continue_on_listener_filters_timeout = True
    return lf


# --------------------------------------------------------------------------- outbound


def build_outbound_listener(spec: OutboundListener) -> listener_pb2.Listener:
    """An outbound listener for one service port (bind: on 127.0.0.1; intercept: not bound,
    reached through `virtualOutbound`)."""
    lst = _listener(spec.name, spec.address, spec.port, base_pb2.OUTBOUND)
    if not spec.bind_to_port:
        lst.bind_to_port.value = False
    stat = f"outbound_{spec.address}_{spec.port}"
    if spec.route_name is not None and spec.tcp:
        _sniffing(lst)
        http = lst.filter_chains.add(name=f"{spec.name}_http")
        http.filter_chain_match.application_protocols.extend(SNIFFED_PROTOCOLS)
        http.filters.append(_hcm(stat, spec.route_name, None))
        lst.filter_chains.add(name=f"{spec.name}_tcp").filters.append(_tcp_proxy(stat, spec.tcp))
    elif spec.route_name is not None:
        lst.filter_chains.add(name=f"{spec.name}_http").filters.append(_hcm(stat, spec.route_name, None))
    else:
        lst.filter_chains.add(name=f"{spec.name}_tcp").filters.append(_tcp_proxy(stat, spec.tcp))
    return lst


def build_virtual_outbound(passthrough_cluster: str) -> listener_pb2.Listener:
    """0.0.0.0:15001: receives every captured outbound connection and hands it to the
    listener for its original destination; anything unmatched passes through."""
    lst = _listener(VIRTUAL_OUTBOUND, "0.0.0.0", OUTBOUND_CAPTURE_PORT, base_pb2.OUTBOUND)
    lst.use_original_dst.value = True
    _add_listener_filter(lst, "envoy.filters.listener.original_dst", original_dst_pb2.OriginalDst())
    chain = lst.default_filter_chain
    chain.name = f"{VIRTUAL_OUTBOUND}-catchall-tcp"
    chain.filters.append(_tcp_proxy(passthrough_cluster, [WeightedCluster(passthrough_cluster)]))
    return lst


# --------------------------------------------------------------------------- inbound


def _inbound_route(ip: InboundPort) -> route_pb2.RouteConfiguration:
    rcfg = route_pb2.RouteConfiguration(name=ip.cluster)
    rcfg.validate_clusters.value = False
    vh = rcfg.virtual_hosts.add(name=f"inbound|http|{ip.port}", domains=["*"])
    r = vh.routes.add(name="default")
    r.match.prefix = "/"
    r.route.cluster = ip.cluster
    r.route.timeout.CopyFrom(duration_ms(0))
    return rcfg


def _inbound_chains(lst: listener_pb2.Listener, ip: InboundPort, match_port: bool) -> None:
    stat = f"inbound_0.0.0.0_{ip.port}"
    tcp = [WeightedCluster(ip.cluster)]
    chains: list[tuple[str, tuple[str, ...], Any]] = []
    if ip.protocol.is_http or ip.protocol is PortProtocol.UNKNOWN:
        sniffed: tuple[str, ...] = SNIFFED_PROTOCOLS if ip.protocol is PortProtocol.UNKNOWN else ()
        chains.append(("http", sniffed, _hcm(stat, None, _inbound_route(ip))))
    if not ip.protocol.is_http:
        chains.append(("tcp", (), _tcp_proxy(stat, tcp)))
    for kind, app_protocols, flt in chains:
        fc = lst.filter_chains.add(name=f"inbound_{ip.port}_{kind}")
        if match_port:
            fc.filter_chain_match.destination_port.value = ip.port
        if app_protocols:
            fc.filter_chain_match.application_protocols.extend(app_protocols)
        fc.filters.append(flt)


def build_virtual_inbound(ports: tuple[InboundPort, ...], passthrough_cluster: str) -> listener_pb2.Listener:
    """0.0.0.0:15006: every captured inbound connection, one filter chain per served port
    (by original destination port); other ports pass through to their original destination."""
    lst = _listener(VIRTUAL_INBOUND, "0.0.0.0", INBOUND_CAPTURE_PORT, base_pb2.INBOUND)
    _add_listener_filter(lst, "envoy.filters.listener.original_dst", original_dst_pb2.OriginalDst())
    sniffed = [p.port for p in ports if p.protocol is PortProtocol.UNKNOWN]
    if sniffed:
        lf = _sniffing(lst)
        # Inspect only the sniffed ports: elsewhere it would delay server-first protocols.
        pred = lf.filter_disabled.not_match
        targets = [pred] if len(sniffed) == 1 else [pred.or_match.rules.add() for _ in sniffed]
        for target, port in zip(targets, sniffed, strict=True):
            target.destination_port_range.start = port
            target.destination_port_range.end = port + 1
    for ip in sorted(ports, key=lambda p: p.port):
        _inbound_chains(lst, ip, match_port=True)
    chain = lst.default_filter_chain
    chain.name = f"{VIRTUAL_INBOUND}-passthrough"
    chain.filters.append(_tcp_proxy(passthrough_cluster, [WeightedCluster(passthrough_cluster)]))
    return lst


def build_inbound_listener(name: str, address: str, ip: InboundPort) -> listener_pb2.Listener:
    """Bind capture: a listener on the pod's address and target port, forwarding to the app."""
    lst = _listener(name, address, ip.port, base_pb2.INBOUND)
    if ip.protocol is PortProtocol.UNKNOWN:
        _sniffing(lst)
    _inbound_chains(lst, ip, match_port=False)
    return lst
