"""Envoy Listeners for sidecars: outbound per-port listeners, the capture listeners
`virtualOutbound` (15001) and `virtualInbound` (15006), and bind-mode inbound listeners.

Pure functions, no I/O. Each `build_*` function is a cache builder; its arguments are small
frozen values describing exactly one listener.

Ports whose protocol is unknown are sniffed with the http_inspector listener filter: HTTP/1.1
and h2c go to the HTTP connection manager, anything else to tcp_proxy. Like Istio's historic
default, sniffing waits at most 100 ms for the client's first bytes and then falls back to
TCP (so server-first protocols still work on such ports).

Inbound chains follow the port's mTLS mode (`InboundSecurity`): PERMISSIVE keeps the
plaintext chains and adds mTLS chains (transport protocol `tls`, found by the tls_inspector
listener filter, which waits as long as the HTTP sniffer); STRICT has only the mTLS chains
(in virtualInbound plus a chain that sends other connections to a cluster without
endpoints, so they cannot fall through to the passthrough chain); DISABLE only plaintext.
On a sniffed port, mTLS connections offering ALPN h2 or http/1.1 (what an Envoy client's
HTTP pool offers) reach the HTTP chain, others the TCP chain. Every chain carries the RBAC
filters of the workload's AuthorizationPolicies, after the JWT filter of its
RequestAuthentications (`controlplane.translate.jwt`); chains write the access logs its
Telemetry asks for (`controlplane.translate.accesslog`: `InboundSecurity.access_logs` inbound,
`OutboundListener.access_logs` outbound).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.cors.v3 import cors_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.http_inspector.v3 import http_inspector_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf.message import Message

from controlplane.model.authn import issuers as jwt_issuers
from controlplane.model.ir import DEFAULT_TRUST_DOMAIN, AuthorizationPolicy, JwtRule, MtlsMode, PortProtocol
from controlplane.translate.accesslog import AccessLogSink, access_logs
from controlplane.translate.extauthz import ExtAuthzTarget, http_authz_filters, network_authz_filters
from controlplane.translate.jwt import http_jwt_filters
from controlplane.translate.names import (
    INBOUND_CAPTURE_PORT,
    OUTBOUND_CAPTURE_PORT,
    VIRTUAL_INBOUND,
    VIRTUAL_OUTBOUND,
    duration_ms,
    pack,
)
from controlplane.translate.security import MESH_ALPN, downstream_mtls, tls_socket

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
    tcp_hash_source_ip: bool = False  # DestinationRule consistentHash.useSourceIp on a TCP port
    access_logs: tuple[AccessLogSink, ...] = ()  # Telemetry accessLogging (CLIENT)


@dataclass(frozen=True, slots=True)
class InboundPort:
    """A port the workload serves: traffic to it goes to `cluster` (the application)."""

    port: int
    cluster: str
    protocol: PortProtocol


# --------------------------------------------------------------------------- network filters


def hcm_filter(
    stat_prefix: str,
    rds_name: str | None,
    route_config: route_pb2.RouteConfiguration | None,
    authz: Sequence[tuple[str, Message]] = (),
    *,
    client_cert: bool = False,
    logs: Sequence[AccessLogSink] = (),
) -> listener_components_pb2.Filter:
    """An HTTP connection manager. `authz`: RBAC filters to run before the router (paths are
    then normalised first, so that `/a/../b` cannot slip past a path rule); `client_cert`:
    the connection is mTLS, and the app gets the peer's SPIFFE URI in x-forwarded-client-cert."""
    h = hcm_pb2.HttpConnectionManager(stat_prefix=stat_prefix, codec_type=hcm_pb2.HttpConnectionManager.AUTO)
    if client_cert:
        h.forward_client_cert_details = hcm_pb2.HttpConnectionManager.SANITIZE_SET
        h.set_current_client_cert_details.uri = True
    if authz:
        h.normalize_path.value = True
        h.merge_slashes = True
    if rds_name is not None:
        h.rds.config_source.ads.SetInParent()
        h.rds.route_config_name = rds_name
        filters: tuple[tuple[str, Message], ...] = (
            ("envoy.filters.http.cors", cors_pb2.Cors()),
            ("envoy.filters.http.fault", fault_pb2.HTTPFault()),
        )
    elif route_config is not None:
        h.route_config.CopyFrom(route_config)
        filters = ()
    else:
        raise ValueError(f"{stat_prefix}: an HTTP connection manager needs rds_name or route_config")
    h.use_remote_address.value = False
    h.access_log.extend(access_logs(logs))
    for name, cfg in (*authz, *filters, ("envoy.filters.http.router", router_pb2.Router())):
        h.http_filters.add(name=name).typed_config.CopyFrom(pack(cfg))
    f = listener_components_pb2.Filter(name=HCM_FILTER)
    f.typed_config.CopyFrom(pack(h))
    return f


