"""Raw Kubernetes-shaped objects -> IR values plus validation issues. Pure, no I/O.

`convert(raw)` is the one entry point. It never raises on bad input: every problem becomes
an `Issue` (ref = the object, field = a dotted path such as
`spec.http[0].match[1].uri.regex`, line = the line of that field when known). An object
with any error converts to None and must be left out of the mesh; warnings alone keep
the value.

The value returned for each supported kind:

| kind (apiVersion)                    | value                                              |
|--------------------------------------|----------------------------------------------------|
| Namespace (v1)                       | `Namespace`                                        |
| Service (v1)                         | `Service` (None, with a warning, for ExternalName) |
| EndpointSlice (discovery.k8s.io/v1)  | `EndpointSet` (None, with a warning, for FQDN)     |
| Endpoints (v1)                       | `tuple[EndpointSet, ...]`, one per subset          |
| Pod (v1)                             | `Workload`                                         |
| Secret (v1)                          | `TlsCredential` for TLS Secrets, else None         |
| VirtualService (networking)          | `VirtualService` (with its `gateways` binding:     |
|                                      | `controlplane.model.gateways`)                     |
| Gateway (networking)                 | `Gateway` (`controlplane.model.convert_gateway`)   |
| DestinationRule (networking)         | `DestinationRule` (None, with a warning, for a     |
|                                      | wildcard host)                                     |
| ServiceEntry (networking)            | `ServiceEntry` (its hosts become registry services:|
|                                      | `controlplane.model.serviceentry`)                 |
| WorkloadEntry (networking)           | `WorkloadEntry` (an endpoint of the ServiceEntries |
|                                      | whose workloadSelector matches it)                 |
| Sidecar (networking)                 | `Sidecar` (egress scoping; ingress and             |
|                                      | outboundTrafficPolicy are ignored with a warning)  |
| PeerAuthentication (security)        | `PeerAuthentication`                               |
| RequestAuthentication (security)     | `RequestAuthentication` (JWT rules:                |
|                                      | `controlplane.model.authn`)                        |
| Telemetry (telemetry)                | `Telemetry` (access logging:                       |
|                                      | `controlplane.model.telemetry`)                    |
| AuthorizationPolicy (security)       | `AuthorizationPolicy` (CUSTOM: `provider` kept,    |
|                                      | action DENY; sidecars ask the provider's ext_authz |
|                                      | where `--mesh-config` makes it usable, elsewhere   |
|                                      | the rules deny: fail closed, as Istio)             |

"networking" is `networking.meshline.io/v1` or Istio's `networking.istio.io/v1`, `v1beta1`
or `v1alpha3`; "security" is `security.meshline.io/v1` or Istio's `security.istio.io/v1` or
`v1beta1`. Other kinds convert to None: with a warning naming the kind (and what is lost)
when they belong to a mesh API group (Meshline's, any of Istio's `*.istio.io` groups:
WorkloadGroup, Gateway, EnvoyFilter, Telemetry, WasmPlugin, RequestAuthentication,
ProxyConfig, ...) or to the Kubernetes Gateway API (`gateway.networking.k8s.io`,
`gateway.networking.x-k8s.io`) or SIG-Network's other experimental groups
(`networking.x-k8s.io`, `inference.networking.x-k8s.io`), silently otherwise (Deployments,
ConfigMaps, ...).
Cross-object checks live in `controlplane.model.validate.check_mesh`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from controlplane.model.convert_authn import convert_request_authentication
from controlplane.model.convert_base import Ctx, as_map, check_fields, get_labels, get_str, is_dns_label
from controlplane.model.convert_core import (
    convert_endpoint_slice,
    convert_endpoints,
    convert_namespace,
    convert_pod,
    convert_service,
)
from controlplane.model.convert_dr import convert_destination_rule
from controlplane.model.convert_gateway import convert_gateway
from controlplane.model.convert_gatewayapi import API_VERSIONS as GATEWAY_API_VERSIONS
from controlplane.model.convert_gatewayapi import UNSUPPORTED as GATEWAY_API_UNSUPPORTED
from controlplane.model.convert_gatewayapi import convert_gateway_api
from controlplane.model.convert_secret import convert_secret
from controlplane.model.convert_security import convert_authorization_policy, convert_peer_authentication
from controlplane.model.convert_serviceentry import convert_service_entry, convert_workload_entry
from controlplane.model.convert_sidecar import convert_sidecar
from controlplane.model.convert_telemetry import convert_telemetry
from controlplane.model.convert_vs import convert_virtual_service
from controlplane.model.ir import Issue, Labels, PodNetns
from controlplane.model.raw import RawObject

ConvertResult = tuple[object | None, tuple[Issue, ...]]

NETWORKING_API_VERSIONS = (
    "networking.meshline.io/v1",
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
)
SECURITY_API_VERSIONS = (
    "security.meshline.io/v1",
    "security.istio.io/v1",
    "security.istio.io/v1beta1",
)
TELEMETRY_API_VERSIONS = (
    "telemetry.meshline.io/v1",
    "telemetry.istio.io/v1",
    "telemetry.istio.io/v1alpha1",
)
API_VERSIONS: Mapping[str, tuple[str, ...]] = {
    "Namespace": ("v1",),
    "Service": ("v1",),
    "Endpoints": ("v1",),
    "Pod": ("v1",),
    "EndpointSlice": ("discovery.k8s.io/v1",),
    "VirtualService": NETWORKING_API_VERSIONS,
    "DestinationRule": NETWORKING_API_VERSIONS,
    "Sidecar": NETWORKING_API_VERSIONS,
    "PeerAuthentication": SECURITY_API_VERSIONS,
    "AuthorizationPolicy": SECURITY_API_VERSIONS,
    "RequestAuthentication": SECURITY_API_VERSIONS,  # convert_authn
    "Telemetry": TELEMETRY_API_VERSIONS,  # convert_telemetry (access logging)
    "PodNetns": ("meshline.io/v1",),  # node agents' reports (controlplane.nodeagent)
    "Secret": ("v1",),  # TLS credentials for DestinationRule credentialName (convert_secret)
    "ServiceEntry": NETWORKING_API_VERSIONS,  # convert_serviceentry
    "WorkloadEntry": NETWORKING_API_VERSIONS,
    "Gateway": NETWORKING_API_VERSIONS,  # convert_gateway (ingress/egress gateways)
}
"""Supported kinds and the apiVersions accepted for each."""

MESH_API_GROUPS = frozenset(
    {"networking.meshline.io", "networking.istio.io", "security.meshline.io", "security.istio.io"}
)
GATEWAY_API_GROUPS = frozenset({"gateway.networking.k8s.io", "gateway.networking.x-k8s.io"})
X_K8S_API_GROUPS = frozenset({"networking.x-k8s.io", "inference.networking.x-k8s.io"})
"""SIG-Network's other experimental groups (the Gateway API's first group, with its v1alpha1
kinds, and the Gateway API Inference Extension's): no kind of theirs is supported."""
REPORTED_API_GROUPS: tuple[str, ...] = (
    "networking.istio.io", "security.istio.io", "telemetry.istio.io", "extensions.istio.io",
    *sorted(GATEWAY_API_GROUPS), *sorted(X_K8S_API_GROUPS))
