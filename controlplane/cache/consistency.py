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
cannot be checked and are not. A route to a service cluster a VirtualService names but the
mesh lacks (unknown host, port or subset: `Inconsistency.user_destination`) is the user's
configuration, not a translation fault: reported, but tests' strict mode does not fail on it.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2
from google.protobuf import any_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from controlplane.cache.resources import Resource
from controlplane.cache.snapshot import Snapshot, TypeResources
from controlplane.model.ir import TypeUrl
from controlplane.translate.plan import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET
from controlplane.translate.secrets import CREDENTIAL_SDS_PREFIX

USER_CLUSTER_PREFIX = "outbound|"
"""Clusters of services as VirtualService destinations name them (`translate.names`)."""
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

    @property
    def user_destination(self) -> bool:
        """A route or listener names a service cluster (`outbound|<port>|<subset>|<host>`)
        that is not there: a VirtualService destination whose host, port or subset does not
        exist (or is outside the proxy's Sidecar scope). The user named it; Envoy answers 503
        for that route, as with Istio. Everything else is the translator's own naming."""
        return (self.kind == "cluster" and self.missing.startswith(USER_CLUSTER_PREFIX)
                and self.referrer[0] in (ROUTE, LISTENER))

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


_OWNERS = frozenset(owner for owner, _ in _REFERENCES)
_may_refer: dict[str, bool] = {}


def _can_refer(desc: Descriptor) -> bool:
    """Whether a message of type `desc` can hold a reference (a referring field, or an Any,
    somewhere inside it): the walk skips those that cannot (durations, matchers, ...).
    Memoized per type; a type inside its own definition counts as able to (conservative)."""
    name = desc.full_name
    found = _may_refer.get(name)
    if found is not None:
        return found
    _may_refer[name] = True  # while deciding (recursive types)
    result = name == "google.protobuf.Any" or name in _OWNERS or any(
        f.type == FieldDescriptor.TYPE_MESSAGE and f.message_type is not None and _can_refer(f.message_type)
        for f in desc.fields)
    _may_refer[name] = result
    return result


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
            mtype = field.message_type  # set for every message field
            if mtype is None or not _can_refer(mtype):
                continue
            if field.is_repeated:
                if mtype.GetOptions().map_entry:
                    values: Iterable[Message] = value.values()
                    if mtype.fields_by_name["value"].type != FieldDescriptor.TYPE_MESSAGE:
                        continue
                else:
                    values = value
                for item in values:
                    _walk(item, out)
            else:
                _walk(value, out)
        elif field.type == FieldDescriptor.TYPE_STRING and not field.is_repeated:
            kind = _REFERENCES.get((desc.full_name, field.name))
            if kind is not None and value and not (kind == SECRET and value.startswith(CREDENTIAL_SDS_PREFIX)):
                # (DestinationRule credentialName secrets are withheld by design while their
                # Secret is missing or unusable: validation reports it, the cluster fails closed.)
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


def missing(held: Mapping[TypeUrl, Container[str]], wanted: Mapping[Reference, Reference],
            static_clusters: frozenset[str] = STATIC_CLUSTERS, secrets: bool = True) -> list[Inconsistency]:
    """Of `wanted` (reference -> a resource that makes it), those `held` lacks, sorted."""
    none: frozenset[str] = frozenset()
    out = []
    for (t, name), referrer in wanted.items():
        if t == SECRET and not secrets:
            continue
        if name not in held.get(t, none) and not (t == CLUSTER and name in static_clusters):
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
        self._sets: dict[tuple[TypeUrl, str], dict[TypeUrl, dict[str, int]]] = {}
        self._used_refs: set[tuple[TypeUrl, str, str]] = set()
        self._used_sets: set[tuple[TypeUrl, str]] = set()

    def resource_refs(self, res: Resource) -> frozenset[Reference]:
        key = (res.type_url, res.name, res.version)
        self._used_refs.add(key)
        found = self._refs.get(key)
        if found is None:
            found = self._refs[key] = references(res.type_url, _parse(res))
        return found

    def _counts(self, tr: TypeResources) -> dict[TypeUrl, dict[str, int]]:
        """Per referenced type, how many of `tr`'s resources name each name; derived from the
        predecessor's counts when `tr` is a successor that knows what changed (an
        endpoint-only patch re-reads a few resources, not the set)."""
        key = (tr.type_url, tr.version)
        self._used_sets.add(key)
        found = self._sets.get(key)
        if found is not None:
            return found
        prev = tr.prev
        base = self._sets.get((prev.type_url, prev.version)) if prev is not None and tr.changed is not None else None
        counts: dict[TypeUrl, dict[str, int]]
        if prev is not None and tr.changed is not None and base is not None:
            counts = {t: dict(names) for t, names in base.items()}
            for name in tr.changed:
                old = prev.items.get(name)
                for t, ref in self.resource_refs(old) if old is not None else ():
                    left = counts[t][ref] - 1
                    if left:
                        counts[t][ref] = left
                    else:
                        del counts[t][ref]
                new = tr.items.get(name)
                for t, ref in self.resource_refs(new) if new is not None else ():
                    names = counts.setdefault(t, {})
                    names[ref] = names.get(ref, 0) + 1
        else:
            counts = {}
            for res in tr.items.values():
                for t, ref in self.resource_refs(res):
                    names = counts.setdefault(t, {})
                    names[ref] = names.get(ref, 0) + 1
        self._sets[key] = counts
        return counts

    def check(self, snap: Snapshot, secrets: bool = True) -> list[Inconsistency]:
        """What `snap` refers to and does not hold. `secrets=False`: the proxy is served no
        secrets by design (an unauthenticated stream), so they are not checked."""
        held = {t: tr.items for t, tr in snap.types.items()}
        none: Mapping[str, Resource] = {}
        lacking: set[Reference] = set()
        for tr in snap.types.values():
            for t, names in self._counts(tr).items():
                if t == SECRET and not secrets:
                    continue
                gone = names.keys() - held.get(t, none).keys()  # set operations in C: no loop per name
                if t == CLUSTER:
                    gone -= self.static_clusters
                lacking.update((t, name) for name in gone)
        if not lacking:
            return []
        wanted: dict[Reference, Reference] = {}  # only now: which resource names each missing one
        for t in sorted(snap.types):
            items = snap.types[t].items
            for name in sorted(items):
                for ref in self.resource_refs(items[name]):
                    if ref in lacking:
                        wanted.setdefault(ref, (t, name))
        return missing(held, wanted, self.static_clusters, secrets)

    def prune(self, live: Iterable[Snapshot] = ()) -> None:
        """Forget what neither the checks since the last prune nor the `live` snapshots use."""
        seen: set[int] = set()
        for snap in live:
            for tr in snap.types.values():
                if id(tr) in seen:
                    continue
                seen.add(id(tr))
                self._used_sets.add((tr.type_url, tr.version))
                self._used_refs.update((tr.type_url, n, r.version) for n, r in tr.items.items())
        self._refs = {k: v for k, v in self._refs.items() if k in self._used_refs}
        self._sets = {k: v for k, v in self._sets.items() if k in self._used_sets}
        self._used_refs.clear()
        self._used_sets.clear()
