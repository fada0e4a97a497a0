"""Envoy resources of the HBONE tunnel (HTTP/2 CONNECT over mTLS on 15008) and of node
proxies' in-pod listeners. Pure builders, no I/O; each takes small frozen values.

Tunnel, client side: a `tcp_proxy` whose `tunneling_config.hostname` is the CONNECT
authority, to an HTTP/2 cluster with mesh mTLS presenting the *source* identity's
certificate (SDS secret named after its SPIFFE URI on node proxies, `default` on sidecars
and waypoints) and checking the destination's SPIFFE URI. The authority is a fixed
`VIP:port` when the tunnel starts behind an HTTP route (waypoints, sidecars: route ->
internal listener -> tunnel; node proxies build theirs in `nodeproxy_envoy`). Endpoints are
the destination pods' IP:15008.

Tunnel, server side (`build_hbone_inbound`): 15008 with `require_client_certificate`, an
HTTP/2 connection manager accepting CONNECT, one virtual host per target port whose domains
are exactly the authorities that mean "this pod, this port" (its IP:port and the VIPs:ports
of the services selecting it). Any other authority gets 404: it is never an open proxy.
AuthorizationPolicies are evaluated per virtual host with L4 semantics (the CONNECT request
carries no L7 attributes of the tunnelled traffic; L7 rules fail closed as on TCP).

Node proxies own listeners inside each ambient pod's network namespace
(`network_namespace_filepath`: `netns_listener`) and deliver to the pod's app from inside it
(`upstream_bind_config` in that namespace, sockets marked `AMBIENT_MARK` so the pod's capture
rules let them pass).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, socket_option_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.access_loggers.stream.v3 import stream_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

from controlplane.model.ir import AuthorizationPolicy
from controlplane.model.policy import policies_for_port
from controlplane.translate.clusters import ClusterPolicy, apply_connection_policy
from controlplane.translate.names import AMBIENT_MARK, HBONE_PORT, duration_ms, pack
from controlplane.translate.rbac import network_rbac_filters, rbac_rules
from controlplane.translate.secrets import ROOT_SECRET, ads_config_source
from controlplane.translate.security import tls_socket

HCM_FILTER = "envoy.filters.network.http_connection_manager"
TCP_PROXY_FILTER = "envoy.filters.network.tcp_proxy"
ORIGINAL_DST_FILTER = "envoy.filters.listener.original_dst"
HTTP2_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
SOL_SOCKET, SO_MARK = 1, 36
_RBAC_NAMES = {"AUDIT": "meshline.rbac.audit", "DENY": "meshline.rbac.deny", "ALLOW": "meshline.rbac.allow"}
ACCESS_LOG_FORMAT = (
    "[%START_TIME%] %REQ(:METHOD)% %REQ(:AUTHORITY)% %RESPONSE_CODE% %RESPONSE_FLAGS% "
    "src=%DOWNSTREAM_REMOTE_ADDRESS% src.identity=%DOWNSTREAM_PEER_URI_SAN% "
    "dst.identity=%DOWNSTREAM_LOCAL_URI_SAN% upstream=%UPSTREAM_HOST% "
    "bytes_in=%BYTES_RECEIVED% bytes_out=%BYTES_SENT% listener=%ACCESS_LOG_TYPE%\n"
)


# --------------------------------------------------------------------------- TLS


def _sds(name: str) -> secret_pb2.SdsSecretConfig:
    return secret_pb2.SdsSecretConfig(name=name, sds_config=ads_config_source())


def common_tls(cert_secret: str, trust_domain: str, peers: Sequence[str]) -> tls_pb2.CommonTlsContext:
    """Our certificate (`cert_secret`), the mesh root, TLS 1.3, ALPN h2; the peer must hold
    one of `peers` (SPIFFE URIs) or, when empty, any identity of `trust_domain`."""
    common = tls_pb2.CommonTlsContext(alpn_protocols=["h2"])
    common.tls_params.tls_minimum_protocol_version = common_pb2.TlsParameters.TLSv1_3
    common.tls_params.tls_maximum_protocol_version = common_pb2.TlsParameters.TLSv1_3
    common.tls_certificate_sds_secret_configs.append(_sds(cert_secret))
    combined = common.combined_validation_context
    sans = combined.default_validation_context.match_typed_subject_alt_names
    for uri in peers:
        m = sans.add(san_type=common_pb2.SubjectAltNameMatcher.URI)
        m.matcher.exact = uri
    if not peers:
        m = sans.add(san_type=common_pb2.SubjectAltNameMatcher.URI)
        m.matcher.prefix = f"spiffe://{trust_domain}/"
    combined.validation_context_sds_secret_config.CopyFrom(_sds(ROOT_SECRET))
    return common


def http2_only(c: cluster_pb2.Cluster) -> None:
    opts = http_protocol_options_pb2.HttpProtocolOptions()
    opts.explicit_http_config.http2_protocol_options.SetInParent()
    c.typed_extension_protocol_options[HTTP2_OPTIONS].CopyFrom(pack(opts))


# --------------------------------------------------------------------------- client side


def build_hbone_cluster(name: str, eds_name: str | None, cert_secret: str, trust_domain: str,
                        peers: tuple[str, ...], policy: ClusterPolicy | None = None) -> cluster_pb2.Cluster:
    """The tunnel's upstream: EDS endpoints `<pod IP>:15008` (`eds_name`), or with
    `eds_name` None the captured destination IP itself on 15008 (ORIGINAL_DST). `policy`:
    the DestinationRule's load balancer, limits and outlier detection (waypoints, sidecars)."""
    c = cluster_pb2.Cluster(name=name)
    c.connect_timeout.CopyFrom(duration_ms(2000))
    if policy is not None and eds_name is not None:
        apply_connection_policy(c, policy)
    if eds_name is None:
        c.type = cluster_pb2.Cluster.ORIGINAL_DST
        c.lb_policy = cluster_pb2.Cluster.CLUSTER_PROVIDED
        c.original_dst_lb_config.upstream_port_override.value = HBONE_PORT
    else:
        c.type = cluster_pb2.Cluster.EDS
        c.eds_cluster_config.service_name = eds_name
        c.eds_cluster_config.eds_config.CopyFrom(ads_config_source())
    http2_only(c)
    ctx = tls_pb2.UpstreamTlsContext()
    ctx.common_tls_context.CopyFrom(common_tls(cert_secret, trust_domain, peers))
    c.transport_socket.CopyFrom(tls_socket(ctx))
    return c


