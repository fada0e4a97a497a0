"""Envoy Cluster resources for sidecars, with DestinationRule traffic policy applied.

Pure functions, no I/O. `effective_policy` merges a DestinationRule for one port and subset
the way Istio does; the `build_*` functions are the cache's builders (module-level, their
arguments are exactly what they read).

Merge order (Istio): the top-level trafficPolicy; a portLevelSettings entry for the port
replaces it as a whole (port-level settings do not inherit destination-level ones); the
subset's trafficPolicy then overrides per sub-message (loadBalancer, connectionPool,
outlierDetection, tls), and a portLevelSettings entry of the subset again replaces all four.
How a cluster secures its connections (`UpstreamTls`) is decided by the planner from the
merged `tls` and the endpoints (see `controlplane.translate.security`).

`loadBalancer.simple: PASSTHROUGH` forwards to the original destination (an ORIGINAL_DST
cluster) for intercepting sidecars, as in Istio; in bind capture the original destination
is the sidecar's own loopback listener, so such clusters keep round robin over endpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import protocol_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

from controlplane.model.ir import (
    ClientTLS,
    ConnectionPool,
    DestinationRule,
    LoadBalancer,
    OutlierDetection,
    PortProtocol,
    RetryBudget,
    TrafficPolicy,
)
from controlplane.translate.locality import LocalityMode, locality_mode
from controlplane.translate.names import duration_ms, pack
from controlplane.translate.security import UpstreamTls, apply_upstream_tls

DEFAULT_CONNECT_TIMEOUT_MS = 10_000
MAX_U32 = 2**32 - 1
HTTP_OPTIONS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


@dataclass(frozen=True, slots=True)
class ClusterPolicy:
    """The traffic policy in force for one cluster after merging."""

    load_balancer: LoadBalancer | None = None
    connection_pool: ConnectionPool | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLS | None = None
    retry_budget: RetryBudget | None = None


def _layer(base: ClusterPolicy, tp: TrafficPolicy | None, port: int) -> ClusterPolicy:
    if tp is None:
        return base
    budget = tp.retry_budget or base.retry_budget  # (not per port)
    for pl in tp.port_level:
        if pl.port == port:
            return ClusterPolicy(pl.load_balancer, pl.connection_pool, pl.outlier_detection, pl.tls, budget)
    return ClusterPolicy(
        tp.load_balancer or base.load_balancer,
        tp.connection_pool or base.connection_pool,
        tp.outlier_detection or base.outlier_detection,
        tp.tls or base.tls,
        budget,
    )


def effective_policy(dr: DestinationRule | None, port: int, subset: str | None = None) -> ClusterPolicy:
    """The merged policy of `dr` for `port` and (optionally) one of its subsets."""
    if dr is None:
        return ClusterPolicy()
    policy = _layer(ClusterPolicy(), dr.traffic_policy, port)
    if subset is not None:
        for s in dr.subsets:
            if s.name == subset:
                policy = _layer(policy, s.traffic_policy, port)
                break
    return policy


def _circuit_breakers(c: cluster_pb2.Cluster, cp: ConnectionPool | None, budget: RetryBudget | None = None) -> None:
    # Like Istio: Envoy's defaults (1024) are far too low for a mesh, so unset limits are
    # effectively unlimited.
    t = c.circuit_breakers.thresholds.add()
    t.max_connections.value = MAX_U32 if cp is None or cp.max_connections is None else cp.max_connections
    t.max_pending_requests.value = (
        MAX_U32 if cp is None or cp.http1_max_pending_requests is None else cp.http1_max_pending_requests
    )
    t.max_requests.value = MAX_U32 if cp is None or cp.http2_max_requests is None else cp.http2_max_requests
    t.max_retries.value = MAX_U32 if cp is None or cp.max_retries is None else cp.max_retries
    t.track_remaining = True
    if budget is not None:  # (Envoy then ignores max_retries; unset values: Envoy's = Istio's defaults)
        t.retry_budget.SetInParent()
        if budget.percent is not None:
            t.retry_budget.budget_percent.value = budget.percent
        if budget.min_retry_concurrency is not None:
            t.retry_budget.min_retry_concurrency.value = budget.min_retry_concurrency


def _load_balancer(c: cluster_pb2.Cluster, lb: LoadBalancer | None) -> None:
    if lb is None:
        return
    ch = lb.consistent_hash
    if ch is not None:
        if ch.maglev:
            c.lb_policy = cluster_pb2.Cluster.MAGLEV
            if ch.maglev_table_size:
                c.maglev_lb_config.table_size.value = ch.maglev_table_size
        else:
            c.lb_policy = cluster_pb2.Cluster.RING_HASH
            if ch.minimum_ring_size:
                c.ring_hash_lb_config.minimum_ring_size.value = ch.minimum_ring_size
    elif lb.simple == "LEAST_REQUEST":
        c.lb_policy = cluster_pb2.Cluster.LEAST_REQUEST
    elif lb.simple == "RANDOM":
        c.lb_policy = cluster_pb2.Cluster.RANDOM
    # ROUND_ROBIN and UNSPECIFIED: Envoy's default, round robin. PASSTHROUGH is an
    # ORIGINAL_DST cluster where the original destination is known (intercept capture, see
    # build_original_dst_cluster); elsewhere (bind capture, tunnels) round robin as well.


def _protocol_options(c: cluster_pb2.Cluster, protocol: PortProtocol, cp: ConnectionPool | None,
                      od: OutlierDetection | None = None) -> None:
    h2 = protocol in (PortProtocol.HTTP2, PortProtocol.GRPC)
    sniffed = protocol is PortProtocol.UNKNOWN
    idle = cp.idle_timeout_ms if cp else None
    per_conn = cp.max_requests_per_connection if cp else None
    streams = cp.max_concurrent_streams if cp else None
    codes = od.http_error_codes if od else ()
    common = idle is not None or bool(per_conn) or bool(codes)
    if not (h2 or sniffed or (common and protocol.is_http)):
        return
    opts = http_protocol_options_pb2.HttpProtocolOptions()
    _error_codes(opts, codes)
    if idle is not None:
        opts.common_http_protocol_options.idle_timeout.CopyFrom(duration_ms(idle))
    if per_conn:
        opts.common_http_protocol_options.max_requests_per_connection.value = per_conn
    if h2:
        h2o = opts.explicit_http_config.http2_protocol_options
        h2o.SetInParent()
        if streams:
            h2o.max_concurrent_streams.value = streams
        _keepalive(h2o, cp)
    elif sniffed:
        # Speak upstream whatever the client spoke (HTTP/1.1 or h2c).
        down = opts.use_downstream_protocol_config
        down.http_protocol_options.SetInParent()
        down.http2_protocol_options.SetInParent()
        if streams:
            down.http2_protocol_options.max_concurrent_streams.value = streams
        _keepalive(down.http2_protocol_options, cp)
    else:
        opts.explicit_http_config.http_protocol_options.SetInParent()
    c.typed_extension_protocol_options[HTTP_OPTIONS_KEY].CopyFrom(pack(opts))


def _error_codes(opts: http_protocol_options_pb2.HttpProtocolOptions, codes: tuple[int, ...]) -> None:
    """DestinationRule `outlierDetection.outlierDetectionHttpErrorCodes`: only responses with
    one of these statuses count as errors for outlier detection (Envoy: a response matching
    `error_matcher` is an error, any other one is not)."""
    if not codes:
        return
    matcher = opts.outlier_detection.error_matcher
    # (Envoy's or_match needs two rules or more)
    for code in codes:
        one = matcher.or_match.rules.add() if len(codes) > 1 else matcher
        header = one.http_response_headers_match.headers.add(name=":status")
        header.string_match.exact = str(code)


def _keepalive(h2o: protocol_pb2.Http2ProtocolOptions, cp: ConnectionPool | None) -> None:
    """DestinationRule `connectionPool.http.http2KeepAlive`: PING frames on the HTTP/2
    connections to the upstream (HTTP/1.1 connections have no PINGs)."""
    if cp is None or cp.http2_keepalive is None:
        return
    interval, timeout = cp.http2_keepalive
    h2o.connection_keepalive.interval.CopyFrom(duration_ms(interval))
    h2o.connection_keepalive.timeout.CopyFrom(duration_ms(timeout))


def _outlier_detection(c: cluster_pb2.Cluster, od: OutlierDetection | None) -> None:
    if od is None:
        return
    o = c.outlier_detection
    o.SetInParent()
    if od.consecutive_5xx_errors is not None:
        o.consecutive_5xx.value = od.consecutive_5xx_errors
        o.enforcing_consecutive_5xx.value = 100 if od.consecutive_5xx_errors > 0 else 0
    if od.consecutive_gateway_errors is not None:
        o.consecutive_gateway_failure.value = od.consecutive_gateway_errors
        o.enforcing_consecutive_gateway_failure.value = 100 if od.consecutive_gateway_errors > 0 else 0
    if od.split_external_local_origin_errors:
        o.split_external_local_origin_errors = True
        if od.consecutive_local_origin_failures:
            o.consecutive_local_origin_failure.value = od.consecutive_local_origin_failures
            o.enforcing_consecutive_local_origin_failure.value = 100
        o.enforcing_local_origin_success_rate.value = 0  # like Istio
    if od.interval_ms is not None:
        o.interval.CopyFrom(duration_ms(od.interval_ms))
    if od.base_ejection_time_ms is not None:
        o.base_ejection_time.CopyFrom(duration_ms(od.base_ejection_time_ms))
    if od.max_ejection_percent:
        # Like Istio: 0 cannot be told from unset there, so it keeps Envoy's default (10%).
        o.max_ejection_percent.value = od.max_ejection_percent
    # Istio's API and tasks (locality failover, circuit breaking) are written for Envoy's rule
    # that the first ejection is always allowed whatever max_ejection_percent says; Envoy 1.28
    # made that an explicit switch (envoyproxy/envoy#27909, #34796) and on Envoy 1.40 without it
    # a service with fewer than 10 hosts never ejects any, so nothing fails over. Istio's
    # translation sets neither; Meshline sets the switch, so Istio's documented outcome holds.
    o.always_eject_one_host.value = True
    # Like Istio: success-rate ejection stays off.
    o.enforcing_success_rate.value = 0
    # Like Istio: outlier detection turns the panic threshold off unless minHealthPercent says
    # otherwise (with few pods per service, panic mode would send traffic to ejected hosts).
    c.common_lb_config.healthy_panic_threshold.value = float(od.min_health_percent or 0)


def build_outbound_cluster(
    name: str, protocol: PortProtocol, policy: ClusterPolicy, tls: UpstreamTls | None = None
) -> cluster_pb2.Cluster:
    """An EDS cluster (`service_name` = its own name, endpoints over ADS) for one service
    port or subset, with the merged DestinationRule policy applied and its connections
    secured as `tls` says (None: plaintext)."""
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS)
    c.eds_cluster_config.eds_config.ads.SetInParent()
    c.eds_cluster_config.service_name = name
    cp = policy.connection_pool
    timeout = (
        cp.connect_timeout_ms if cp is not None and cp.connect_timeout_ms else DEFAULT_CONNECT_TIMEOUT_MS
    )
    c.connect_timeout.CopyFrom(duration_ms(timeout))
    _load_balancer(c, policy.load_balancer)
    _circuit_breakers(c, cp, policy.retry_budget)
    _protocol_options(c, protocol, cp, policy.outlier_detection)
    _outlier_detection(c, policy.outlier_detection)
    lb = policy.load_balancer
    if cluster_locality_mode(policy) is not None and (lb is None or lb.consistent_hash is None):
        # Like Istio: the locality groups' weights (group sizes, or distribute's) count.
        c.common_lb_config.locality_weighted_lb_config.SetInParent()
    apply_upstream_tls(c, tls)
    return c


def cluster_locality_mode(policy: ClusterPolicy) -> LocalityMode | None:
    """How the cluster's endpoints are grouped by locality (see controlplane.translate.locality)."""
    lb = policy.load_balancer
    return locality_mode(lb.locality_lb if lb is not None else None, policy.outlier_detection is not None)


