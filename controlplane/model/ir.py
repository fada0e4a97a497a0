"""Intermediate representation of the mesh: frozen, hashable values. Pure data, no I/O.

Everything past `sources/` sees only these types. Durations are integer milliseconds,
hostnames are fully qualified (`name.ns.svc.cluster.local`), label sets are sorted tuples
of pairs so that equal inputs compare and hash equal.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, NewType

ClusterName = NewType("ClusterName", str)
NodeId = NewType("NodeId", str)
TypeUrl = NewType("TypeUrl", str)
Hostname = NewType("Hostname", str)

Labels = tuple[tuple[str, str], ...]
"""Sorted (key, value) pairs."""

DOMAIN_SUFFIX = "svc.cluster.local"


def labels_of(mapping: Mapping[str, str] | None) -> Labels:
    """Normalise a label mapping into the sorted tuple form used everywhere in the IR."""
    if not mapping:
        return ()
    return tuple(sorted((str(k), str(v)) for k, v in mapping.items()))


def labels_match(selector: Labels, labels: Labels) -> bool:
    """True when every selector pair is present in `labels` (an empty selector matches all)."""
    if not selector:
        return True
    have = dict(labels)
    return all(have.get(k) == v for k, v in selector)


def service_fqdn(name: str, namespace: str) -> Hostname:
    return Hostname(f"{name}.{namespace}.{DOMAIN_SUFFIX}")


# --------------------------------------------------------------------------- sources and errors


@dataclass(frozen=True, slots=True)
class SourceRef:
    """Where an object came from: its identity and, for files, its location."""

    kind: str
    namespace: str
    name: str
    file: str | None = None
    line: int | None = None

    @property
    def display(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}" if self.namespace else f"{self.kind}/{self.name}"

    @property
    def location(self) -> str:
        if self.file is None:
            return ""
        return f"{self.file}:{self.line or 0}"


Severity = Literal["error", "warning"]


@dataclass(frozen=True, slots=True)
class Issue:
    """A validation problem, carried as a value. `field` is a dotted path such as
    `spec.http[0].match[1].uri.regex`; `line` is the line of that field when known."""

    ref: SourceRef
    field: str
    message: str
    severity: Severity = "error"
    line: int | None = None

    def format(self) -> str:
        line = self.line if self.line is not None else self.ref.line
        where = f"{self.ref.file}:{line or 0}: " if self.ref.file else ""
        fld = f"{self.field}: " if self.field else ""
        sev = "" if self.severity == "error" else f"{self.severity}: "
        return f"{where}{self.ref.display}: {sev}{fld}{self.message}"


# --------------------------------------------------------------------------- core kinds


@dataclass(frozen=True, slots=True)
class Namespace:
    name: str
    labels: Labels = ()


class PortProtocol(enum.Enum):
    HTTP = "http"
    HTTP2 = "http2"
    GRPC = "grpc"
    TCP = "tcp"
    UNKNOWN = "unknown"  # sniffed: HTTP if the client speaks HTTP, TCP otherwise

    @property
    def is_http(self) -> bool:
        return self in (PortProtocol.HTTP, PortProtocol.HTTP2, PortProtocol.GRPC)


@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str
    port: int
    target_port: int | str  # number, or a named container port
    protocol: PortProtocol


@dataclass(frozen=True, slots=True)
class Service:
    ref: SourceRef
    namespace: str
    name: str
    hostname: Hostname
    cluster_ip: str | None
    ports: tuple[ServicePort, ...]
    selector: Labels = ()
    labels: Labels = ()
    annotations: Labels = ()
    entry: ServiceEntryInfo | None = None  # a ServiceEntry host (controlplane.model.serviceentry)


@dataclass(frozen=True, slots=True)
class EndpointPort:
    name: str
    port: int


@dataclass(frozen=True, slots=True)
class Endpoint:
    address: str
    ready: bool = True
    pod: str | None = None  # targetRef Pod name, same namespace as the service
    node: str | None = None
    zone: str | None = None
    # ServiceEntry endpoints and WorkloadEntries (no Pod): their labels (subsets), locality
    # (`region/zone/subzone`), weight, whether they accept mesh mTLS (None: decided by the
    # Pod) and their SPIFFE identity
    labels: Labels | None = None
    locality: str | None = None
    weight: int | None = None
    mesh_tls: bool | None = None
    identity: str | None = None


@dataclass(frozen=True, slots=True)
class EndpointSet:
    """One EndpointSlice (or a legacy Endpoints subset) of a service."""

    ref: SourceRef
    namespace: str
    service: str
    ports: tuple[EndpointPort, ...]
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True)
class ContainerPort:
    name: str
    port: int


@dataclass(frozen=True, slots=True)
class Workload:
    """A Pod."""

    ref: SourceRef
    namespace: str
    name: str
    ip: str | None
    labels: Labels = ()
    annotations: Labels = ()
    service_account: str = "default"
    node: str | None = None
    ports: tuple[ContainerPort, ...] = ()
    host_network: bool = False
    netns: str | None = None  # path of the pod's network namespace (annotation or node agent)


# --------------------------------------------------------------------------- ServiceEntry / WorkloadEntry

Resolution = Literal["NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN"]


@dataclass(frozen=True, slots=True)
class ServiceEntryInfo:
    """What a registry `Service` made from a ServiceEntry host carries besides ports."""

    resolution: Resolution = "NONE"
    mesh_external: bool = True
    addresses: tuple[str, ...] = ()  # IPs or CIDRs, as written
    export_to: tuple[str, ...] = ()
    subject_alt_names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class WorkloadEntry:
    """A WorkloadEntry, or one `endpoints[]` item of a ServiceEntry (then `name` is the
    ServiceEntry's and `inline` is True). `ports`: port name -> number."""

    ref: SourceRef
    namespace: str
    name: str
    address: str
    ports: tuple[tuple[str, int], ...] = ()
    labels: Labels = ()
    service_account: str | None = None
    locality: str | None = None
    weight: int | None = None
    network: str | None = None
    inline: bool = False


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    ref: SourceRef
    namespace: str
    name: str
    hosts: tuple[Hostname, ...]
    ports: tuple[ServicePort, ...]
    info: ServiceEntryInfo
    endpoints: tuple[WorkloadEntry, ...] = ()
    workload_selector: Labels | None = None  # None: no workloadSelector
    labels: Labels = ()  # the metadata labels Meshline reads (`meshline.io/use-waypoint`)
    created: str = ""  # metadata.creationTimestamp (RFC 3339 sorts as text); "" when absent


# --------------------------------------------------------------------------- VirtualService


StringMatchKind = Literal["exact", "prefix", "regex", "path_prefix"]
"""`path_prefix`: the Gateway API's PathPrefix (whole path segments: `/a` matches `/a` and
`/a/b`, not `/ab`); the others are Istio's StringMatch kinds."""


@dataclass(frozen=True, slots=True)
class StringMatch:
    kind: StringMatchKind
    value: str


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    name: str
    match: StringMatch | None  # None: header present with any value


@dataclass(frozen=True, slots=True)
class HTTPMatch:
    name: str = ""
    uri: StringMatch | None = None
    ignore_uri_case: bool = False
    method: StringMatch | None = None
    authority: StringMatch | None = None
    scheme: StringMatch | None = None
    headers: tuple[HeaderMatch, ...] = ()
    without_headers: tuple[HeaderMatch, ...] = ()
    query_params: tuple[HeaderMatch, ...] = ()
    port: int | None = None
    source_labels: Labels = ()
    source_namespace: str | None = None
    # `gateways` of the match (overrides the VirtualService's): "mesh" or "ns/name"; empty: inherit
    gateways: tuple[str, ...] = ()
    # Gateway API: the name of the Gateway server (listener) the route attached to; only that
    # server's host names route by it (empty, as from an Istio VirtualService: every server's)
    listener: str = ""


@dataclass(frozen=True, slots=True)
class Destination:
    host: Hostname
    subset: str | None = None
    port: int | None = None


@dataclass(frozen=True, slots=True)
class HeaderOps:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.set or self.add or self.remove)


