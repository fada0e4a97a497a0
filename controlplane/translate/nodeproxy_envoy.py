"""Envoy resources of the shared node-proxy layout (see `controlplane.translate.nodeproxy`).
Pure builders, no I/O; each takes small frozen values.

How one captured connection travels (every hop after the first is an internal listener,
a user-space socket inside the same Envoy, reached through a cluster whose transport is
`internal_upstream`, which carries filter state and endpoint metadata across):

1. `ambient_outbound_<ns>_<pod>` (0.0.0.0:15001 in the pod's netns; `build_pod_outbound`)
   records two facts and forwards everything to its scope's listener:
   `envoy.filters.listener.original_dst.local_ip` = the captured destination (ONCE: the next
   hop restores it), and `meshline.source` = the tunnel cluster of the pod's identity
   (TRANSITIVE: every later hop reads it).
2. `ambient_outbound[|scope]` (`build_scope_listener`, one per Sidecar scope on the node,
   shared by its pods) restores the destination and matches it (`filter_chain_matcher`: a
   trie of destination IPs, no per-port precedence quirks, and a matcher-only update drains
   nothing): a Service VIP -> `ambient|<VIP:port>` (the cluster is named after the address,
   so one chain serves every VIP: `envoy.tcp_proxy.cluster` is formatted from it); a VIP
   bound to a waypoint -> that waypoint's cluster; a pod CIDR block -> that block's listener
   (3'); anything else passes through. The CONNECT authority (the VIP:port) is recorded.
3. A service cluster's endpoints are internal addresses of `ambient_connect` carrying, as
   metadata, the pod's tunnel address (`envoy.filters.listener.original_dst.local`) and its
   SPIFFE identity (`meshline.tunnel.identity`). `ambient_connect` (`build_connect_listener`)
   restores that address, sets `envoy.network.upstream_subject_alt_names` to the identity
   (checked in addition to the cluster's trust-domain SAN matcher, per connection) and
   `envoy.tcp_proxy.cluster` to the source's tunnel cluster, and tunnels with the recorded
   authority.
3'. `ambient_pods|<block>` (`build_pods_listener`): for a direct pod-IP call, one chain per
   destination identity whose pods are in that block: the same SAN and source checks,
   authority = the pod IP:port.
4. `ambient_src|<SPIFFE URI>` (`build_source_cluster`, one per identity on the node): an
   ORIGINAL_DST HTTP/2 cluster presenting that identity's certificate to `<pod IP>:15008`.

Missing identity metadata formats as "-", a SAN nobody holds: a tunnel never falls back to
trusting any mesh identity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.common.set_filter_state.v3 import value_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.network.set_filter_state.v3 import set_filter_state_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.matching.common_inputs.network.v3 import network_inputs_pb2
from envoy.extensions.transport_sockets.internal_upstream.v3 import internal_upstream_pb2
from envoy.extensions.transport_sockets.raw_buffer.v3 import raw_buffer_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from google.protobuf import struct_pb2, wrappers_pb2
from xds.type.matcher.v3 import ip_pb2, matcher_pb2

from controlplane.translate.hbone import (
    ORIGINAL_DST_FILTER,
    TCP_PROXY_FILTER,
    common_tls,
    http2_only,
    netns_listener,
)
from controlplane.translate.names import HBONE_PORT, duration_ms, pack
from controlplane.translate.secrets import ads_config_source
from controlplane.translate.security import tls_socket

CONNECT_LISTENER = "ambient_connect"
SERVICE_CLUSTER = "ambient|"  # + the destination as Envoy prints it: "10.96.0.1:80", "[fd00::1]:80"
WAYPOINT_CLUSTER = "ambient_wp|"  # + the waypoint Service's hostname
SOURCE_CLUSTER = "ambient_src|"  # + the SPIFFE URI of a pod identity on the node
SOURCE_KEY = "meshline.source"
AUTHORITY_KEY = "meshline.authority"
LOCAL_IP_KEY = "envoy.filters.listener.original_dst.local_ip"
SAN_KEY = "envoy.network.upstream_subject_alt_names"
CLUSTER_KEY = "envoy.tcp_proxy.cluster"
ODST_METADATA = "envoy.filters.listener.original_dst"  # endpoint metadata: {local: "<pod IP>:15008"}
TUNNEL_METADATA = "meshline.tunnel"  # endpoint metadata: {identity: "<SPIFFE URI>"}
LOCAL = "%DOWNSTREAM_LOCAL_ADDRESS%"
SERVICES_CHAIN = "services"
PASSTHROUGH_CHAIN = "passthrough"
PODS_STAT = "ambient_pods"
_SFS_FILTER = "envoy.filters.network.set_filter_state"


def host_port(ip: str, port: int) -> str:
    """`ip:port` as Envoy prints an address (IPv6 in brackets)."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def service_cluster(vip: str, port: int) -> str:
    return SERVICE_CLUSTER + host_port(vip, port)