def _tcp_proxy(stat_prefix: str, clusters: Sequence[WeightedCluster], hash_source_ip: bool = False,
               logs: Sequence[AccessLogSink] = ()) -> listener_components_pb2.Filter:
    t = tcp_proxy_pb2.TcpProxy(stat_prefix=stat_prefix)
    t.access_log.extend(access_logs(logs))
    if len(clusters) == 1:
        t.cluster = clusters[0].name
    else:
        for wc in clusters:
            t.weighted_clusters.clusters.add(name=wc.name, weight=wc.weight)
    if hash_source_ip:
        t.hash_policy.add().source_ip.SetInParent()
    f = listener_components_pb2.Filter(name=TCP_PROXY_FILTER)
    f.typed_config.CopyFrom(pack(t))
    return f


def _listener(name: str, address: str, port: int,
              direction: base_pb2.TrafficDirection.ValueType) -> listener_pb2.Listener:
    lst = listener_pb2.Listener(name=name, traffic_direction=direction)
    sa = lst.address.socket_address
    sa.address = address
    sa.port_value = port
    return lst


def _add_listener_filter(lst: listener_pb2.Listener, name: str, cfg: Message) -> listener_components_pb2.ListenerFilter:
    lf = lst.listener_filters.add(name=name)
    lf.typed_config.CopyFrom(pack(cfg))
    return lf


def _sniffing(lst: listener_pb2.Listener) -> listener_components_pb2.ListenerFilter:  # outbound listeners
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
        http.filters.append(hcm_filter(stat, spec.route_name, None, logs=spec.access_logs))
        lst.filter_chains.add(name=f"{spec.name}_tcp").filters.append(
            _tcp_proxy(stat, spec.tcp, spec.tcp_hash_source_ip, spec.access_logs))
    elif spec.route_name is not None:
        lst.filter_chains.add(name=f"{spec.name}_http").filters.append(
            hcm_filter(stat, spec.route_name, None, logs=spec.access_logs))
    else:
        lst.filter_chains.add(name=f"{spec.name}_tcp").filters.append(
            _tcp_proxy(stat, spec.tcp, spec.tcp_hash_source_ip, spec.access_logs))
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


@dataclass(frozen=True, slots=True)
class InboundSecurity:
    """mTLS and authorization for a workload's inbound listeners: `mode` for every port
    without an entry in `ports` ((port, mode) pairs); `authz`, the AuthorizationPolicies
    that apply. The default (DISABLE, no policies) is plaintext only, without RBAC."""

    mode: MtlsMode = "DISABLE"
    ports: tuple[tuple[int, MtlsMode], ...] = ()
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    authz: tuple[AuthorizationPolicy, ...] = ()
    # the external authorizer of the workload's CUSTOM policies (None: they deny)
    ext_authz: ExtAuthzTarget | None = None
    jwt: tuple[JwtRule, ...] = ()  # RequestAuthentication jwtRules (translate.jwt)
    access_logs: tuple[AccessLogSink, ...] = ()  # Telemetry accessLogging (SERVER)

    def for_port(self, port: int) -> MtlsMode:
        return next((m for p, m in self.ports if p == port), self.mode)


def _inbound_route(ip: InboundPort) -> route_pb2.RouteConfiguration:
    rcfg = route_pb2.RouteConfiguration(name=ip.cluster)
    rcfg.validate_clusters.value = False
    vh = rcfg.virtual_hosts.add(name=f"inbound|http|{ip.port}", domains=["*"])
    r = vh.routes.add(name="default")
    r.match.prefix = "/"
    r.route.cluster = ip.cluster
    r.route.timeout.CopyFrom(duration_ms(0))
    return rcfg


