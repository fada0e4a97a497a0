"""TLS for sidecars: the mesh mTLS contexts (SPIFFE identities, certificates over SDS),
which endpoints can take mTLS, and the transport sockets of outbound clusters.
Pure functions, no I/O.

Secrets, both delivered over ADS (SDS) to authenticated proxies (`controlplane.translate.
secrets`): `default`, the proxy's own certificate and key (URI SAN
`spiffe://<td>/ns/<ns>/sa/<sa>`), and `ROOTCA`, the trust bundle.

Inbound, a DownstreamTlsContext requires a client certificate chaining to ROOTCA whose URI
SAN is in the mesh's trust domain. Outbound, an UpstreamTlsContext presents `default` and
verifies the server's URI SAN against the service accounts of the service's Pods. Endpoints
whose Pod runs a Meshline sidecar carry the metadata
`envoy.transport_socket_match: {tlsMode: meshline}`; a cluster in automatic mode uses mTLS
for those and plaintext for the rest (Envoy's `transport_socket_matches`).

A Pod runs a Meshline sidecar when the injector marked it (`meshline.io/status: injected`),
it did not opt out (`meshline.io/inject: "false"`, annotation or label) and it is not on the
host network (the injector never touches those).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.raw_buffer.v3 import raw_buffer_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from google.protobuf import struct_pb2

from controlplane.model.ir import DEFAULT_TRUST_DOMAIN, ClientTLS, PortProtocol
from controlplane.translate.names import pack
from controlplane.translate.secrets import apply_origination, root_sds, workload_sds

TLS_SOCKET = "envoy.transport_sockets.tls"
RAW_SOCKET = "envoy.transport_sockets.raw_buffer"
TLS_MATCH_KEY = "envoy.transport_socket_match"
"""Endpoint metadata namespace that `transport_socket_matches` match against."""
TLS_MODE_LABEL = "tlsMode"
TLS_MODE_MESH = "meshline"
SYSTEM_CA_FILE = "/etc/ssl/certs/ca-certificates.crt"
MESH_ALPN = ("h2", "http/1.1")

UpstreamTlsMode = Literal["mesh", "auto", "simple"]


def spiffe_uri(trust_domain: str, namespace: str, service_account: str) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def outbound_sni(port: int, subset: str | None, host: str) -> str:
    """Istio's SNI for mesh mTLS: `outbound_.<port>_.<subset>_.<host>`."""
    return f"outbound_.{port}_.{subset or ''}_.{host}"


# --------------------------------------------------------------------------- TLS contexts


def _tls_params(common: tls_pb2.CommonTlsContext) -> None:
    common.tls_params.tls_minimum_protocol_version = common_pb2.TlsParameters.TLSv1_2
    common.tls_params.tls_maximum_protocol_version = common_pb2.TlsParameters.TLSv1_3


def _san(matcher_list: object, san_type: int, *, exact: str = "", prefix: str = "") -> None:
    m = matcher_list.add()  # type: ignore[attr-defined]
    m.san_type = san_type
    if prefix:
        m.matcher.prefix = prefix
    else:
        m.matcher.exact = exact


def _mesh_common(common: tls_pb2.CommonTlsContext, trust_domain: str, peers: tuple[str, ...]) -> None:
    """Our certificate, the mesh root, and the peer SPIFFE URIs accepted (`peers`; empty:
    any identity in `trust_domain`)."""
    _tls_params(common)
    common.tls_certificate_sds_secret_configs.append(workload_sds())
    combined = common.combined_validation_context
    sans = combined.default_validation_context.match_typed_subject_alt_names
    if peers:
        for uri in peers:
            _san(sans, common_pb2.SubjectAltNameMatcher.URI, exact=uri)
    else:
        _san(sans, common_pb2.SubjectAltNameMatcher.URI, prefix=f"spiffe://{trust_domain}/")
    combined.validation_context_sds_secret_config.CopyFrom(root_sds())


def downstream_mtls(trust_domain: str, alpn: tuple[str, ...] = ()) -> tls_pb2.DownstreamTlsContext:
    """Server side of mesh mTLS: a client certificate from the mesh's trust domain is required."""
    ctx = tls_pb2.DownstreamTlsContext()
    ctx.require_client_certificate.value = True
    _mesh_common(ctx.common_tls_context, trust_domain, ())
    ctx.common_tls_context.alpn_protocols.extend(alpn)
    return ctx


def upstream_mtls(trust_domain: str, sni: str, peers: tuple[str, ...], alpn: tuple[str, ...] = ()
                  ) -> tls_pb2.UpstreamTlsContext:
    ctx = tls_pb2.UpstreamTlsContext(sni=sni)
    _mesh_common(ctx.common_tls_context, trust_domain, peers)
    ctx.common_tls_context.alpn_protocols.extend(alpn)
    return ctx


