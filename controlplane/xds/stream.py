"""One ADS stream (state-of-the-world or delta): subscriptions, versions, nonces, ACK/NACK
bookkeeping and the ordered push of a target snapshot. Pure state machine: it consumes
requests and snapshots and returns response bytes; the gRPC server does the I/O. It never
reads time itself: the clock is injected (`Clock`; the server passes the wall clock, tests a
`ManualClock`). Others read a stream through `view()`/`views()` (frozen `TypeView`s),
`held_resources()`, `acked_resource()`, `has_pending()` and `sync_state()`, not its
per-type state.

Push order is make-before-break: secrets, clusters, endpoints, listeners, routes with
additions and updates first (after clusters with new names the stream waits for their
ACK, i.e. until Envoy has warmed them), then removals in the same order. A NACKed
resource version is quarantined for this proxy: the last version it accepted (or nothing)
is sent in its place until the resource changes again, so one bad resource never blocks
later good updates of the others. Which resources a NACK rejected comes from the names
Envoy's message reports in its known formats (`nackblame`), else every resource the
rejected response changed.

Every request is checked against `XdsLimits` before it changes anything: a type URL we do
not serve, a name longer than the limit or an oversized node is malformed
(`RequestRefused`, INVALID_ARGUMENT at the gRPC boundary); more names per request, per
type or subscribed bytes per stream than allowed is RESOURCE_EXHAUSTED. A delta
subscribe/unsubscribe costs O(names it changes): the stream's names are a shared set plus
its own differences (`NameDelta`), and the next push examines only the changed names.
"""

from __future__ import annotations

import hashlib
import sys
import weakref
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import DecodeError

from controlplane.cache.resources import Resource
from controlplane.cache.snapshot import Snapshot, TypeResources
from controlplane.model.ir import SourceRef, TypeUrl
from controlplane.translate.plan import CLUSTER, ENDPOINT, LISTENER, PUSH_ORDER, ROUTE, SECRET, SHORT_NAMES
from controlplane.xds.clock import Clock, wall_clock
from controlplane.xds.nackblame import named_in_nack

Protocol = Literal["sotw", "delta"]
WILDCARD_TYPES = frozenset({CLUSTER, LISTENER})
REMOVE_ORDER: tuple[TypeUrl, ...] = (ROUTE, LISTENER, CLUSTER, ENDPOINT, SECRET)
NAMED_TYPES = frozenset({ENDPOINT, ROUTE, SECRET})
SERVED_TYPES: frozenset[str] = frozenset(PUSH_ORDER)
MiB = 1024 * 1024
# How much of a NACK's message is read for the names it rejects (see `_on_nack`): a base plus
# an allowance per resource the rejected response changed.
NACK_READ_BASE = 64 * 1024
NACK_READ_PER_RESOURCE = 4 * 1024


@dataclass(frozen=True, slots=True)
class XdsLimits:
    """What one client may make the xDS server hold (issue 14, item 4). Beyond a limit its
    stream ends with RESOURCE_EXHAUSTED; a malformed request ends it with INVALID_ARGUMENT.
    The defaults fit a sidecar or node proxy of a 10,000-service mesh with room to spare."""

    max_request_bytes: int = 4 * MiB  # one gRPC message (the server's receive limit)
    max_names_per_request: int = 10_000  # names subscribed + unsubscribed + initial versions in one request
    max_names_per_type: int = 10_000  # names one stream subscribes to, per type
    max_name_length: int = 1024  # characters of one resource name (or of a version in initial_resource_versions)
    max_subscription_bytes: int = 2 * MiB  # characters of every name one stream subscribes to, all types
    max_node_bytes: int = 64 * 1024  # the serialized node (id, metadata, ...) of a stream's first request
    max_queued_requests: int = 64  # requests held while a stream is being set up (authentication)
    max_queued_bytes: int = 8 * MiB  # ...and their size
    max_streams_per_connection: int = 100  # HTTP/2 MAX_CONCURRENT_STREAMS (RFC 9113: "no smaller than 100"; more wait)
    max_streams_per_identity: int = 1000  # open streams of one authenticated identity (node proxies: per node)
    max_streams_per_peer: int = 256  # open unauthenticated streams from one IP address (not loopback: see next)
    limit_loopback_peers: bool = False  # loopback is local development (and 15012's TLS front, behind a socket)
    shared_name_bytes: int = 64 * MiB  # names held in the index of sets shared between streams (`NameSets`)


class RequestRefused(Exception):
    """A request the stream will not take: beyond a limit (`exhausted`, RESOURCE_EXHAUSTED)
    or malformed (INVALID_ARGUMENT). The stream ends with `message`."""

    def __init__(self, message: str, exhausted: bool) -> None:
        super().__init__(message)
        self.message = message
        self.exhausted = exhausted


def _same(a: Resource | None, b: Resource) -> bool:
    return a is b or (a is not None and a.version == b.version)


def content_version(items: Mapping[str, Resource]) -> str:
    h = hashlib.blake2b(digest_size=8)
    for name in sorted(items):
        h.update(name.encode())
        h.update(b"\0")
        h.update(items[name].version.encode())
    return h.hexdigest()


class Layered(MutableMapping[str, Resource]):
    """What a stream holds for one type, as a shared read-only `base` (a snapshot's items,
    shared by every stream in sync with it) plus this stream's own differences. A thousand
    proxies holding the same thousand clusters keep one dict, not a thousand copies."""

    __slots__ = ("base", "gone", "over")

    def __init__(self, base: Mapping[str, Resource]) -> None:
        self.base = base
        self.over: dict[str, Resource] = {}
        self.gone: set[str] = set()

    def __getitem__(self, name: str) -> Resource:
        r = self.over.get(name)
        if r is not None:
            return r
        if name in self.gone:
            raise KeyError(name)
        return self.base[name]

    def __contains__(self, name: object) -> bool:
        return name in self.over or (name in self.base and name not in self.gone)

    def get(self, name: str, default: Any = None) -> Any:
        r = self.over.get(name)
        if r is not None:
            return r
        if name in self.gone:
            return default
        return self.base.get(name, default)

    def __setitem__(self, name: str, r: Resource) -> None:
        self.over[name] = r
        if self.gone:
            self.gone.discard(name)

    def update(self, other: Any = (), /, **kw: Resource) -> None:
        """(MutableMapping's update goes through `__setitem__` per name in Python: one
        changed endpoint per push makes this per-stream, per-change work.)"""
        if kw or not isinstance(other, dict):
            super().update(other, **kw)
            return
        self.over.update(other)
        if self.gone:
            self.gone.difference_update(other)

    def __delitem__(self, name: str) -> None:
        if name not in self:
            raise KeyError(name)
        self.over.pop(name, None)
        if name in self.base:
            self.gone.add(name)

    def __iter__(self) -> Iterator[str]:
        yield from self.over
        for n in self.base:
            if n not in self.over and n not in self.gone:
                yield n

    def __len__(self) -> int:
        return len(self.base) - len(self.gone) + sum(1 for n in self.over if n not in self.base)

    def __bool__(self) -> bool:  # (without counting: `gone` holds names of `base` only)
        return bool(self.over) or len(self.base) > len(self.gone)

    def names(self) -> set[str]:
        """The names held, as a set (built at C speed, unlike iterating)."""
        return set(self.base).difference(self.gone).union(self.over)