def build_original_dst_cluster(
    name: str, protocol: PortProtocol, policy: ClusterPolicy, tls: UpstreamTls | None = None
) -> cluster_pb2.Cluster:
    """DestinationRule `loadBalancer.simple: PASSTHROUGH` (Istio): no load balancing, each
    connection goes to the address the client asked for (the captured original
    destination), with the rest of the policy (limits, outlier detection, TLS) applied. Such a
    cluster has no endpoints of its own (no EDS)."""
    c = cluster_pb2.Cluster(
        name=name, type=cluster_pb2.Cluster.ORIGINAL_DST, lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED
    )
    cp = policy.connection_pool
    timeout = (
        cp.connect_timeout_ms if cp is not None and cp.connect_timeout_ms else DEFAULT_CONNECT_TIMEOUT_MS
    )
    c.connect_timeout.CopyFrom(duration_ms(timeout))
    _circuit_breakers(c, cp, policy.retry_budget)
    _protocol_options(c, protocol, cp, policy.outlier_detection)
    _outlier_detection(c, policy.outlier_detection)
    apply_upstream_tls(c, tls)
    return c


def is_passthrough(policy: ClusterPolicy) -> bool:
    lb = policy.load_balancer
    return lb is not None and lb.consistent_hash is None and lb.simple == "PASSTHROUGH"


