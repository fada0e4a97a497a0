"""Envoy bootstrap generation for `meshline bootstrap`. Pure: settings in, YAML text out.

Identity: with a `token_file`, Envoy's xDS client is gRPC's own (`google_grpc`) with the
`file_based_metadata` call credentials: Envoy reads the file at *every* stream it opens and
sends `authorization: Bearer <token>`. So a token the kubelet rotates on disk (a projected
service-account token), or that `meshline serve --ca-dir` renews, keeps the proxy
authenticated across reconnects and control-plane restarts, with no Envoy restart; when
the control plane ends a stream whose token expired, the reconnect carries the new one.
(Inline `initial_metadata` would freeze the token read at start; gRPC sends call credentials
only over TLS, so a plaintext loopback connection — the local demo — still carries the token
inline, read when the bootstrap is made.) With `xds_tls` the
channel is TLS (the control plane's 15012), verifying the server certificate against the
trust bundle (a file, so a rotated bundle is read by new channels) and DNS name. A token is
never sent in clear beyond loopback: `render` refuses that combination.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import yaml

from controlplane.model.ir import CaptureMode, Labels, ProxyMode
from controlplane.netaddr import is_ip, is_loopback


@dataclass(frozen=True, slots=True)
class XdsTls:
    trusted_ca: str  # PEM bundle the control plane's serving certificate must chain to
    server_name: str = ""  # SNI and required DNS SAN; "" = the xDS host (or localhost for an IP)
    trusted_ca_file: str | None = None  # with a token file: Envoy reads the bundle from here


@dataclass(frozen=True, slots=True)
class BootstrapOptions:
    node_id: str
    namespace: str
    mode: ProxyMode = "sidecar"
    workload: str | None = None
    service_account: str = "default"
    labels: Labels = ()
    capture: CaptureMode = "bind"
    xds_protocol: str = "delta"
    xds_address: str = "127.0.0.1:15010"
    admin_address: str = "127.0.0.1:15000"
    cluster: str = "meshline"
    token: str | None = None  # bearer token sent inline on the xDS stream (tests of the legacy form)
    token_file: str | None = None  # file Envoy reads the bearer token from at every xDS stream
    xds_tls: XdsTls | None = None
    outbound_address: str = "127.0.0.1"  # bind capture: loopback address of the outbound listeners
    node_name: str | None = None  # node proxies: the node served
    waypoint: str | None = None  # waypoints: the waypoint's name
    gateway: str | None = None  # gateways: the Gateway served (NAME or NS/NAME)


def split_address(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit() or any(c.isspace() for c in host):
        raise ValueError(f"address must be HOST:PORT, got {addr!r}")
    if not 0 < int(port) < 65536:
        raise ValueError(f"port must be 1-65535, got {addr!r}")
    return host.strip("[]"), int(port)


def bootstrap(opts: BootstrapOptions) -> dict[str, Any]:
    xds_host, xds_port = split_address(opts.xds_address)
    admin_host, admin_port = split_address(opts.admin_address)
    metadata: dict[str, Any] = {
        "mode": opts.mode,
        "namespace": opts.namespace,
        "service_account": opts.service_account,
        "capture": opts.capture,
        **({"outbound_address": opts.outbound_address} if opts.outbound_address != "127.0.0.1" else {}),
        "labels": dict(opts.labels),
    }
    if opts.workload:
        metadata["workload"] = opts.workload
    if opts.node_name:
        metadata["node"] = opts.node_name
    if opts.waypoint:
        metadata["waypoint"] = opts.waypoint
    if opts.gateway:
        metadata["gateway"] = opts.gateway
    api_type = "DELTA_GRPC" if opts.xds_protocol == "delta" else "GRPC"
    if (opts.token or opts.token_file) and opts.xds_tls is None and not is_loopback(xds_host):
        raise ValueError(f"a token must not cross the network in clear: {opts.xds_address} is not loopback, "
                         "so connect over TLS (--xds-tls, the control plane's port 15012)")
    grpc_service: dict[str, Any] = {"envoy_grpc": {"cluster_name": "xds-grpc"}}
    if opts.token_file and opts.xds_tls is None:
        # gRPC sends call credentials only over a secure channel: plaintext (loopback only,
        # the local demo) carries the token inline, as read now.
        opts = replace(opts, token=_read_token(opts.token_file), token_file=None)
    if opts.token_file:
        grpc_service = _google_grpc(opts, xds_host)
    elif opts.token:
        grpc_service["initial_metadata"] = [{"key": "authorization", "value": f"Bearer {opts.token}"}]
    doc: dict[str, Any] = {
        "node": {"id": opts.node_id, "cluster": opts.cluster, "metadata": metadata},
        "admin": {"address": {"socket_address": {"address": admin_host, "port_value": admin_port}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": api_type,
                "transport_api_version": "V3",
                "grpc_services": [grpc_service],
                "set_node_on_first_message_only": True,
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {
            "clusters": [
                {
                    "name": "xds-grpc",
                    "type": "STATIC" if is_ip(xds_host) else "STRICT_DNS",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                    "load_assignment": {
                        "cluster_name": "xds-grpc",
                        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                            "address": xds_host, "port_value": xds_port}}}}]}],
                    },
                }
            ],
        },
    }
    if opts.token_file:
        doc["static_resources"]["clusters"] = []  # the google_grpc client dials the target itself
    elif opts.xds_tls is not None:
        server_name = opts.xds_tls.server_name or ("localhost" if is_ip(xds_host) else xds_host)
        doc["static_resources"]["clusters"][0]["transport_socket"] = _xds_tls(opts.xds_tls.trusted_ca, server_name)
    if opts.capture == "intercept" or opts.mode != "sidecar":
        doc["static_resources"]["listeners"] = [_health_listener(), _stats_listener()]
    if opts.capture == "intercept" or opts.mode in ("waypoint", "node"):
        # Tunnels behind HTTP routes (HBONE to ambient pods) and node proxies' shared
        # listeners go through internal listeners.
        doc["bootstrap_extensions"] = [{
            "name": "envoy.bootstrap.internal_listener",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3"
                                      ".InternalListener"},
        }]
    if opts.mode == "node":
        # Envoy 1.40 reports a user-space (internal listener) peer's close as a reset, and
        # tcp_proxy then resets its own downstream, dropping the response bytes still queued
        # there (a server that closes after answering loses its answer on every internal
        # hop). Closing with FIN, as before that propagation existed, delivers them.
        doc["layered_runtime"] = {"layers": [
            {"name": "static", "static_layer": {NODE_RUNTIME_GUARD: False}},
            {"name": "admin", "admin_layer": {}},
        ]}
    return doc


NODE_RUNTIME_GUARD = "envoy.reloadable_features.propagate_upstream_rst_through_tunneled_tcp_proxy"


FILE_BASED_METADATA = "envoy.grpc_credentials.file_based_metadata"


def _read_token(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _google_grpc(opts: BootstrapOptions, xds_host: str) -> dict[str, Any]:
    """gRPC's own client for xDS: it can read the token file at every stream."""
    assert opts.token_file is not None
    svc: dict[str, Any] = {
        "target_uri": opts.xds_address,
        "stat_prefix": "xds",
        "credentials_factory_name": FILE_BASED_METADATA,
        "call_credentials": [{"from_plugin": {"name": FILE_BASED_METADATA, "typed_config": {
            "@type": "type.googleapis.com/envoy.config.grpc_credential.v3.FileBasedMetadataConfig",
            "secret_data": {"filename": opts.token_file},
            "header_key": "authorization",
            "header_prefix": "Bearer ",
        }}}],
        # Like Envoy's own client: large HTTP/2 windows, so big pushes are not throttled.
        "channel_args": {"args": {"grpc.http2.lookahead_bytes": {"int_value": 256 * 1024 * 1024}}},
    }
    if opts.xds_tls is not None:
        tls = opts.xds_tls
        roots = {"filename": tls.trusted_ca_file} if tls.trusted_ca_file else {"inline_string": tls.trusted_ca}
        svc["channel_credentials"] = {"ssl_credentials": {"root_certs": roots}}
        server_name = tls.server_name or ("localhost" if is_ip(xds_host) else xds_host)
        if server_name != xds_host:
            svc["channel_args"]["args"]["grpc.ssl_target_name_override"] = {"string_value": server_name}
    return {"google_grpc": svc}