@dataclass(frozen=True, slots=True)
class Headers:
    request: HeaderOps = HeaderOps()
    response: HeaderOps = HeaderOps()


@dataclass(frozen=True, slots=True)
class RouteDestination:
    destination: Destination
    weight: int = 100
    headers: Headers | None = None


@dataclass(frozen=True, slots=True)
class Retry:
    attempts: int
    per_try_timeout_ms: int | None = None
    retry_on: tuple[str, ...] = ()  # Envoy retry_on conditions
    retriable_status_codes: tuple[int, ...] = ()
    retry_remote_localities: bool = False
    ignore_previous_hosts: bool | None = None  # None: Istio's default (previous hosts are avoided)
    backoff_ms: int | None = None  # base interval between retries; None: Envoy's default (25 ms)


@dataclass(frozen=True, slots=True)
class FaultDelay:
    fixed_delay_ms: int
    percentage: float = 100.0


@dataclass(frozen=True, slots=True)
class FaultAbort:
    http_status: int | None = None
    grpc_status: int | None = None
    percentage: float = 100.0


@dataclass(frozen=True, slots=True)
class Fault:
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None


@dataclass(frozen=True, slots=True)
class Mirror:
    destination: Destination
    percentage: float | None = None  # None: 100%


@dataclass(frozen=True, slots=True)
class Rewrite:
    uri: str | None = None
    authority: str | None = None
    uri_regex: tuple[str, str] | None = None  # (match, substitution)