def _names(m: Mapping[str, Resource]) -> set[str]:
    return m.names() if isinstance(m, Layered) else set(m)


class NameDelta(AbstractSet[str]):
    """A delta stream's subscribed names of one type: a shared frozenset (`base`, from
    `NameSets`) plus this stream's own additions and removals. Subscribing or unsubscribing
    k names costs O(k); once the stream's own differences outgrow a quarter of the base,
    `settled()` folds them into a new shared set (amortized O(1) per changed name), so
    streams subscribing to the same names still share one set."""

    __slots__ = ("added", "base", "removed")

    def __init__(self, base: frozenset[str] = frozenset()) -> None:
        self.base = base
        self.added: set[str] = set()  # never in base
        self.removed: set[str] = set()  # always in base

    def __contains__(self, name: object) -> bool:
        return name in self.added or (name in self.base and name not in self.removed)

    def __len__(self) -> int:
        return len(self.base) - len(self.removed) + len(self.added)

    def __iter__(self) -> Iterator[str]:
        # Copies taken in C before iterating: the status API reads subscriptions from another
        # thread while this one may change them.
        added, removed = tuple(self.added), frozenset(self.removed)
        yield from added
        if removed:
            yield from (n for n in self.base if n not in removed)
        else:
            yield from self.base

    def as_set(self) -> set[str]:
        """The names as a new set (built at C speed, unlike iterating)."""
        return set(self.base).difference(self.removed).union(self.added)

    def add(self, name: str) -> bool:
        """Subscribe `name`; True when it was not subscribed."""
        if name in self.base:
            if name in self.removed:
                self.removed.discard(name)
                return True
            return False
        if name in self.added:
            return False
        self.added.add(name)
        return True

    def discard(self, name: str) -> bool:
        """Unsubscribe `name`; True when it was subscribed."""
        if name in self.base:
            if name in self.removed:
                return False
            self.removed.add(name)
            return True
        if name in self.added:
            self.added.remove(name)
            return True
        return False

    def settled(self, sets: NameSets) -> NameDelta:
        """This, or (when its own differences have grown large) the same names over a new
        shared base."""
        if len(self.added) + len(self.removed) <= max(64, len(self.base) // 4):
            return self
        return NameDelta(sets.canonical(self.base.difference(self.removed).union(self.added)))


def _name_set(names: AbstractSet[str]) -> set[str]:
    return names.as_set() if isinstance(names, NameDelta) else set(names)


def _delta_names(st: TypeState) -> NameDelta:
    """A delta stream's names of `st`, as a `NameDelta` it may change."""
    if not isinstance(st.names, NameDelta):
        st.names = NameDelta(frozenset(st.names))
    return st.names


def _shares(items: Mapping[str, Resource], tr: TypeResources | None) -> bool:
    """Whether `items` is exactly `tr`'s resources (the very same objects)."""
    if tr is None or len(items) != len(tr.items):
        return False
    target = tr.items
    return all(target.get(n) is r for n, r in items.items())


@dataclass(slots=True)
class NackRecord:
    version: str
    nonce: str
    message: str
    code: int
    at: float
    resources: tuple[str, ...]
    sources: tuple[SourceRef, ...]
    generation: int = 0  # snapshot generation of the rejected response
    rejected: tuple[Resource, ...] = ()  # the rejected resource versions themselves


MAX_MESSAGE = 1000


def sanitize(text: str, limit: int = MAX_MESSAGE) -> str:
    """A proxy's (untrusted) text made safe for logs, status and CRD status: control
    characters escaped, truncated."""
    out = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text.strip()[: limit * 2])
    return out if len(out) <= limit else out[:limit] + "..."


@dataclass(slots=True)
class Pending:
    """A response Envoy has not answered yet."""

    nonce: str
    version: str
    changes: Mapping[str, Resource | None]  # None: removal (may be a snapshot's shared items)
    full: bool  # SotW: `changes` is the whole state of the type
    sent_at: float
    generation: int = 0  # snapshot generation the response came from


@dataclass(slots=True)
class TypeState:
    type_url: TypeUrl
    wildcard: bool = False
    # Subscribed names. SotW replaces the whole set per request: then it is a frozenset shared
    # by every stream subscribing to the same names (`NameSets`); delta edits a `NameDelta`.
    names: AbstractSet[str] = field(default_factory=frozenset)
    name_bytes: int = 0  # characters of the subscribed names (counted against the stream's limit)
    # Delta: names whose subscription changed since the stream was last in sync with
    # `synced_target` (the next push examines only these).
    touched: set[str] = field(default_factory=set)
    known: MutableMapping[str, Resource] = field(default_factory=dict)  # what Envoy holds (sent, not NACKed)
    acked: MutableMapping[str, Resource] = field(default_factory=dict)  # what Envoy ACKed
    pending: dict[str, Pending] = field(default_factory=dict)
    quarantine: dict[str, str] = field(default_factory=dict)  # name -> rejected version
    nonce: str = ""
    version_sent: str = ""
    version_acked: str = ""
    last_push: float = 0.0
    last_ack: float = 0.0
    needs_response: bool = False
    names_key: bytes = b""  # SotW: the subscription of the last request, as bytes (see _handle_sotw)
    absent_notified: set[str] = field(default_factory=set)
    # EDS: names to send again even though Envoy holds this version (their cluster changed:
    # Envoy's new cluster warms until it gets its ClusterLoadAssignment, and only then asks
    # for the cluster's SDS secrets; see `_resend_endpoints`).
    resend: set[str] = field(default_factory=set)
    synced_target: TypeResources | None = None
    last_nack: NackRecord | None = None
    nacks: int = 0

    def subscribed(self, name: str) -> bool:
        return self.wildcard or name in self.names


