"""Bounded resources per xDS client (issue 14, item 4), over real gRPC on loopback with an
in-process server: requests beyond the caps end only the offending stream, with
RESOURCE_EXHAUSTED (too much) or INVALID_ARGUMENT (malformed) and a message naming the
limit, while other streams keep getting their config; streams per connection, per peer and
per identity are bounded; shared subscription sets are freed with their streams; a delta
subscribe costs O(change). Does network I/O (loopback)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from controlplane.ca.identity import AuthResult, Identity
from controlplane.cache.snapshot import Snapshot, TypeResources
from controlplane.translate.plan import CLUSTER, ENDPOINT, LISTENER, PUSH_ORDER
from controlplane.xds.server import XdsServer, peer_host, start_grpc
from controlplane.xds.stream import AdsStream, NameSets, XdsLimits
from tests.xdsharness import AdsClient, FakeControl, XdsFixture, make_cla, make_cluster

pytestmark = pytest.mark.timeout(120)


def ended(r: Any) -> grpc.aio.AioRpcError:
    assert isinstance(r, grpc.aio.AioRpcError), f"expected the stream to end, got {r!r}"
    return r


async def refusal(c: AdsClient, timeout: float = 60.0) -> grpc.aio.AioRpcError:
    """The error that ends `c`'s stream (responses before it are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        r = await asyncio.wait_for(c.responses.get(), max(0.1, deadline - time.monotonic()))
        if isinstance(r, BaseException):
            return ended(r)


async def good_stream(fx: XdsFixture | LimitedServer) -> AdsClient:
    """A well-behaved delta stream subscribed to endpoint `a` (its first response read)."""
    c = fx.client("delta", node_id="good")
    c.send_delta(ENDPOINT, subscribe=["a"])
    r = await c.recv(20)
    assert [x.name for x in r.resources] == ["a"]
    c.send_delta(ENDPOINT, nonce=r.nonce)
    return c


async def still_served(fx: XdsFixture | LimitedServer, c: AdsClient, n: int) -> None:
    """`c` gets a change published now (the server and that stream are still fine)."""
    fx.control.publish({ENDPOINT: {"a": make_cla("a", n)}})
    r = await c.recv(20)
    assert [x.name for x in r.resources] == ["a"]
    c.send_delta(ENDPOINT, nonce=r.nonce)


# --------------------------------------------------------------------------- per-request caps


async def test_a_request_naming_more_than_the_limit_ends_only_that_stream(fx: XdsFixture) -> None:
    fx.control.publish({ENDPOINT: {"a": make_cla("a")}})
    good = await good_stream(fx)
    for protocol in ("sotw", "delta"):
        bad = fx.client(protocol, node_id=f"greedy-{protocol}")
        names = [f"outbound|80||svc-{i}.default.svc.cluster.local" for i in range(10_001)]
        if protocol == "sotw":
            bad.send(ENDPOINT, names)
        else:
            bad.send_delta(ENDPOINT, subscribe=names)
        err = await refusal(bad)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "10001" in (err.details() or "") and "at most 10000 per request" in (err.details() or "")
        await bad.close()
    await still_served(fx, good, 2)
    assert sorted(c.meta.node_id for c in fx.xds.connections.values()) == ["good"]
    await good.close()


async def test_delta_subscriptions_accumulating_past_the_per_type_limit_are_refused(fx: XdsFixture) -> None:
    fx.control.publish({ENDPOINT: {"a": make_cla("a")}})
    good = await good_stream(fx)
    bad = fx.client("delta", node_id="accumulator")
    bad.send_delta(ENDPOINT, subscribe=[f"first-{i}" for i in range(6000)])
    r = await bad.recv(20)  # accepted: all 6000 reported absent
    assert len(r.removed_resources) == 6000
    bad.send_delta(ENDPOINT, nonce=r.nonce, subscribe=[f"second-{i}" for i in range(4000)])
    r = await bad.recv(20)  # 10,000: still within the limit
    bad.send_delta(ENDPOINT, nonce=r.nonce, subscribe=["one-too-many"])
    err = await refusal(bad)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "10001" in (err.details() or "") and "at most 10000 per type" in (err.details() or "")
    await still_served(fx, good, 3)
    await bad.close()
    await good.close()