@dataclass(frozen=True, slots=True)
class Redirect:
    uri: str | None = None
    authority: str | None = None
    port: int | None = None
    scheme: str | None = None
    redirect_code: int = 301
    prefix_rewrite: str | None = None  # replaces the matched prefix (Gateway API ReplacePrefixMatch)


@dataclass(frozen=True, slots=True)
class DirectResponse:
    status: int
    body: str | None = None


@dataclass(frozen=True, slots=True)
class CorsPolicy:
    allow_origins: tuple[StringMatch, ...] = ()
    allow_methods: tuple[str, ...] = ()
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()
    max_age_s: int | None = None
    allow_credentials: bool | None = None


@dataclass(frozen=True, slots=True)
class HTTPRoute:
    name: str = ""
    matches: tuple[HTTPMatch, ...] = ()  # empty: match everything; several: ORed
    route: tuple[RouteDestination, ...] = ()
    redirect: Redirect | None = None
    direct_response: DirectResponse | None = None
    rewrite: Rewrite | None = None
    timeout_ms: int | None = None
    retries: Retry | None = None
    fault: Fault | None = None
    mirrors: tuple[Mirror, ...] = ()
    headers: Headers | None = None
    cors: CorsPolicy | None = None


@dataclass(frozen=True, slots=True)
class L4Match:
    port: int | None = None
    destination_subnets: tuple[str, ...] = ()
    source_labels: Labels = ()
    source_namespace: str | None = None
    gateways: tuple[str, ...] = ()  # as HTTPMatch.gateways


@dataclass(frozen=True, slots=True)
class TCPRoute:
    matches: tuple[L4Match, ...] = ()
    route: tuple[RouteDestination, ...] = ()


@dataclass(frozen=True, slots=True)
class TLSMatch:
    """`tls[].match[]`: the SNI names (wildcards `*.suffix` allowed) and optionally the port."""

    sni_hosts: tuple[str, ...]
    port: int | None = None
    gateways: tuple[str, ...] = ()  # as HTTPMatch.gateways
    # Gateway API: the name of the Gateway server (listener) the TLSRoute attached to; only
    # that server applies the match (empty, as from an Istio VirtualService: every server)
    listener: str = ""


@dataclass(frozen=True, slots=True)
class TLSRoute:
    matches: tuple[TLSMatch, ...]
    route: tuple[RouteDestination, ...] = ()


@dataclass(frozen=True, slots=True)
class VirtualService:
    ref: SourceRef
    namespace: str
    name: str
    hosts: tuple[Hostname, ...]
    http: tuple[HTTPRoute, ...] = ()
    tcp: tuple[TCPRoute, ...] = ()
    export_to: tuple[str, ...] = ()
    # `spec.gateways`: "mesh" and/or "ns/name" of Gateways (controlplane.model.gateways)
    gateways: tuple[str, ...] = ("mesh",)
    # every host as given (lower-cased, short names resolved), wildcards included: what a
    # gateway server's hosts are intersected with (`hosts` keeps the exact service hosts)
    host_patterns: tuple[str, ...] = ()
    # `spec.tls` routes: applied by gateways' PASSTHROUGH servers (routing by SNI)
    tls: tuple[TLSRoute, ...] = ()