def build_hbone_cla(name: str, addresses: tuple[str, ...]) -> endpoint_pb2.ClusterLoadAssignment:
    """Tunnel endpoints: each address on 15008."""
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    if addresses:
        group = cla.endpoints.add()
        for ip in addresses:
            sa = group.lb_endpoints.add().endpoint.address.socket_address
            sa.address = ip
            sa.port_value = HBONE_PORT
    return cla


def _tunnel_proxy(stat_prefix: str, cluster: str, authority: str | None) -> listener_components_pb2.Filter:
    t = tcp_proxy_pb2.TcpProxy(stat_prefix=stat_prefix, cluster=cluster)
    if authority is not None:
        t.tunneling_config.hostname = authority
    f = listener_components_pb2.Filter(name=TCP_PROXY_FILTER)
    f.typed_config.CopyFrom(pack(t))
    return f


def netns_listener(name: str, port: int, netns: str | None,
                   direction: base_pb2.TrafficDirection.ValueType) -> listener_pb2.Listener:
    """0.0.0.0:`port`, inside the network namespace at `netns` when set."""
    lst = listener_pb2.Listener(name=name, traffic_direction=direction)
    sa = lst.address.socket_address
    sa.address, sa.port_value = "0.0.0.0", port
    if netns:
        sa.network_namespace_filepath = netns
    return lst


def build_internal_cluster(name: str, listener_name: str) -> cluster_pb2.Cluster:
    """A cluster whose only endpoint is the internal listener `listener_name` (an HTTP route
    that must end in a tunnel goes route -> this cluster -> that listener -> tunnel)."""
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.STATIC)
    c.connect_timeout.CopyFrom(duration_ms(2000))
    c.load_assignment.cluster_name = name
    ep = c.load_assignment.endpoints.add().lb_endpoints.add().endpoint
    ep.address.envoy_internal_address.server_listener_name = listener_name
    return c


