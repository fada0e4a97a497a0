"""The xDS stream state machine (controlplane/xds/stream.py) without gRPC: tables of steps
(snapshots published, Envoy's requests, ACKs and NACKs, clock advances) and after each step
the responses the stream sends (or holds back), its NACK records and its read-only view.

A push is written `"CDS a,b"` (resources carried) or `"EDS a -x"` (delta: `x` removed);
`[]` expects nothing to be sent."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.service.discovery.v3 import discovery_pb2

from controlplane.model.ir import TypeUrl
from controlplane.translate.plan import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET
from controlplane.xds.clock import ManualClock
from controlplane.xds.nackblame import named_in_nack
from controlplane.xds.stream import AdsStream, NackRecord, Outgoing
from tests.xdsharness import FakeControl, make_cla, make_cluster

BY_SHORT: dict[str, TypeUrl] = {"CDS": CLUSTER, "EDS": ENDPOINT, "LDS": LISTENER, "RDS": ROUTE, "SDS": SECRET}
SHORT = {t: s for s, t in BY_SHORT.items()}
_MESSAGES: dict[str, Any] = {CLUSTER: cluster_pb2.Cluster, ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
                             LISTENER: listener_pb2.Listener}


def listener(name: str, port: int = 8080) -> listener_pb2.Listener:
    lis = listener_pb2.Listener(name=name)
    lis.address.socket_address.address = "127.0.0.1"
    lis.address.socket_address.port_value = port
    return lis


# ---------------------------------------------------------------------- steps
@dataclass(frozen=True)
class Publish:
    """A new target snapshot: {type: {name: variant}}, a variant an int that changes the body."""

    resources: Mapping[str, Mapping[str, int]]


@dataclass(frozen=True)
class Req:
    """Envoy's request for `type` (short name). SotW: `names` (None: wildcard / the same as
    before). Delta: `sub`/`unsub`/`initial` (name -> variant of the version Envoy holds).
    `answer`: "ack"/"nack" the last response of the type, or an explicit nonce via `nonce`."""

    type: str
    names: tuple[str, ...] | None = None
    sub: tuple[str, ...] = ()
    unsub: tuple[str, ...] = ()
    initial: Mapping[str, int] = field(default_factory=dict)
    answer: str = ""  # "", "ack", "nack"
    nonce: str | None = None
    error: str = "rejected"


@dataclass(frozen=True)
class Advance:
    seconds: float


@dataclass(frozen=True)
class Expect:
    """The responses the stream sends now, in order."""

    pushes: tuple[str, ...]


@dataclass(frozen=True)
class Nacked:
    """The NACK just recorded for `type` blames `resources` (None: no new NACK record)."""

    type: str
    resources: tuple[str, ...] | None


@dataclass(frozen=True)
class State:
    """The read API's view of `type`: its sync state and, if given, what it holds back."""

    type: str
    state: str
    quarantine: tuple[str, ...] | None = None


Step = Publish | Req | Advance | Expect | Nacked | State


def _body(t: TypeUrl, name: str, variant: int) -> Any:
    if t == CLUSTER:
        return make_cluster(name, variant)
    if t == ENDPOINT:
        return make_cla(name, variant)
    return listener(name, 8000 + variant)


def _render(t: TypeUrl, out: Outgoing, protocol: str) -> str:
    msg = _MESSAGES[t]
    names: list[str] = []
    removed: list[str] = []
    if protocol == "sotw":
        resp = discovery_pb2.DiscoveryResponse.FromString(out.payload)
        for a in resp.resources:
            m = msg.FromString(a.value)
            names.append(m.cluster_name if t == ENDPOINT else m.name)
    else:
        dresp = discovery_pb2.DeltaDiscoveryResponse.FromString(out.payload)
        names = [r.name for r in dresp.resources]
        removed = list(dresp.removed_resources)
    text = f"{SHORT[t]} {','.join(names)}".rstrip()
    return text + (f" -{','.join(removed)}" if removed else "")


