"""A NACK's message is the proxy's text (untrusted, up to one gRPC message): reading the
rejected names from it must take time linear in its size, not hold the event loop (and every
other stream) for hours (issue 20, h23 review)."""

from __future__ import annotations

import pytest

from controlplane.xds.nackblame import named_in_nack

pytestmark = pytest.mark.timeout(120)  # (before: ~20 minutes for each of the first two messages)

MiB = 1024 * 1024
CANDIDATES = {f"outbound|80||svc-{i}.ns.svc.cluster.local" for i in range(1000)} | {"a", "odd: name"}


@pytest.mark.parametrize("message", [
    "Proto constraint validation failed (" * (2 * MiB // 36),  # many starts, no name on the line
    "Error adding/updating cluster(s) " + "a, " * (2 * MiB // 3),  # many entries, no ": " after them
    "Error adding/updating cluster(s) " + "a, " * (2 * MiB // 3) + "a: bad",
], ids=["validation-starts", "cluster-list", "cluster-list-named-at-the-end"])
def test_a_huge_nack_message_is_read_in_linear_time(message: str) -> None:
    expected = {"a"} if message.endswith("a: bad") else set()
    assert named_in_nack(message, CANDIDATES) == expected


def test_names_are_still_read_from_envoys_formats() -> None:
    msg = ("Error adding/updating listener(s) l1: Proto constraint validation failed (ListenerValidationError."
           'Address: value is required): name: "l2"\naddress {\n}\nodd: name: reason\n')
    assert named_in_nack(msg, {"l1", "l2", "odd: name", "l3"}) == {"l1", "l2", "odd: name"}
    two = ('Proto constraint validation failed (x): name: "c1"\n'
           "Proto constraint validation failed (no name here)\n"
           'Proto constraint validation failed (y): name: "c\\"2"')
    assert named_in_nack(two, {"c1", 'c"2', "c3"}) == {"c1", 'c"2'}


def test_a_nack_message_longer_than_envoys_own_is_not_read_and_blames_everything_changed() -> None:
    """The stream reads a NACK's message for names only up to a length Envoy's own messages for
    that response stay within (a base plus an allowance per changed resource); a longer one is
    not read at all (its cost is bounded by the response the server sent, not by the client's
    text) and blames every resource the response changed."""
    from envoy.service.discovery.v3 import discovery_pb2

    from controlplane.translate.plan import CLUSTER
    from controlplane.xds.clock import ManualClock
    from controlplane.xds.stream import NACK_READ_BASE, NACK_READ_PER_RESOURCE, AdsStream
    from tests.xdsharness import FakeControl, make_cluster

    def quarantined_after(message: str) -> set[str]:
        control = FakeControl()
        stream = AdsStream("sotw", 1, clock=ManualClock())
        stream.set_target(control.publish({CLUSTER: {n: make_cluster(n) for n in ("a", "b")}}))
        stream.handle_sotw_request(discovery_pb2.DiscoveryRequest(type_url=CLUSTER))
        out = stream.next_push()
        assert out is not None
        nack = discovery_pb2.DiscoveryRequest(type_url=CLUSTER, response_nonce=out.nonce)
        nack.error_detail.code, nack.error_detail.message = 13, message
        stream.handle_sotw_request(nack)
        v = stream.view(CLUSTER)
        assert v is not None
        return set(v.quarantine)

    named = "Error adding/updating cluster(s) a: bad"
    assert quarantined_after(named) == {"a"}
    limit = NACK_READ_BASE + NACK_READ_PER_RESOURCE * 2
    assert quarantined_after(named + " " * (limit - len(named))) == {"a"}  # at the limit: read
    assert quarantined_after(named + " " * (limit + 1 - len(named))) == {"a", "b"}  # past it: not read
