"""Debounce as users see it: the first change after a quiet period is pushed at once, a
burst that follows is coalesced into one push after it pauses. Runs the real rebuild loop
(asyncio, no network); the debounce tests run on a virtual clock (tests/virtualtime.py), so their
windows cost no wall time and what they measure does not depend on the machine's speed."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import yaml

from controlplane.model.raw import RawObject
from controlplane.runtime import Runtime, Settings
from controlplane.sources.base import Sink, Synced, Upsert
from controlplane.sources.yamlload import parse_documents
from tests import virtualtime


def slice_obj(ip: str) -> RawObject:
    body = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
            "ports": [{"name": "http", "port": 80}], "endpoints": [{"addresses": [ip]}]}
    (obj,), _ = parse_documents(yaml.safe_dump(body), "web.yaml")
    return obj


class ScriptedSource:
    name = "scripted"

    def __init__(self) -> None:
        self.sink: Sink | None = None

    async def run(self, sink: Sink) -> None:
        self.sink = sink
        await sink([Synced(self.name)])
        await asyncio.Event().wait()


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[tuple[Runtime, ScriptedSource]]:
    """A runtime with a scripted source and its rebuild loop, after its first rebuild. Its
    clock is the event loop's (virtual under tests/virtualtime.py)."""
    src = ScriptedSource()
    rt = Runtime(settings, [src], clock=asyncio.get_running_loop().time)
    tasks = [asyncio.create_task(rt.run_sources()), asyncio.create_task(rt.rebuild_loop())]
    try:
        while src.sink is None or rt.rebuilds == 0:
            await asyncio.sleep(0.01)
        yield rt, src
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# Times here are the event loop's. On the virtual clock (tests/virtualtime.py) they count only
# what the runtime and the test wait for on purpose, never the machine's speed: a debounce
# window is a lower bound (the runtime sleeps at least that long), and "the first change is
# pushed before the window closes" means the runtime did not wait for the window (rebuilding
# takes no virtual time). Waits for something to happen poll with a generous deadline (on the
# virtual clock it passes at once when nothing happens, so a failure does not hang).
WINDOW_S = 3.0
DEADLINE_S = 60.0


def now() -> float:
    return asyncio.get_running_loop().time()


async def until(cond: Callable[[], object], what: str, timeout: float = DEADLINE_S) -> None:
    deadline = now() + timeout
    while not cond():
        if now() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.005)


def settled(rt: Runtime, base: int) -> Callable[[], bool]:
    """Rebuilt at least once since `base`, and nothing is waiting for another rebuild."""
    return lambda: rt.rebuilds > base and not rt._dirty.is_set() and not rt.rebuilding


def test_first_change_is_pushed_at_once_and_a_burst_is_coalesced() -> None:
    async def scenario() -> tuple[float, int, int, float]:
        async with running(Settings(debounce_ms=int(WINDOW_S * 1000), debounce_max_ms=30_000)) as (rt, src):
            await asyncio.sleep(WINDOW_S + 0.2)  # quiet for longer than the window
            base = rt.rebuilds
            t0 = now()
            await src.sink([Upsert("web.yaml", slice_obj("10.0.0.1"))])
            await until(lambda: rt.rebuilds > base, "the first change pushed")
            first_latency = now() - t0
            after_first = rt.rebuilds
            for i in range(5):  # a burst right after: 5 changes 50 ms apart
                t_last = now()  # (taken before the change: the window starts after it)
                await src.sink([Upsert("web.yaml", slice_obj(f"10.0.0.{i + 2}"))])
                await asyncio.sleep(0.05)
            await until(lambda: rt.rebuilds > after_first, "the burst pushed")
            burst_quiet = now() - t_last
            await asyncio.sleep(0.5)
            return first_latency, after_first - base, rt.rebuilds - after_first, burst_quiet

    first_latency, first_pushes, burst_pushes, burst_quiet = virtualtime.run(scenario())
    assert first_pushes == 1
    assert first_latency < WINDOW_S  # not held back by the debounce window
    assert burst_pushes == 1  # five changes, one push
    assert burst_quiet >= WINDOW_S  # pushed only after the burst paused for the whole window


def service_obj(port: int) -> RawObject:
    body = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": port}]}}
    (obj,), _ = parse_documents(yaml.safe_dump(body), "svc.yaml")
    return obj


def test_other_changes_wait_for_the_debounce_and_identity_changes_rebuild_in_full() -> None:
    """A Service change (its VirtualService may be a few ms behind) is not pushed at once;
    after a certificate/bundle change the next rebuild is a full one, never an endpoint patch."""

    async def scenario() -> tuple[float, int, int]:
        async with running(Settings(debounce_ms=300, debounce_max_ms=5000)) as (rt, src):
            base = rt.rebuilds
            await src.sink([Upsert("web.yaml", slice_obj("10.0.0.1"))])
            await until(settled(rt, base), "the first slice pushed")
            base = rt.rebuilds
            t0 = now()
            await src.sink([Upsert("svc.yaml", service_obj(80))])
            await until(lambda: rt.rebuilds > base, "the Service change pushed")
            waited = now() - t0
            await until(settled(rt, base), "the Service change settled")
            base, before = rt.rebuilds, rt.builder.incremental_rebuilds
            await src.sink([Upsert("web.yaml", slice_obj("10.0.0.5"))])
            await until(settled(rt, base), "the endpoint change pushed")
            patched = rt.builder.incremental_rebuilds
            assert patched == before + 1  # an endpoint change alone is a patch
            base = rt.rebuilds
            rt._identity_changed()  # what a rotation or a new trust bundle triggers
            await src.sink([Upsert("web.yaml", slice_obj("10.0.0.9"))])
            await until(settled(rt, base), "the change after the identity change pushed")
            return waited, patched, rt.builder.incremental_rebuilds

    waited, patched_before, patched_after = virtualtime.run(scenario())
    assert waited >= 0.3  # the whole 300 ms window (a lower bound: holds on any machine)
    assert patched_after == patched_before  # the endpoint change after it was not a patch


def test_a_nack_for_an_unreachable_netns_blames_no_object_and_is_retried() -> None:
    """A node proxy that cannot enter a pod's netns yet (the node agent has not mounted it)
    NACKs; that is not the Pod's fault: nothing is quarantined, and the proxy is offered the
    same config again after the retry delay."""
    from controlplane.model.ir import ProxyMeta
    from controlplane.xds.server import Connection
    from controlplane.xds.stream import AdsStream, NackRecord

    async def scenario() -> tuple[dict[object, str], bool, bool]:
        async with running(Settings(environmental_retry_s=0.2)) as (rt, _src):
            stream = AdsStream("delta", 99)
            conn = Connection(ProxyMeta("node-n1", mode="node", node="n1"), stream)
            rt.xds.connections[99] = conn
            st = stream._state("type.googleapis.com/envoy.config.listener.v3.Listener")
            st.quarantine["ambient_outbound_shop_a"] = "v1"
            nack = NackRecord("", "1", "Error adding/updating listener(s) ambient_outbound_shop_a: failed to set "
                              "netns to /var/run/meshline/netns/shop_a (fd=27): Invalid argument", 13, time.time(),
                              ("ambient_outbound_shop_a",), ())
            rt.on_nack(conn, nack)
            held_before = bool(st.quarantine)
            await until(lambda: not st.quarantine, "offered again after the retry delay")
            return rt.store.quarantined(), held_before, bool(st.quarantine)

    quarantined, held_before, held_after = asyncio.run(scenario())
    assert quarantined == {}
    assert held_before and not held_after  # offered again after the retry delay