# --------------------------------------------------------------------------- DestinationRule


@dataclass(frozen=True, slots=True)
class ConsistentHash:
    http_header_name: str | None = None
    http_cookie_name: str | None = None
    http_cookie_path: str | None = None
    http_cookie_ttl_ms: int | None = None
    use_source_ip: bool = False
    http_query_parameter_name: str | None = None
    minimum_ring_size: int | None = None
    maglev: bool = False
    maglev_table_size: int | None = None  # a prime; None: Envoy's default (65537)


LbSimple = Literal["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM", "PASSTHROUGH", "UNSPECIFIED"]


@dataclass(frozen=True, slots=True)
class LocalityLbSetting:
    """`loadBalancer.localityLbSetting` (Istio). Localities are `region/zone/subzone` (`*`
    wildcards allowed in `distribute`). `enabled` None: Istio's default (on)."""

    enabled: bool | None = None
    # distribute[]: (from locality, ((to locality, weight percent), ...))
    distribute: tuple[tuple[str, tuple[tuple[str, int], ...]], ...] = ()
    failover: tuple[tuple[str, str], ...] = ()  # (from region, to region)
    failover_priority: tuple[str, ...] = ()  # label keys, or `key=value` overrides


@dataclass(frozen=True, slots=True)
class LoadBalancer:
    simple: LbSimple | None = None
    consistent_hash: ConsistentHash | None = None
    locality_lb: LocalityLbSetting | None = None


@dataclass(frozen=True, slots=True)
class ConnectionPool:
    max_connections: int | None = None
    connect_timeout_ms: int | None = None
    http1_max_pending_requests: int | None = None
    http2_max_requests: int | None = None
    max_requests_per_connection: int | None = None
    max_retries: int | None = None
    idle_timeout_ms: int | None = None
    max_concurrent_streams: int | None = None
    http2_keepalive: tuple[int, int] | None = None  # (interval, timeout) ms of HTTP/2 PINGs


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    consecutive_5xx_errors: int | None = None
    consecutive_gateway_errors: int | None = None
    consecutive_local_origin_failures: int | None = None
    split_external_local_origin_errors: bool = False
    interval_ms: int | None = None
    base_ejection_time_ms: int | None = None
    max_ejection_percent: int | None = None
    min_health_percent: int | None = None
    http_error_codes: tuple[int, ...] = ()  # only these statuses count as errors (default: 5xx)


TLSMode = Literal["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"]


@dataclass(frozen=True, slots=True)
class ClientTLS:
    mode: TLSMode
    sni: str | None = None
    subject_alt_names: tuple[str, ...] = ()
    # MUTUAL/SIMPLE: files on the proxy's host (Envoy reads them), or a Secret of the rule's
    # namespace (`credential_name`, delivered over SDS)
    client_certificate: str | None = None
    private_key: str | None = None
    ca_certificates: str | None = None
    ca_crl: str | None = None
    credential_name: str | None = None
    insecure_skip_verify: bool = False


@dataclass(frozen=True, slots=True)
class PortTrafficPolicy:
    port: int
    load_balancer: LoadBalancer | None = None
    connection_pool: ConnectionPool | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLS | None = None


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    load_balancer: LoadBalancer | None = None
    connection_pool: ConnectionPool | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLS | None = None
    port_level: tuple[PortTrafficPolicy, ...] = ()
    retry_budget: RetryBudget | None = None  # not per port (Istio's PortTrafficPolicy has none)


@dataclass(frozen=True, slots=True)
class RetryBudget:
    """DestinationRule `retryBudget`: concurrent retries limited to `percent` of the active and
    pending requests, at least `min_retry_concurrency` (Istio's defaults: 20%, 3)."""

    percent: float | None = None
    min_retry_concurrency: int | None = None


@dataclass(frozen=True, slots=True)
class Subset:
    name: str
    labels: Labels
    traffic_policy: TrafficPolicy | None = None