# --------------------------------------------------------------------------- small parts


def _fs(key: str, fmt: str,
        shared: value_pb2.FilterStateValue.SharedWithUpstream.ValueType = value_pb2.FilterStateValue.NONE,
        factory: str = ""
        ) -> value_pb2.FilterStateValue:
    v = value_pb2.FilterStateValue(object_key=key, shared_with_upstream=shared)
    if factory:
        v.factory_key = factory
    v.format_string.text_format_source.inline_string = fmt
    return v


ONCE = value_pb2.FilterStateValue.ONCE
TRANSITIVE = value_pb2.FilterStateValue.TRANSITIVE


def _set_state(*values: value_pb2.FilterStateValue) -> listener_components_pb2.Filter:
    cfg = set_filter_state_pb2.Config(on_new_connection=list(values))
    return listener_components_pb2.Filter(name=_SFS_FILTER, typed_config=pack(cfg))


def _tcp(stat: str, cluster: str, authority: str | None = None) -> listener_components_pb2.Filter:
    t = tcp_proxy_pb2.TcpProxy(stat_prefix=stat, cluster=cluster)
    if authority is not None:
        t.tunneling_config.hostname = authority
    return listener_components_pb2.Filter(name=TCP_PROXY_FILTER, typed_config=pack(t))


def _original_dst(lst: listener_pb2.Listener) -> None:
    lst.listener_filters.add(name=ORIGINAL_DST_FILTER).typed_config.CopyFrom(pack(original_dst_pb2.OriginalDst()))


def _internal(name: str) -> listener_pb2.Listener:
    lst = listener_pb2.Listener(name=name)
    lst.internal_listener.SetInParent()
    _original_dst(lst)
    return lst


def _internal_upstream(*metadata: str) -> base_pb2.TransportSocket:
    iu = internal_upstream_pb2.InternalUpstreamTransport()
    for ns in metadata:
        src = iu.passthrough_metadata.add(name=ns)
        src.kind.host.SetInParent()
    iu.transport_socket.name = "envoy.transport_sockets.raw_buffer"
    iu.transport_socket.typed_config.CopyFrom(pack(raw_buffer_pb2.RawBuffer()))
    return base_pb2.TransportSocket(name="envoy.transport_sockets.internal_upstream", typed_config=pack(iu))


def _cidr(add: object, text: str) -> None:
    ip, _, bits = text.partition("/")
    add.address_prefix = ip  # type: ignore[attr-defined]
    add.prefix_len.value = int(bits or (128 if ":" in ip else 32))  # type: ignore[attr-defined]


def _action(on_match: matcher_pb2.Matcher.OnMatch, chain: str) -> None:
    on_match.action.name = chain
    on_match.action.typed_config.CopyFrom(pack(wrappers_pb2.StringValue(value=chain)))


@dataclass(frozen=True, slots=True)
class IpRoute:
    """Destinations in `ranges` (CIDRs) go to filter chain `chain`; with `ports`, only on
    those destination ports (elsewhere: whatever a less specific range or the default says)."""

    ranges: tuple[str, ...]
    chain: str
    ports: tuple[int, ...] | None = None


def _ip_matcher(lst: listener_pb2.Listener, routes: Sequence[IpRoute]) -> None:
    if not routes:
        return
    tree = lst.filter_chain_matcher.matcher_tree
    tree.input.name = "envoy.matching.inputs.destination_ip"
    tree.input.typed_config.CopyFrom(pack(network_inputs_pb2.DestinationIPInput()))
    ipm = ip_pb2.IPMatcher()
    for r in routes:
        rm = ipm.range_matchers.add()
        for c in r.ranges:
            _cidr(rm.ranges.add(), c)
        if r.ports is None:
            _action(rm.on_match, r.chain)
            continue
        rm.exclusive = False
        sub = rm.on_match.matcher.matcher_tree
        sub.input.name = "envoy.matching.inputs.destination_port"
        sub.input.typed_config.CopyFrom(pack(network_inputs_pb2.DestinationPortInput()))
        for p in r.ports:
            _action(sub.exact_match_map.map[str(p)], r.chain)
    tree.custom_match.name = "envoy.matching.custom_matchers.ip_matcher"
    tree.custom_match.typed_config.CopyFrom(pack(ipm))