class Driver:
    def __init__(self, protocol: str, as_received: bool = False) -> None:
        """`as_received`: SotW requests are handed over as bytes, as the gRPC server does
        (`handle_sotw_bytes`), not parsed (`handle_sotw_request`)."""
        self.protocol = protocol
        self.as_received = as_received
        self.clock = ManualClock()
        self.control = FakeControl()
        self.stream = AdsStream(protocol, 1, clock=self.clock)  # type: ignore[arg-type]
        self.last: dict[TypeUrl, Outgoing] = {}
        self.versions: dict[TypeUrl, str] = {}  # SotW: version_info of the last response per type
        self.sent: list[str] = []
        self.nack: NackRecord | None = None

    def publish(self, step: Publish) -> None:
        res = {BY_SHORT[s]: {n: _body(BY_SHORT[s], n, v) for n, v in items.items()}
               for s, items in step.resources.items()}
        snap = self.control.publish(res)
        self.stream.set_target(snap)
        self._drain()

    def request(self, step: Req) -> None:
        t = BY_SHORT[step.type]
        nonce = step.nonce if step.nonce is not None else (self.last[t].nonce if step.answer else "")
        if self.protocol == "sotw":
            req = discovery_pb2.DiscoveryRequest(type_url=t, response_nonce=nonce,
                                                 resource_names=list(step.names or ()))
            if step.answer == "nack":
                req.error_detail.code, req.error_detail.message = 13, step.error
            if self.as_received:
                self.nack = self.stream.handle_sotw_bytes(req.SerializeToString()).nack
            else:
                self.nack = self.stream.handle_sotw_request(req)
        else:
            initial = {n: self.control.memo.realize(_spec(t, n, v)).version for n, v in step.initial.items()}
            dreq = discovery_pb2.DeltaDiscoveryRequest(
                type_url=t, response_nonce=nonce, resource_names_subscribe=list(step.sub),
                resource_names_unsubscribe=list(step.unsub), initial_resource_versions=initial)
            if step.answer == "nack":
                dreq.error_detail.code, dreq.error_detail.message = 13, step.error
            self.nack = self.stream.handle_delta_request(dreq)
        self._drain()

    def _drain(self) -> None:
        while (out := self.stream.next_push()) is not None:
            self.last[out.type_url] = out
            self.sent.append(_render(out.type_url, out, self.protocol))

    def run(self, steps: list[Step]) -> None:
        for i, step in enumerate(steps):
            where = f"step {i}: {step}"
            if isinstance(step, Publish):
                self.publish(step)
            elif isinstance(step, Req):
                self.request(step)
            elif isinstance(step, Advance):
                self.clock.advance(step.seconds)
                self._drain()
            elif isinstance(step, Expect):
                assert tuple(self.sent) == step.pushes, where
                self.sent.clear()
            elif isinstance(step, Nacked):
                if step.resources is None:
                    assert self.nack is None, where
                else:
                    assert self.nack is not None and self.nack.resources == step.resources, where
                    assert self.nack.at == self.clock.now, where  # the injected clock, not time.time()
                    v = self.stream.view(BY_SHORT[step.type])
                    assert v is not None and v.last_nack is self.nack, where
            elif isinstance(step, State):
                v = self.stream.view(BY_SHORT[step.type])
                assert v is not None and v.state == step.state, (where, v)
                if step.quarantine is not None:
                    assert tuple(sorted(v.quarantine)) == step.quarantine, (where, v)


def _spec(t: TypeUrl, name: str, variant: int) -> Any:
    from controlplane.translate.plan import ResourceSpec
    from tests.xdsharness import _ident

    return ResourceSpec(t, name, _ident, (_body(t, name, variant),))


# ---------------------------------------------------------------------- tables
ACK = "ack"
NACK = "nack"