async def test_unsubscribing_makes_room_under_the_per_type_limit(fx: XdsFixture) -> None:
    fx.control.publish({ENDPOINT: {"a": make_cla("a")}})
    c = fx.client("delta")
    c.send_delta(ENDPOINT, subscribe=[f"n-{i}" for i in range(10_000)])
    r = await c.recv(20)
    for round_ in range(3):  # churn at the limit: each request swaps 100 names
        c.send_delta(ENDPOINT, nonce=r.nonce, subscribe=[f"r{round_}-{i}" for i in range(100)],
                     unsubscribe=[f"n-{round_ * 100 + i}" for i in range(100)])
        r = await c.recv(20)
        assert len(r.removed_resources) == 100  # the new names, reported absent
    c.send_delta(ENDPOINT, nonce=r.nonce, subscribe=["a"], unsubscribe=["n-9999"])
    r = await c.recv(20)
    assert [x.name for x in r.resources] == ["a"]
    await c.close()


async def test_subscribed_characters_per_stream_are_bounded(fx: XdsFixture) -> None:
    c = fx.client("delta", node_id="long-names")
    # 1,000-character names are allowed, but 2,100 of them are over the stream's 2 MiB of names.
    c.send_delta(ENDPOINT, subscribe=[f"{i:06d}".ljust(1000, "x") for i in range(2100)])
    err = await refusal(c)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "characters of resource names; at most 2097152" in (err.details() or "")
    await c.close()


@pytest.mark.parametrize("protocol", ["sotw", "delta"])
async def test_malformed_requests_end_the_stream_with_invalid_argument(fx: XdsFixture, protocol: str) -> None:
    fx.control.publish({ENDPOINT: {"a": make_cla("a")}})
    good = await good_stream(fx)
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig", {}, "is not served here"),
        ("", {}, "type URL (empty) is not served here"),
        (ENDPOINT, {"names": ["ok", "y" * 1025]}, "a resource name of 1025 characters (at most 1024)"),
    ]
    for type_url, kw, expected in cases:
        bad = fx.client(protocol, node_id="malformed")
        if protocol == "sotw":
            bad.send(type_url, kw.get("names"))
        else:
            bad.send_delta(type_url, subscribe=kw.get("names"))
        err = await refusal(bad)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (type_url, err)
        assert expected in (err.details() or "")
        await bad.close()
    await still_served(fx, good, 4)
    await good.close()


async def test_a_sotw_request_that_does_not_parse_ends_only_that_stream(fx: XdsFixture) -> None:
    """SotW requests reach the stream as bytes (an ACK repeating the subscription is not
    parsed whole): one that is not a DiscoveryRequest ends its stream with INVALID_ARGUMENT,
    before and after the stream is set up, and the other streams carry on."""
    fx.control.publish({ENDPOINT: {"a": make_cla("a")}})
    good = await good_stream(fx)
    method = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
    first = discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=["a"])
    first.node.id = "raw-client"
    for before_setup in (True, False):
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{fx.port}")
        call = channel.stream_stream(method, request_serializer=lambda b: b,
                                     response_deserializer=discovery_pb2.DiscoveryResponse.FromString)()
        if not before_setup:
            await call.write(first.SerializeToString())
            resp = await asyncio.wait_for(call.read(), 30)
            assert resp.type_url == ENDPOINT
        await call.write(b"\x0a\xff\xff\xff\x0f")  # field 1, a length past the end
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            while True:
                if await asyncio.wait_for(call.read(), 30) is grpc.aio.EOF:
                    break
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, before_setup
        assert "does not parse" in (caught.value.details() or "")
        await channel.close()
    await still_served(fx, good, 4)
    await good.close()


async def test_oversized_initial_versions_and_node_metadata_are_refused(fx: XdsFixture) -> None:
    c = fx.client("delta", node_id="bad-initial")
    c.send_delta(ENDPOINT, subscribe=["a"], initial={"a": "v" * 2000})
    err = await refusal(c)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "resource version of 2000 characters" in (err.details() or "")
    await c.close()
    c = fx.client("delta", node_id="fat-node", padding="p" * 100_000)
    c.send_delta(CLUSTER)
    err = await refusal(c)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the node (id and metadata) is" in (err.details() or "") and "at most 65536" in (err.details() or "")
    await c.close()


