"""Adversarial review of the SotW request fast path (issue 20): a request the stream handles
from its small fields (`AdsStream.handle_sotw_bytes`, subscription compared as bytes) must be
refused or accepted exactly as the full parse would, and what one stream sends must not stay
held on behalf of another."""

from __future__ import annotations

import asyncio
import gc

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import DecodeError

from controlplane.translate.plan import ENDPOINT
from controlplane.xds.clock import ManualClock
from controlplane.xds.stream import AdsStream, NameSets, RequestRefused, XdsLimits
from tests.test_xds_limits import good_stream, still_served
from tests.xdsharness import XdsFixture, make_cla


def _eds(names: list[str], nonce: str = "") -> bytes:
    return discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=names,
                                          response_nonce=nonce).SerializeToString()


@pytest.mark.parametrize("as_received", [False, True], ids=["parsed", "as-received"])
def test_a_sotw_subscription_beyond_the_per_type_limit_is_refused_at_once(as_received: bool) -> None:
    """A stream subscribing to more names of one type than `max_names_per_type` is refused
    by the request that does it (it was checked against the previous subscription's size, so
    a first request of 50 names passed a limit of 10)."""
    stream = AdsStream("sotw", 1, limits=XdsLimits(max_names_per_type=10, max_names_per_request=100),
                       clock=ManualClock())
    names = [f"outbound|80||svc-{i}.ns.svc.cluster.local" for i in range(50)]
    with pytest.raises(RequestRefused) as caught:
        if as_received:
            stream.handle_sotw_bytes(_eds(names))
        else:
            stream.handle_sotw_request(discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=names))
    assert caught.value.exhausted and "50" in caught.value.message and "at most 10 per type" in caught.value.message


def test_a_repeated_subscription_with_a_node_that_does_not_parse_is_refused() -> None:
    """The fast path keeps `node` as bytes: a later request repeating the subscription but
    carrying a node that is not a Node is malformed, as the full parse says."""
    stream = AdsStream("sotw", 1, clock=ManualClock())
    first = _eds(["a"])
    stream.handle_sotw_bytes(first)
    for bad in (b"\x12\x03\xff\xff\xff" + first,  # field 2 (node): three bytes that are no message
                b"\x12\x02\xff\xff" + first + b"\x12\x00"):  # ...followed by an empty one (merged, not replaced)
        with pytest.raises(DecodeError):
            discovery_pb2.DiscoveryRequest.FromString(bad)  # (the full parse refuses it)
        with pytest.raises(RequestRefused) as caught:
            stream.handle_sotw_bytes(bad)
        assert not caught.value.exhausted and "does not parse" in caught.value.message
    ok = discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=["a"])
    ok.node.id = "sidecar~10.0.0.1~a.ns~ns.svc.cluster.local"
    again = AdsStream("sotw", 2, clock=ManualClock())
    again.handle_sotw_bytes(first)
    assert again.handle_sotw_bytes(ok.SerializeToString()).request is None  # a valid node: still the fast path


def test_padding_one_stream_sends_is_not_held_by_another_streams_shared_names() -> None:
    """Streams subscribing to the same names share one set, and with it one copy of the
    subscription's bytes. A client padding its request with unknown fields must not leave its
    padding in that shared set, held for other proxies after its own stream has ended."""
    sets = NameSets()
    attacker = AdsStream("sotw", 1, sets, clock=ManualClock())
    victim = AdsStream("sotw", 2, sets, clock=ManualClock())
    pad = 1024 * 1024
    padding = b"\xfa\x06" + bytes([0x80, 0x80, 0x40]) + b"p" * pad  # field 111, 1 MiB
    attacker.handle_sotw_bytes(_eds(["a", "b"]) + padding)
    victim.handle_sotw_bytes(_eds(["a", "b"]))
    shared = victim.types[ENDPOINT].names
    assert shared is attacker.types[ENDPOINT].names  # the same names: one set
    del attacker
    gc.collect()
    held = len(getattr(shared, "key", None) or b"") + len(victim.types[ENDPOINT].names_key)
    assert held < 1024, held
    # An honest subscription's bytes are still shared.
    other = AdsStream("sotw", 3, sets, clock=ManualClock())
    other.handle_sotw_bytes(_eds(["a", "b"]))
    assert other.types[ENDPOINT].names_key is victim.types[ENDPOINT].names_key


async def test_an_ack_with_a_node_that_does_not_parse_ends_only_that_stream(fx: XdsFixture) -> None:
    """Over gRPC: a set-up SotW stream whose ACK repeats the subscription (the fast path) but
    carries a node that is no Node (the full parse merges a bad and an empty occurrence and
    refuses) ends with INVALID_ARGUMENT; another stream carries on."""
    fx.control.publish({ENDPOINT: {"a": make_cla("a")}})
    good = await good_stream(fx)
    method = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
    first = discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=["a"])
    first.node.id = "raw-client"
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{fx.port}")
    call = channel.stream_stream(method, request_serializer=lambda b: b,
                                 response_deserializer=discovery_pb2.DiscoveryResponse.FromString)()
    await call.write(first.SerializeToString())
    resp = await asyncio.wait_for(call.read(), 30)
    assert not isinstance(resp, type(grpc.aio.EOF)) and resp.type_url == ENDPOINT
    ack = discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=["a"], response_nonce=resp.nonce)
    await call.write(b"\x12\x02\xff\xff" + ack.SerializeToString() + b"\x12\x00")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        while True:
            if await asyncio.wait_for(call.read(), 30) is grpc.aio.EOF:
                break
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not parse" in (caught.value.details() or "")
    await channel.close()
    await still_served(fx, good, 4)
    await good.close()