SOTW: dict[str, list[Step]] = {
    "wildcard CDS: full state, ACK, change, removal": [
        Publish({"CDS": {"a": 1, "b": 1}}),
        Req("CDS"), Expect(("CDS a,b",)), State("CDS", "STALE"),
        Req("CDS", answer=ACK), Expect(()), State("CDS", "SYNCED"),
        Publish({"CDS": {"a": 2, "b": 1}}), Expect(("CDS a,b",)),  # CDS is full state in SotW
        Req("CDS", answer=ACK),
        Publish({"CDS": {"a": 2}}), Expect(("CDS a",)),  # removal: the full state without b
        Req("CDS", answer=ACK), Expect(()), State("CDS", "SYNCED"),
    ],
    "EDS subscription: only subscribed, only changed": [
        Publish({"EDS": {"a": 1, "b": 1, "c": 1}}),
        Req("EDS", names=("a", "x")), Expect(("EDS a",)),  # x does not exist: not sent
        Req("EDS", names=("a", "x"), answer=ACK), Expect(()),
        Req("EDS", names=("a", "b"), answer=ACK), Expect(("EDS a,b",)),  # a new subscription: answered in full
        Req("EDS", names=("a", "b"), answer=ACK),
        Publish({"EDS": {"a": 1, "b": 2, "c": 2}}), Expect(("EDS b",)),  # c is not subscribed
        Req("EDS", names=("a", "b"), answer=ACK), State("EDS", "SYNCED"),
    ],
    "new clusters: listeners wait for their ACK (endpoints do not)": [
        Publish({"CDS": {"a": 1}, "EDS": {"a": 1}, "LDS": {"l": 1}}),
        Req("CDS"), Expect(("CDS a",)),
        Req("EDS", names=("a",)), Expect(("EDS a",)),  # warming needs its endpoints
        Req("LDS"), Expect(()),  # held until CDS is ACKed
        Advance(5), Expect(()),
        Req("CDS", answer=ACK), Expect(("LDS l",)),
    ],
    "new clusters never ACKed: the hold ends at the deadline": [
        Publish({"CDS": {"a": 1}, "LDS": {"l": 1}}),
        Req("CDS"), Expect(("CDS a",)),
        Req("LDS"), Expect(()),
        Advance(9.9), Expect(()),
        Advance(0.2), Expect(("LDS l",)),  # 10 s + 1/500 s per new cluster
    ],
    "stale or unknown nonces are ignored": [
        Publish({"CDS": {"a": 1}}),
        Req("CDS"), Expect(("CDS a",)),
        Req("CDS", answer=ACK), State("CDS", "SYNCED"),
        Publish({"CDS": {"a": 2}}), Expect(("CDS a",)), State("CDS", "STALE"),
        Req("CDS", answer=ACK, nonce="1"), Expect(()), State("CDS", "STALE"),  # answered already
        Req("CDS", answer=NACK, nonce="77"), Nacked("CDS", None), State("CDS", "STALE"),  # never sent
        Req("CDS", answer=ACK), State("CDS", "SYNCED"),
    ],
    "NACK naming a cluster: it is held back, the others flow, a fix lifts it": [
        Publish({"CDS": {"a": 1, "b": 1}}),
        Req("CDS"), Expect(("CDS a,b",)), Req("CDS", answer=ACK),
        Publish({"CDS": {"a": 1, "b": 9, "c": 1}}), Expect(("CDS a,b,c",)),
        Req("CDS", answer=NACK, error="Error adding/updating cluster(s) b: bad connect_timeout"),
        Nacked("CDS", ("b",)), Expect(()), State("CDS", "NACKED", ("b",)),  # c was accepted
        Publish({"CDS": {"a": 2, "b": 9, "c": 1}}), Expect(("CDS a,b,c",)),  # with the accepted b
        Req("CDS", answer=ACK), State("CDS", "NACKED", ("b",)),
        Publish({"CDS": {"a": 2, "b": 3, "c": 1}}), Expect(("CDS a,b,c",)),
        Req("CDS", answer=ACK), State("CDS", "SYNCED", ()),
    ],
    "NACK naming no resource of the response: everything it changed is blamed": [
        Publish({"EDS": {"a": 1, "b": 1}}),
        Req("EDS", names=("a", "b")), Expect(("EDS a,b",)), Req("EDS", names=("a", "b"), answer=ACK),
        Publish({"EDS": {"a": 2, "b": 2}}), Expect(("EDS a,b",)),
        # "a" and "b" occur in the text, but not where Envoy names rejected resources.
        Req("EDS", names=("a", "b"), answer=NACK, error="endpoint a has a priority gap"),
        Nacked("EDS", ("a", "b")), Expect(()), State("EDS", "NACKED", ("a", "b")),
    ],
    # Envoy's replacement cluster warms until its EDS update arrives, asking for nothing
    # (envoyproxy/envoy#13009): a changed cluster's endpoints go again, changed or not.
    "a changed cluster: its unchanged endpoints are sent again": [
        Publish({"CDS": {"a": 1, "b": 1}, "EDS": {"a": 1, "b": 1}}),
        Req("CDS"), Expect(("CDS a,b",)), Req("EDS", names=("a", "b")), Expect(("EDS a,b",)),
        Req("CDS", answer=ACK), Req("EDS", names=("a", "b"), answer=ACK), State("EDS", "SYNCED"),
        Publish({"CDS": {"a": 2, "b": 1}, "EDS": {"a": 1, "b": 1}}), Expect(("CDS a,b", "EDS a")),
        Req("CDS", answer=ACK), Req("EDS", names=("a", "b"), answer=ACK), Expect(()), State("EDS", "SYNCED"),
    ],
}