@dataclass(frozen=True, slots=True)
class DestinationRule:
    ref: SourceRef
    namespace: str
    name: str
    host: Hostname
    traffic_policy: TrafficPolicy | None = None
    subsets: tuple[Subset, ...] = ()
    export_to: tuple[str, ...] = ()
    # workloadSelector.matchLabels: applies only to client workloads of its own namespace
    # whose labels include these (empty: every client that looks it up)
    workload_selector: Labels = ()


@dataclass(frozen=True, slots=True)
class TlsCredential:
    """A Secret holding TLS material (DestinationRule `credentialName`), PEM: certificate
    chain and key (kubernetes.io/tls `tls.crt`/`tls.key`, or Istio's generic `cert`/`key`),
    CA bundle (`ca.crt` or `cacert`) and CRL (`ca.crl` or `crl`); any may be empty.
    `problem`: why the material is unusable (it is then never sent). The key stays out of
    `repr`."""

    ref: SourceRef
    namespace: str
    name: str
    cert_pem: str = ""
    key_pem: str = field(default="", repr=False)
    ca_pem: str = ""
    crl_pem: str = ""
    problem: str | None = None


# --------------------------------------------------------------------------- proxies


ProxyMode = Literal["sidecar", "node", "waypoint", "gateway"]
CaptureMode = Literal["bind", "intercept"]


@dataclass(frozen=True, slots=True)
class ProxyMeta:
    """What a connecting Envoy says about itself (node id and metadata)."""

    node_id: str
    mode: ProxyMode = "sidecar"
    namespace: str = "default"
    workload: str | None = None
    labels: Labels = ()
    service_account: str = "default"
    capture: CaptureMode = "bind"
    extra: Labels = field(default=())
    outbound_address: str = "127.0.0.1"  # bind capture: the loopback address outbound listeners use
    node: str | None = None  # node proxies: the node they claim to serve (proven via `extra`)
    waypoint: str | None = None  # waypoints: the waypoint's name (its Service's name)
    gateway: str | None = None  # gateways: the Gateway served, "ns/name"


@dataclass(frozen=True, slots=True)
class PodNetns:
    """A node agent's report: where a pod's network namespace can be reached on its node."""

    ref: SourceRef
    namespace: str
    name: str
    node: str
    path: str


# --------------------------------------------------------------------------- security

MtlsMode = Literal["UNSET", "DISABLE", "PERMISSIVE", "STRICT"]
MTLS_MODES: tuple[MtlsMode, ...] = ("UNSET", "DISABLE", "PERMISSIVE", "STRICT")
DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_ROOT_NAMESPACE = "meshline-system"


@dataclass(frozen=True, slots=True)
class PeerAuthentication:
    """Inbound mTLS requirements. `selector` empty: the whole namespace (the whole mesh in
    the root namespace). `port_level`: (workload port, mode) pairs, sorted by port."""

    ref: SourceRef
    namespace: str
    name: str
    selector: Labels = ()
    mode: MtlsMode = "UNSET"
    port_level: tuple[tuple[int, MtlsMode], ...] = ()


AuthzAction = Literal["ALLOW", "DENY", "AUDIT"]


