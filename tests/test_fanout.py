"""The per-stream fan-out path (issue 8): ACKs handled by the stream's reader without waking
its writer, failures while handling a request end the stream visibly, SotW ACKs that repeat
the subscription are recognised without rebuilding it, and the control plane's GC policy."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from pathlib import Path

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2

from controlplane.gcpolicy import THRESHOLDS, GcPolicy
from controlplane.translate.plan import CLUSTER, ENDPOINT
from controlplane.xds.server import Inbox
from controlplane.xds.stream import AdsStream, NameSets
from tests.xdsharness import XdsFixture, make_cla, make_cluster


async def _until(cond: object, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


async def test_an_ack_that_needs_no_answer_does_not_wake_the_stream(fx: XdsFixture,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    fx.control.publish({CLUSTER: {"a": make_cluster("a")}})
    c = fx.client("delta")
    c.send_delta(CLUSTER)
    r1 = await c.recv()
    conn = next(iter(fx.xds.connections.values()))
    wakes = 0
    wake = Inbox.wake

    def counting_wake(self: Inbox) -> None:
        nonlocal wakes
        if self is conn.inbox:
            wakes += 1
        wake(self)

    monkeypatch.setattr(Inbox, "wake", counting_wake)
    c.send_delta(CLUSTER, nonce=r1.nonce)
    st = conn.stream.types[CLUSTER]
    await _until(lambda: not st.pending)
    assert st.version_acked == r1.system_version_info
    assert wakes == 0  # the reader handled it; nothing to send, so the writer slept on

    # A change still wakes it and is pushed; its ACK again needs no wake-up.
    fx.control.publish({CLUSTER: {"a": make_cluster("a", 5)}})
    r2 = await c.recv()
    assert [r.name for r in r2.resources] == ["a"]
    assert wakes == 1
    c.send_delta(CLUSTER, nonce=r2.nonce)
    await _until(lambda: not st.pending)
    assert wakes == 1
    await c.expect_nothing()
    await c.close()


async def test_a_subscription_change_in_an_ack_wakes_the_stream_and_is_answered(fx: XdsFixture) -> None:
    fx.control.publish({CLUSTER: {"a": make_cluster("a"), "b": make_cluster("b")},
                        ENDPOINT: {"a": make_cla("a"), "b": make_cla("b", 2)}})
    c = fx.client("delta")
    c.send_delta(ENDPOINT, subscribe=["a"])
    r1 = await c.recv()
    assert [r.name for r in r1.resources] == ["a"]
    c.send_delta(ENDPOINT, subscribe=["b"], nonce=r1.nonce)  # ACK + subscribe, handled by the reader
    r2 = await c.recv()
    assert [r.name for r in r2.resources] == ["b"]
    await c.close()


async def test_a_failure_handling_a_request_ends_the_stream_and_detaches_it(fx: XdsFixture) -> None:
    fx.control.publish({CLUSTER: {"a": make_cluster("a")}})
    c = fx.client("delta")
    c.send_delta(CLUSTER)
    r1 = await c.recv()
    conn = next(iter(fx.xds.connections.values()))

    def broken(req: object) -> None:
        raise RuntimeError("bug while handling a request")

    conn.stream.handle_delta_request = broken  # type: ignore[method-assign]
    c.send_delta(CLUSTER, nonce=r1.nonce)
    with pytest.raises(AssertionError, match="stream ended"):
        await c.recv()
    assert isinstance(c.call, grpc.aio.Call)
    assert await c.call.code() == grpc.StatusCode.UNKNOWN
    await _until(lambda: not fx.control.conns and not fx.xds.connections)
    await c.close()


async def test_inbox_wakes_at_once_when_woken_before_and_at_a_deadline() -> None:
    box = Inbox()
    box.wake()
    await asyncio.wait_for(box.wait(), 30)  # woken before waiting: returns without a wake-up
    t0 = time.monotonic()
    await asyncio.wait_for(box.wait(time.monotonic() + 0.05), 30)  # nobody wakes it: the deadline does
    assert time.monotonic() - t0 >= 0.04
    waiter = asyncio.ensure_future(box.wait())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    box.put("request")
    await asyncio.wait_for(waiter, 30)
    assert list(box.items) == ["request"]


def _sotw_req(names: list[str], nonce: str = "", version: str = "", error: str = "") -> discovery_pb2.DiscoveryRequest:
    req = discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=names, response_nonce=nonce,
                                         version_info=version)
    if error:
        req.error_detail.message = error
    return req


def test_a_sotw_ack_repeating_the_subscription_keeps_it_and_a_changed_one_is_noticed() -> None:
    class CountingSets(NameSets):
        built = 0

        def canonical(self, names: frozenset[str]) -> frozenset[str]:
            CountingSets.built += 1  # a set of names was built from the request
            return super().canonical(names)

    sets = CountingSets()
    s1, s2 = AdsStream("sotw", 1, sets), AdsStream("sotw", 2, sets)
    names = [f"outbound|8080||svc-{i}.bench.svc.cluster.local" for i in range(200)]
    s1.handle_sotw_request(_sotw_req(names))
    s2.handle_sotw_request(_sotw_req(list(reversed(names))))  # the same set, in another order
    st1, st2 = s1.types[ENDPOINT], s2.types[ENDPOINT]
    assert st1.names is st2.names and len(st1.names) == 200  # one shared set for both streams
    held = st1.names
    st1.needs_response = False
    built = CountingSets.built
    s1.handle_sotw_request(_sotw_req(names, nonce="7", version="v1"))  # an ACK: same names
    assert st1.names is held and not st1.needs_response
    s1.handle_sotw_request(_sotw_req(names, nonce="8", version="v1", error="rejected"))  # NACK: same names
    assert st1.names is held and not st1.needs_response
    assert CountingSets.built == built  # recognised from the serialized names: no set rebuilt
    s3 = AdsStream("sotw", 3, sets)
    s3.handle_sotw_request(_sotw_req(names))
    assert s3.types[ENDPOINT].names_key is st1.names_key  # one copy of the key per distinct subscription
    s1.handle_sotw_request(_sotw_req([*names, "extra"], nonce="9", version="v1"))  # an ACK that subscribes
    assert "extra" in st1.names and len(st1.names) == 201 and st1.needs_response
    st1.needs_response = False
    s1.handle_sotw_request(_sotw_req(names[:5], nonce="10", version="v1"))  # ...and one that unsubscribes
    assert st1.names == frozenset(names[:5]) and st1.needs_response


def test_gc_policy_settles_after_a_burst_of_full_rebuilds_and_frees_frozen_cycles() -> None:
    saved = gc.get_threshold()
    gc.collect()
    try:
        policy = GcPolicy(settle_after_s=1.0, every_s=300.0)
        policy.install()
        assert gc.get_threshold() == THRESHOLDS  # young collections far apart
        # Times are passed in; the base is a round number so that `(t + 300) - t` is exactly
        # 300 (with the monotonic clock's value it may round to 299.99999..., as it did in CI).
        t = policy.last = 1000.0

        class Node:
            def __init__(self) -> None:
                self.me = self  # a reference cycle: only the cyclic collector frees it

        assert not policy.maybe_settle(busy=False, now=t + 1)  # nothing rebuilt: nothing due
        policy.after_full_rebuild(now=t + 10)
        policy.after_full_rebuild(now=t + 10.5)  # a burst: the pass waits for its last rebuild
        assert not policy.maybe_settle(busy=False, now=t + 11.25)
        assert not policy.maybe_settle(busy=True, now=t + 11.75)  # a rebuild is pending: later
        n = Node()
        alive = weakref.ref(n)
        assert policy.maybe_settle(busy=False, now=t + 11.75)
        assert gc.get_freeze_count() > 0 and alive() is not None  # n was alive: it is frozen now
        del n
        gc.collect()
        assert alive() is not None  # frozen: ordinary collections no longer scan it
        assert not policy.maybe_settle(busy=False, now=t + 12)  # not due again yet
        assert policy.maybe_settle(busy=False, now=t + 11.75 + 300)  # the periodic pass
        assert alive() is None  # ...collected the frozen cycle
        assert policy.passes == 2
        policy.after_full_rebuild(now=t + 400, streams=0)  # nobody connected: settle at once
        assert policy.maybe_settle(busy=False, now=t + 400)
    finally:
        gc.unfreeze()
        gc.set_threshold(*saved)
        gc.collect()


def test_only_full_rebuilds_schedule_a_settle_pass(tmp_path: Path) -> None:
    import shutil

    from controlplane.runtime import Runtime, Settings
    from controlplane.sources.directory import DirectorySource, read_file

    mesh = tmp_path / "mesh"
    shutil.copytree(Path(__file__).resolve().parents[1] / "samples" / "bookinfo", mesh)
    src = DirectorySource([mesh])
    policy = GcPolicy()
    rt = Runtime(Settings(config_dirs=(mesh,)), [src], gc_policy=policy)
    asyncio.run(rt.sink([*src.initial()]))
    rt._synced.add(src.name)
    rt.rebuild_now()
    assert policy.due is not None  # a full rebuild: settle once things are quiet
    policy.due = None
    services = mesh / "10-services.yaml"
    services.write_text(services.read_text().replace('"127.0.0.41"', '"127.0.0.99"'))
    asyncio.run(rt.sink([read_file(services)]))
    assert rt.store.mesh_delta()[1] is not None  # an endpoint-only change: patched, not rebuilt
    rt.rebuild_now()
    assert policy.due is None  # ...so nothing to settle


async def test_a_passed_warming_deadline_with_nothing_to_send_does_not_spin_the_stream(
        fx: XdsFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    fx.control.publish({CLUSTER: {"a": make_cluster("a")}})
    c = fx.client("delta")
    c.send_delta(CLUSTER)
    await c.recv()  # new clusters: the stream waits (up to a deadline) for Envoy to warm them
    conn = next(iter(fx.xds.connections.values()))
    stream = conn.stream
    assert stream.waiting is not None and not stream.may_push()
    calls = 0
    next_push = AdsStream.next_push

    def counting(self: AdsStream, now: float | None = None) -> object:
        nonlocal calls
        if self is stream:
            calls += 1
        return next_push(self, now)

    monkeypatch.setattr(AdsStream, "next_push", counting)
    stream.waiting = (stream.waiting[0], stream.waiting[1], stream.clock() + 0.05)  # Envoy never ACKs in time
    await asyncio.sleep(0.1)
    conn.inbox.wake()  # e.g. an unrelated wake-up after the deadline
    await _until(lambda: stream.waiting is None)  # the expired wait is dropped
    await asyncio.sleep(0.4)
    assert calls <= 3  # woken once, not once per loop iteration after the deadline
    fx.control.publish({CLUSTER: {"a": make_cluster("a"), "b": make_cluster("b")}})
    r = await c.recv()  # and later changes still flow
    assert [x.name for x in r.resources] == ["b"]
    await c.close()


async def test_a_failing_attach_leaves_no_connection_behind(fx: XdsFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    attach = fx.control.attach

    def failing(conn: object) -> None:
        attach(conn)  # type: ignore[arg-type]
        raise RuntimeError("attach failed")

    monkeypatch.setattr(fx.control, "attach", failing)
    c = fx.client("delta")
    c.send_delta(CLUSTER)
    with pytest.raises(AssertionError, match="stream ended"):
        await c.recv()
    await _until(lambda: not fx.xds.connections and not fx.control.conns)  # detached as well
    await c.close()


def test_gc_settle_pass_is_not_postponed_forever_by_steady_churn() -> None:
    try:
        policy = GcPolicy(settle_after_s=1.0, every_s=300.0)
        t = policy.last = 1000.0  # (a round base: `(t + 600) - t` is exactly 600)
        assert not policy.maybe_settle(busy=True, now=t + 301)  # due, but a rebuild is pending
        assert policy.maybe_settle(busy=True, now=t + 600)  # twice the period: runs anyway
    finally:
        gc.unfreeze()
        gc.collect()
