"""DestinationRule spec -> IR `DestinationRule`. Pure, no I/O.

The spec follows Istio's public v1 schema: host, trafficPolicy (loadBalancer,
connectionPool, outlierDetection, tls, portLevelSettings), subsets, exportTo and
workloadSelector (the rule then applies only to matching client workloads of its own
namespace; see `Mesh.destination_rule`). Unknown
fields are errors naming their path; Istio fields Meshline accepts but does not implement
(warmup, keepalives, ...) are warnings. localityLbSetting and the TLS files and
credentialName of MUTUAL/SIMPLE are translated (see `controlplane.translate.locality` and
`controlplane.translate.security`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from controlplane.model.convert_base import (
    INT32_MAX,
    Ctx,
    check_fields,
    child,
    get_bool,
    get_duration,
    get_export_to,
    get_int,
    get_labels,
    get_list,
    get_str,
    get_str_list,
    host_problem,
    index,
    is_dns_label,
    item_map,
    join,
    resolve_host,
)
from controlplane.model.convert_http import port_selector
from controlplane.model.ir import (
    ClientTLS,
    ConnectionPool,
    ConsistentHash,
    DestinationRule,
    Labels,
    LbSimple,
    LoadBalancer,
    LocalityLbSetting,
    OutlierDetection,
    PortTrafficPolicy,
    RetryBudget,
    Subset,
    TLSMode,
    TrafficPolicy,
)

_SPEC_FIELDS = ("host", "trafficPolicy", "subsets", "exportTo", "workloadSelector")
_POLICY_FIELDS = ("loadBalancer", "connectionPool", "outlierDetection", "tls", "portLevelSettings", "retryBudget")
_POLICY_IGNORED = {
    "tunnel": "tunnel settings are not supported; ignored",
    "proxyProtocol": "proxyProtocol is not supported; ignored",
}
_PORT_FIELDS = ("port", "loadBalancer", "connectionPool", "outlierDetection", "tls")
_LB_SIMPLE: Mapping[str, LbSimple] = {
    "ROUND_ROBIN": "ROUND_ROBIN",
    "LEAST_REQUEST": "LEAST_REQUEST",
    "LEAST_CONN": "LEAST_REQUEST",  # deprecated Istio alias
    "RANDOM": "RANDOM",
    "PASSTHROUGH": "PASSTHROUGH",
    "UNSPECIFIED": "UNSPECIFIED",
}
_TLS_MODES: tuple[TLSMode, ...] = ("DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL")
_TLS_MODE_BY_NAME: Mapping[str, TLSMode] = {m: m for m in _TLS_MODES}
_TLS_FIELDS = (
    "mode", "sni", "subjectAltNames", "clientCertificate", "privateKey", "caCertificates", "credentialName",
    "caCrl", "insecureSkipVerify",
)
_TLS_FILES = ("clientCertificate", "privateKey", "caCertificates", "caCrl")
MAX_RING_SIZE = 8_388_608  # Envoy's limit for ring_hash minimum_ring_size
MAX_MAGLEV_TABLE_SIZE = 5_000_011  # Envoy's limit for maglev table_size


def convert_destination_rule(ctx: Ctx, namespace: str, name: str) -> DestinationRule | None:
    spec = child(ctx, ctx.raw.body, "spec", "")
    if spec is None:
        if ctx.raw.body.get("spec") is None:
            ctx.error("spec", "is required")
        return None
    check_fields(ctx, spec, "spec", _SPEC_FIELDS)
    host_text = get_str(ctx, spec, "host", "spec", required=True)
    wildcard = host_text is not None and "*" in host_text
    if wildcard:
        ctx.warn(
            "spec.host", f"wildcard host {host_text!r} is not supported yet; this DestinationRule is ignored"
        )
    elif host_text is not None and (problem := host_problem(host_text)) is not None:
        ctx.error("spec.host", problem)
    policy = traffic_policy(ctx, spec, "spec")
    subsets = _subsets(ctx, spec)
    export_to = get_export_to(ctx, spec, "spec")
    selector = _workload_selector(ctx, spec)
    if host_text is None or wildcard:
        return None
    dr = DestinationRule(
        ref=ctx.raw.ref,
        namespace=namespace,
        name=name,
        host=resolve_host(host_text, namespace),
        traffic_policy=policy,
        subsets=subsets,
        export_to=export_to,
        workload_selector=selector,
    )
    failover_needs_outlier_detection(ctx, dr)
    return dr


def _workload_selector(ctx: Ctx, spec: Mapping[str, Any]) -> Labels:
    """`workloadSelector.matchLabels` (Istio: the rule applies only to the client workloads of
    its namespace that carry these labels)."""
    sel = child(ctx, spec, "workloadSelector", "spec")
    if sel is None:
        return ()
    check_fields(ctx, sel, "spec.workloadSelector", ("matchLabels",))
    labels = get_labels(ctx, sel, "matchLabels", "spec.workloadSelector")
    if not labels and not ctx.failed:
        ctx.warn("spec.workloadSelector", "selects no labels: this rule applies to every client, as without it")
    return labels


def _subsets(ctx: Ctx, spec: Mapping[str, Any]) -> tuple[Subset, ...]:
    out: list[Subset] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(get_list(ctx, spec, "subsets", "spec")):
        p = index("spec.subsets", i)
        m = item_map(ctx, item, p)
        if m is None:
            continue
        check_fields(ctx, m, p, ("name", "labels", "trafficPolicy"))
        name = get_str(ctx, m, "name", p, required=True)
        labels = get_labels(ctx, m, "labels", p)
        policy = traffic_policy(ctx, m, p)
        if name is None:
            continue
        if not is_dns_label(name):
            ctx.error(
                join(p, "name"), f"{name!r} is not a valid subset name (lower-case letters, digits and '-')"
            )
            continue
        if name in seen:
            ctx.error(join(p, "name"), f"duplicate subset name {name!r} (also spec.subsets[{seen[name]}])")
            continue
        seen[name] = i
        out.append(Subset(name, labels, policy))
    return tuple(out)


# --------------------------------------------------------------------------- traffic policy


def traffic_policy(ctx: Ctx, m: Mapping[str, Any], path: str) -> TrafficPolicy | None:
    p = join(path, "trafficPolicy")
    tm = child(ctx, m, "trafficPolicy", path)
    if tm is None:
        return None
    check_fields(ctx, tm, p, _POLICY_FIELDS, _POLICY_IGNORED)
    port_level: list[PortTrafficPolicy] = []
    seen: dict[int, int] = {}
    for i, item in enumerate(get_list(ctx, tm, "portLevelSettings", p)):
        pp = index(join(p, "portLevelSettings"), i)
        pm = item_map(ctx, item, pp)
        if pm is None:
            continue
        check_fields(ctx, pm, pp, _PORT_FIELDS)
        number = port_selector(ctx, pm, pp)
        if pm.get("port") is None:
            ctx.error(join(pp, "port"), "is required")
        settings = PortTrafficPolicy(
            port=number or 0,
            load_balancer=load_balancer(ctx, pm, pp),
            connection_pool=connection_pool(ctx, pm, pp),
            outlier_detection=outlier_detection(ctx, pm, pp),
            tls=client_tls(ctx, pm, pp),
        )
        if number is None:
            continue
        if number in seen:
            ctx.error(join(pp, "port"), f"duplicate port {number} (also portLevelSettings[{seen[number]}])")
            continue
        seen[number] = i
        port_level.append(settings)
    return TrafficPolicy(
        load_balancer=load_balancer(ctx, tm, p),
        connection_pool=connection_pool(ctx, tm, p),
        outlier_detection=outlier_detection(ctx, tm, p),
        tls=client_tls(ctx, tm, p),
        port_level=tuple(sorted(port_level, key=lambda s: s.port)),
        retry_budget=_retry_budget(ctx, tm, p),
    )


def _retry_budget(ctx: Ctx, m: Mapping[str, Any], path: str) -> RetryBudget | None:
    """`retryBudget` -> Envoy's circuit breaker `retry_budget` (which replaces the maxRetries
    limit, as in Istio). Envoy has no budget interval: `budgetInterval` is warned."""
    p = join(path, "retryBudget")
    rm = child(ctx, m, "retryBudget", path)
    if rm is None:
        return None
    check_fields(ctx, rm, p, ("percent", "minRetryConcurrency"), {
        "budgetInterval": "budgetInterval is not supported (Envoy's retry budget counts only the active and "
                          "pending requests); ignored"})
    percent = rm.get("percent")
    if percent is not None and (isinstance(percent, bool) or not isinstance(percent, int | float)
                                or not 0 <= percent <= 100):
        ctx.error(join(p, "percent"), f"must be a number between 0 and 100, got {percent!r}")
        percent = None
    return RetryBudget(None if percent is None else float(percent),
                       get_int(ctx, rm, "minRetryConcurrency", p, lo=0, hi=2**32 - 1))


def load_balancer(ctx: Ctx, m: Mapping[str, Any], path: str) -> LoadBalancer | None:
    p = join(path, "loadBalancer")
    lm = child(ctx, m, "loadBalancer", path)
    if lm is None:
        return None
    check_fields(
        ctx,
        lm,
        p,
        ("simple", "consistentHash", "localityLbSetting"),
        {
            "warmupDurationSecs": "warmupDurationSecs is not supported yet; ignored",
            "warmup": "warmup is not supported yet; ignored",
            "zoneAwareLbSetting": "zoneAwareLbSetting is not supported yet; ignored (Envoy's zone-aware routing "
                                  "is off; localityLbSetting is supported)",
        },
    )
    simple_text = get_str(ctx, lm, "simple", p)
    simple: LbSimple | None = None
    if simple_text is not None:
        simple = _LB_SIMPLE.get(simple_text)
        if simple is None:
            ctx.error(
                join(p, "simple"), f"unknown value {simple_text!r} (expected one of {', '.join(_LB_SIMPLE)})"
            )
    ch = consistent_hash(ctx, lm, p)
    if simple_text is not None and lm.get("consistentHash") is not None:
        ctx.error(p, "set simple or consistentHash, not both")
    return LoadBalancer(simple, ch, locality_lb_setting(ctx, lm, p))


def _locality_problem(text: str, wildcard: bool) -> str | None:
    """Why `text` is not a `region/zone/subzone` locality (`*` only as a whole last segment
    when `wildcard`), or None."""
    parts = text.split("/")
    if not text or len(parts) > 3 or any(not part for part in parts):
        return f"{text!r} is not a locality (region, region/zone or region/zone/subzone)"
    for i, part in enumerate(parts):
        if "*" in part and (not wildcard or part != "*" or i != len(parts) - 1):
            return f"{text!r}: '*' may only stand alone as the last segment"
    return None


def locality_lb_setting(ctx: Ctx, m: Mapping[str, Any], path: str) -> LocalityLbSetting | None:
    """`localityLbSetting` (Istio's LocalityLoadBalancerSetting): distribute, failover,
    failoverPriority and enabled. Locality failover acts only with outlier detection (see
    `failover_needs_outlier_detection`)."""
    p = join(path, "localityLbSetting")
    sm = child(ctx, m, "localityLbSetting", path)
    if sm is None:
        return None
    check_fields(ctx, sm, p, ("distribute", "failover", "failoverPriority", "enabled"))
    enabled = get_bool(ctx, sm, "enabled", p)
    distribute: list[tuple[str, tuple[tuple[str, int], ...]]] = []
    for i, item in enumerate(get_list(ctx, sm, "distribute", p)):
        dp = index(join(p, "distribute"), i)
        dm = item_map(ctx, item, dp)
        if dm is None:
            continue
        check_fields(ctx, dm, dp, ("from", "to"))
        src = get_str(ctx, dm, "from", dp) or ""
        if src and (problem := _locality_problem(src, True)) is not None:
            ctx.error(join(dp, "from"), problem)
        to = child(ctx, dm, "to", dp)
        weights: list[tuple[str, int]] = []
        if to is None:
            ctx.error(join(dp, "to"), "is required (weights adding up to 100)")
        else:
            for loc in to:
                tp = join(join(dp, "to"), str(loc))
                if (problem := _locality_problem(str(loc), True)) is not None:
                    ctx.error(tp, problem)
                weight = get_int(ctx, to, loc, join(dp, "to"), lo=1, hi=100)
                if weight is not None:
                    weights.append((str(loc), weight))
            if weights and sum(w for _, w in weights) != 100:
                ctx.error(join(dp, "to"), f"weights must add up to 100, got {sum(w for _, w in weights)}")
        distribute.append((src, tuple(weights)))
    failover: list[tuple[str, str]] = []
    for i, item in enumerate(get_list(ctx, sm, "failover", p)):
        fp = index(join(p, "failover"), i)
        fm = item_map(ctx, item, fp)
        if fm is None:
            continue
        check_fields(ctx, fm, fp, ("from", "to"))
        src = get_str(ctx, fm, "from", fp) or ""
        dst = get_str(ctx, fm, "to", fp) or ""
        for key, value in (("from", src), ("to", dst)):
            if "/" in value or "*" in value:
                ctx.error(join(fp, key), f"{value!r}: failover is between regions (a region name, no '/' or '*')")
        if src == dst:
            ctx.error(fp, f"from and to must be different regions, both are {src!r}")
        failover.append((src, dst))
    priority = get_str_list(ctx, sm, "failoverPriority", p)
    for i, label in enumerate(priority):
        key = label.split("=", 1)[0]
        if not key:
            ctx.error(index(join(p, "failoverPriority"), i), f"{label!r} is not a label name (or name=value)")
    if distribute and (failover or priority):
        ctx.error(p, "set distribute or failover/failoverPriority, not both")
    return LocalityLbSetting(enabled, tuple(distribute), tuple(failover), priority)


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    f = 2
    while f * f <= n:
        if n % f == 0:
            return False
        f += 1
    return True


def consistent_hash(ctx: Ctx, m: Mapping[str, Any], path: str) -> ConsistentHash | None:
    p = join(path, "consistentHash")
    cm = child(ctx, m, "consistentHash", path)
    if cm is None:
        return None
    check_fields(
        ctx,
        cm,
        p,
        (
            "httpHeaderName",
            "httpCookie",
            "useSourceIp",
            "httpQueryParameterName",
            "ringHash",
            "maglev",
            "minimumRingSize",
        ),
    )
    header = get_str(ctx, cm, "httpHeaderName", p)
    query = get_str(ctx, cm, "httpQueryParameterName", p)
    source_ip = bool(get_bool(ctx, cm, "useSourceIp", p))
    cookie_name = cookie_path = None
    cookie_ttl: int | None = None
    cp = join(p, "httpCookie")
    cookie = child(ctx, cm, "httpCookie", p)
    if cookie is not None:
        check_fields(
            ctx,
            cookie,
            cp,
            ("name", "path", "ttl"),
            {"attributes": "cookie attributes are not supported; ignored"},
        )
        cookie_name = get_str(ctx, cookie, "name", cp, required=True)
        cookie_path = get_str(ctx, cookie, "path", cp)
        cookie_ttl = get_duration(ctx, cookie, "ttl", cp)
    keys = [k for k in ("httpHeaderName", "httpCookie", "httpQueryParameterName") if cm.get(k) is not None]
    if source_ip:
        keys.append("useSourceIp")
    if not keys:
        ctx.error(p, "one of httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName is required")
    elif len(keys) > 1:
        ctx.error(p, f"set only one hash key, got {', '.join(keys)}")
    ring_size = get_int(ctx, cm, "minimumRingSize", p, lo=1, hi=MAX_RING_SIZE)
    rp = join(p, "ringHash")
    ring = child(ctx, cm, "ringHash", p)
    if ring is not None:
        check_fields(ctx, ring, rp, ("minimumRingSize",))
        if cm.get("minimumRingSize") is not None:
            ctx.error(join(p, "minimumRingSize"), "set ringHash.minimumRingSize or minimumRingSize, not both")
        ring_size = get_int(ctx, ring, "minimumRingSize", rp, lo=1, hi=MAX_RING_SIZE)
    mp = join(p, "maglev")
    maglev = child(ctx, cm, "maglev", p)
    table_size: int | None = None
    if maglev is not None:
        check_fields(ctx, maglev, mp, ("tableSize",))
        if ring is not None or cm.get("minimumRingSize") is not None:
            ctx.error(mp, "set ringHash (or minimumRingSize) or maglev, not both")
        table_size = get_int(ctx, maglev, "tableSize", mp, lo=1, hi=MAX_MAGLEV_TABLE_SIZE)
        if table_size is not None and not _is_prime(table_size):
            ctx.error(join(mp, "tableSize"), f"must be a prime number (Envoy requires it), got {table_size}")
            table_size = None
    return ConsistentHash(
        http_header_name=header,
        http_cookie_name=cookie_name,
        http_cookie_path=cookie_path,
        http_cookie_ttl_ms=cookie_ttl,
        use_source_ip=source_ip,
        http_query_parameter_name=query,
        minimum_ring_size=ring_size,
        maglev="maglev" in cm and cm["maglev"] is not None,
        maglev_table_size=table_size,
    )


def connection_pool(ctx: Ctx, m: Mapping[str, Any], path: str) -> ConnectionPool | None:
    p = join(path, "connectionPool")
    cm = child(ctx, m, "connectionPool", path)
    if cm is None:
        return None
    check_fields(ctx, cm, p, ("tcp", "http"))
    tp = join(p, "tcp")
    tcp = child(ctx, cm, "tcp", p) or {}
    check_fields(
        ctx,
        tcp,
        tp,
        ("maxConnections", "connectTimeout"),
        {
            "tcpKeepalive": "tcpKeepalive is not supported yet; ignored",
            "maxConnectionDuration": "maxConnectionDuration is not supported yet; ignored",
            "idleTimeout": "tcp idleTimeout is not supported yet; ignored (http.idleTimeout is)",
        },
    )
    hp = join(p, "http")
    http = child(ctx, cm, "http", p) or {}
    check_fields(
        ctx,
        http,
        hp,
        (
            "http1MaxPendingRequests",
            "http2MaxRequests",
            "maxRequestsPerConnection",
            "maxRetries",
            "idleTimeout",
            "maxConcurrentStreams",
            "http2KeepAlive",
        ),
        {
            "h2UpgradePolicy": "h2UpgradePolicy is not supported yet; ignored",
            "useClientProtocol": "useClientProtocol is not supported yet; ignored",
        },
    )

    def count(mm: Mapping[str, Any], key: str, pp: str) -> int | None:
        return get_int(ctx, mm, key, pp, lo=0, hi=INT32_MAX)

    return ConnectionPool(
        max_connections=count(tcp, "maxConnections", tp),
        connect_timeout_ms=get_duration(ctx, tcp, "connectTimeout", tp, min_ms=1),
        http1_max_pending_requests=count(http, "http1MaxPendingRequests", hp),
        http2_max_requests=count(http, "http2MaxRequests", hp),
        max_requests_per_connection=count(http, "maxRequestsPerConnection", hp),
        max_retries=count(http, "maxRetries", hp),
        idle_timeout_ms=get_duration(ctx, http, "idleTimeout", hp),
        max_concurrent_streams=count(http, "maxConcurrentStreams", hp),
        http2_keepalive=_http2_keepalive(ctx, http, hp),
    )


def _http2_keepalive(ctx: Ctx, m: Mapping[str, Any], path: str) -> tuple[int, int] | None:
    """`http2KeepAlive` (Istio: interval and timeout both required): HTTP/2 PING frames on
    upstream HTTP/2 connections, Envoy's `http2_protocol_options.connection_keepalive`."""
    p = join(path, "http2KeepAlive")
    km = child(ctx, m, "http2KeepAlive", path)
    if km is None:
        return None
    check_fields(ctx, km, p, ("interval", "timeout"))
    values = [get_duration(ctx, km, k, p, min_ms=1) for k in ("interval", "timeout")]
    for k, v in zip(("interval", "timeout"), values, strict=True):
        if v is None and km.get(k) is None:
            ctx.error(join(p, k), "is required when http2KeepAlive is set (as in Istio)")
    interval, timeout = values
    return None if interval is None or timeout is None else (interval, timeout)


def outlier_detection(ctx: Ctx, m: Mapping[str, Any], path: str) -> OutlierDetection | None:
    p = join(path, "outlierDetection")
    om = child(ctx, m, "outlierDetection", path)
    if om is None:
        return None
    check_fields(
        ctx,
        om,
        p,
        (
            "consecutive5xxErrors",
            "consecutiveGatewayErrors",
            "consecutiveLocalOriginFailures",
            "splitExternalLocalOriginErrors",
            "interval",
            "baseEjectionTime",
            "maxEjectionPercent",
            "minHealthPercent",
            "outlierDetectionHttpErrorCodes",
        ),
        {"consecutiveErrors": "consecutiveErrors is deprecated and ignored; use consecutive5xxErrors"},
    )
    return OutlierDetection(
        consecutive_5xx_errors=get_int(ctx, om, "consecutive5xxErrors", p, lo=0, hi=INT32_MAX),
        consecutive_gateway_errors=get_int(ctx, om, "consecutiveGatewayErrors", p, lo=0, hi=INT32_MAX),
        consecutive_local_origin_failures=get_int(
            ctx, om, "consecutiveLocalOriginFailures", p, lo=0, hi=INT32_MAX
        ),
        split_external_local_origin_errors=bool(get_bool(ctx, om, "splitExternalLocalOriginErrors", p)),
        interval_ms=get_duration(ctx, om, "interval", p, min_ms=1),
        base_ejection_time_ms=get_duration(ctx, om, "baseEjectionTime", p, min_ms=1),
        max_ejection_percent=get_int(ctx, om, "maxEjectionPercent", p, lo=0, hi=100),
        min_health_percent=get_int(ctx, om, "minHealthPercent", p, lo=0, hi=100),
        http_error_codes=_http_error_codes(ctx, om, p),
    )


def _http_error_codes(ctx: Ctx, m: Mapping[str, Any], path: str) -> tuple[int, ...]:
    """`outlierDetectionHttpErrorCodes` (Istio 1.31): only responses with these statuses count
    as errors toward consecutive5xxErrors/consecutiveGatewayErrors (Envoy's HTTP protocol
    option `outlier_detection.error_matcher` on the response's :status)."""
    p = join(path, "outlierDetectionHttpErrorCodes")
    out: list[int] = []
    for i, v in enumerate(get_list(ctx, m, "outlierDetectionHttpErrorCodes", path)):
        if isinstance(v, bool) or not isinstance(v, int) or not 100 <= v <= 599:
            ctx.error(index(p, i), f"must be an HTTP status code between 100 and 599, got {v!r}")
        elif v not in out:
            out.append(v)
    return tuple(out)


def client_tls(ctx: Ctx, m: Mapping[str, Any], path: str) -> ClientTLS | None:
    p = join(path, "tls")
    tm = child(ctx, m, "tls", path)
    if tm is None:
        return None
    check_fields(ctx, tm, p, _TLS_FIELDS)
    mode_text = get_str(ctx, tm, "mode", p) or "DISABLE"
    mode = _TLS_MODE_BY_NAME.get(mode_text, "DISABLE")
    if mode_text not in _TLS_MODE_BY_NAME:
        ctx.error(
            join(p, "mode"), f"unknown TLS mode {mode_text!r} (expected one of {', '.join(_TLS_MODES)})"
        )
    files = {k: get_str(ctx, tm, k, p) for k in _TLS_FILES}
    for k, value in files.items():
        if value is not None and not value.startswith("/"):
            ctx.error(join(p, k), f"must be an absolute path of a file on the proxy's host, got {value!r}")
    credential = get_str(ctx, tm, "credentialName", p)
    if credential is not None and not is_dns_subdomain(credential):
        ctx.error(join(p, "credentialName"), f"{credential!r} is not a Secret name")
    skip = bool(get_bool(ctx, tm, "insecureSkipVerify", p))
    if mode in ("DISABLE", "ISTIO_MUTUAL"):
        for k in (*_TLS_FILES, "credentialName", "insecureSkipVerify"):
            if tm.get(k) is not None:
                ctx.warn(join(p, k), f"has no effect with mode {mode} (ignored, as in Istio)")
    elif credential is not None:
        for k in ("clientCertificate", "privateKey", "caCertificates"):
            if files[k] is not None:
                ctx.error(join(p, k), "set credentialName or certificate files, not both (as in Istio)")
    elif mode == "MUTUAL":
        for k, what in (("clientCertificate", "client certificate"), ("privateKey", "private key")):
            if files[k] is None:
                ctx.error(join(p, k), f"is required for MUTUAL (the {what} file), unless credentialName is set")
    elif mode == "SIMPLE":
        for k in ("clientCertificate", "privateKey"):
            if files[k] is not None:
                ctx.warn(join(p, k), "has no effect with mode SIMPLE (no client certificate is sent)")
    if skip and mode in ("SIMPLE", "MUTUAL") and (tm.get("caCertificates") or tm.get("subjectAltNames")):
        ctx.warn(join(p, "insecureSkipVerify"), "the server certificate is not verified: caCertificates and "
                 "subjectAltNames are ignored")
    return ClientTLS(
        mode, get_str(ctx, tm, "sni", p), get_str_list(ctx, tm, "subjectAltNames", p),
        client_certificate=files["clientCertificate"], private_key=files["privateKey"],
        ca_certificates=files["caCertificates"], ca_crl=files["caCrl"], credential_name=credential,
        insecure_skip_verify=skip,
    )


def is_dns_subdomain(name: str) -> bool:
    """A Kubernetes object name (RFC 1123 subdomain)."""
    return 0 < len(name) <= 253 and all(is_dns_label(part) for part in name.split("."))


def failover_needs_outlier_detection(ctx: Ctx, dr: DestinationRule) -> None:
    """Istio fails over by locality only where outlier detection is on (without it Envoy never
    sees an endpoint as unhealthy and never leaves the first priority); a warning names each
    localityLbSetting that asks for failover where no outlierDetection applies."""
    top = dr.traffic_policy

    def check(tp: TrafficPolicy | None, path: str, inherited: OutlierDetection | None) -> None:
        if tp is None:
            return
        od = tp.outlier_detection or inherited
        lb = tp.load_balancer
        _warn_failover(ctx, lb, od, join(path, "trafficPolicy.loadBalancer.localityLbSetting"))
        for i, pl in enumerate(tp.port_level):
            pp = join(path, f"trafficPolicy.portLevelSettings[{i}].loadBalancer.localityLbSetting")
            _warn_failover(ctx, pl.load_balancer, pl.outlier_detection, pp)

    check(top, "spec", None)
    for i, s in enumerate(dr.subsets):
        check(s.traffic_policy, f"spec.subsets[{i}]", top.outlier_detection if top else None)


def _warn_failover(ctx: Ctx, lb: LoadBalancer | None, od: OutlierDetection | None, path: str) -> None:
    setting = lb.locality_lb if lb is not None else None
    if setting is None or od is not None or setting.enabled is False:
        return
    for name, value in (("failover", setting.failover), ("failoverPriority", setting.failover_priority)):
        if value:
            ctx.warn(join(path, name), "locality failover needs outlierDetection (as in Istio): without it "
                     "endpoints get no priorities and traffic is not kept local; add outlierDetection")