def _passthrough_default(lst: listener_pb2.Listener, passthrough: str) -> None:
    lst.default_filter_chain.name = PASSTHROUGH_CHAIN
    lst.default_filter_chain.filters.append(_tcp(f"{lst.name}-passthrough", passthrough))


# --------------------------------------------------------------------------- listeners


def build_pod_outbound(name: str, netns: str | None, source_cluster: str, scope_cluster: str
                       ) -> listener_pb2.Listener:
    """0.0.0.0:15001 inside the pod's netns: every captured connection is handed to the
    shared scope listener, labelled with its destination and the pod's tunnel cluster."""
    lst = netns_listener(name, 15001, netns, base_pb2.OUTBOUND)
    _original_dst(lst)
    fc = lst.filter_chains.add(name=name)
    fc.filters.append(_set_state(_fs(LOCAL_IP_KEY, LOCAL, ONCE),
                                 _fs(SOURCE_KEY, source_cluster, TRANSITIVE, "envoy.string")))
    fc.filters.append(_tcp(name, scope_cluster))
    return lst


@dataclass(frozen=True, slots=True)
class WaypointRoute:
    """The VIPs bound to one waypoint, tunnelled to `cluster` (its pods) naming the VIP:port."""

    chain: str
    cluster: str
    routes: tuple[IpRoute, ...]


def build_scope_listener(name: str, services: tuple[IpRoute, ...], waypoints: tuple[WaypointRoute, ...],
                         blocks: tuple[tuple[str, str], ...], passthrough: str) -> listener_pb2.Listener:
    """The internal listener shared by the node's pods of one Sidecar scope. `services`: the
    VIPs (with their in-scope ports when not all are) reached through `ambient|<VIP:port>`;
    `blocks`: (pod CIDR block, cluster of its `ambient_pods` listener)."""
    lst = _internal(name)
    routes: list[IpRoute] = []
    if services:
        fc = lst.filter_chains.add(name=SERVICES_CHAIN)
        fc.filters.append(_set_state(_fs(CLUSTER_KEY, SERVICE_CLUSTER + LOCAL),
                                     _fs(AUTHORITY_KEY, LOCAL, ONCE, "envoy.string")))
        fc.filters.append(_tcp(f"{name}-services", passthrough))
        routes += services
    for wp in waypoints:
        fc = lst.filter_chains.add(name=wp.chain)
        fc.filters.append(_set_state(_fs(AUTHORITY_KEY, LOCAL, ONCE, "envoy.string")))
        fc.filters.append(_tcp(wp.chain, wp.cluster))
        routes += wp.routes
    for block, cluster in blocks:
        chain = f"pods|{block}"
        fc = lst.filter_chains.add(name=chain)
        fc.filters.append(_set_state(_fs(LOCAL_IP_KEY, LOCAL, ONCE)))  # restored again by the block's listener
        fc.filters.append(_tcp(chain, cluster))
        routes.append(IpRoute((block,), chain))
    _ip_matcher(lst, routes)
    _passthrough_default(lst, passthrough)
    return lst


def build_pods_listener(name: str, identities: tuple[tuple[str, tuple[str, ...]], ...], blackhole: str,
                        passthrough: str) -> listener_pb2.Listener:
    """Direct pod-IP calls into one CIDR block: per destination identity (SPIFFE URI, its
    pods' /32s), a tunnel from the caller's identity to `<pod IP>:15008` that accepts only
    that identity; other addresses pass through."""
    lst = _internal(name)
    routes = []
    for uri, ips in identities:
        # Named by the identity alone (short, and stable: a chain whose name and content stay
        # put is kept in place when other identities come and go, its connections undrained).
        chain = uri.rpartition("/ns/")[2] or uri
        fc = lst.filter_chains.add(name=chain)
        fc.filters.append(_set_state(_fs(SAN_KEY, uri, ONCE), _fs(CLUSTER_KEY, f"%FILTER_STATE({SOURCE_KEY}:PLAIN)%")))
        fc.filters.append(_tcp(PODS_STAT, blackhole, LOCAL))
        routes.append(IpRoute(ips, chain))
    _ip_matcher(lst, routes)
    _passthrough_default(lst, passthrough)
    return lst