async def test_a_message_over_4_mib_is_refused_by_grpc_and_the_server_carries_on(fx: XdsFixture) -> None:
    fx.control.publish({ENDPOINT: {"a": make_cla("a")}})
    good = await good_stream(fx)
    bad = AdsClient(f"127.0.0.1:{fx.port}", "delta", "huge", {},
                    channel=grpc.aio.insecure_channel(f"127.0.0.1:{fx.port}",
                                                      options=[("grpc.max_send_message_length", 64 << 20)]))
    bad.send_delta(ENDPOINT, subscribe=["z" * 1000] * 4300)  # ~4.3 MB (the names need not be distinct)
    err = await refusal(bad)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in (err.details() or "")
    await still_served(fx, good, 5)
    await bad.close()
    await good.close()


# --------------------------------------------------------------------------- streams per client


class StaticAuth:
    """Proves the identity named by the stream's `x-test-identity` metadata (ns/sa)."""

    async def authenticate(self, metadata: Any) -> AuthResult:
        for k, v in metadata or ():
            if k == "x-test-identity":
                ns, sa = v.split("/")
                return AuthResult(Identity(ns, sa), presented=True)
        return AuthResult(None, "no token")


class LimitedServer:
    def __init__(self, limits: XdsLimits, authenticator: Any = None) -> None:
        self.control = FakeControl()
        self.xds = XdsServer(self.control, authenticator=authenticator, limits=limits)
        self.limits = limits
        self.server: grpc.aio.Server | None = None
        self.port = 0

    def client(self, protocol: str = "delta", node_id: str = "proxy", channel: grpc.aio.Channel | None = None,
               metadata: Sequence[tuple[str, str]] = (), **meta: str) -> AdsClient:
        return AdsClient(f"127.0.0.1:{self.port}", protocol, node_id, meta, metadata=metadata, channel=channel)


@asynccontextmanager
async def limited(limits: XdsLimits, authenticator: Any = None) -> AsyncIterator[LimitedServer]:
    s = LimitedServer(limits, authenticator)
    s.server, s.port = await start_grpc("127.0.0.1:0", s.xds.handlers(), limits=limits)
    s.control.publish({CLUSTER: {"c": make_cluster("c")}, ENDPOINT: {"a": make_cla("a")}})
    try:
        yield s
    finally:
        await s.server.stop(0)


async def first_cds(c: AdsClient) -> None:
    c.send_delta(CLUSTER)
    r = await c.recv(20)
    assert [x.name for x in r.resources] == ["c"]


async def test_streams_beyond_the_per_connection_limit_wait_for_a_free_slot() -> None:
    async with limited(XdsLimits(max_streams_per_connection=3)) as s:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{s.port}")
        clients = [s.client(node_id=f"p{i}", channel=channel) for i in range(3)]
        for c in clients:
            await first_cds(c)
        waiting = s.client(node_id="fourth", channel=channel)
        waiting.send_delta(CLUSTER)
        await waiting.expect_nothing(0.5)  # the connection carries 3 streams at most
        assert len(s.xds.connections) == 3
        clients[0].call.cancel()
        r = await waiting.recv(20)  # a slot is free: now it is served
        assert [x.name for x in r.resources] == ["c"]
        for c in [*clients[1:], waiting]:
            c.call.cancel()
        await channel.close()


async def test_unauthenticated_streams_per_peer_address_are_bounded() -> None:
    async with limited(XdsLimits(max_streams_per_peer=2, limit_loopback_peers=True)) as s:
        clients = [s.client(node_id=f"p{i}") for i in range(2)]
        for c in clients:
            await first_cds(c)
        third = s.client(node_id="third")
        third.send_delta(CLUSTER)
        err = await refusal(third)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "127.0.0.1 already has 2 open xDS streams; at most 2" in (err.details() or "")
        await third.close()
        await clients[0].close()
        for _ in range(1200):  # the server notices the closed stream (polled for up to a minute)
            if s.xds.streams_per_client.get(("peer", "127.0.0.1")) == 1:
                break
            await asyncio.sleep(0.05)
        assert s.xds.streams_per_client.get(("peer", "127.0.0.1")) == 1
        again = s.client(node_id="again")
        await first_cds(again)  # room again
        await again.close()
        await clients[1].close()