def build_tunnel_listener(name: str, authority: str, cluster: str) -> listener_pb2.Listener:
    """An internal listener that tunnels what it receives to `cluster` with `authority`."""
    lst = listener_pb2.Listener(name=name)
    lst.internal_listener.SetInParent()
    lst.filter_chains.add(name=name).filters.append(_tunnel_proxy(name, cluster, authority))
    return lst


# --------------------------------------------------------------------------- server side


@dataclass(frozen=True, slots=True)
class TunnelTarget:
    """What the tunnel delivers: CONNECT authorities `domains` -> `cluster` (the app's
    target port `port`)."""

    port: int
    domains: tuple[str, ...]
    cluster: str


def _access_log(hcm: hcm_pb2.HttpConnectionManager) -> None:
    # Envoy's own stdout (not a file path: a proxy under its own uid may not open /dev/stdout).
    out = stream_pb2.StdoutAccessLog()
    out.log_format.text_format_source.inline_string = ACCESS_LOG_FORMAT
    hcm.access_log.append(accesslog_pb2.AccessLog(name="envoy.access_loggers.stdout", typed_config=pack(out)))
    # Tunnels live as long as their pooled connection: log when one opens, not only when it ends.
    hcm.access_log_options.flush_log_on_tunnel_successfully_established = True


def _per_port_rbac(vh: route_components_pb2.VirtualHost, policies: tuple[AuthorizationPolicy, ...], port: int,
                   trust_domain: str) -> None:
    rules = dict(rbac_rules(policies_for_port(policies, port), trust_domain, tcp=True))
    for action, filter_name in _RBAC_NAMES.items():
        per = http_rbac_pb2.RBACPerRoute()
        if action in rules:
            per.rbac.rules.CopyFrom(rules[action])
        vh.typed_per_filter_config[filter_name].CopyFrom(pack(per))


def build_hbone_routes(name: str, trust_domain: str, targets: tuple[TunnelTarget, ...],
                       policies: tuple[AuthorizationPolicy, ...]) -> route_pb2.RouteConfiguration:
    """The CONNECT routes of a tunnel terminator: one virtual host per target port, whose
    domains are exactly the authorities meaning "this pod, this port", with that port's
    AuthorizationPolicies; any other authority gets 404."""
    rc_ = route_pb2.RouteConfiguration(name=name)
    for t in targets:
        vh = rc_.virtual_hosts.add(name=f"{name}_{t.port}", domains=list(t.domains))
        r = vh.routes.add()
        r.match.connect_matcher.SetInParent()
        r.route.cluster = t.cluster
        r.route.upgrade_configs.add(upgrade_type="CONNECT").connect_config.SetInParent()
        r.route.timeout.CopyFrom(duration_ms(0))
        _per_port_rbac(vh, policies, t.port, trust_domain)
    return rc_