def build_connect_listener(name: str, blackhole: str) -> listener_pb2.Listener:
    """Where service clusters' endpoints lead: a tunnel from the caller's identity to the
    chosen pod's 15008, accepting only the identity its endpoint names."""
    lst = _internal(name)
    fc = lst.filter_chains.add(name=name)
    fc.filters.append(_set_state(_fs(SAN_KEY, f"%DYNAMIC_METADATA({TUNNEL_METADATA}:identity)%", ONCE),
                                 _fs(CLUSTER_KEY, f"%FILTER_STATE({SOURCE_KEY}:PLAIN)%")))
    fc.filters.append(_tcp(name, blackhole, f"%FILTER_STATE({AUTHORITY_KEY}:PLAIN)%"))
    return lst


# --------------------------------------------------------------------------- clusters


def build_hop_cluster(name: str, listener: str) -> cluster_pb2.Cluster:
    """The internal listener `listener` as a cluster, passing filter state along."""
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.STATIC)
    c.connect_timeout.CopyFrom(duration_ms(2000))
    c.load_assignment.cluster_name = name
    ep = c.load_assignment.endpoints.add().lb_endpoints.add().endpoint
    ep.address.envoy_internal_address.server_listener_name = listener
    c.transport_socket.CopyFrom(_internal_upstream())
    return c


def build_source_cluster(name: str, cert_secret: str, trust_domain: str) -> cluster_pb2.Cluster:
    """Tunnels presenting `cert_secret` (one identity's certificate) to `<pod IP>:15008`,
    the pod being the connection's restored destination. The trust domain is checked here,
    the exact destination identity per connection (filter state)."""
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.ORIGINAL_DST,
                            lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED)
    c.connect_timeout.CopyFrom(duration_ms(2000))
    c.original_dst_lb_config.upstream_port_override.value = HBONE_PORT
    http2_only(c)
    ctx = tls_pb2.UpstreamTlsContext()
    ctx.common_tls_context.CopyFrom(common_tls(cert_secret, trust_domain, ()))
    c.transport_socket.CopyFrom(tls_socket(ctx))
    return c


def build_tunnel_service_cluster(name: str) -> cluster_pb2.Cluster:
    """A service (or waypoint) whose pods take only HBONE: EDS endpoints that lead to
    `ambient_connect`, with their tunnel address and identity as metadata."""
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS)
    c.connect_timeout.CopyFrom(duration_ms(2000))
    c.eds_cluster_config.service_name = name
    c.eds_cluster_config.eds_config.CopyFrom(ads_config_source())
    c.transport_socket.CopyFrom(_internal_upstream(ODST_METADATA, TUNNEL_METADATA))
    return c


@dataclass(frozen=True, slots=True)
class TunnelEndpoint:
    ip: str
    identity: str  # SPIFFE URI the pod must present


def build_tunnel_cla(name: str, endpoints: tuple[TunnelEndpoint, ...]) -> endpoint_pb2.ClusterLoadAssignment:
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    if endpoints:
        group = cla.endpoints.add()
        for ep in endpoints:
            lb = group.lb_endpoints.add()
            tunnel = host_port(ep.ip, HBONE_PORT)
            addr = lb.endpoint.address.envoy_internal_address
            addr.server_listener_name, addr.endpoint_id = CONNECT_LISTENER, tunnel
            meta = lb.metadata.filter_metadata
            meta[ODST_METADATA].CopyFrom(struct_pb2.Struct(fields={"local": struct_pb2.Value(string_value=tunnel)}))
            meta[TUNNEL_METADATA].CopyFrom(
                struct_pb2.Struct(fields={"identity": struct_pb2.Value(string_value=ep.identity)}))
    return cla


__all__ = [
    "CONNECT_LISTENER", "SERVICE_CLUSTER", "SOURCE_CLUSTER", "WAYPOINT_CLUSTER", "IpRoute", "TunnelEndpoint",
    "WaypointRoute", "build_connect_listener", "build_hop_cluster", "build_pod_outbound", "build_pods_listener",
    "build_scope_listener", "build_source_cluster", "build_tunnel_cla", "build_tunnel_service_cluster",
    "host_port", "service_cluster",
]