DELTA: dict[str, list[Step]] = {
    "wildcard CDS: changes and removals": [
        Publish({"CDS": {"a": 1, "b": 1}}),
        Req("CDS"), Expect(("CDS a,b",)), Req("CDS", answer=ACK), State("CDS", "SYNCED"),
        Publish({"CDS": {"a": 2, "b": 1}}), Expect(("CDS a",)),  # only what changed
        Req("CDS", answer=ACK),
        Publish({"CDS": {"a": 2}}), Expect(("CDS -b",)),
        Req("CDS", answer=ACK), Expect(()), State("CDS", "SYNCED"),
    ],
    "named EDS: subscribe, absent names, unsubscribe": [
        Publish({"EDS": {"a": 1, "b": 1}}),
        Req("EDS", sub=("a", "x")), Expect(("EDS a -x",)),  # x does not exist: said once
        Req("EDS", answer=ACK), Expect(()),
        Req("EDS", sub=("b",)), Expect(("EDS b",)), Req("EDS", answer=ACK),
        Req("EDS", unsub=("a",)), Expect(()),  # nothing to send for an unsubscribe
        Publish({"EDS": {"a": 2, "b": 1}}), Expect(()),  # a is no longer subscribed
        Publish({"EDS": {"a": 2, "b": 1, "x": 1}}), Expect(("EDS x",)),  # x appears
        Req("EDS", answer=ACK), State("EDS", "SYNCED"),
    ],
    "wildcard added and removed by name": [
        Publish({"CDS": {"a": 1, "b": 1}}),
        Req("CDS", sub=("a",)), Expect(("CDS a",)), Req("CDS", answer=ACK),
        Req("CDS", sub=("*",)), Expect(("CDS b",)), Req("CDS", answer=ACK),
        Req("CDS", unsub=("*",)), Expect(("CDS -b",)), Req("CDS", answer=ACK), State("CDS", "SYNCED"),
    ],
    "NACK then fix: per response, nothing resent until the resource changes": [
        Publish({"CDS": {"a": 1, "b": 1}}),
        Req("CDS"), Expect(("CDS a,b",)), Req("CDS", answer=ACK),
        Publish({"CDS": {"a": 9, "b": 1}}), Expect(("CDS a",)),
        Req("CDS", answer=NACK, error="a is bad"), Nacked("CDS", ("a",)), Expect(()),
        State("CDS", "NACKED", ("a",)),
        Publish({"CDS": {"a": 9, "b": 2}}), Expect(("CDS b",)), Req("CDS", answer=ACK),
        Publish({"CDS": {"a": 3, "b": 2}}), Expect(("CDS a",)), Req("CDS", answer=ACK),
        State("CDS", "SYNCED", ()),
    ],
    "NACK of several clusters names the rejected ones only": [
        Publish({"CDS": {"a": 1, "b": 1, "c": 1}}),
        Req("CDS"), Expect(("CDS a,b,c",)), Req("CDS", answer=ACK),
        Publish({"CDS": {"a": 2, "b": 2, "c": 2}}), Expect(("CDS a,b,c",)),
        Req("CDS", answer=NACK, error="Error adding/updating cluster(s) a: x: y, c: bad thing, b is fine"),
        Nacked("CDS", ("a", "c")), State("CDS", "NACKED", ("a", "c")),
    ],
    "a NACK of an already answered nonce is ignored": [
        Publish({"CDS": {"a": 1}}),
        Req("CDS"), Expect(("CDS a",)), Req("CDS", answer=ACK),
        Req("CDS", answer=NACK, nonce="1"), Nacked("CDS", None), State("CDS", "SYNCED"),
    ],
    "reconnect with initial versions: only what differs is sent": [
        Publish({"CDS": {"a": 1, "b": 2, "c": 1}}),
        Req("CDS", initial={"a": 1, "b": 1, "gone": 1}), Expect(("CDS b,c",)),
        Req("CDS", answer=ACK), Expect(("CDS -gone",)),  # removals after the new cluster warmed
        Req("CDS", answer=ACK), State("CDS", "SYNCED"),
    ],
    "a changed cluster: its unchanged endpoints are sent again": [
        Publish({"CDS": {"a": 1, "b": 1}, "EDS": {"a": 1, "b": 1}}),
        Req("CDS"), Expect(("CDS a,b",)), Req("EDS", sub=("a", "b")), Expect(("EDS a,b",)),
        Req("CDS", answer=ACK), Req("EDS", answer=ACK), State("EDS", "SYNCED"),
        Publish({"CDS": {"a": 2, "b": 1}, "EDS": {"a": 1, "b": 1}}), Expect(("CDS a", "EDS a")),
        Req("CDS", answer=ACK), Req("EDS", answer=ACK), Expect(()), State("EDS", "SYNCED"),
        Publish({"CDS": {"a": 2, "b": 1}, "EDS": {"a": 1, "b": 2}}), Expect(("EDS b",)),  # no cluster changed
    ],
}