def upstream_simple(sni: str, sans: tuple[str, ...], origin: ClientTLS | None = None) -> tls_pb2.UpstreamTlsContext:
    """TLS origination (DestinationRule SIMPLE, MUTUAL; `origin` its tls settings): see
    `controlplane.translate.secrets.apply_origination` (without `origin`: trust the system CA
    bundle, check the given subject alternative names)."""
    ctx = tls_pb2.UpstreamTlsContext(sni=sni)
    _tls_params(ctx.common_tls_context)
    apply_origination(ctx.common_tls_context, origin, sans, SYSTEM_CA_FILE)
    return ctx


def tls_socket(ctx: tls_pb2.UpstreamTlsContext | tls_pb2.DownstreamTlsContext) -> base_pb2.TransportSocket:
    sock = base_pb2.TransportSocket(name=TLS_SOCKET)
    sock.typed_config.CopyFrom(pack(ctx))
    return sock


def raw_socket() -> base_pb2.TransportSocket:
    sock = base_pb2.TransportSocket(name=RAW_SOCKET)
    sock.typed_config.CopyFrom(pack(raw_buffer_pb2.RawBuffer()))
    return sock


def mesh_endpoint_metadata(md: base_pb2.Metadata) -> None:
    md.filter_metadata[TLS_MATCH_KEY].CopyFrom(struct_pb2.Struct(fields={
        TLS_MODE_LABEL: struct_pb2.Value(string_value=TLS_MODE_MESH)}))


# --------------------------------------------------------------------------- outbound clusters


@dataclass(frozen=True, slots=True)
class UpstreamTls:
    """How an outbound cluster secures its connections.

    - `mesh`: always mesh mTLS (DestinationRule ISTIO_MUTUAL);
    - `auto`: mesh mTLS to endpoints marked as running a sidecar, plaintext to the rest;
    - `simple`: TLS origination as the DestinationRule's `origin` (SIMPLE or MUTUAL) says.
    `sans`: the accepted server identities (SPIFFE URIs for mesh and auto; SANs for simple).
    """

    mode: UpstreamTlsMode
    sni: str = ""
    sans: tuple[str, ...] = ()
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    alpn: tuple[str, ...] = ()
    origin: ClientTLS | None = None


def apply_upstream_tls(c: cluster_pb2.Cluster, tls: UpstreamTls | None) -> None:
    if tls is None:
        return
    if tls.mode == "simple":
        c.transport_socket.CopyFrom(tls_socket(upstream_simple(tls.sni, tls.sans, tls.origin)))
        return
    mtls = tls_socket(upstream_mtls(tls.trust_domain, tls.sni, tls.sans, tls.alpn))
    if tls.mode == "mesh":
        c.transport_socket.CopyFrom(mtls)
        return
    m = c.transport_socket_matches.add(name=f"{TLS_MODE_LABEL}-{TLS_MODE_MESH}")
    m.match.fields[TLS_MODE_LABEL].string_value = TLS_MODE_MESH
    m.transport_socket.CopyFrom(mtls)
    plain = c.transport_socket_matches.add(name=f"{TLS_MODE_LABEL}-disabled")
    plain.match.SetInParent()
    plain.transport_socket.CopyFrom(raw_socket())


def mesh_alpn(protocol: PortProtocol) -> tuple[str, ...]:
    """The ALPN a client offers for mesh mTLS: what its connection pool speaks, so that the
    server's HTTP connection manager picks the same codec (none for TCP and sniffed ports,
    where Envoy offers what each connection pool speaks)."""
    if protocol is PortProtocol.HTTP:
        return ("http/1.1",)
    if protocol in (PortProtocol.HTTP2, PortProtocol.GRPC):
        return ("h2",)
    return ()


def upstream_tls(
    client_tls: ClientTLS | None,
    mesh_endpoints: bool,
    sni: str,
    peers: tuple[tuple[str, ...], tuple[str, ...]],
    trust_domain: str,
    protocol: PortProtocol,
) -> UpstreamTls | None:
    """How one outbound cluster secures its connections. `client_tls`: the merged
    DestinationRule tls (None: automatic); `mesh_endpoints`: some endpoint runs a sidecar;
    `sni`: the mesh SNI of the cluster; `peers`: the SPIFFE URIs of the service's Pods that
    run a sidecar, and of all of them (ISTIO_MUTUAL expects mTLS from every one)."""
    if client_tls is None:
        if not mesh_endpoints:
            return None
        return UpstreamTls("auto", sni, peers[0], trust_domain, mesh_alpn(protocol))
    if client_tls.mode == "DISABLE":
        return None
    if client_tls.mode == "ISTIO_MUTUAL":
        return UpstreamTls("mesh", client_tls.sni or sni, client_tls.subject_alt_names or peers[1], trust_domain,
                           mesh_alpn(protocol))
    # SIMPLE and MUTUAL: TLS to the server (with MUTUAL, the DestinationRule's client certificate).
    sans = client_tls.subject_alt_names or ((client_tls.sni,) if client_tls.sni else ())
    return UpstreamTls("simple", client_tls.sni or "", sans, trust_domain, origin=client_tls)
