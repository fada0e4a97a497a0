"""The contract between translation and the cache. Pure, no I/O.

Translation does not build Envoy messages eagerly. For a proxy it returns a *plan*: one
`ResourceSpec` per resource, naming a pure builder function and the exact IR inputs it
reads. The cache builds (and serializes) a resource only when no earlier build used an
equal (builder, args) pair, so a change rebuilds only what it touches and identical
resources are shared by every proxy that receives them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message

from controlplane.model.ir import SourceRef, TypeUrl

CLUSTER = TypeUrl("type.googleapis.com/envoy.config.cluster.v3.Cluster")
ENDPOINT = TypeUrl("type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment")
LISTENER = TypeUrl("type.googleapis.com/envoy.config.listener.v3.Listener")
ROUTE = TypeUrl("type.googleapis.com/envoy.config.route.v3.RouteConfiguration")
SECRET = TypeUrl("type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret")

# Push order (make-before-break): clusters, endpoints, listeners, routes, secrets first.
PUSH_ORDER: tuple[TypeUrl, ...] = (SECRET, CLUSTER, ENDPOINT, LISTENER, ROUTE)
SHORT_NAMES: dict[TypeUrl, str] = {
    CLUSTER: "clusters",
    ENDPOINT: "endpoints",
    LISTENER: "listeners",
    ROUTE: "routes",
    SECRET: "secrets",
}


@dataclass(frozen=True, slots=True)
class ResourceSpec:
    """How to build one named resource.

    `build(*args)` must be a pure module-level function returning the Envoy message; `args`
    are hashable IR values (compared with ==). `sources` names the user objects that shaped
    the resource, for NACK attribution in status."""

    type_url: TypeUrl
    name: str
    build: Callable[..., Message]
    args: tuple[Any, ...]
    sources: tuple[SourceRef, ...] = ()

    def make(self) -> Message:
        return self.build(*self.args)


def build_all(specs: Iterable[ResourceSpec]) -> dict[TypeUrl, dict[str, Message]]:
    """Build every spec eagerly (tests, golden files, config dumps)."""
    out: dict[TypeUrl, dict[str, Message]] = {}
    for spec in specs:
        out.setdefault(spec.type_url, {})[spec.name] = spec.make()
    return out
