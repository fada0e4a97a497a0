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