async def test_loopback_peers_are_not_limited_by_default() -> None:
    async with limited(XdsLimits(max_streams_per_peer=2)) as s:
        clients = [s.client(node_id=f"p{i}") for i in range(4)]
        for c in clients:
            await first_cds(c)
        for c in clients:
            await c.close()


async def test_streams_per_authenticated_identity_are_bounded() -> None:
    async with limited(XdsLimits(max_streams_per_identity=2), StaticAuth()) as s:
        alice = [s.client(node_id=f"a{i}", metadata=[("x-test-identity", "default/alice")]) for i in range(2)]
        for c in alice:
            await first_cds(c)
        extra = s.client(node_id="a-extra", metadata=[("x-test-identity", "default/alice")])
        extra.send_delta(CLUSTER)
        err = await refusal(extra)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "default/alice already has 2 open xDS streams; at most 2" in (err.details() or "")
        bob = s.client(node_id="b", metadata=[("x-test-identity", "default/bob")])
        await first_cds(bob)  # another identity is unaffected
        for c in [*alice, extra, bob]:
            await c.close()


def test_peer_host_parses_grpc_peers() -> None:
    assert peer_host("ipv4:10.1.2.3:5678") == "10.1.2.3"
    assert peer_host("ipv6:[::1]:5678") == "::1"
    assert peer_host("unix:/tmp/x.sock") is None
    assert peer_host("") is None


# --------------------------------------------------------------------------- shared name sets


async def test_shared_subscription_sets_are_freed_when_their_streams_end(fx: XdsFixture) -> None:
    fx.control.publish({ENDPOINT: {"a": make_cla("a")}})
    names = [f"outbound|80||svc-{i}.default.svc.cluster.local" for i in range(2000)]
    clients = []
    for i in range(10):
        c = fx.client("sotw" if i % 2 else "delta", node_id=f"p{i}")
        if i % 2:
            c.send(ENDPOINT, list(reversed(names)))
        else:
            c.send_delta(ENDPOINT, subscribe=names)
        await c.recv(20)
        clients.append(c)
    assert len(fx.xds.name_sets) == 1  # ten streams, one set of those names
    for i in range(10):  # streams that each subscribe to their own names, then go away
        c = fx.client("delta", node_id=f"abandoned-{i}")
        c.send_delta(ENDPOINT, subscribe=[f"own-{i}-{j}" for j in range(2000)])
        await c.recv(20)
        clients.append(c)
    assert len(fx.xds.name_sets) == 11
    for c in clients:
        await c.close()
    for _ in range(1200):  # polled for up to a minute
        if not fx.xds.connections and len(fx.xds.name_sets) == 0:
            break
        await asyncio.sleep(0.05)
    assert not fx.xds.connections
    assert len(fx.xds.name_sets) == 0 and fx.xds.name_sets.bytes == 0  # nothing outlives its streams


def test_the_shared_set_index_is_bounded_by_bytes() -> None:
    sets = NameSets(max_bytes=50_000)
    small = sets.canonical(frozenset(f"n{i}" for i in range(100)))
    assert sets.canonical(frozenset(f"n{i}" for i in range(100))) is small
    big = frozenset(f"{i}".ljust(100, "x") for i in range(1000))  # ~100 kB: over the budget
    got = sets.canonical(big)
    assert got is big and sets.canonical(frozenset(list(big))) is not got  # not shared
    assert len(sets) == 1 and sets.bytes <= 50_000
    del small
    assert len(sets) == 0 and sets.bytes == 0


# --------------------------------------------------------------------------- delta cost