"""The groups Kubernetes mode discovers (`controlplane.sources.kube_informer`): every kind they
serve is watched, to be translated or reported as not supported."""
UNSUPPORTED_KINDS: Mapping[str, str] = {
    "WorkloadGroup": "its workloads are not added to the mesh",
    "EnvoyFilter": "its patches are not applied to any Envoy",
    "WasmPlugin": "its Wasm extension is not loaded",
    "ProxyConfig": "its proxy settings are not applied",
    "UDPRoute": "its routes are not applied",
    "BackendTLSPolicy": "no TLS is originated to its backends (use a DestinationRule's tls)",
}
"""What is lost when a kind of Istio's or the Gateway API's groups is ignored."""
_TOP_LEVEL_FIELDS = ("apiVersion", "kind", "metadata", "spec", "status")
_MESH_KINDS = ("VirtualService", "DestinationRule", "Sidecar", "PeerAuthentication", "AuthorizationPolicy",
               "RequestAuthentication", "Telemetry")


def convert(raw: RawObject) -> ConvertResult:
    """Convert one raw object to its IR value (see the module docstring for the value type
    of each kind) plus its issues. The value is None when the object has any error, or is
    of a kind Meshline does not use."""
    ctx = Ctx(raw)
    try:
        value = _convert(ctx)
    except Exception as exc:  # a converter bug must never stop the pipeline
        ctx.error("", f"internal error while reading this object: {type(exc).__name__}: {exc}")
        value = None
    return (None if ctx.failed else value), tuple(ctx.issues)


