"""gRPC xDS servers (grpc.aio): ADS state-of-the-world and delta, plus the per-type
CDS/EDS/LDS/RDS/SDS services on the same stream machinery. Does network I/O.

With an authenticator, each stream's `authorization: Bearer <token>` metadata is verified
when the stream starts, and the connection is bound to the proven identity (never to what
the node metadata claims): a token for another namespace than the node's is refused
(PERMISSION_DENIED); a missing or invalid token gets configuration but no secrets.

Responses are assembled from pre-serialized resource chunks (see cache/resources.py), so
the gRPC response serializer is the identity: a resource's bytes are produced once and
shared by every stream.

What one client can make the server hold is bounded (`XdsLimits`, issue 14 item 4): a
message is at most a few MiB (gRPC refuses larger ones), a connection carries a bounded
number of concurrent streams, an authenticated identity (per node, for node proxies) or an
unauthenticated peer address a bounded number of open streams, and each request is checked
by the stream (names per request, per type and per stream). Beyond a limit the stream ends
with RESOURCE_EXHAUSTED, a malformed request with INVALID_ARGUMENT, each with a message
naming the limit; other streams are unaffected. What a stream held is freed by reference
counting when it ends (no cycles through grpc's call state), and after a large stream the
C heap is trimmed (`HeapTrim`, glibc's malloc_trim) so the memory goes back to the OS.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import ipaddress
import itertools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from controlplane.ca.identity import AuthResult, Identity, bind_identity
from controlplane.cache.snapshot import Snapshot
from controlplane.model.ir import CaptureMode, ProxyMeta, ProxyMode, TypeUrl, labels_of
from controlplane.translate.plan import SECRET, SHORT_NAMES
from controlplane.translate.secrets import SECRET_NAMES
from controlplane.xds.clock import Clock, wall_clock
from controlplane.xds.stream import (
    AdsStream,
    NackRecord,
    NameSets,
    Outgoing,
    RequestRefused,
    XdsLimits,
    sanitize,
)
from controlplane.xds.stream import Protocol as StreamProtocol

if TYPE_CHECKING:
    from _collections_abc import dict_items, dict_keys, dict_values

log = logging.getLogger(__name__)

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
PER_TYPE_SERVICES = {
    "envoy.service.cluster.v3.ClusterDiscoveryService": ("StreamClusters", "DeltaClusters"),
    "envoy.service.endpoint.v3.EndpointDiscoveryService": ("StreamEndpoints", "DeltaEndpoints"),
    "envoy.service.listener.v3.ListenerDiscoveryService": ("StreamListeners", "DeltaListeners"),
    "envoy.service.route.v3.RouteDiscoveryService": ("StreamRoutes", "DeltaRoutes"),
    "envoy.service.secret.v3.SecretDiscoveryService": ("StreamSecrets", "DeltaSecrets"),
}


Request = discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest
# What a stream's reader receives: a SotW request as its bytes (`AdsStream.handle_sotw_bytes`
# parses only what it needs), a delta request parsed.
Received = bytes | discovery_pb2.DeltaDiscoveryRequest
"""What Envoy sends on an xDS stream (SotW or delta)."""


def proxy_meta_from_node(node: base_pb2.Node) -> ProxyMeta:
    """Read the node's identity and Meshline metadata (set by `meshline bootstrap`)."""
    md: dict[str, Any] = json_format.MessageToDict(node.metadata) if node.HasField("metadata") else {}
    raw_mode = md.get("mode")
    mode: ProxyMode = ("node" if raw_mode == "node" else "waypoint" if raw_mode == "waypoint"
                       else "gateway" if raw_mode == "gateway" else "sidecar")
    capture: CaptureMode = "intercept" if md.get("capture") == "intercept" else "bind"
    raw_labels = md.get("labels")
    labels: dict[str, Any] = raw_labels if isinstance(raw_labels, dict) else {}
    return ProxyMeta(
        node_id=node.id,
        mode=mode,
        namespace=str(md.get("namespace") or "default"),
        workload=str(md["workload"]) if md.get("workload") else None,
        labels=labels_of({str(k): str(v) for k, v in labels.items()}),
        service_account=str(md.get("service_account") or "default"),
        capture=capture,
        outbound_address=_loopback(md.get("outbound_address")),
        node=str(md["node"]) if mode == "node" and md.get("node") else None,
        waypoint=str(md.get("waypoint") or "waypoint") if mode == "waypoint" else None,
        gateway=_gateway_key(md.get("gateway"), str(md.get("namespace") or "default")) if mode == "gateway" else None,
    )