def _tcp_filters(stat: str, cluster: str, sec: InboundSecurity) -> list[listener_components_pb2.Filter]:
    out = []
    for name, cfg in network_authz_filters(sec.authz, sec.trust_domain, stat, sec.ext_authz):
        f = listener_components_pb2.Filter(name=name)
        f.typed_config.CopyFrom(pack(cfg))
        out.append(f)
    return [*out, _tcp_proxy(stat, [WeightedCluster(cluster)], logs=sec.access_logs)]


def _secure(fc: listener_components_pb2.FilterChain, sec: InboundSecurity, alpn: tuple[str, ...]) -> None:
    """Make `fc` an mTLS chain: it matches TLS connections and terminates mesh mTLS."""
    fc.filter_chain_match.transport_protocol = "tls"
    fc.transport_socket.CopyFrom(tls_socket(downstream_mtls(sec.trust_domain, alpn)))


def _inbound_chains(lst: listener_pb2.Listener, ip: InboundPort, match_port: bool, sec: InboundSecurity,
                    deny_plaintext_to: str | None = None) -> None:
    """The chains of one served port: plaintext unless STRICT, mTLS unless DISABLE. With
    `deny_plaintext_to` (a cluster without endpoints), a STRICT port also gets a chain that
    takes every non-TLS connection there, so it cannot fall through to the listener's
    default chain."""
    stat = f"inbound_0.0.0.0_{ip.port}"
    mode = sec.for_port(ip.port)
    http_filters = [*http_jwt_filters(sec.jwt),
                    *http_authz_filters(sec.authz, sec.trust_domain, sec.ext_authz, jwt_issuers(sec.jwt))]
    sniffed = ip.protocol is PortProtocol.UNKNOWN
    chains: list[tuple[str, bool, tuple[str, ...], list[listener_components_pb2.Filter]]] = []
    for secure in (False, True):
        if (secure and mode == "DISABLE") or (not secure and mode == "STRICT"):
            continue
        prefix = "mtls_" if secure else ""
        if ip.protocol.is_http or sniffed:
            app: tuple[str, ...] = (MESH_ALPN if secure else SNIFFED_PROTOCOLS) if sniffed else ()
            hcm = hcm_filter(stat, None, _inbound_route(ip), http_filters, client_cert=secure, logs=sec.access_logs)
            chains.append((f"{prefix}http", secure, app, [hcm]))
        if not ip.protocol.is_http:
            chains.append((f"{prefix}tcp", secure, (), _tcp_filters(stat, ip.cluster, sec)))
    if mode == "STRICT" and deny_plaintext_to is not None:
        chains.append(("plaintext_denied", False, (), [_tcp_proxy(stat, [WeightedCluster(deny_plaintext_to)])]))
    for kind, secure, app_protocols, filters in chains:
        fc = lst.filter_chains.add(name=f"inbound_{ip.port}_{kind}")
        if match_port:
            fc.filter_chain_match.destination_port.value = ip.port
        if secure:
            _secure(fc, sec, MESH_ALPN if ip.protocol.is_http or kind.endswith("http") else ())
        if app_protocols:
            fc.filter_chain_match.application_protocols.extend(app_protocols)
        fc.filters.extend(filters)


def _match_ports(pred: listener_components_pb2.ListenerFilterChainMatchPredicate, ports: Sequence[int]) -> None:
    """Make listener-filter predicate `pred` match a destination port in `ports`."""
    targets = [pred] if len(ports) == 1 else [pred.or_match.rules.add() for _ in ports]
    for target, port in zip(targets, ports, strict=True):
        target.destination_port_range.start = port
        target.destination_port_range.end = port + 1


def _inspectors(lst: listener_pb2.Listener, tls: tuple[bool, Sequence[int]] | None, sniffed: Sequence[int] | bool
                ) -> None:
    """TLS inspection (`tls`: (enabled by default, ports that are the exception)), then HTTP
    sniffing on the `sniffed` ports only (elsewhere it would delay server-first protocols;
    True: on every port). Inspection waits at most SNIFF_TIMEOUT_MS for the client's first
    bytes."""
    if tls is not None:
        lf = _add_listener_filter(lst, "envoy.filters.listener.tls_inspector", tls_inspector_pb2.TlsInspector())
        by_default, exceptions = tls
        if exceptions:
            _match_ports(lf.filter_disabled if by_default else lf.filter_disabled.not_match, sorted(exceptions))
    if sniffed:
        lf = _add_listener_filter(lst, "envoy.filters.listener.http_inspector", http_inspector_pb2.HttpInspector())
        if sniffed is not True:
            _match_ports(lf.filter_disabled.not_match, sorted(sniffed))
    if tls is not None or sniffed:
        lst.listener_filters_timeout.CopyFrom(duration_ms(SNIFF_TIMEOUT_MS))
        lst.continue_on_listener_filters_timeout = True