def build_hbone_inbound(name: str, netns: str | None, cert_secret: str, trust_domain: str,
                        targets: tuple[TunnelTarget, ...] | None, policies: tuple[AuthorizationPolicy, ...]
                        ) -> listener_pb2.Listener:
    """0.0.0.0:15008 (inside `netns` when set): terminates tunnels with `cert_secret`,
    requires a mesh client certificate, delivers CONNECTs for exactly the `targets`.

    With `targets` None the routes come from RDS (`build_hbone_routes`, same name): a policy
    or target change then applies to every new tunnel at once, also to those multiplexed on an
    existing connection, where an inline change would leave pooled connections on the old
    filter chain (old policy) until they drain."""
    lst = netns_listener(name, HBONE_PORT, netns, base_pb2.INBOUND)
    fc = lst.filter_chains.add(name=name)
    ctx = tls_pb2.DownstreamTlsContext()
    ctx.require_client_certificate.value = True
    ctx.common_tls_context.CopyFrom(common_tls(cert_secret, trust_domain, ()))
    fc.transport_socket.CopyFrom(tls_socket(ctx))
    h = hcm_pb2.HttpConnectionManager(stat_prefix=name, codec_type=hcm_pb2.HttpConnectionManager.HTTP2)
    h.http2_protocol_options.allow_connect = True
    h.upgrade_configs.add(upgrade_type="CONNECT")
    # A tunnel is one TCP connection: no stream idle timeout here (Istio's connect_terminate
    # sets none either). Envoy's default (5 min) reset idle tunnelled connections, such as a
    # database pool's, long before the source's tcp_proxy idle timeout (1 h) that bounds them.
    h.stream_idle_timeout.CopyFrom(duration_ms(0))
    _access_log(h)
    if targets is None:
        h.rds.route_config_name = name
        h.rds.config_source.CopyFrom(ads_config_source())
    else:
        h.route_config.CopyFrom(build_hbone_routes(name, trust_domain, targets, policies))
    for action in ("AUDIT", "DENY", "ALLOW"):
        h.http_filters.add(name=_RBAC_NAMES[action]).typed_config.CopyFrom(pack(http_rbac_pb2.RBAC()))
    h.http_filters.add(name="envoy.filters.http.router").typed_config.CopyFrom(pack(router_pb2.Router()))
    f = fc.filters.add(name=HCM_FILTER)
    f.typed_config.CopyFrom(pack(h))
    return lst


def build_delivery_cluster(name: str, ip: str, port: int, netns: str | None) -> cluster_pb2.Cluster:
    """The app at `ip:port`, dialled from inside its network namespace with the ambient mark."""
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.STATIC)
    c.connect_timeout.CopyFrom(duration_ms(2000))
    c.load_assignment.cluster_name = name
    sa = c.load_assignment.endpoints.add().lb_endpoints.add().endpoint.address.socket_address
    sa.address, sa.port_value = ip, port
    if netns:
        src = c.upstream_bind_config.source_address
        src.address, src.port_value = "0.0.0.0", 0
        src.network_namespace_filepath = netns
        c.upstream_bind_config.socket_options.append(socket_option_pb2.SocketOption(
            description="ambient mark", level=SOL_SOCKET, name=SO_MARK, int_value=AMBIENT_MARK,
            state=socket_option_pb2.SocketOption.STATE_PREBIND))
    return c


@dataclass(frozen=True, slots=True)
class PlainPort:
    """Plaintext callers (outside the mesh) reaching target port `port`: delivered to
    `cluster` when `allowed` (PeerAuthentication is not STRICT there)."""

    port: int
    cluster: str
    allowed: bool


def build_plain_inbound(name: str, netns: str | None, ports: tuple[PlainPort, ...], blackhole: str,
                        trust_domain: str, policies: tuple[AuthorizationPolicy, ...]) -> listener_pb2.Listener:
    """0.0.0.0:15006 (inside `netns`): captured plaintext inbound connections, per target
    port, with the network RBAC of the pod's AuthorizationPolicies; STRICT ports and
    unknown ports go nowhere."""
    lst = netns_listener(name, 15006, netns, base_pb2.INBOUND)
    lst.listener_filters.add(name=ORIGINAL_DST_FILTER).typed_config.CopyFrom(pack(original_dst_pb2.OriginalDst()))
    for p in ports:
        if not p.allowed:
            continue
        fc = lst.filter_chains.add(name=f"{name}_{p.port}")
        fc.filter_chain_match.destination_port.value = p.port
        stat = f"{name}_{p.port}"
        for fname, cfg in network_rbac_filters(policies, trust_domain, stat):
            fc.filters.add(name=fname).typed_config.CopyFrom(pack(cfg))
        fc.filters.append(_tunnel_proxy(stat, p.cluster, None))
    lst.default_filter_chain.name = f"{name}-refused"
    lst.default_filter_chain.filters.append(_tunnel_proxy(f"{name}-refused", blackhole, None))
    return lst


__all__ = [
    "PlainPort", "TunnelTarget", "build_delivery_cluster",
    "build_hbone_cla", "build_hbone_cluster", "build_hbone_inbound", "build_hbone_routes", "build_internal_cluster",
    "build_plain_inbound", "build_tunnel_listener"
]