def apply_connection_policy(c: cluster_pb2.Cluster, policy: ClusterPolicy) -> None:
    """The DestinationRule settings that hold for any cluster, TCP tunnels included: load
    balancer, connection limits, outlier detection and the connect timeout."""
    cp = policy.connection_pool
    if cp is not None and cp.connect_timeout_ms:
        c.connect_timeout.CopyFrom(duration_ms(cp.connect_timeout_ms))
    _load_balancer(c, policy.load_balancer)
    _circuit_breakers(c, cp, policy.retry_budget)
    _outlier_detection(c, policy.outlier_detection)


def build_passthrough_cluster(name: str) -> cluster_pb2.Cluster:
    """An ORIGINAL_DST cluster: connects to wherever the captured connection was going."""
    c = cluster_pb2.Cluster(
        name=name, type=cluster_pb2.Cluster.ORIGINAL_DST, lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED
    )
    c.connect_timeout.CopyFrom(duration_ms(DEFAULT_CONNECT_TIMEOUT_MS))
    _circuit_breakers(c, None)
    return c


def build_blackhole_cluster(name: str) -> cluster_pb2.Cluster:
    """A cluster without endpoints: connections sent there are closed."""
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.STATIC)
    c.connect_timeout.CopyFrom(duration_ms(DEFAULT_CONNECT_TIMEOUT_MS))
    c.load_assignment.cluster_name = name
    return c


def build_inbound_cluster(name: str, address: str, port: int, protocol: PortProtocol) -> cluster_pb2.Cluster:
    """A STATIC cluster delivering inbound traffic to the application at address:port."""
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.STATIC)
    c.connect_timeout.CopyFrom(duration_ms(DEFAULT_CONNECT_TIMEOUT_MS))
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    sa = cla.endpoints.add().lb_endpoints.add().endpoint.address.socket_address
    sa.address = address
    sa.port_value = port
    c.load_assignment.CopyFrom(cla)
    _circuit_breakers(c, None)
    _protocol_options(c, protocol, None)
    return c