def _snapshot(n: int) -> Snapshot:
    from controlplane.cache.resources import ResourceMemo
    from controlplane.translate.plan import ResourceSpec

    memo = ResourceMemo()
    memo.begin_round()
    items = {f"e{i}": memo.realize(ResourceSpec(ENDPOINT, f"e{i}", lambda m: m, (make_cla(f"e{i}"),)))
             for i in range(n)}
    memo.end_round()
    types = {t: TypeResources(t, items if t == ENDPOINT else {}) for t in PUSH_ORDER}
    return Snapshot(types, 1)


def _churn_seconds(subscribed: int, snapshot: Snapshot, rounds: int = 400) -> float:
    """Seconds for `rounds` delta requests that each subscribe one more name, with its push
    and ACK, on a stream already subscribed to `subscribed` names."""
    s = AdsStream("delta", 1)
    s.set_target(snapshot)
    node = base_pb2.Node(id="p")
    s.handle_delta_request(discovery_pb2.DeltaDiscoveryRequest(
        type_url=ENDPOINT, node=node, resource_names_subscribe=[f"e{i}" for i in range(subscribed)]))
    out = s.next_push(time.monotonic())
    assert out is not None
    s.handle_delta_request(discovery_pb2.DeltaDiscoveryRequest(type_url=ENDPOINT, response_nonce=out.nonce))
    t0 = time.thread_time()  # this thread's CPU time: other processes on a busy machine do not count
    for i in range(rounds):
        s.handle_delta_request(discovery_pb2.DeltaDiscoveryRequest(
            type_url=ENDPOINT, resource_names_subscribe=[f"e{subscribed + i}"]))
        out = s.next_push(time.monotonic())
        assert out is not None and out.count == 1  # exactly the newly subscribed resource
        s.handle_delta_request(discovery_pb2.DeltaDiscoveryRequest(type_url=ENDPOINT, response_nonce=out.nonce))
        assert s.next_push(time.monotonic()) is None
    return time.thread_time() - t0


def test_a_delta_subscribe_costs_o_change_not_o_subscription() -> None:
    snapshot = _snapshot(10_000)
    runs = [(_churn_seconds(50, snapshot), _churn_seconds(9_500, snapshot)) for _ in range(3)]  # interleaved
    small, large = min(r[0] for r in runs), min(r[1] for r in runs)
    # O(subscription) per request would make the large stream ~190x slower; allow noise.
    assert large < small * 5, (small, large)


async def test_delta_subscription_changes_on_a_synced_stream_send_exactly_the_changes(fx: XdsFixture) -> None:
    fx.control.publish({ENDPOINT: {n: make_cla(n) for n in ("a", "b", "c", "d")},
                        LISTENER: {}})
    c = fx.client("delta")
    c.send_delta(ENDPOINT, subscribe=["a", "b"])
    r = await c.recv(20)
    assert sorted(x.name for x in r.resources) == ["a", "b"]
    c.send_delta(ENDPOINT, nonce=r.nonce, subscribe=["c", "missing"], unsubscribe=["a"])
    r = await c.recv(20)
    assert [x.name for x in r.resources] == ["c"] and list(r.removed_resources) == ["missing"]
    c.send_delta(ENDPOINT, nonce=r.nonce)
    c.send_delta(ENDPOINT, subscribe=["a"])  # re-subscribing sends it again
    r = await c.recv(20)
    assert [x.name for x in r.resources] == ["a"] and not r.removed_resources
    c.send_delta(ENDPOINT, nonce=r.nonce)
    # A change to a subscribed resource together with a subscription change.
    fx.control.publish({ENDPOINT: {"a": make_cla("a"), "b": make_cla("b", 3), "c": make_cla("c"),
                                   "d": make_cla("d")}})
    c.send_delta(ENDPOINT, subscribe=["d"], unsubscribe=["c"])
    got: set[str] = set()
    while got != {"b", "d"}:
        r = await c.recv(20)
        got |= {x.name for x in r.resources}
        assert not r.removed_resources and got <= {"b", "d"}
        c.send_delta(ENDPOINT, nonce=r.nonce)
    await c.expect_nothing()
    conn = next(iter(fx.xds.connections.values()))
    assert set(conn.stream.types[ENDPOINT].names) == {"a", "b", "d", "missing"}
    await c.close()