@dataclass(frozen=True, slots=True)
class AuthzSource:
    """`rules[].from[].source`: every set field must match (values within a field are ORed).
    Strings keep Istio's wildcard forms (`abc*`, `*abc`, `*`); IP blocks are normalised
    CIDRs; service accounts are `ns/sa`."""

    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    request_principals: tuple[str, ...] = ()
    not_request_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    service_accounts: tuple[str, ...] = ()
    not_service_accounts: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()
    remote_ip_blocks: tuple[str, ...] = ()
    not_remote_ip_blocks: tuple[str, ...] = ()
    trust_domains: tuple[str, ...] = ()  # of the peer certificate's SPIFFE ID, with wildcards
    not_trust_domains: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthzOperation:
    """`rules[].to[].operation`: every set field must match."""

    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthzCondition:
    """`rules[].when[]`. `key` is one of `request.headers[NAME]`, `source.ip`,
    `source.namespace`, `source.principal`, `destination.port`, `destination.ip`,
    `connection.sni`; IP values are normalised CIDRs."""

    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthzRule:
    """Matches when one source, one operation and every condition match; empty parts match
    everything (so an empty rule matches every request)."""

    sources: tuple[AuthzSource, ...] = ()
    operations: tuple[AuthzOperation, ...] = ()
    conditions: tuple[AuthzCondition, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    """An ALLOW, DENY or AUDIT policy for the workloads `selector` picks in `namespace` (all
    of them when empty; in the root namespace: in every namespace). No rules: matches nothing
    (an ALLOW policy without rules therefore denies everything)."""

    ref: SourceRef
    namespace: str
    name: str
    selector: Labels = ()
    action: AuthzAction = "ALLOW"
    rules: tuple[AuthzRule, ...] = ()
    # targetRefs: (kind, name) of the waypoints (kind Gateway) or Services of the policy's
    # namespace it attaches to. Such a policy is enforced by the waypoint, not the workloads.
    target_refs: tuple[tuple[str, str], ...] = ()
    # action CUSTOM: the extension provider (`spec.provider.name`) whose external authorizer
    # decides on the requests the rules match. `action` is then DENY: the fail-closed stand-in
    # every enforcement point uses unless it sends those requests to that authorizer.
    provider: str | None = None


# --------------------------------------------------------------------------- Sidecar (egress scoping)


@dataclass(frozen=True, slots=True)
class EgressHost:
    """One `egress[].hosts` entry, `namespace/dnsName`. `namespace` is `.` (the namespace
    of the proxy), `*` (every namespace), `~` (none) or a namespace name; `host` is `*`, a
    wildcard suffix such as `*.example.com`, or an exact host name (lower-cased)."""

    namespace: str
    host: str

    @property
    def text(self) -> str:
        return f"{self.namespace}/{self.host}"


@dataclass(frozen=True, slots=True)
class SidecarEgress:
    """One `egress[]` listener: the hosts it imports, on `port` only when set."""

    hosts: tuple[EgressHost, ...] = ()
    port: int | None = None
    protocol: str | None = None
    port_name: str | None = None


@dataclass(frozen=True, slots=True)
class Sidecar:
    """Which services the sidecars of `namespace` that `selector` picks receive (every
    sidecar of the namespace when `selector` is empty; every sidecar of the mesh for a
    selector-less Sidecar in the root namespace). No `egress`: inherits the egress of the
    namespace or mesh default (everything when there is none)."""

    ref: SourceRef
    namespace: str
    name: str
    selector: Labels = ()
    egress: tuple[SidecarEgress, ...] = ()
    # outboundTrafficPolicy.mode: REGISTRY_ONLY blocks destinations outside the scope
    registry_only: bool = False


# --------------------------------------------------------------------------- Gateway (ingress/egress)

ServerTLSMode = Literal["PASSTHROUGH", "SIMPLE", "MUTUAL", "AUTO_PASSTHROUGH", "ISTIO_MUTUAL", "OPTIONAL_MUTUAL"]


@dataclass(frozen=True, slots=True)
class ServerTLS:
    """A Gateway server's `tls` (Istio ServerTLSSettings). Certificates come from a Secret of
    the gateway proxy's namespace (`credential_name`, over SDS) or from files on the proxy."""

    mode: ServerTLSMode = "SIMPLE"
    https_redirect: bool = False
    credential_name: str | None = None
    server_certificate: str | None = None
    private_key: str | None = None
    ca_certificates: str | None = None
    ca_crl: str | None = None
    subject_alt_names: tuple[str, ...] = ()
    verify_certificate_spki: tuple[str, ...] = ()
    verify_certificate_hash: tuple[str, ...] = ()
    min_protocol_version: str | None = None  # TLSV1_0 .. TLSV1_3
    max_protocol_version: str | None = None
    cipher_suites: tuple[str, ...] = ()
    insecure_skip_verify: bool = False  # a client certificate that fails verification is let through
    ca_cert_credential_name: str | None = None  # a Secret whose CA verifies clients (over credentialName's)
    # the namespace of `credential_name`'s Secret when it is not the gateway proxy's: a Gateway
    # API certificateRef (the Gateway's namespace, or another one a ReferenceGrant permits)
    credential_namespace: str | None = None


@dataclass(frozen=True, slots=True)
class GatewayServer:
    """One `servers[]` entry. `hosts` are (namespace, host) pairs: namespace `*` (any) or a
    namespace name (`.` resolved to the Gateway's), host `*`, `*.suffix` or a name."""

    port: int
    protocol: str  # upper-case: HTTP, HTTPS, HTTP2, GRPC, TCP, TLS, ...
    port_name: str = ""
    hosts: tuple[tuple[str, str], ...] = ()
    tls: ServerTLS | None = None
    bind: str | None = None
    name: str = ""
    target_port: int | None = None


@dataclass(frozen=True, slots=True)
class Gateway:
    """An Istio Gateway: the proxies whose workload labels include `selector` serve `servers`."""

    ref: SourceRef
    namespace: str
    name: str
    selector: Labels = ()
    servers: tuple[GatewayServer, ...] = ()
    # (namespace, name) of Gateway API certificateRefs whose listener is refused (no grant, no
    # usable Secret): their SDS names get stand-ins, so a proxy that held the key loses it
    withheld_credentials: tuple[tuple[str, str], ...] = ()
    # A Gateway API Gateway: it configures only gateway proxies of its own namespace (as Istio
    # applies one to the instances of its Service in its namespace); an Istio Gateway selects
    # pods of any namespace (its credentialName Secrets are then the proxy's namespace's).
    own_namespace_only: bool = False

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


# RequestAuthentication (JWT): selection in controlplane.model.authn

@dataclass(frozen=True, slots=True)
class JwtHeader:
    """`fromHeaders[]`: the header carrying the token and the prefix before it."""

    name: str
    prefix: str = ""


@dataclass(frozen=True, slots=True)
class JwksUri:
    """A parsed `jwksUri`: Envoy fetches it from `host:port` (TLS for https)."""

    uri: str
    scheme: str  # http | https
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class JwtRule:
    """One `jwtRules[]` entry. Exactly one of `jwks_uri` and `jwks` (inline JSON) is set.
    `timeout_ms`: how long a JWKS fetch may take (None: Envoy's default)."""

    issuer: str
    audiences: tuple[str, ...] = ()
    jwks_uri: JwksUri | None = None
    jwks: str | None = None
    from_headers: tuple[JwtHeader, ...] = ()
    from_params: tuple[str, ...] = ()
    from_cookies: tuple[str, ...] = ()
    output_payload_to_header: str | None = None
    output_claim_to_headers: tuple[tuple[str, str], ...] = ()  # (header, claim)
    forward_original_token: bool = False
    timeout_ms: int | None = None
    space_delimited_claims: tuple[str, ...] = ()  # besides scope and permission (Istio 1.31)


@dataclass(frozen=True, slots=True)
class RequestAuthentication:
    ref: SourceRef
    namespace: str
    name: str
    selector: Labels = ()
    rules: tuple[JwtRule, ...] = ()
    # (kind, name): a waypoint (Gateway) or a Service of the namespace; enforced by the waypoint
    target_refs: tuple[tuple[str, str], ...] = ()


# Telemetry (access logging): precedence in controlplane.model.telemetry

LogMode = Literal["CLIENT", "SERVER", "CLIENT_AND_SERVER"]
LOG_MODES: tuple[LogMode, ...] = ("CLIENT_AND_SERVER", "CLIENT", "SERVER")
Direction = Literal["CLIENT", "SERVER"]
BUILTIN_PROVIDER = "envoy"
"""Istio's default mesh config defines the `envoy` provider: a file access log to stdout in
Istio's default text format. Meshline provides it unless the mesh config defines that name."""


@dataclass(frozen=True, slots=True)
class AccessLogging:
    """One `accessLogging[]` entry. `providers` empty: the mesh config's default providers."""

    mode: LogMode = "CLIENT_AND_SERVER"
    providers: tuple[str, ...] = ()
    disabled: bool = False
    filter: str | None = None  # CEL expression


@dataclass(frozen=True, slots=True)
class Telemetry:
    ref: SourceRef
    namespace: str
    name: str
    selector: Labels = ()
    access_logging: tuple[AccessLogging, ...] = ()
    target_refs: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class AccessLog:
    """One access log a proxy writes: `provider` (a mesh-config provider name) and the CEL
    `filter` a request must pass (None: every request)."""

    provider: str
    filter: str | None = None