def _gateway_key(value: object, namespace: str) -> str | None:
    """A gateway proxy's Gateway as `ns/name` (`name` alone: the proxy's namespace)."""
    if not value:
        return None
    text = str(value)
    return text if "/" in text else f"{namespace}/{text}"


def _loopback(value: object) -> str:
    """The bind-capture outbound address a proxy asks for: a loopback IPv4 address only."""
    try:
        ip = ipaddress.IPv4Address(str(value))
    except ValueError:
        return "127.0.0.1"
    return str(ip) if ip.is_loopback else "127.0.0.1"


class StreamAuthenticator(Protocol):
    async def authenticate(self, metadata: Any) -> AuthResult: ...


class SnapshotSource(Protocol):
    """What the server needs from the composition root."""

    def attach(self, conn: Connection) -> None: ...

    def detach(self, conn: Connection) -> None: ...


class Inbox:
    """What wakes a stream's coroutine: new requests (before the connection is set up),
    a new snapshot, the end of the stream, or a deadline. Cheaper than an asyncio.Queue per
    stream (no loop lookup per call, no wake-up for an ACK that needs no answer), which
    matters when one change wakes a thousand streams."""

    __slots__ = ("_waiter", "items", "woken")

    def __init__(self) -> None:
        self.items: collections.deque[Request | _Failed | None] = collections.deque()  # requests, None (end) or _Failed
        self.woken = False
        self._waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        self.woken = True
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def put(self, item: Request | _Failed | None) -> None:
        self.items.append(item)
        self.wake()

    async def wait(self, deadline: float | None = None) -> None:
        """Until woken (returns at once if woken since the last wait), or until the
        monotonic `deadline`."""
        if not self.woken:
            loop = asyncio.get_running_loop()
            self._waiter = waiter = loop.create_future()
            timer = None
            if deadline is not None:
                timer = loop.call_later(max(0.0, deadline - time.monotonic()), self.wake)
            try:
                await waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
        self.woken = False


@dataclass(eq=False)
class Connection:
    meta: ProxyMeta
    stream: AdsStream
    inbox: Inbox = field(default_factory=Inbox)
    node: base_pb2.Node | None = None
    peer: str = ""
    sent_responses: int = 0
    refused_secrets: set[str] = field(default_factory=set)  # secret names already logged as never sent
    identity: Identity | None = None  # proven by the stream's token; None: no secrets
    credential: tuple[tuple[str, str], ...] = ()  # the stream's authorization metadata (re-checked)
    expires_at: float | None = None  # when the stream's credential expires, if known

    def update(self, snapshot: Snapshot) -> None:
        """Called by the composition root with this proxy's newest snapshot."""
        self.stream.set_target(snapshot)
        self.inbox.wake()


class ConnectionTable(dict[int, Connection]):
    """The open streams by id. Its views are copies (taken at C speed, atomically under the
    GIL): the status API iterates them from worker threads while the event loop adds and
    removes streams, which would otherwise fail with "dictionary changed size during
    iteration". (`__iter__` stays dict's own: copying relies on it.)"""

    def keys(self) -> dict_keys[int, Connection]:
        return dict.copy(self).keys()

    def values(self) -> dict_values[int, Connection]:
        return dict.copy(self).values()

    def items(self) -> dict_items[int, Connection]:
        return dict.copy(self).items()


