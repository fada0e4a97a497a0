"""IR of the Kubernetes Gateway API (gateway.networking.k8s.io) objects Meshline reads:
routes (HTTPRoute, GRPCRoute, TCPRoute, TLSRoute), ReferenceGrants and the route status it computes.
Pure data, no I/O.

A route converts (`controlplane.model.convert_gatewayapi`) to a `GatewayRoute` whose rules
already hold the IR match, filter and timeout values the VirtualService path uses; what
needs other objects (the parent Service, backend Services, ReferenceGrants) is resolved in
`controlplane.model.gamma`, which turns the routes attached to each Service into one
VirtualService value, so every routing rule is translated in one place
(`controlplane.translate.routes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from controlplane.model.ir import CorsPolicy, Headers, HTTPMatch, Labels, Redirect, Retry, Rewrite, SourceRef

GATEWAY_GROUP = "gateway.networking.k8s.io"
MESH_CONTROLLER = "meshline.io/mesh-controller"
"""controllerName in the status of routes attached to Services (GAMMA)."""
GATEWAY_CONTROLLER = "meshline.io/gateway-controller"
"""controllerName of GatewayClasses (and Gateways) Meshline implements."""

RouteKind = Literal["HTTPRoute", "GRPCRoute", "TCPRoute", "TLSRoute"]


@dataclass(frozen=True, slots=True)
class ParentRef:
    """`spec.parentRefs[]` with defaults applied (group gateway.networking.k8s.io, kind
    Gateway, the route's namespace). `given` keeps the fields as written, echoed back in
    `status.parents[].parentRef`."""

    group: str
    kind: str
    namespace: str
    name: str
    port: int | None = None
    section_name: str | None = None
    given: tuple[tuple[str, str | int], ...] = ()

    @property
    def is_service(self) -> bool:
        return self.group in ("", "core") and self.kind == "Service"

    @property
    def is_gateway(self) -> bool:
        return self.group == GATEWAY_GROUP and self.kind == "Gateway"


@dataclass(frozen=True, slots=True)
class BackendRef:
    """A `backendRefs[]` entry (or a RequestMirror's `backendRef`). `headers`: the entry's own
    RequestHeaderModifier / ResponseHeaderModifier filters."""

    group: str
    kind: str
    namespace: str
    name: str
    port: int | None
    weight: int = 1
    headers: Headers | None = None
    path: str = ""  # field path, for messages


@dataclass(frozen=True, slots=True)
class RuleMatch:
    """One match of a rule, with what depends on the match (a prefix rewrite or redirect
    needs the matched prefix) and its Gateway API precedence key (smaller sorts first)."""

    match: HTTPMatch
    rank: tuple[int, ...]
    rewrite: Rewrite | None = None
    redirect: Redirect | None = None


@dataclass(frozen=True, slots=True)
class Mirror:
    backend: BackendRef
    percentage: float | None = None  # None: every request


@dataclass(frozen=True, slots=True)
class RouteRule:
    index: int
    name: str = ""
    matches: tuple[RuleMatch, ...] = ()  # TCPRoute: none
    backends: tuple[BackendRef, ...] = ()
    mirrors: tuple[Mirror, ...] = ()
    headers: Headers | None = None
    timeout_ms: int | None = None
    retries: Retry | None = None
    # why every request of this rule is answered 500 (a filter Meshline cannot apply:
    # the Gateway API forbids skipping it)
    fails: str | None = None
    cors: CorsPolicy | None = None


@dataclass(frozen=True, slots=True)
class GatewayRoute:
    ref: SourceRef
    kind: RouteKind
    namespace: str
    name: str
    parents: tuple[ParentRef, ...]
    rules: tuple[RouteRule, ...] = ()
    hostnames: tuple[str, ...] = ()
    generation: int | None = None
    created: str = ""  # metadata.creationTimestamp (RFC 3339 sorts as text); "" when absent


@dataclass(frozen=True, slots=True)
class ReferenceGrant:
    """Allows objects `from` (group, kind, namespace) to refer to objects `to` (group,
    kind, name or None for any) of the grant's own namespace."""

    ref: SourceRef
    namespace: str
    name: str
    from_: tuple[tuple[str, str, str], ...] = ()
    to: tuple[tuple[str, str, str | None], ...] = ()

    def permits(self, group: str, kind: str, namespace: str, to_group: str, to_kind: str, to_name: str) -> bool:
        return (any(f == (group, kind, namespace) for f in self.from_)
                and any(_core(g) == _core(to_group) and k == to_kind and (n is None or n == to_name)
                        for g, k, n in self.to))


def _core(group: str) -> str:
    return "" if group == "core" else group


@dataclass(frozen=True, slots=True)
class Condition:
    type: str  # Accepted | ResolvedRefs
    status: Literal["True", "False"]
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class ParentStatus:
    """One `status.parents[]` entry Meshline owns."""

    parent: ParentRef
    controller: str
    conditions: tuple[Condition, ...]

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)


# --------------------------------------------------------------------------- Gateways (class meshline)


@dataclass(frozen=True, slots=True)
class Listener:
    """A Gateway's `spec.listeners[]`. `certificate_refs`: (group, kind, namespace, name);
    `allowed_namespaces`: Same, All or Selector (with `namespace_selector`);
    `allowed_kinds`: route kinds (empty: the protocol's defaults)."""

    name: str
    port: int
    protocol: str
    hostname: str | None = None
    tls_mode: str | None = None  # Terminate | Passthrough (HTTPS/TLS)
    certificate_refs: tuple[tuple[str, str, str, str], ...] = ()
    allowed_namespaces: str = "Same"
    namespace_selector: Labels = ()
    allowed_kinds: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ApiGateway:
    """A Gateway API `Gateway` (`ref.kind` is `Gateway.gateway.networking.k8s.io`: see
    `controlplane.model.raw.ObjectKey`)."""

    ref: SourceRef
    namespace: str
    name: str
    class_name: str
    listeners: tuple[Listener, ...] = ()
    generation: int | None = None


@dataclass(frozen=True, slots=True)
class GatewayClass:
    ref: SourceRef
    name: str
    controller: str
    generation: int | None = None


@dataclass(frozen=True, slots=True)
class ListenerStatus:
    name: str
    supported_kinds: tuple[str, ...]
    attached_routes: int
    conditions: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class ObjectStatus:
    """The status Meshline owns of a Gateway (conditions and listeners) or GatewayClass."""

    conditions: tuple[Condition, ...]
    listeners: tuple[ListenerStatus, ...] = ()
    generation: int | None = None
    ref: SourceRef | None = None