SyncState = Literal["SYNCED", "STALE", "NACKED", "NOT_SENT"]


@dataclass(frozen=True, slots=True)
class TypeView:
    """A read-only copy of one type's state on one stream (what status and the runtime read)."""

    type_url: TypeUrl
    state: SyncState  # see AdsStream.sync_state
    wildcard: bool
    subscribed: frozenset[str]  # names subscribed besides the wildcard
    version_sent: str
    version_acked: str
    nonce: str  # of the last response sent
    pending_nonces: tuple[str, ...]  # responses Envoy has not answered yet, oldest first
    pending_names: frozenset[str]  # the resources those responses carry (or remove)
    resources: int  # resources Envoy holds (sent, not rejected)
    acked: int  # resources Envoy ACKed
    quarantine: Mapping[str, str]  # name -> rejected version held back
    last_push: float  # clock time of the last response (0: none)
    last_ack: float
    last_nack: NackRecord | None
    nacks: int


@dataclass(slots=True)
class Outgoing:
    type_url: TypeUrl
    nonce: str
    payload: bytes
    count: int
    removed: int = 0


class _SharedNames(frozenset[str]):
    """A canonical set of names, with its serialized SotW subscription and its size."""

    __slots__ = ("key", "nbytes")

    key: bytes | None
    nbytes: int


class _Ref(weakref.ref[_SharedNames]):
    __slots__ = ("hash", "nbytes")

    hash: int
    nbytes: int


class NameSets:
    """Canonical sets of subscribed names, so a thousand streams subscribing to the same
    thousand endpoints hold one set (of interned strings), not a thousand. It holds only weak
    references: a set lives exactly as long as some stream uses it, so abandoned streams
    leave nothing behind. Bounded by bytes: beyond `max_bytes` of names in live shared sets,
    new sets are not shared (the streams keep their own)."""

    def __init__(self, max_bytes: int = 64 * MiB) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0  # names (characters, plus a pointer each) in the live shared sets
        self._sets: dict[int, list[_Ref]] = {}

    def __len__(self) -> int:
        """Shared sets still in use."""
        return sum(len(refs) for refs in self._sets.values())

    def canonical(self, names: frozenset[str]) -> frozenset[str]:
        h = hash(names)
        refs = self._sets.get(h)
        if refs is not None:
            for ref in refs:
                found = ref()
                if found is not None and found == names:
                    return found
        nbytes = sum(map(len, names)) + 8 * len(names) + 200
        if self.bytes + nbytes > self.max_bytes:
            return names  # the index is full: this stream keeps its own set
        shared = names if isinstance(names, _SharedNames) else _SharedNames(names)
        shared.key, shared.nbytes = None, nbytes
        ref = _Ref(shared, self._gone)
        ref.hash, ref.nbytes = h, nbytes
        self._sets.setdefault(h, []).append(ref)
        self.bytes += nbytes
        return shared

    def _gone(self, ref: weakref.ref[_SharedNames]) -> None:
        assert isinstance(ref, _Ref)
        refs = self._sets.get(ref.hash)
        if refs is None:
            return
        try:
            refs.remove(ref)
        except ValueError:
            return
        self.bytes -= ref.nbytes
        if not refs:
            del self._sets[ref.hash]

    def key(self, names: frozenset[str], key: bytes) -> bytes:
        """One shared copy of the serialized subscription `key` for the canonical `names`."""
        if not isinstance(names, _SharedNames):
            return key
        found = names.key
        if found is not None and found == key:
            return found
        if found is None and len(key) <= names.nbytes:
            # (Only a key about the size of the names: one stream's padding (unknown fields,
            # counted against its own limit) must not stay held for the other streams sharing
            # the set after its own stream has ended.)
            names.key = key
        return key


