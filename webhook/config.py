"""Settings of the admission webhooks and the pod annotations the injector honours. Pure
data, no I/O; built once in the composition root."""

from __future__ import annotations

from dataclasses import dataclass

from controlplane.iptables import DEFAULT_INBOUND_PORT, DEFAULT_OUTBOUND_PORT, DEFAULT_PROXY_UID

# Names (and the Kubernetes contract around them)
PROXY_CONTAINER = "meshline-proxy"
INIT_CONTAINER = "meshline-init"
ENVOY_CONFIG_VOLUME = "meshline-envoy"
TOKEN_VOLUME = "meshline-token"
ENVOY_CONFIG_DIR = "/etc/meshline"
TOKEN_DIR = "/var/run/secrets/meshline/tokens"
TOKEN_FILE = "meshline-token"
CA_BUNDLE_CONFIGMAP = "meshline-ca-root"
"""ConfigMap holding the mesh trust bundle (key `root-cert.pem`) in each namespace that runs
proxies (a projected volume reads only its own namespace); the leader keeps it current."""
CA_BUNDLE_FILE = "root-cert.pem"

DATAPLANE_MODE_LABEL = "meshline.io/dataplane-mode"
INJECT = "meshline.io/inject"
STATUS = "meshline.io/status"
EXCLUDE_OUTBOUND_PORTS = "meshline.io/exclude-outbound-ports"
EXCLUDE_INBOUND_PORTS = "meshline.io/exclude-inbound-ports"
EXCLUDE_OUTBOUND_CIDRS = "meshline.io/exclude-outbound-cidrs"
INCLUDE_OUTBOUND_CIDRS = "meshline.io/include-outbound-cidrs"
PROXY_CPU = "meshline.io/proxy-cpu"
PROXY_MEMORY = "meshline.io/proxy-memory"
PROXY_CPU_LIMIT = "meshline.io/proxy-cpu-limit"
PROXY_MEMORY_LIMIT = "meshline.io/proxy-memory-limit"
PROXY_LOG_LEVEL = "meshline.io/proxy-log-level"

ADMIN_PORT = 15000
HBONE_PORT = 15008
HEALTH_PORT = 15021
STATS_PORT = 15090
HEALTH_PATH = "/healthz/ready"
PROXY_PORTS = frozenset({ADMIN_PORT, DEFAULT_OUTBOUND_PORT, DEFAULT_INBOUND_PORT, HBONE_PORT, 15020, HEALTH_PORT,
                         STATS_PORT})
"""Ports the proxy binds in the pod: an application container must not claim them."""

ENVOY_LOG_LEVELS = ("trace", "debug", "info", "warning", "error", "critical", "off")

MAX_BODY_BYTES = 1 << 20
"""Largest AdmissionReview accepted (the API server's own objects stay well below it)."""


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    """What the injector puts into pods and how the webhook server behaves."""

    proxy_image: str = "meshline-proxy:0.1.0"
    """Image with `meshline`, `envoy` and `iptables` on PATH (runs both injected containers)."""
    image_pull_policy: str = "IfNotPresent"
    xds_address: str = "meshline.meshline-system.svc:15012"
    """The TLS port: proxies verify the control plane against the mesh trust bundle, and their
    token never crosses the network in clear."""
    xds_protocol: str = "delta"
    native_sidecars: bool = True
    """False: the classic layout for clusters older than 1.29 (proxy as the first container)."""
    sidecar_namespaces: frozenset[str] | None = None
    """None: inject wherever the API server sends pods (the namespaceSelector decides);
    a set: inject only pods of these namespaces (tests, or a cluster without selectors)."""
    proxy_uid: int = DEFAULT_PROXY_UID
    cpu_request: str = "100m"
    memory_request: str = "128Mi"
    cpu_limit: str | None = None
    memory_limit: str | None = "1Gi"
    log_level: str = "warning"
    concurrency: int = 2
    token_audience: str = "meshline"
    token_expiration_seconds: int = 43200
    drain_seconds: int = 5
    """Classic layout: how long the proxy keeps serving after the pod starts terminating."""
    startup_timeout_seconds: int = 600
    max_body_bytes: int = MAX_BODY_BYTES
    body_timeout_seconds: float = 10.0