def _xds_tls(trusted_ca: str, server_name: str) -> dict[str, Any]:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": server_name,
            "common_tls_context": {
                "alpn_protocols": ["h2"],
                "validation_context": {
                    "trusted_ca": {"inline_string": trusted_ca},
                    "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": server_name}}],
                },
            },
        },
    }




def _hcm(stat_prefix: str, routes: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat_prefix,
            "route_config": {"virtual_hosts": [{"name": stat_prefix, "domains": ["*"], "routes": routes}]},
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
        },
    }


def _health_listener() -> dict[str, Any]:
    # 15021 answers 200 on /healthz/ready once Envoy serves (used by the startup probe).
    return {
        "name": "health",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": 15021}},
        "filter_chains": [{"filters": [_hcm("health", [{
            "match": {"prefix": "/healthz/ready"}, "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}}])]}],
    }


def _stats_listener() -> dict[str, Any]:
    return {
        "name": "stats",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": 15090}},
        "filter_chains": [{"filters": [_hcm("stats", [{
            "match": {"prefix": "/stats/prometheus"}, "route": {"cluster": "admin"}}])]}],
    }


# Envoy reads YAML with yaml-cpp, which also takes y/Y/n/N as booleans; PyYAML leaves those
# plain, so a node id `n` or a label value `y` would reach Envoy as a bool.
_YAML_CPP_BOOLEANS = frozenset({"y", "n", "yes", "no", "true", "false", "on", "off"})


def _represent_str(dumper: yaml.representer.BaseRepresenter, data: Any) -> yaml.Node:
    style = '"' if str(data).lower() in _YAML_CPP_BOOLEANS else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


class _EnvoyDumper(yaml.SafeDumper):
    yaml_representers = {**yaml.SafeDumper.yaml_representers, str: _represent_str}


def render(opts: BootstrapOptions) -> str:
    doc = bootstrap(opts)
    if opts.capture == "intercept" or opts.mode != "sidecar":
        host, port = split_address(opts.admin_address)
        doc["static_resources"]["clusters"].append({
            "name": "admin", "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": "admin", "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": host, "port_value": port}}}}]}]},
        })
    return yaml.dump(doc, Dumper=_EnvoyDumper, sort_keys=False)