def _view_class() -> Any:
    """The message class that reads a DiscoveryRequest's small fields only: `version_info`,
    `type_url`, `response_nonce`, `node` and `error_detail` are parsed, and
    the subscription (resource names, locators, dynamic parameters) stays as unknown fields
    (raw bytes: a copy in C, no string objects). Same field numbers, so any DiscoveryRequest
    parses as it."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from google.rpc import status_pb2  # noqa: F401  (google/rpc/status.proto in the pool)

    fd = descriptor_pb2.FileDescriptorProto(name="meshline/internal/sotw_request_view.proto",
                                            package="meshline.internal", syntax="proto3",
                                            dependency=["google/rpc/status.proto", base_pb2.DESCRIPTOR.name])
    msg = fd.message_type.add(name="SotwRequestView")
    f = descriptor_pb2.FieldDescriptorProto
    for name, number, kind in (("version_info", 1, f.TYPE_STRING), ("type_url", 4, f.TYPE_STRING),
                               ("response_nonce", 5, f.TYPE_STRING)):
        msg.field.add(name=name, number=number, type=kind, label=f.LABEL_OPTIONAL)
    # `node` parsed as the Node it must be (Envoy sends it on a stream's first request only): as
    # bytes, a request repeating the subscription with a node that does not parse, or two
    # occurrences the full parse would merge (the last one valid), was accepted.
    msg.field.add(name="node", number=2, type=f.TYPE_MESSAGE, label=f.LABEL_OPTIONAL,
                  type_name=".envoy.config.core.v3.Node")
    msg.field.add(name="error_detail", number=6, type=f.TYPE_MESSAGE, label=f.LABEL_OPTIONAL,
                  type_name=".google.rpc.Status")
    pool = descriptor_pool.Default()
    try:
        desc = pool.FindMessageTypeByName("meshline.internal.SotwRequestView")
    except KeyError:
        pool.Add(fd)
        desc = pool.FindMessageTypeByName("meshline.internal.SotwRequestView")
    return message_factory.GetMessageClass(desc)


_SotwView = _view_class()
_NOT_SUBSCRIPTION = ("version_info", "node", "response_nonce", "error_detail")


@dataclass(frozen=True, slots=True)
class SotwHandled:
    """What `AdsStream.handle_sotw_bytes` did with a request: its type, its response nonce,
    the NACK it was (or None), and the parsed request when its subscription changed (None
    when the request repeated the stream's subscription and was never parsed whole)."""

    type_url: TypeUrl
    nonce: str
    nack: NackRecord | None
    request: discovery_pb2.DiscoveryRequest | None


class AdsStream:
    """State of one stream. `handle_request()` and `next_push()` return what to send."""

    def __init__(self, protocol: Protocol, stream_id: int, name_sets: NameSets | None = None,
                 limits: XdsLimits | None = None, clock: Clock = wall_clock) -> None:
        self.protocol = protocol
        self.clock = clock
        self.stream_id = stream_id
        self.limits = limits if limits is not None else XdsLimits()
        self.name_sets = name_sets if name_sets is not None else NameSets(self.limits.shared_name_bytes)
        self.subscription_bytes = 0  # characters of every name this stream subscribes to
        self.peak_subscription_bytes = 0
        self.types: dict[TypeUrl, TypeState] = {}
        self.target: Snapshot | None = None
        self.waiting: tuple[TypeUrl, str, float] | None = None  # (type, nonce, deadline)
        self._nonce = 0
        self.connected_at = clock()
        self._sotw = protocol == "sotw"

    # ------------------------------------------------------------------ read API
    def view(self, type_url: TypeUrl) -> TypeView | None:
        """A frozen copy of `type_url`'s state, or None when Envoy never asked for it."""
        st = self.types.get(type_url)
        if st is None:
            return None
        pending = sorted(st.pending.values(), key=lambda p: int(p.nonce))
        names: set[str] = set()
        for p in pending:
            names.update(p.changes)
        return TypeView(
            type_url=type_url, state=self.sync_state(type_url), wildcard=st.wildcard,
            subscribed=frozenset(_name_set(st.names)), version_sent=st.version_sent,
            version_acked=st.version_acked, nonce=st.nonce, pending_nonces=tuple(p.nonce for p in pending),
            pending_names=frozenset(names), resources=len(st.known), acked=len(st.acked),
            quarantine=MappingProxyType(dict(st.quarantine)), last_push=st.last_push, last_ack=st.last_ack,
            last_nack=st.last_nack, nacks=st.nacks)

    def views(self) -> dict[TypeUrl, TypeView]:
        """Every requested type's view, in type URL order."""
        out: dict[TypeUrl, TypeView] = {}
        for t in sorted(self.types):
            v = self.view(t)
            if v is not None:
                out[t] = v
        return out

    def held_resources(self, type_url: TypeUrl) -> list[Resource]:
        """The resources of `type_url` Envoy holds (sent, not rejected), by name."""
        st = self.types.get(type_url)
        if st is None:
            return []
        known = st.known
        return [known[n] for n in sorted(_names(known))]

    def acked_resource(self, type_url: TypeUrl, name: str) -> Resource | None:
        """The version of a resource Envoy ACKed, if any."""
        st = self.types.get(type_url)
        return st.acked.get(name) if st is not None else None

    def has_pending(self) -> bool:
        """Whether a response of any type is still unanswered."""
        for st in self.types.values():
            if st.pending:
                return True
        return False

    def last_nack(self, type_url: TypeUrl) -> NackRecord | None:
        st = self.types.get(type_url)
        return st.last_nack if st is not None else None

    def subscribes(self, type_url: TypeUrl, name: str) -> bool:
        """Whether Envoy asked for `name` of `type_url` (by name or by wildcard)."""
        st = self.types.get(type_url)
        return st is not None and st.subscribed(name)

    def requested_types(self) -> list[TypeUrl]:
        """The types Envoy asked for on this stream, in type URL order."""
        return sorted(self.types)

    def nack_type(self, nack: NackRecord) -> TypeUrl | None:
        """The type whose latest NACK `nack` is (None: not this stream's latest)."""
        for t, st in self.types.items():
            if st.last_nack is nack:
                return t
        return None

    def held_back(self) -> dict[TypeUrl, Mapping[str, str]]:
        """Per type, in type URL order, the resources this stream holds back because the proxy
        rejected them (name -> rejected version); types holding nothing back are left out.
        Cheap when nothing is held back (read per proxy on every status/metrics read)."""
        return {t: MappingProxyType(dict(st.quarantine))
                for t, st in sorted(self.types.items()) if st.quarantine}

    @property
    def target_generation(self) -> int | None:
        """The snapshot generation this stream is being brought to (None: no snapshot yet)."""
        return self.target.generation if self.target is not None else None

    def warming_left(self) -> float | None:
        """Seconds until the wait for new clusters to warm gives up, when that deadline
        matters (something waits for it); None otherwise."""
        if self.waiting is None or not self.may_push():
            return None
        return max(0.0, self.waiting[2] - self.clock())

    # ------------------------------------------------------------------ helpers
    def _next_nonce(self) -> str:
        self._nonce += 1
        return str(self._nonce)

    def _state(self, type_url: TypeUrl) -> TypeState:
        st = self.types.get(type_url)
        if st is None:
            st = self.types[type_url] = TypeState(type_url)
        return st

    def _desired(self, st: TypeState) -> dict[str, Resource]:
        """Target resources of this type that Envoy subscribes to, after quarantine."""
        tr = self.target.get(st.type_url) if self.target is not None else None
        items: Mapping[str, Resource] = tr.items if tr is not None else {}
        if st.wildcard:
            out = dict(items)
        else:
            out = {n: items[n] for n in st.names if n in items}
        for name, bad in st.quarantine.items():
            r = out.get(name)
            if r is not None and r.version == bad:
                fallback = st.acked.get(name)
                if fallback is not None:
                    out[name] = fallback
                elif not self._keep_rejected(st):
                    del out[name]
        return out

    def _keep_rejected(self, st: TypeState) -> bool:
        """SotW CDS/LDS: a rejected resource with no accepted version stays in the full state
        (at the rejected version): leaving its name out would delete Envoy's older copy."""
        return self.protocol == "sotw" and st.type_url in WILDCARD_TYPES

    # ------------------------------------------------------------------ limits
    def check_request(self, req: discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest) -> TypeUrl:
        """The request's type, after the checks that need no stream state and cost O(1)
        (type URL, number of names); raises `RequestRefused`."""
        t = self._check_type(req.type_url)
        if isinstance(req, discovery_pb2.DeltaDiscoveryRequest):
            count = (len(req.resource_names_subscribe) + len(req.resource_names_unsubscribe)
                     + len(req.initial_resource_versions))
        else:
            count = len(req.resource_names)
        limit = self.limits.max_names_per_request
        if count > limit:
            raise RequestRefused(f"a request for {SHORT_NAMES.get(TypeUrl(t), t)} names {count} resources; "
                                 f"at most {limit} per request", exhausted=True)
        return t

    @staticmethod
    def _check_type(t: str) -> TypeUrl:
        if t not in SERVED_TYPES:
            shown = sanitize(t, 200) or "(empty)"
            raise RequestRefused(f"type URL {shown} is not served here; served: {', '.join(sorted(SERVED_TYPES))}",
                                 exhausted=False)
        return TypeUrl(t)

    def _check_names(self, names: Iterable[str], what: str = "resource name") -> None:
        limit = self.limits.max_name_length
        for n in names:
            if len(n) > limit:
                raise RequestRefused(f"a {what} of {len(n)} characters (at most {limit}): {sanitize(n, 80)}",
                                     exhausted=False)

    def _count(self, st: TypeState, nbytes: int, count: int | None = None) -> None:
        """Replace `st`'s subscribed characters with `nbytes` (and its names with `count` names,
        when not yet in `st.names`); raise when a limit is passed."""
        self.subscription_bytes += nbytes - st.name_bytes
        self.peak_subscription_bytes = max(self.peak_subscription_bytes, self.subscription_bytes)
        st.name_bytes = nbytes
        lim = self.limits
        n = len(st.names) if count is None else count
        if n > lim.max_names_per_type:
            raise RequestRefused(f"this stream subscribes to {n} {SHORT_NAMES.get(st.type_url, '')} "
                                 f"resources; at most {lim.max_names_per_type} per type", exhausted=True)
        if self.subscription_bytes > lim.max_subscription_bytes:
            raise RequestRefused(f"this stream subscribes to {self.subscription_bytes} characters of resource "
                                 f"names; at most {lim.max_subscription_bytes}", exhausted=True)

    # ------------------------------------------------------------------ requests
    def handle_sotw_request(self, req: discovery_pb2.DiscoveryRequest) -> NackRecord | None:
        return self._handle_sotw(_SotwView.FromString(req.SerializeToString()), req, b"").nack

    def handle_sotw_bytes(self, raw: bytes) -> SotwHandled:
        """A SotW request as received (the server's path). Every EDS or RDS ACK repeats the
        stream's whole subscription (a thousand names is ~48 KB): such a request is handled
        from its few small fields, and the subscription is compared as bytes, not parsed.
        Only a request that changes the subscription is parsed whole."""
        try:
            view = _SotwView.FromString(raw)
        except DecodeError:
            raise RequestRefused("a request that is not a DiscoveryRequest (it does not parse)",
                                 exhausted=False) from None
        return self._handle_sotw(view, None, raw)

    def _handle_sotw(self, view: Any, req: discovery_pb2.DiscoveryRequest | None, raw: bytes) -> SotwHandled:
        t = self._check_type(view.type_url)
        nonce: str = view.response_nonce
        error = view.error_detail if view.HasField("error_detail") else None
        for f in _NOT_SUBSCRIPTION:
            view.ClearField(f)
        key: bytes = view.SerializeToString()  # type URL + the subscription's bytes as sent
        known = self.types.get(t)
        if req is None and (known is None or key != known.names_key):
            try:
                req = discovery_pb2.DiscoveryRequest.FromString(raw)  # a new subscription: parsed whole
            except DecodeError:
                raise RequestRefused("a request that is not a DiscoveryRequest (it does not parse)",
                                     exhausted=False) from None
        if req is not None:
            self.check_request(req)
        st = self._state(t)
        nack = None
        if nonce:
            pending = st.pending.get(nonce)
            if pending is None:
                pass  # unknown or already answered nonce: only subscription changes matter
            elif error is not None:
                nack = self._on_nack(st, pending, error.message, error.code)
            else:
                self._on_ack(st, pending)
        else:
            # First request for this type on this stream (possibly a reconnect).
            st.needs_response = True
        if key == st.names_key:
            return SotwHandled(t, nonce, nack, req)  # the same subscription as the last request (an ACK, mostly)
        assert req is not None
        self._check_names(req.resource_names)
        names = frozenset(map(sys.intern, req.resource_names))
        wildcard = (t in WILDCARD_TYPES and not names) or "*" in names
        if "*" in names:
            names = names - {"*"}
        names = self.name_sets.canonical(names)
        # What the stream holds for this subscription is its key: the names as sent, and any
        # other field the request carried with them (unknown ones too), so that is what counts
        # against the stream's limit, not just the names' characters.
        self._count(st, max(len(key), sum(map(len, names))), len(names))  # (before st.names is replaced)
        st.names_key = self.name_sets.key(names, key)
        if wildcard != st.wildcard or (names is not st.names and names != st.names):
            st.wildcard, st.names = wildcard, names
            st.needs_response = True
            st.synced_target = None
        return SotwHandled(t, nonce, nack, req)

    def handle_delta_request(self, req: discovery_pb2.DeltaDiscoveryRequest) -> NackRecord | None:
        t = self.check_request(req)
        first = t not in self.types
        if first and req.initial_resource_versions:
            self._check_names(req.initial_resource_versions.keys())
            self._check_names(req.initial_resource_versions.values(), "resource version")
        st = self._state(t)
        nack = None
        if req.response_nonce:
            pending = st.pending.get(req.response_nonce)
            if pending is not None:
                if req.HasField("error_detail"):
                    nack = self._on_nack(st, pending, req.error_detail.message, req.error_detail.code)
                else:
                    self._on_ack(st, pending)
        if first:
            # A fresh subscription needs an answer (even an empty one) to finish Envoy's
            # initialisation; a reconnect that already holds everything does not.
            st.needs_response = not req.initial_resource_versions
            if not req.resource_names_subscribe and t in WILDCARD_TYPES:
                st.wildcard = True  # legacy wildcard
            # What Envoy already holds after a reconnect: unchanged resources are not resent.
            tr = self.target.get(t) if self.target is not None else None
            for name, version in req.initial_resource_versions.items():
                have = tr.items.get(name) if tr is not None else None
                if have is not None and have.version == version:
                    st.known[name] = have
                    st.acked[name] = have
                else:
                    placeholder = Resource.placeholder(t, name, version)
                    st.known[name] = placeholder
                    st.acked[name] = placeholder  # Envoy holds it: a later NACK must not forget it
        if req.resource_names_subscribe or req.resource_names_unsubscribe:
            self._subscription_change(st, req)
        return nack

    def _subscription_change(self, st: TypeState, req: discovery_pb2.DeltaDiscoveryRequest) -> None:
        """O(names in the request): only the names that change are touched."""
        self._check_names(req.resource_names_subscribe)
        self._check_names(req.resource_names_unsubscribe)
        names = _delta_names(st)
        nbytes = st.name_bytes
        changed: list[str] = []
        for name in req.resource_names_subscribe:
            if name == "*":
                if not st.wildcard:
                    st.wildcard = True
                    self._resync(st)
            else:
                name = sys.intern(name)
                if names.add(name):
                    nbytes += len(name)
                    changed.append(name)
        for name in req.resource_names_unsubscribe:
            if name == "*":
                if st.wildcard:
                    st.wildcard = False
                    self._resync(st)
            elif names.discard(name):
                nbytes -= len(name)
                changed.append(name)
                if not st.wildcard:
                    st.known.pop(name, None)
                    st.absent_notified.discard(name)
        if changed and st.synced_target is not None:
            st.touched.update(changed)
            if len(st.touched) > self.limits.max_names_per_type:
                self._resync(st)  # churn without pushes in between: compare everything once instead
        st.names = names.settled(self.name_sets)  # (streams subscribing to the same names share one set)
        self._count(st, nbytes)

    @staticmethod
    def _resync(st: TypeState) -> None:
        """The next push compares everything of `st`'s type (not only touched names)."""
        st.synced_target = None
        st.touched.clear()

    def _on_ack(self, st: TypeState, pending: Pending) -> None:
        # Envoy answers responses in order: anything older still pending was applied too.
        if len(st.pending) == 1:
            older = [pending.nonce]  # (the usual case: one response in flight)
        else:
            older = sorted((n for n in st.pending if int(n) <= int(pending.nonce)), key=int)
        for nonce in older:
            p = st.pending.pop(nonce)
            if type(p.changes) is _SharedItems:  # (not isinstance: an ABC's check is slow per ACK)
                st.acked = Layered(p.changes.shared) if p.full or not st.acked else _merged(st.acked, p.changes.shared)
            elif p.full:
                st.acked = {n: r for n, r in p.changes.items() if r is not None}
            else:
                for n, r in p.changes.items():
                    if r is None:
                        st.acked.pop(n, None)
                    else:
                        st.acked[n] = r
        st.version_acked = pending.version
        st.last_ack = self.clock()
        if self.waiting is not None and self.waiting[0] == st.type_url and int(self.waiting[1]) <= int(pending.nonce):
            self.waiting = None

    def _on_nack(self, st: TypeState, pending: Pending, message: str, code: int) -> NackRecord:
        st.pending.pop(pending.nonce, None)
        # What this response changed relative to what Envoy had accepted...
        changed = {
            n: r for n, r in pending.changes.items() if r is not None and not _same(st.acked.get(n), r)
        }
        # ...and of that, what Envoy's message names ("Error adding/updating cluster(s) NAME: ...").
        # Envoy applies the valid resources of a rejected response and keeps its previous
        # copy of each rejected one; when the message names none, everything changed is blamed.
        # The message is the proxy's (untrusted, up to a 4 MiB request): it is read for names only
        # up to a length Envoy's own messages for this response stay within (its format names each
        # rejected resource with a reason); a longer one blames everything changed, unread.
        named = (named_in_nack(message, changed)
                 if len(message) <= NACK_READ_BASE + NACK_READ_PER_RESOURCE * len(changed) else ())
        blamed = {n: changed[n] for n in named} if named else changed
        for n, r in blamed.items():
            st.quarantine[n] = r.version
        if pending.full:
            held = {n: r for n, r in pending.changes.items() if r is not None}
        else:
            held = dict(st.acked)
            for n, change in pending.changes.items():
                if n in blamed:
                    continue
                if change is None:
                    held.pop(n, None)
                else:
                    held[n] = change
        accepted = dict(held)
        for n in blamed:
            old = st.acked.get(n)
            if old is not None:
                held[n] = accepted[n] = old
            else:
                accepted.pop(n, None)
                if not (pending.full and st.type_url in WILDCARD_TYPES):
                    held.pop(n, None)
                # else: keep it in the state-of-the-world: leaving a name out of a full CDS/LDS
                # response deletes whatever copy Envoy still has.
        st.acked = accepted
        st.known = held
        if pending.full:
            st.version_sent = st.version_acked
        for nonce in sorted((x for x in st.pending if int(x) > int(pending.nonce)), key=int):
            p = st.pending[nonce]  # later responses still in flight
            if p.full:
                st.known = {n: r for n, r in p.changes.items() if r is not None}
                continue
            for n, change in p.changes.items():
                if change is None:
                    st.known.pop(n, None)
                else:
                    st.known[n] = change
        suspects = blamed
        st.synced_target = None
        sources: list[SourceRef] = []
        for r in suspects.values():
            for s in r.sources:
                if s not in sources:
                    sources.append(s)
        rec = NackRecord(pending.version, pending.nonce, sanitize(message), code, self.clock(),
                         tuple(sorted(suspects)), tuple(sources), pending.generation,
                         tuple(suspects[n] for n in sorted(suspects)))
        st.last_nack = rec
        st.nacks += 1
        if self.waiting is not None and self.waiting[0] == st.type_url:
            self.waiting = None
        return rec

    # ------------------------------------------------------------------ pushes
    def set_target(self, snapshot: Snapshot) -> None:
        if snapshot is self.target:
            return
        self.target = snapshot
        for st in self.types.values():
            # Lift quarantines whose resource has moved on to a new version.
            if st.quarantine:
                tr = snapshot.get(st.type_url)
                for n, bad in list(st.quarantine.items()):
                    r = tr.items.get(n) if tr is not None else None
                    if r is None or r.version != bad:
                        del st.quarantine[n]

    def clear_quarantine(self) -> None:
        for st in self.types.values():
            if st.quarantine:
                st.quarantine.clear()
                st.synced_target = None

    def synced(self) -> bool:
        target = self.target
        if target is None:
            return False
        types = target.types
        for t, st in self.types.items():
            if t in SERVED_TYPES and (  # requests for types we do not serve never block convergence
                    st.needs_response or st.touched or st.synced_target is not types.get(t)):
                return False
        return True

    def may_push(self) -> bool:
        """Whether `next_push()` may have something to send: cheap, no side effects, never a
        wrong "no" (a "yes" may find nothing to send)."""
        target = self.target
        if target is None:
            return False
        for t, st in self.types.items():
            if t in PUSH_ORDER and (st.needs_response or st.touched or st.synced_target is None
                                    or st.synced_target is not target.types.get(t)):
                return True
        return False

    def next_push(self, now: float | None = None) -> Outgoing | None:
        """The next response to send for the target snapshot, or None when in sync (or
        waiting for Envoy to ACK new clusters). `now`: the stream's clock (read when None)."""
        if self.target is None:
            return None
        warming_only = False
        if self.waiting is not None:
            if (self.clock() if now is None else now) < self.waiting[2]:
                # New clusters are warming: answer only what warming needs (their endpoints
                # and secrets); listeners and routes that may use them wait for the ACK.
                warming_only = True
            else:
                self.waiting = None  # Envoy did not answer in time: carry on
        if not self.may_push():
            return None  # every type is in sync with the target (the usual case after a push)
        # Phase 1: additions and updates, in order.
        for t in PUSH_ORDER:
            if warming_only and t not in (SECRET, ENDPOINT):
                continue
            st = self.types.get(t)
            if st is None or self._in_sync(st):
                continue
            out = self._upsert(st)
            if out is not None:
                return out
        if warming_only:
            return None
        # Phase 2: removals. Routes and listeners stop using a cluster before the cluster
        # goes, and a cluster goes before its endpoints and secrets.
        for t in REMOVE_ORDER:
            st = self.types.get(t)
            if st is None or self._in_sync(st):
                continue
            out = self._remove(st)
            if out is not None:
                return out
            tr = self.target.get(t)
            st.synced_target = tr
            st.touched.clear()
            if self.protocol == "delta":
                self._settle_delta(st, tr)
        return None

    @staticmethod
    def _settle_delta(st: TypeState, tr: TypeResources | None) -> None:
        """Delta, once a type is in sync with the target `tr` and nothing is in flight: Envoy
        holds exactly the target (e.g. after the only changed resource was removed)."""
        if tr is not None and not st.pending and not st.quarantine:
            st.version_sent = st.version_acked = tr.version
            if isinstance(st.known, Layered) and st.known.base is not tr.items and len(st.known) == len(tr.items):
                # Drop this stream's own differences: share the target's items again.
                st.known = Layered(tr.items)
                st.acked = Layered(tr.items)

    def sync_state(self, type_url: TypeUrl) -> SyncState:
        """SYNCED, STALE (sent, not yet ACKed, or still pushing), NACKED (a rejected resource
        is held back), or NOT_SENT."""
        st = self.types.get(type_url)
        if st is None or (not st.version_sent and not st.pending):
            return "NOT_SENT"
        if st.quarantine:
            return "NACKED"
        if st.pending or st.touched or self.target is None or st.synced_target is not self.target.get(type_url):
            return "STALE"
        return "SYNCED"

    def _in_sync(self, st: TypeState) -> bool:
        assert self.target is not None
        return (not st.needs_response and not st.touched and st.synced_target is not None
                and st.synced_target is self.target.get(st.type_url))

    def _diff(self, st: TypeState) -> tuple[dict[str, Resource], list[str], list[str]]:
        """(upserts, removals, absent) between what Envoy holds and the target. When the
        stream was in sync with the target or its predecessor, only the names that changed
        between the two, and those whose subscription changed since (delta), are examined
        (O(changed), not O(resources))."""
        assert self.target is not None
        tr = self.target.get(st.type_url)
        items: Mapping[str, Resource] = tr.items if tr is not None else {}
        names: Iterable[str]
        base = st.synced_target
        if tr is not None and not st.needs_response and base is not None and (
                base is tr or (tr.prev is base and tr.changed is not None)):
            if base is tr:
                names = st.touched
            else:
                assert tr.changed is not None
                names = tr.changed.union(st.touched) if st.touched else tr.changed
        elif st.wildcard:
            names = set(items) | _names(st.known)
        else:
            names = _name_set(st.names) | _names(st.known)
        upserts: dict[str, Resource] = {}
        removals: list[str] = []
        absent: list[str] = []
        for n in names:
            r = items.get(n) if st.subscribed(n) else None
            if r is not None and st.quarantine:
                bad = st.quarantine.get(n)
                if bad is not None and r.version == bad:
                    # Hold the rejected version back: the accepted one, or (SotW CDS/LDS with
                    # none) keep what Envoy was last sent rather than dropping the name.
                    fallback = st.acked.get(n)
                    r = fallback if fallback is not None or not self._keep_rejected(st) else st.known.get(n, r)
            if r is None:
                if n in st.known:
                    removals.append(n)
                elif not st.wildcard and n in st.names and n not in st.absent_notified:
                    absent.append(n)
            elif not _same(st.known.get(n), r) or n in st.resend:
                upserts[n] = r
        return upserts, sorted(removals), sorted(absent)

    # SotW and delta differ in what a response holds and how removals go. (Dispatched here,
    # not through bound methods stored on the stream: those would make a reference cycle,
    # and a stream's state must be freed by reference counting when it ends.)
    def _upsert(self, st: TypeState) -> Outgoing | None:
        return self._upsert_sotw(st) if self._sotw else self._upsert_delta(st)

    def _remove(self, st: TypeState) -> Outgoing | None:
        return self._remove_sotw(st) if self._sotw else self._remove_delta(st)

    def _upsert_sotw(self, st: TypeState) -> Outgoing | None:
        """SotW phase 1: CDS/LDS as their full state, SDS as the full set, EDS/RDS as the
        changed resources only."""
        upserts, removals, _absent = self._diff(st)
        st.resend.clear()
        if not upserts and not st.needs_response:
            return None
        new_names = sum(1 for n in upserts if n not in st.known)
        updated = self._updated_clusters(st, upserts)
        if st.type_url in WILDCARD_TYPES:
            # Full state; resources about to be removed stay until phase 2.
            content = dict(st.known)
            content.update(upserts)
            out = self._send_sotw(st, content, full=True)
        elif st.needs_response or st.type_url == SECRET:
            # SDS in SotW: Envoy treats a subscribed secret missing from a response as an
            # error, so secrets always go as the full set (it is two resources).
            out = self._send_sotw(st, self._desired(st), full=True)
        else:
            out = self._send_sotw(st, upserts, full=False)  # EDS/RDS/SDS: only what changed
        self._upserted(st, out, new_names, removals)
        self._resend_endpoints(updated)
        return out

    def _upsert_delta(self, st: TypeState) -> Outgoing | None:
        """Delta phase 1: the changed resources, and subscribed names that do not exist
        (as removed, once each)."""
        upserts, removals, absent = self._diff(st)
        st.resend.clear()
        if not upserts and not absent and not st.needs_response:
            return None
        new_names = sum(1 for n in upserts if n not in st.known)
        updated = self._updated_clusters(st, upserts)
        out = self._send_delta(st, upserts, absent)
        st.absent_notified.update(absent)
        self._upserted(st, out, new_names, removals)
        self._resend_endpoints(updated)
        return out

    @staticmethod
    def _updated_clusters(st: TypeState, upserts: Mapping[str, Resource]) -> list[Resource]:
        """The clusters of a CDS push that replace one Envoy already holds (not new ones)."""
        if st.type_url != CLUSTER:
            return []
        return [r for n, r in upserts.items() if n in st.known]

    def _resend_endpoints(self, updated: list[Resource]) -> None:
        """After a push that changes clusters Envoy holds: send their ClusterLoadAssignments
        again, changed or not. Envoy builds a new cluster that warms until its EDS update
        arrives and asks for nothing (envoyproxy/envoy#13009); without one it waits for the
        initial fetch timeout (15 s) and only then asks for the cluster's SDS secrets, so
        a DestinationRule's new TLS settings (e.g. `credentialName`) took 15 s or more.
        Istio's full pushes resend EDS after CDS likewise."""
        ep = self.types.get(ENDPOINT)
        if not updated or ep is None:
            return
        for r in updated:
            name = r.eds_service_name()
            if name is not None and ep.subscribed(name):
                ep.resend.add(name)
                ep.touched.add(name)

    def _upserted(self, st: TypeState, out: Outgoing, new_names: int, removals: list[str]) -> None:
        if st.type_url == CLUSTER and new_names:
            # Envoy ACKs once new clusters have warmed: ~1 s per 1,000 here, so scale the wait.
            self.waiting = (st.type_url, out.nonce, self.clock() + 10.0 + new_names / 500)
        if not removals and self.target is not None:
            # Nothing left to remove either: this type is done for the target (saves the
            # removal phase a second diff when the stream is next asked for a push).
            st.synced_target = self.target.get(st.type_url)
            st.touched.clear()

    def _remove_sotw(self, st: TypeState) -> Outgoing | None:
        _upserts, gone, _absent = self._diff(st)
        if not gone:
            return None
        if st.type_url not in WILDCARD_TYPES:
            for n in gone:  # named types: Envoy drops them with their parents
                st.known.pop(n, None)
            return None
        return self._send_sotw(st, self._desired(st), full=True)

    def _remove_delta(self, st: TypeState) -> Outgoing | None:
        _upserts, gone, _absent = self._diff(st)
        if not gone:
            return None
        return self._send_delta(st, {}, gone)

    def _send_sotw(self, st: TypeState, content: dict[str, Resource], full: bool) -> Outgoing:
        """A SotW response. `full`: `content` is the type's whole state for this proxy;
        otherwise (EDS/RDS/SDS only) it holds just the changed resources."""
        nonce = self._next_nonce()
        known: MutableMapping[str, Resource]
        if full:
            known = content
        else:
            known = st.known  # this stream's own mapping: updated in place (no O(resources) copy per push)
            known.update(content)
        tr = self.target.get(st.type_url) if self.target is not None else None
        # version_info names the state Envoy will hold: the target's version when it is exactly that.
        if tr is None or st.quarantine:
            version = content_version(known)
        elif not st.wildcard:
            version = tr.version
        elif len(known) == len(tr.items) and all(_same(tr.items.get(n), r) for n, r in known.items()):
            version = tr.version
        else:
            version = content_version(known)
        header = discovery_pb2.DiscoveryResponse(version_info=version, type_url=st.type_url, nonce=nonce)
        payload = header.SerializeToString() + b"".join(content[n].sotw_chunk for n in sorted(content))
        now = self.clock()
        recorded: Mapping[str, Resource | None]
        if full and tr is not None and _shares(content, tr):
            known = Layered(tr.items)  # exactly the target: share its items
            recorded = _SharedItems(tr.items)
        else:
            recorded = dict(content)
        st.pending[nonce] = Pending(nonce, version, recorded, full, now,
                                    self.target.generation if self.target is not None else 0)
        st.known = known
        st.nonce, st.version_sent, st.last_push, st.needs_response = nonce, version, now, False
        return Outgoing(st.type_url, nonce, payload, len(content))

    def _send_delta(self, st: TypeState, changes: dict[str, Resource], removed: list[str]) -> Outgoing:
        nonce = self._next_nonce()
        tr = self.target.get(st.type_url) if self.target is not None else None
        version = tr.version if tr is not None else ""
        header = discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=version, type_url=st.type_url, nonce=nonce, removed_resources=removed
        )
        payload = header.SerializeToString()
        if changes:  # (not a copy of a header that may list thousands of removed names)
            payload += b"".join(changes[n].delta_chunk for n in sorted(changes))
        now = self.clock()
        recorded: Mapping[str, Resource | None]
        if not removed and not st.known and tr is not None and _shares(changes, tr):
            st.known = Layered(tr.items)  # a first push of everything: share the target's items
            recorded = _SharedItems(tr.items)
        else:
            rec: dict[str, Resource | None] = dict(changes)
            for n in removed:
                rec[n] = None
                st.known.pop(n, None)
            st.known.update(changes)
            recorded = rec
        st.pending[nonce] = Pending(nonce, version, recorded, False, now,
                                    self.target.generation if self.target is not None else 0)
        st.nonce, st.version_sent, st.last_push, st.needs_response = nonce, version, now, False
        return Outgoing(st.type_url, nonce, payload, len(changes), len(removed))


class _SharedItems(Mapping[str, "Resource | None"]):
    """A pending response's changes that are exactly a snapshot's items (not copied)."""

    __slots__ = ("shared",)

    def __init__(self, shared: Mapping[str, Resource]) -> None:
        self.shared = shared

    def __getitem__(self, name: str) -> Resource | None:
        return self.shared[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.shared)

    def __len__(self) -> int:
        return len(self.shared)


def _merged(acked: MutableMapping[str, Resource], items: Mapping[str, Resource]) -> MutableMapping[str, Resource]:
    for n, r in items.items():
        acked[n] = r
    return acked