class StreamEnded(Exception):
    """Ends the stream with a gRPC status (the server sets it; see `_serve`)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class _Failed:
    """The reader task's exception, re-raised by the stream's coroutine."""

    exc: BaseException


class Observer(Protocol):
    def on_push(self, conn: Connection, out: Outgoing) -> None: ...

    def on_nack(self, conn: Connection, nack: NackRecord) -> None: ...

    def on_ack(self, conn: Connection) -> None: ...


def peer_host(peer: str) -> str | None:
    """The IP address of a gRPC peer (`ipv4:1.2.3.4:5`, `ipv6:[::1]:5`), or None (a Unix
    socket, e.g. behind 15012's TLS front, or something unrecognised)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        host = rest.rpartition(":")[0]
    elif kind == "ipv6":
        host = rest.rpartition(":")[0].strip("[]")
    else:
        return None
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


class HeapTrim:
    """Gives the memory a large stream freed back to the OS. glibc keeps freed blocks in its
    arenas: after 100 streams holding 1.7 MiB of names each had gone, the server stayed
    ~100 MiB above its baseline, and `malloc_trim` returned 60 MiB of it. Runs at most once
    per `period_s`, in a worker thread (ctypes releases the GIL); a no-op without glibc."""

    def __init__(self, period_s: float = 1.0) -> None:
        self.period_s = period_s
        self.runs = 0
        self._handle: asyncio.TimerHandle | None = None
        self._trim: Any = None
        try:
            trim = ctypes.CDLL(None).malloc_trim
        except (AttributeError, OSError):
            return
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
        self._trim = trim

    def schedule(self) -> None:
        if self._trim is None or self._handle is not None:
            return
        self._handle = asyncio.get_running_loop().call_later(self.period_s, self._run)

    def _run(self) -> None:
        self._handle = None
        self.runs += 1
        asyncio.get_running_loop().run_in_executor(None, self._trim, 0)


TRIM_AFTER_BYTES = 256 * 1024
"""A stream that subscribed to this many characters of names (or was refused) schedules a
`HeapTrim` when it ends."""


class XdsServer:
    def __init__(self, source: SnapshotSource, observer: Observer | None = None,
                 authenticator: StreamAuthenticator | None = None,
                 node_proxy_identity: Identity | None = None, limits: XdsLimits | None = None,
                 clock: Clock = wall_clock) -> None:
        """`node_proxy_identity`: the identity node proxies must prove (with a credential bound
        to their node) when streams are authenticated. `limits`: per-client bounds (defaults:
        `XdsLimits()`); start the gRPC server with the same (`start_grpc(..., limits=...)`).
        `clock`: what the streams' state machines read (the wall clock)."""
        self.source = source
        self.clock = clock
        self.node_proxy_identity = node_proxy_identity
        self.observer = observer
        self.authenticator = authenticator
        self.limits = limits if limits is not None else XdsLimits()
        self.connections = ConnectionTable()
        self._ids = itertools.count(1)
        self.name_sets = NameSets(self.limits.shared_name_bytes)  # subscribed-name sets shared between streams
        self.streams_per_client: dict[tuple[str, str], int] = {}  # (kind, who) -> open streams
        self.refused = 0  # streams ended for a limit or a malformed request
        self.heap_trim = HeapTrim()
        self.require_authentication = True  # TLS port: streams without a valid credential are refused
        self.plaintext_identities = True  # plaintext port: honour tokens (loopback development only)

    # ------------------------------------------------------------------ registration
    def handlers(self, secure: bool = False) -> list[grpc.GenericRpcHandler]:
        """The xDS services. `secure`: for the TLS port (a credential is required there unless
        `require_authentication` is off); otherwise the plaintext port, which never proves an
        identity unless `plaintext_identities` (loopback development only)."""
        def identity(b: bytes) -> bytes:
            return b

        async def sotw_stream(requests: AsyncIterator[bytes],
                              context: grpc.aio.ServicerContext) -> None:
            await self._serve("sotw", requests, context, secure)

        async def delta_stream(requests: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
                               context: grpc.aio.ServicerContext) -> None:
            await self._serve("delta", requests, context, secure)

        def methods(sotw: str, delta: str) -> dict[str, grpc.RpcMethodHandler]:
            return {
                sotw: grpc.stream_stream_rpc_method_handler(
                    sotw_stream, request_deserializer=identity,  # (parsed by the stream: handle_sotw_bytes)
                    response_serializer=identity,
                ),
                delta: grpc.stream_stream_rpc_method_handler(
                    delta_stream, request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                    response_serializer=identity,
                ),
            }

        out = [grpc.method_handlers_generic_handler(
            ADS_SERVICE, methods("StreamAggregatedResources", "DeltaAggregatedResources"))]
        for svc, (sotw, delta) in PER_TYPE_SERVICES.items():
            out.append(grpc.method_handlers_generic_handler(svc, methods(sotw, delta)))
        return out

    # ------------------------------------------------------------------ one stream
    async def _serve(
        self, protocol: StreamProtocol, requests: AsyncIterator[Received], context: grpc.aio.ServicerContext,
        secure: bool = False,
    ) -> None:
        """One stream. Its reader task handles Envoy's requests as they arrive (an ACK usually
        needs no answer, and then this coroutine is not woken); this coroutine sets the
        connection up from the first request and writes every response."""
        inbox = Inbox()
        stream_id = next(self._ids)
        limits = self.limits
        stream = AdsStream(protocol, stream_id, self.name_sets, limits, clock=self.clock)
        conn: Connection | None = None

        async def read() -> None:
            held = 0  # bytes of requests queued before the connection is set up
            failed = False
            try:
                async for req in requests:
                    # After a failure, requests are dropped, but the iterator is never abandoned at a
                    # request it has just yielded: grpc's generator would keep that request forever.
                    if not failed:
                        try:
                            held = self._read_one(req, conn, stream, inbox, held)
                        except RequestRefused as exc:
                            failed = True
                            inbox.put(_Failed(exc.with_traceback(None)))  # (its frames would hold the request)
                        except Exception as exc:  # a bug handling a request: fail the stream, visibly
                            failed = True
                            inbox.put(_Failed(exc))
                    del req  # (a parsed request holds its whole buffer: not kept while waiting for the next)
            except (grpc.aio.AioRpcError, asyncio.CancelledError):
                pass
            if not failed:
                inbox.put(None)

        reader = asyncio.create_task(read())
        auth: AuthResult | None = None
        client: tuple[str, str] | None = None
        try:
            if self.authenticator is not None:
                auth = await self.authenticator.authenticate(context.invocation_metadata())
                if auth.unavailable:
                    log.warning("xDS stream from %s refused for now: %s", context.peer(), auth.reason)
                    raise StreamEnded(grpc.StatusCode.UNAVAILABLE, "cannot verify the token now; retry later")
                if secure and auth.identity is None and self.require_authentication:
                    log.warning("xDS stream from %s refused: %s", context.peer(), auth.reason)
                    raise StreamEnded(grpc.StatusCode.UNAUTHENTICATED,
                                      f"a valid credential is required on this port ({auth.reason})")
                if not secure and not self.plaintext_identities:
                    # Plaintext beyond loopback development: configuration only, never secrets.
                    auth = None
            client = self._admit(auth, context.peer())
            while True:
                # (The warming deadline matters only while something waits for it.)
                left = stream.warming_left()
                await inbox.wait(None if left is None else time.monotonic() + left)
                while inbox.items:
                    item = inbox.items.popleft()
                    if item is None:
                        return
                    if isinstance(item, _Failed):
                        raise item.exc
                    if conn is None:
                        conn = await self._connect(protocol, item, auth, stream, inbox, context)
                        self.connections[stream_id] = conn  # (set before attach: teardown undoes both)
                        self.source.attach(conn)
                    self._handle(conn, item)
                    del item  # (not held while waiting: a request holds its whole buffer)
                if conn is None:
                    continue
                while (out := stream.next_push()) is not None:
                    await context.write(out.payload)
                    conn.sent_responses += 1
                    if self.observer is not None:
                        self.observer.on_push(conn, out)
        except (RequestRefused, StreamEnded) as exc:
            # Its traceback holds this frame, which may hold it (`item`): a cycle that would keep
            # the stream's state and request alive until a full garbage collection.
            exc.__traceback__ = None
            if isinstance(exc, RequestRefused):
                self.refused += 1
                self.heap_trim.schedule()
                who = conn.meta.node_id if conn is not None else "(not set up)"
                log.warning("xDS stream of proxy %s from %s refused: %s", sanitize(who, 200), context.peer(),
                            exc.message)
                code = grpc.StatusCode.RESOURCE_EXHAUSTED if exc.exhausted else grpc.StatusCode.INVALID_ARGUMENT
            else:
                code = exc.code
            # Not context.abort(): its AbortError keeps this frame (and the request) in a cycle
            # through grpc's C-level call state that the garbage collector cannot free.
            context.set_code(code)
            context.set_details(exc.message)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            if client is not None:
                left = self.streams_per_client[client] - 1
                if left:
                    self.streams_per_client[client] = left
                else:
                    del self.streams_per_client[client]
            if conn is not None:
                self.connections.pop(stream_id, None)
                self.source.detach(conn)
                log.info("proxy %s disconnected", conn.meta.node_id)
            if stream.peak_subscription_bytes >= TRIM_AFTER_BYTES:
                self.heap_trim.schedule()

    def _read_one(self, got: Received, conn: Connection | None, stream: AdsStream, inbox: Inbox, held: int) -> int:
        """A request as the stream's reader receives it: handled at once once the connection is
        set up (and nothing is queued before it), else queued within bounds. Returns the bytes
        queued before set-up."""
        if conn is None or inbox.items:
            req = _parsed(got)
            if conn is None:
                stream.check_request(req)  # (cheap refusals before holding on to it)
                held += req.ByteSize()
                lim = self.limits
                if len(inbox.items) >= lim.max_queued_requests or held > lim.max_queued_bytes:
                    raise RequestRefused(f"more than {lim.max_queued_requests} requests or {lim.max_queued_bytes} "
                                         "bytes sent before the stream was set up", exhausted=True)
            inbox.put(req)  # in order, after what the coroutine has not handled yet
        else:
            self._handle(conn, got)
            if stream.may_push():
                inbox.wake()
        return held

    def _admit(self, auth: AuthResult | None, peer: str) -> tuple[str, str] | None:
        """Count a new stream against its client's limit: its authenticated identity (and
        node), else its peer address; RequestRefused beyond it. Returns the key counted (None:
        not counted, e.g. loopback or a Unix socket peer)."""
        lim = self.limits
        if auth is not None and auth.identity is not None:
            key = ("identity", f"{auth.identity}" + (f" on node {auth.node}" if auth.node else ""))
            limit = lim.max_streams_per_identity
        else:
            host = peer_host(peer)
            if host is None or (ipaddress.ip_address(host).is_loopback and not lim.limit_loopback_peers):
                return None
            key, limit = ("peer", host), lim.max_streams_per_peer
        open_now = self.streams_per_client.get(key, 0)
        if open_now >= limit:
            raise RequestRefused(f"{key[1]} already has {open_now} open xDS streams; at most {limit}", exhausted=True)
        self.streams_per_client[key] = open_now + 1
        return key

    async def _connect(self, protocol: StreamProtocol, first: Request, auth: AuthResult | None, stream: AdsStream,
                       inbox: Inbox, context: grpc.aio.ServicerContext) -> Connection:
        """The connection for a stream's first request (raises StreamEnded or RequestRefused
        when it is refused); the caller registers and attaches it."""
        if not first.HasField("node") or not first.node.id:
            raise StreamEnded(grpc.StatusCode.INVALID_ARGUMENT, "the first request must carry node.id")
        size = first.node.ByteSize()
        if size > self.limits.max_node_bytes:
            raise RequestRefused(f"the node (id and metadata) is {size} bytes; at most {self.limits.max_node_bytes}",
                                 exhausted=False)
        meta = proxy_meta_from_node(first.node)
        identity = await self._identity(auth, meta, context)
        node = None
        if meta.mode == "node" and self.authenticator is not None:
            node, why = self._node_proof(auth, meta)
            if node is None:
                log.warning("node proxy %s refused: %s", meta.node_id, why, extra={"proxy": meta.node_id})
                raise StreamEnded(grpc.StatusCode.PERMISSION_DENIED, why)
        if identity is not None:
            meta = bind_identity(meta, identity, node)
        log.info("proxy %s connected (%s, %s/%s)", meta.node_id, protocol, meta.namespace, meta.workload or "-")
        node_copy = type(first.node)()
        node_copy.CopyFrom(first.node)  # (the request's node would keep the whole first request alive)
        credential: tuple[tuple[str, str], ...] = ()
        if identity is not None:
            credential = tuple((str(k), v if isinstance(v, str) else v.decode(errors="replace"))
                               for k, v in context.invocation_metadata() or ()
                               if str(k).lower() == "authorization")
        return Connection(meta, stream, inbox, node=node_copy, peer=context.peer(), identity=identity,
                          credential=credential, expires_at=auth.expires_at if auth is not None else None)

    # ------------------------------------------------------------------ credentials over time
    async def credential_watch(self, period_s: float = 10.0) -> None:
        """Every `period_s`, end the streams whose credential has expired or no longer proves
        the identity they were bound to (the token key replaced, a TokenReview that now
        refuses): with the token reviewer's cache, within 30 s of a revocation. The proxy
        reconnects with whatever its token file holds by then."""
        while True:
            await asyncio.sleep(period_s)
            await self.recheck_credentials()

    async def recheck_credentials(self, now: float | None = None) -> int:
        """One pass of `credential_watch`; returns the number of streams ended."""
        if self.authenticator is None:
            return 0
        ended = 0
        for conn in list(self.connections.values()):
            if conn.identity is None:
                continue
            t = time.time() if now is None else now
            if conn.expires_at is not None and t >= conn.expires_at:
                why = "its credential expired"
            else:
                result = await self.authenticator.authenticate(conn.credential)
                if result.unavailable or (result.identity == conn.identity):
                    continue
                why = f"its credential no longer proves {conn.identity} ({result.reason or 'another identity'})"
            log.warning("ending the xDS stream of proxy %s: %s", conn.meta.node_id, why,
                        extra={"proxy": conn.meta.node_id})
            conn.inbox.put(_Failed(StreamEnded(grpc.StatusCode.UNAUTHENTICATED, why)))
            ended += 1
        return ended

    async def _identity(self, auth: AuthResult | None, meta: ProxyMeta,
                        context: grpc.aio.ServicerContext) -> Identity | None:
        """The identity the stream proved, checked against the node's claims (may end the stream)."""
        if auth is None:
            return None
        ident = auth.identity
        if ident is None:
            log.warning("proxy %s: %s; serving configuration without certificates", meta.node_id, auth.reason,
                        extra={"proxy": meta.node_id})
            return None
        if ident.namespace != meta.namespace:
            log.warning("proxy %s refused: its token is for %s but its node metadata says namespace %s",
                        meta.node_id, ident, meta.namespace, extra={"proxy": meta.node_id})
            raise StreamEnded(grpc.StatusCode.PERMISSION_DENIED,
                              f"the token's namespace {ident.namespace!r} is not the node's namespace "
                              f"{meta.namespace!r}")
        if ident.service_account != meta.service_account:
            log.info("proxy %s claims service account %s; its token proves %s, which it gets", meta.node_id,
                     meta.service_account, ident)
        return ident

    def _node_proof(self, auth: AuthResult | None, meta: ProxyMeta) -> tuple[str | None, str]:
        """(the node a node proxy's credential proves, or None and why not). It must be the
        node proxy's own identity, bound to the node the proxy claims."""
        if auth is None or auth.identity is None:
            return None, "a node proxy must authenticate"
        if self.node_proxy_identity is not None and auth.identity != self.node_proxy_identity:
            return None, f"{auth.identity} is not the node proxy's identity {self.node_proxy_identity}"
        if auth.node is None or auth.node != meta.node:
            return None, f"the credential proves node {auth.node or '(none)'}, not {meta.node}"
        return auth.node, ""

    def _handle(self, conn: Connection, got: Request | bytes) -> None:
        full: Request | None
        if isinstance(got, bytes):  # a SotW stream's request as received
            done = conn.stream.handle_sotw_bytes(got)
            type_url, nonce, nack, full = done.type_url, done.nonce, done.nack, done.request
        else:
            if isinstance(got, discovery_pb2.DiscoveryRequest):
                nack = conn.stream.handle_sotw_request(got)
            else:
                nack = conn.stream.handle_delta_request(got)
            type_url, nonce, full = TypeUrl(got.type_url), got.response_nonce, got
        if type_url == SECRET and full is not None:  # (None: the subscription did not change)
            self._check_secret_names(conn, full)
        if nack is not None:
            tname = SHORT_NAMES.get(type_url, type_url)
            log.warning("proxy %s rejected %s (nonce %s): %s", conn.meta.node_id, tname, nack.nonce,
                        nack.message.strip(), extra={"proxy": conn.meta.node_id, "type": tname,
                                                     "nonce": nack.nonce, "error": nack.message.strip(),
                                                     "objects": [s.display for s in nack.sources]})
            if self.observer is not None:
                self.observer.on_nack(conn, nack)
        elif self.observer is not None and nonce:
            self.observer.on_ack(conn)

    @staticmethod
    def _check_secret_names(conn: Connection, req: Request) -> None:
        """Log (once per name) a secret the proxy subscribes to but is never sent."""
        names = req.resource_names if isinstance(req, discovery_pb2.DiscoveryRequest) else req.resource_names_subscribe
        # What the proxy's plan holds (a sidecar: also its namespace's credentialName secrets; a
        # node proxy: its node's pods' certificates only), and an identity's own two secrets,
        # which may be issued a moment after its first request.
        target = conn.stream.target
        held_now = target.get(SECRET) if target is not None else None
        allowed: set[str] = set(held_now.items) if held_now is not None else set()
        if conn.identity is not None and conn.meta.mode != "node":
            allowed |= SECRET_NAMES
        refused = conn.refused_secrets
        for name in names:
            if name in allowed or name in refused or name == "*" or len(refused) >= 32:
                continue
            refused.add(name)
            held = f"identity {conn.identity}" if conn.identity is not None else "no authenticated identity"
            log.warning("proxy %s subscribed to secret %r (%s): it gets nothing for it", conn.meta.node_id, name,
                        held, extra={"proxy": conn.meta.node_id})




def _parsed(got: Received) -> Request:
    """A received request parsed whole (the first requests of a stream, before it is set up)."""
    if not isinstance(got, bytes):
        return got
    try:
        return discovery_pb2.DiscoveryRequest.FromString(got)
    except DecodeError:
        raise RequestRefused("a request that is not a DiscoveryRequest (it does not parse)", exhausted=False) from None


def grpc_options(limits: XdsLimits | None = None) -> list[tuple[str, Any]]:
    """The xDS gRPC server's channel options: the receive limit and streams per connection
    from `limits`."""
    lim = limits if limits is not None else XdsLimits()
    return [
        ("grpc.max_send_message_length", 256 * 1024 * 1024),
        ("grpc.max_receive_message_length", lim.max_request_bytes),
        ("grpc.max_concurrent_streams", lim.max_streams_per_connection),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.http2.max_pings_without_data", 0),
        # No bandwidth-delay probing: it sizes the window for what proxies send us, which is
        # small requests and ACKs, and its PINGs after every read cost ~15% of a fan-out's CPU.
        ("grpc.http2.bdp_probe", 0),
    ]


async def start_grpc(address: str, handlers: list[grpc.GenericRpcHandler],
                     options: list[tuple[str, Any]] | None = None,
                     limits: XdsLimits | None = None) -> tuple[grpc.aio.Server, int]:
    """A started gRPC server on `address` (port 0: any) with `handlers`; `options` are added
    to (and override) `grpc_options(limits)`."""
    server = grpc.aio.server(options=[*grpc_options(limits), *(options or [])])
    server.add_generic_rpc_handlers(handlers)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind the xDS server to {address}")
    await server.start()
    return server, port