def _passthrough(fc: listener_components_pb2.FilterChain, cluster: str, sec: InboundSecurity, secure: bool,
                 port: int | None = None) -> None:
    if port is not None:
        fc.filter_chain_match.destination_port.value = port
    if secure:
        _secure(fc, sec, ())
    fc.filters.extend(_tcp_filters(cluster, cluster, sec))


def build_virtual_inbound(ports: tuple[InboundPort, ...], passthrough_cluster: str,
                          security: InboundSecurity = InboundSecurity(), blackhole_cluster: str | None = None
                          ) -> listener_pb2.Listener:
    """0.0.0.0:15006: every captured inbound connection, chains per served port (by original
    destination port); other ports pass through to their original destination, with the
    workload's mTLS mode (plaintext unless STRICT; mTLS only when STRICT) and authorization.
    Port-level modes for ports no service declares get their own passthrough chains.
    `blackhole_cluster` is needed when some served port is STRICT but the default is not."""
    sec = security
    lst = _listener(VIRTUAL_INBOUND, "0.0.0.0", INBOUND_CAPTURE_PORT, base_pb2.INBOUND)
    _add_listener_filter(lst, "envoy.filters.listener.original_dst", original_dst_pb2.OriginalDst())
    served = {p.port for p in ports}
    undeclared = {p: m for p, m in sec.ports if p not in served and m != sec.mode}
    strict = sec.mode == "STRICT"
    if strict:
        tls_exceptions = [p for p in served if sec.for_port(p) == "DISABLE"] + [
            p for p, m in undeclared.items() if m != "STRICT"]
    else:
        tls_exceptions = [p for p in served if sec.for_port(p) != "DISABLE"] + [
            p for p, m in undeclared.items() if m == "STRICT"]
    tls = (strict, tls_exceptions) if strict or tls_exceptions else None
    sniffed = [p.port for p in ports if p.protocol is PortProtocol.UNKNOWN and sec.for_port(p.port) != "STRICT"]
    _inspectors(lst, tls, sniffed)
    for ip in sorted(ports, key=lambda p: p.port):
        _inbound_chains(lst, ip, True, sec, None if strict else blackhole_cluster)
    name = f"{VIRTUAL_INBOUND}-passthrough"
    for port, mode in sorted(undeclared.items()):
        if mode == "STRICT":
            _passthrough(lst.filter_chains.add(name=f"{name}-mtls-{port}"), passthrough_cluster, sec, True, port)
            if blackhole_cluster is not None:
                denied = lst.filter_chains.add(name=f"{name}-plaintext-denied-{port}")
                denied.filter_chain_match.destination_port.value = port
                denied.filters.append(_tcp_proxy(passthrough_cluster, [WeightedCluster(blackhole_cluster)]))
        elif strict:
            _passthrough(lst.filter_chains.add(name=f"{name}-{port}"), passthrough_cluster, sec, False, port)
    if strict:
        _passthrough(lst.filter_chains.add(name=f"{name}-mtls"), passthrough_cluster, sec, True)
    else:
        lst.default_filter_chain.name = name
        _passthrough(lst.default_filter_chain, passthrough_cluster, sec, False)
    return lst


def build_inbound_listener(name: str, address: str, ip: InboundPort,
                           security: InboundSecurity = InboundSecurity()) -> listener_pb2.Listener:
    """Bind capture: a listener on the pod's address and target port, forwarding to the app.
    Connections no chain takes (plaintext to a STRICT port) are closed."""
    lst = _listener(name, address, ip.port, base_pb2.INBOUND)
    mode = security.for_port(ip.port)
    sniffed = ip.protocol is PortProtocol.UNKNOWN and mode != "STRICT"
    _inspectors(lst, (True, []) if mode != "DISABLE" else None, sniffed)
    _inbound_chains(lst, ip, False, security)
    return lst