@pytest.mark.parametrize("as_received", [False, True], ids=["parsed", "as-received"])
@pytest.mark.parametrize("case", list(SOTW), ids=list(SOTW))
def test_sotw(case: str, as_received: bool) -> None:
    Driver("sotw", as_received).run(SOTW[case])


def _eds_ack(names: list[str], nonce: str, error: str | None = None, node: bool = False) -> bytes:
    req = discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=names, response_nonce=nonce,
                                         version_info="v1")
    if error is not None:
        req.error_detail.code, req.error_detail.message = 13, error
    if node:
        req.node.id = "sidecar~10.0.0.1~a.ns~ns.svc.cluster.local"
    return req.SerializeToString()


def test_a_sotw_ack_repeating_the_subscription_is_not_parsed_whole() -> None:
    """Every SotW EDS ACK repeats the whole subscription: the server compares it as bytes and
    parses the request whole only when the subscription changed."""
    control = FakeControl()
    stream = AdsStream("sotw", 1, clock=ManualClock())
    names = [f"outbound|80||svc-{i}.ns.svc.cluster.local" for i in range(300)]
    stream.set_target(control.publish({ENDPOINT: {n: make_cla(n) for n in names}}))
    first = stream.handle_sotw_bytes(_eds_ack(names, "", node=True))
    assert first.request is not None and len(first.request.resource_names) == 300  # a new subscription
    out = stream.next_push()
    assert out is not None and out.count == 300
    ack = stream.handle_sotw_bytes(_eds_ack(names, out.nonce))
    assert ack.request is None and ack.nack is None and ack.nonce == out.nonce  # not parsed whole
    assert stream.sync_state(ENDPOINT) == "SYNCED"
    stream.set_target(control.publish({ENDPOINT: {n: make_cla(n, 2 if n == names[7] else 1) for n in names}}))
    out = stream.next_push()
    assert out is not None and out.count == 1
    nack = stream.handle_sotw_bytes(_eds_ack(names, out.nonce, error="bad endpoint"))
    assert nack.request is None and nack.nack is not None and nack.nack.message == "bad endpoint"
    assert stream.sync_state(ENDPOINT) == "NACKED"
    # The same names in another order, or fewer names, are parsed and applied.
    reordered = stream.handle_sotw_bytes(_eds_ack(list(reversed(names)), out.nonce))
    assert reordered.request is not None
    fewer = stream.handle_sotw_bytes(_eds_ack(names[:10], out.nonce))
    assert fewer.request is not None
    v = stream.view(ENDPOINT)
    assert v is not None and v.subscribed == frozenset(names[:10])


def test_an_empty_error_detail_is_a_nack_on_both_paths() -> None:
    """`error_detail {}` present but empty is a NACK (presence, not content), parsed or not."""
    for as_received in (False, True):
        control = FakeControl()
        stream = AdsStream("sotw", 1, clock=ManualClock())
        stream.set_target(control.publish({ENDPOINT: {"a": make_cla("a")}}))
        stream.handle_sotw_bytes(_eds_ack(["a"], "", node=True))
        out = stream.next_push()
        assert out is not None
        req = discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=["a"], response_nonce=out.nonce)
        req.error_detail.SetInParent()
        nack = (stream.handle_sotw_bytes(req.SerializeToString()).nack if as_received
                else stream.handle_sotw_request(req))
        assert nack is not None, as_received


