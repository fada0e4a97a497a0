"""Snapshot consistency (go-control-plane's `Snapshot.Consistent()`): every name a proxy's
resources refer to is one the proxy holds. Pure computation, no I/O.

Checked on built resources, here in `cache/` rather than on plans in `translate/`: what must
be consistent is what a proxy receives, after the memo realized each spec, the snapshot
builder combined shared and own layers (the own layer wins a name both plan) and patched
endpoint-only changes; a plan's builder arguments are opaque until built. Each distinct
resource is parsed once (memoized by type, name and content version), and each distinct
per-type resource set once, so a rebuild re-checks only what changed.

A reference is missing when
- a listener (tcp_proxy, also weighted) or a route (cluster, weighted clusters, mirror), or
  any gRPC/HTTP service an extension calls, names a cluster that is neither in the proxy's
  CDS nor a static cluster of its bootstrap (`STATIC_CLUSTERS`): Envoy answers 503 ("no
  cluster") for that route or resets that connection;
- an EDS cluster's ClusterLoadAssignment (its `service_name`, else its name) is not in EDS:
  the cluster stays warming until the initial fetch times out, then has no endpoints;
- an HTTP connection manager's RDS name is not in RDS: the listener stays warming;
- an SDS secret is not among the proxy's secrets: the cluster or listener stays warming.
Names chosen at request time (tcp_proxy's cluster from filter state, a `cluster_header`)
cannot be checked and are not.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from google.protobuf import any_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from controlplane.cache.resources import Resource
from controlplane.cache.snapshot import Snapshot, TypeResources
from controlplane.model.ir import TypeUrl
from controlplane.translate.plan import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET

STATIC_CLUSTERS = frozenset({"xds-grpc", "admin"})
"""Clusters every Meshline bootstrap defines statically (`controlplane.bootstrap`)."""

KINDS: dict[TypeUrl, str] = {CLUSTER: "cluster", ENDPOINT: "endpoint", ROUTE: "route", SECRET: "secret"}
"""The `type` label of each kind of missing name."""

_REFERENCES: dict[tuple[str, str], TypeUrl] = {
    ("envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", "cluster"): CLUSTER,
    ("envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy.WeightedCluster.ClusterWeight", "name"): CLUSTER,
    ("envoy.config.route.v3.RouteAction", "cluster"): CLUSTER,
    ("envoy.config.route.v3.WeightedCluster.ClusterWeight", "name"): CLUSTER,
    ("envoy.config.route.v3.RouteAction.RequestMirrorPolicy", "cluster"): CLUSTER,
    ("envoy.config.core.v3.GrpcService.EnvoyGrpc", "cluster_name"): CLUSTER,
    ("envoy.config.core.v3.HttpUri", "cluster"): CLUSTER,
    ("envoy.extensions.filters.network.http_connection_manager.v3.Rds", "route_config_name"): ROUTE,
    ("envoy.extensions.transport_sockets.tls.v3.SdsSecretConfig", "name"): SECRET,
}
"""(message type, string field) -> the resource type the field names."""

_MESSAGE_TYPES: dict[TypeUrl, str] = {
    CLUSTER: "envoy.config.cluster.v3.Cluster",
    ENDPOINT: "envoy.config.endpoint.v3.ClusterLoadAssignment",
    LISTENER: "envoy.config.listener.v3.Listener",
    ROUTE: "envoy.config.route.v3.RouteConfiguration",
    SECRET: "envoy.extensions.transport_sockets.tls.v3.Secret",
}

Reference = tuple[TypeUrl, str]


class InconsistentSnapshot(Exception):
    """Raised in strict mode (tests) when a snapshot refers to a name it does not hold."""


@dataclass(frozen=True, slots=True)
class Inconsistency:
    """`referrer` (type URL, name) names `missing`, of type `kind`, which the proxy lacks."""

    kind: str
    missing: str
    referrer: Reference

    def __str__(self) -> str:
        rtype = self.referrer[0].rsplit(".", 1)[-1]
        return f"{rtype} {self.referrer[1]!r} refers to {self.kind} {self.missing!r}, which the proxy does not get"


def _message_class(full_name: str) -> type[Message] | None:
    try:
        desc = descriptor_pool.Default().FindMessageTypeByName(full_name)
    except KeyError:
        return None
    cls: type[Message] = message_factory.GetMessageClass(desc)
    return cls


def _walk(msg: Message, out: set[Reference]) -> None:
    desc = msg.DESCRIPTOR
    if desc.full_name == "google.protobuf.Any":
        assert isinstance(msg, any_pb2.Any)
        cls = _message_class(msg.type_url.rsplit("/", 1)[-1])
        if cls is not None:
            inner = cls()
            inner.ParseFromString(msg.value)
            _walk(inner, out)
        return
    for field, value in msg.ListFields():
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.is_repeated:
                if field.message_type.GetOptions().map_entry:
                    values: Iterable[Any] = value.values()
                    if field.message_type.fields_by_name["value"].type != FieldDescriptor.TYPE_MESSAGE:
                        continue
                else:
                    values = value
                for item in values:
                    _walk(item, out)
            else:
                _walk(value, out)
        elif field.type == FieldDescriptor.TYPE_STRING and not field.is_repeated:
            kind = _REFERENCES.get((desc.full_name, field.name))
            if kind is not None and value:
                out.add((kind, value))


def references(type_url: TypeUrl, msg: Message) -> frozenset[Reference]:
    """The (type URL, name) pairs the resource `msg` of `type_url` refers to."""
    out: set[Reference] = set()
    _walk(msg, out)
    if type_url == CLUSTER:
        assert isinstance(msg, cluster_pb2.Cluster)
        if msg.type == cluster_pb2.Cluster.EDS:
            out.add((ENDPOINT, msg.eds_cluster_config.service_name or msg.name))
    return frozenset(out)


def _parse(res: Resource) -> Message:
    cls = _message_class(_MESSAGE_TYPES.get(res.type_url, res.type_url.rsplit("/", 1)[-1]))
    if cls is None:
        raise ValueError(f"unknown resource type {res.type_url}")
    msg = cls()
    msg.ParseFromString(res.body)
    return msg


def missing(held: Mapping[TypeUrl, Iterable[str]], wanted: Mapping[Reference, Reference],
            static_clusters: frozenset[str] = STATIC_CLUSTERS, secrets: bool = True) -> list[Inconsistency]:
    """Of `wanted` (reference -> a resource that makes it), those `held` lacks, sorted."""
    have = {t: set(names) for t, names in held.items()}
    have.setdefault(CLUSTER, set()).update(static_clusters)
    out = []
    for (t, name), referrer in wanted.items():
        if t == SECRET and not secrets:
            continue
        if name not in have.get(t, ()):
            out.append(Inconsistency(KINDS.get(t, t), name, referrer))
    return sorted(out, key=lambda i: (i.kind, i.missing, i.referrer))


def check_messages(resources: Mapping[TypeUrl, Mapping[str, Message]], secrets: bool = True,
                   static_clusters: frozenset[str] = STATIC_CLUSTERS) -> list[Inconsistency]:
    """The check on built messages (golden files, config dumps). `secrets=False`: secrets
    are served apart (by the CA) and not checked."""
    wanted: dict[Reference, Reference] = {}
    for t in sorted(resources):
        for name in sorted(resources[t]):
            for ref in sorted(references(t, resources[t][name])):
                wanted.setdefault(ref, (t, name))
    return missing(resources, wanted, static_clusters, secrets)


class ConsistencyChecker:
    """Checks snapshots, remembering what each distinct resource and resource set refers to
    (a full rebuild `prune()`s what the last checks did not use)."""

    def __init__(self, static_clusters: frozenset[str] = STATIC_CLUSTERS) -> None:
        self.static_clusters = static_clusters
        self._refs: dict[tuple[TypeUrl, str, str], frozenset[Reference]] = {}
        self._sets: dict[tuple[TypeUrl, str], dict[Reference, Reference]] = {}
        self._used_refs: set[tuple[TypeUrl, str, str]] = set()
        self._used_sets: set[tuple[TypeUrl, str]] = set()

    def resource_refs(self, res: Resource) -> frozenset[Reference]:
        key = (res.type_url, res.name, res.version)
        self._used_refs.add(key)
        found = self._refs.get(key)
        if found is None:
            found = self._refs[key] = references(res.type_url, _parse(res))
        return found

    def _wanted(self, tr: TypeResources) -> dict[Reference, Reference]:
        key = (tr.type_url, tr.version)
        self._used_sets.add(key)
        found = self._sets.get(key)
        if found is None:
            found = {}
            for name in sorted(tr.items):
                for ref in self.resource_refs(tr.items[name]):
                    found.setdefault(ref, (tr.type_url, name))
            self._sets[key] = found
        return found

    def check(self, snap: Snapshot, secrets: bool = True) -> list[Inconsistency]:
        """What `snap` refers to and does not hold. `secrets=False`: the proxy is served no
        secrets by design (an unauthenticated stream), so they are not checked."""
        wanted: dict[Reference, Reference] = {}
        for tr in snap.types.values():
            for ref, referrer in self._wanted(tr).items():
                wanted.setdefault(ref, referrer)
        held = {t: tr.items.keys() for t, tr in snap.types.items()}
        return missing(held, wanted, self.static_clusters, secrets)

    def prune(self) -> None:
        """Forget what the checks since the last prune did not use."""
        self._refs = {k: v for k, v in self._refs.items() if k in self._used_refs}
        self._sets = {k: v for k, v in self._sets.items() if k in self._used_sets}
        self._used_refs.clear()
        self._used_sets.clear()