def _convert(ctx: Ctx) -> object | None:
    raw = ctx.raw
    if not isinstance(raw.body, Mapping):
        ctx.error("", "expected a Kubernetes object (a map)")
        return None
    accepted = API_VERSIONS.get(raw.kind)
    group = raw.api_version.split("/", 1)[0] if "/" in raw.api_version else ""
    if group in X_K8S_API_GROUPS:  # checked first: their kinds' names (Gateway, HTTPRoute) are ours too
        ctx.warn("kind", f"{raw.kind} ({raw.api_version}) is not supported by Meshline and is ignored: "
                 "no kind of this experimental API group has an effect")
        return None
    if group in GATEWAY_API_GROUPS:  # HTTPRoute, GRPCRoute, TCPRoute, ReferenceGrant: convert_gatewayapi
        return _gateway_api(ctx)
    if accepted is None:
        if is_mesh_group(group):
            lost = UNSUPPORTED_KINDS.get(raw.kind, "it has no effect")
            ctx.warn("kind", f"{raw.kind} ({raw.api_version}) is not supported by Meshline and is ignored: {lost}")
        return None
    if raw.api_version not in accepted:
        ctx.error(
            "apiVersion",
            f"unsupported apiVersion {raw.api_version!r} for {raw.kind} (expected {' or '.join(accepted)})",
        )
        return None
    if raw.kind in _MESH_KINDS:
        check_fields(ctx, raw.body, "", _TOP_LEVEL_FIELDS)
    meta = _metadata(ctx)
    if meta is None:
        return None
    namespace, name, labels, annotations = meta
    if raw.kind == "Namespace":
        return convert_namespace(ctx, name, labels)
    if raw.kind == "Service":
        return convert_service(ctx, namespace, name, labels, annotations)
    if raw.kind == "EndpointSlice":
        return convert_endpoint_slice(ctx, namespace, labels)
    if raw.kind == "Endpoints":
        return convert_endpoints(ctx, namespace, name)
    if raw.kind == "Pod":
        return convert_pod(ctx, namespace, name, labels, annotations)
    if raw.kind == "VirtualService":
        return convert_virtual_service(ctx, namespace, name)
    if raw.kind == "PeerAuthentication":
        return convert_peer_authentication(ctx, namespace, name)
    if raw.kind == "AuthorizationPolicy":
        return convert_authorization_policy(ctx, namespace, name)
    if raw.kind == "Sidecar":
        return convert_sidecar(ctx, namespace, name)
    if raw.kind == "PodNetns":
        return convert_pod_netns(ctx, namespace, name)
    if raw.kind == "Secret":
        return convert_secret(ctx, namespace, name)
    if raw.kind == "RequestAuthentication":
        return convert_request_authentication(ctx, namespace, name)
    if raw.kind == "Telemetry":
        return convert_telemetry(ctx, namespace, name)
    if raw.kind == "ServiceEntry":
        return convert_service_entry(ctx, namespace, name, labels)
    if raw.kind == "WorkloadEntry":
        return convert_workload_entry(ctx, namespace, name)
    if raw.kind == "Gateway":
        return convert_gateway(ctx, namespace, name)
    return convert_destination_rule(ctx, namespace, name)


def _gateway_api(ctx: Ctx) -> object | None:
    raw = ctx.raw
    accepted = GATEWAY_API_VERSIONS.get(raw.kind)
    if accepted is None:
        lost = GATEWAY_API_UNSUPPORTED.get(raw.kind, "it has no effect")
        ctx.warn("kind", f"{raw.kind} ({raw.api_version}) is not supported by Meshline and is ignored: {lost}")
        return None
    if raw.api_version not in accepted:
        ctx.error("apiVersion", f"unsupported apiVersion {raw.api_version!r} for {raw.kind} (expected "
                  f"{' or '.join(accepted)})")
        return None
    meta = _metadata(ctx)
    return None if meta is None else convert_gateway_api(ctx, meta[0], meta[1])


def is_mesh_group(group: str) -> bool:
    """Whether objects of API group `group` are mesh configuration a user expects to act:
    Meshline's and Istio's groups and the Kubernetes Gateway API."""
    return (group in MESH_API_GROUPS or group in GATEWAY_API_GROUPS or group in X_K8S_API_GROUPS
            or group == "meshline.io" or group.endswith((".istio.io", ".meshline.io")))


def convert_pod_netns(ctx: Ctx, namespace: str, name: str) -> PodNetns | None:
    body = ctx.raw.body
    node = get_str(ctx, body, "node", "")
    path = get_str(ctx, body, "netnsPath", "")
    if not node:
        ctx.error("node", "is required")
    if not path or not path.startswith("/"):
        ctx.error("netnsPath", f"must be an absolute path, got {path!r}")
        return None
    return PodNetns(ctx.raw.ref, namespace, name, node or "", path)


def _metadata(ctx: Ctx) -> tuple[str, str, Labels, Labels] | None:
    """(namespace, name, labels, annotations); None when the name is missing or invalid."""
    raw = ctx.raw
    body: Mapping[str, Any] = raw.body
    meta = as_map(ctx, body.get("metadata"), "metadata") or {}
    name = raw.name or get_str(ctx, meta, "name", "metadata") or ""
    labels = get_labels(ctx, meta, "labels", "metadata")
    annotations = get_labels(ctx, meta, "annotations", "metadata")
    if not name:
        ctx.error("metadata.name", "is required")
        return None
    if raw.kind == "Namespace":
        namespace = ""
        if not is_dns_label(name):
            ctx.error("metadata.name", f"{name!r} is not a valid namespace name")
    else:
        namespace = raw.namespace or get_str(ctx, meta, "namespace", "metadata") or "default"
        if not is_dns_label(namespace):
            ctx.error("metadata.namespace", f"{namespace!r} is not a valid namespace name")
        if raw.kind == "Service" and not is_dns_label(name):
            ctx.error("metadata.name", f"{name!r} is not a valid Service name (it must be a DNS label)")
    return namespace, name, labels, annotations