def test_a_sotw_subscription_counts_what_its_request_carries_not_just_the_names() -> None:
    """The stream keeps a SotW subscription as its bytes: a request padding one name with
    megabytes of fields Meshline does not know is held to the stream's subscription limit
    (2 MiB), as a request naming that many characters is."""
    from controlplane.xds.stream import RequestRefused

    stream = AdsStream("sotw", 1, clock=ManualClock())
    base = discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=["a"])
    pad = 3 * 1024 * 1024
    unknown = b"\xfa\x06" + _varint(pad) + b"p" * pad  # field 111, length-delimited
    with pytest.raises(RequestRefused) as caught:
        stream.handle_sotw_bytes(base.SerializeToString() + unknown)
    assert caught.value.exhausted and "at most 2097152" in str(caught.value)
    small = stream.handle_sotw_bytes(base.SerializeToString() + b"\xfa\x06\x03abc")  # a little is fine
    assert small.request is not None


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def test_sotw_bytes_that_do_not_parse_are_refused_as_malformed() -> None:
    from controlplane.xds.stream import RequestRefused

    stream = AdsStream("sotw", 1, clock=ManualClock())
    for raw in (b"\xff\xff\xff", b"\x22\x05ab", _eds_ack(["a"], "")[:-3]):
        with pytest.raises(RequestRefused) as caught:
            stream.handle_sotw_bytes(raw)
        assert not caught.value.exhausted
    # A name that is not UTF-8 is refused when the subscription is parsed.
    bad = discovery_pb2.DiscoveryRequest(type_url=ENDPOINT).SerializeToString() + b"\x1a\x02\xc3\x28"
    with pytest.raises(RequestRefused):
        stream.handle_sotw_bytes(bad)


@pytest.mark.parametrize("case", list(DELTA), ids=list(DELTA))
def test_delta(case: str) -> None:
    Driver("delta").run(DELTA[case])


def test_timestamps_come_from_the_injected_clock() -> None:
    d = Driver("delta")
    d.run([Publish({"CDS": {"a": 1}}), Advance(7), Req("CDS"), Expect(("CDS a",))])
    pushed_at = d.clock.now
    d.run([Advance(3), Req("CDS", answer=ACK)])
    v = d.stream.view(CLUSTER)
    assert v is not None and (v.last_push, v.last_ack) == (pushed_at, pushed_at + 3)
    assert d.stream.connected_at == pushed_at - 7


def test_views_are_frozen_copies() -> None:
    d = Driver("sotw")
    d.run([Publish({"EDS": {"a": 1}}), Req("EDS", names=("a",)), Expect(("EDS a",))])
    before = d.stream.view(ENDPOINT)
    assert before is not None and before.pending_nonces == ("1",) and before.pending_names == {"a"}
    d.run([Req("EDS", names=("a",), answer=ACK)])
    assert before.pending_nonces == ("1",)  # unchanged by later requests
    after = d.stream.view(ENDPOINT)
    assert after is not None and after.pending_nonces == () and after.subscribed == {"a"}
    with pytest.raises(AttributeError):
        after.state = "NACKED"  # type: ignore[misc]
    assert [r.name for r in d.stream.held_resources(ENDPOINT)] == ["a"]
    assert list(d.stream.views()) == [ENDPOINT]


@pytest.mark.parametrize(("message", "names"), [
    ("Error adding/updating cluster(s) outbound|443||a.b: Invalid path: /x, c: duplicate cluster c found",
     {"outbound|443||a.b", "c"}),
    ("Error adding/updating listener(s) 0.0.0.0_82: duplicate listener 0.0.0.0_82 found\n"
     "0.0.0.0_445: duplicate listener 0.0.0.0_445 found\n", {"0.0.0.0_82", "0.0.0.0_445"}),
    ('Proto constraint validation failed (RouteConfigurationValidationError.VirtualHosts[0]: value '
     'is required): name: "r1"\nvirtual_hosts {\n}\n', {"r1"}),
    ("gRPC config for cluster c0 rejected: c1 is bad", set()),  # names, but not in a known place
    ("Error adding/updating cluster(s) zz: bad", set()),  # not a resource of the response
])
def test_nack_names_come_from_envoys_formats_only(message: str, names: set[str]) -> None:
    candidates = {"outbound|443||a.b", "c", "c0", "c1", "0.0.0.0_82", "0.0.0.0_445", "r1", "r2"}
    assert named_in_nack(message, candidates) == names
