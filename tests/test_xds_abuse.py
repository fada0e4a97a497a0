"""Memory abuse of `meshline serve` over xDS without credentials (issue 14, item 4): the
patterns from the security review (one delta stream subscribing 1.7 MiB of names, then
hundreds of 76-byte requests; many streams opening and leaving; a subscribe over the caps)
keep the server under +150 MiB resident, the memory is freed when the streams go, and
/healthz keeps answering meanwhile (how fast: bench/timing.py, goal 0.5 s). Runs `meshline serve` as a subprocess (RSS with
psutil) and probes /healthz from another process, so the figures are the server's own.
Does process and network I/O (loopback)."""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from controlplane.localrun import free_port, stop, wait_http
from controlplane.translate.plan import CLUSTER, ENDPOINT
from tests.xdsharness import XdsFixture, make_cla

# Abuse under load (thousands of streams, RSS samples): end-to-end, not the unit layer.
pytestmark = [pytest.mark.timeout(300), pytest.mark.e2e]

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
BUDGET = 150 * MiB  # the bound on what abuse may add to the server's resident memory
# /healthz must keep answering: the goal is under 0.5 s (measured by bench/timing.py, which
# runs this same abuse); the pass/fail bound is 10x that, so a busy machine does not fail it
# while an event loop blocked for seconds by a subscribe still does.
HEALTHZ_BOUND_S = 5.0

# Polls /healthz until stdin closes, then prints the latencies (seconds) as JSON.
PROBE = r"""
import json, sys, threading, time, httpx
url = sys.argv[1]
done = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
lat, errors = [], []
with httpx.Client() as c:
    while not done.is_set():
        t = time.perf_counter()
        try:
            r = c.get(url, timeout=10)
            if r.status_code != 200:
                errors.append(r.status_code)
        except Exception as exc:
            errors.append(repr(exc))
        lat.append(time.perf_counter() - t)
        time.sleep(0.02)
print(json.dumps({"lat": lat, "errors": errors}))
"""

# Envoy's HTTP/2 client: no bandwidth probing, a large window (see NOTES-envoy.md).
CHANNEL_OPTIONS = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 256 * MiB),
                   ("grpc.max_send_message_length", 64 * MiB), ("grpc.max_receive_message_length", 64 * MiB),
                   ("grpc.use_local_subchannel_pool", 1)]


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    xds: str
    status: str
    log: Path

    def rss(self) -> int:
        return int(psutil.Process(self.proc.pid).memory_info().rss)

    def proxies(self) -> list[Any]:
        out: list[Any] = httpx.get(f"{self.status}/v1/proxies", timeout=10).json()
        return out


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    xp, sp = free_port(), free_port()
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "controlplane.cli", "serve", "--no-ca", "--ca-address", "off",
         "--config-dir", str(ROOT / "samples" / "bookinfo"), "--xds-address", f"127.0.0.1:{xp}",
         "--status-address", f"127.0.0.1:{sp}", "--log-level", "warning"],
        cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{sp}/readyz", timeout=60)
        yield Served(proc, f"127.0.0.1:{xp}", f"http://127.0.0.1:{sp}", log)
        assert proc.poll() is None, f"serve died:\n{log.read_text()[-3000:]}"
    finally:
        stop(proc)


class Watch:
    """While open: the server's peak RSS (sampled here) and /healthz latencies (measured
    from a separate process)."""

    def __init__(self, s: Served) -> None:
        self.s = s
        self.peak = 0
        self._done = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._probe: subprocess.Popen[bytes] | None = None
        self.latencies: list[float] = []
        self.errors: list[Any] = []

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self.s.rss())
            time.sleep(0.02)

    def __enter__(self) -> Watch:
        self.peak = self.s.rss()
        self._sampler.start()
        self._probe = subprocess.Popen([sys.executable, "-c", PROBE, f"{self.s.status}/healthz"],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        time.sleep(0.3)
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._sampler.join()
        assert self._probe is not None
        out, _ = self._probe.communicate(b"", timeout=30)
        got = json.loads(out)
        self.latencies, self.errors = got["lat"], got["errors"]

    def healthz_summary(self) -> str:
        lat = sorted(self.latencies)
        return f"/healthz n={len(lat)} median {lat[len(lat) // 2] * 1000:.1f} ms max {lat[-1] * 1000:.1f} ms"


class RawStream:
    """A hostile delta client: sends what it is told, counts what comes back."""

    def __init__(self, target: str, node_id: str) -> None:
        self.channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.requests: asyncio.Queue[Any] = asyncio.Queue()
        self.node_id = node_id
        self.first = True
        self.removed = 0  # names the server reported absent
        self.responses = 0
        self.error: grpc.aio.AioRpcError | None = None
        self.progress = asyncio.Event()

        async def gen() -> Any:
            while (r := await self.requests.get()) is not None:
                yield r

        self.call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel).DeltaAggregatedResources(gen())
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for r in self.call:
                self.responses += 1
                self.removed += len(r.removed_resources)
                self.progress.set()
        except grpc.aio.AioRpcError as exc:
            self.error = exc
        self.progress.set()

    def subscribe(self, type_url: str, names: list[str]) -> discovery_pb2.DeltaDiscoveryRequest:
        req = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, resource_names_subscribe=names)
        if self.first:
            req.node.CopyFrom(base_pb2.Node(id=self.node_id))
            self.first = False
        self.requests.put_nowait(req)
        return req

    async def until(self, removed: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.removed < removed and self.error is None:
            self.progress.clear()
            await asyncio.wait_for(self.progress.wait(), max(0.1, deadline - time.monotonic()))

    async def close(self) -> None:
        self.requests.put_nowait(None)
        self.call.cancel()
        self.reader.cancel()
        await self.channel.close()


def long_names(prefix: str, n: int) -> list[str]:
    """`n` EDS names of ~190 characters: 9,000 of them are a 1.7 MiB subscribe."""
    return [f"outbound|9080||{prefix}-{i:06d}.reviews.default.svc.cluster.local".ljust(190, "x") for i in range(n)]


async def wait_no_proxies(s: Served) -> None:
    for _ in range(600):  # polled for up to a minute
        if not await asyncio.to_thread(s.proxies):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"streams still held: {s.proxies()}")


async def config_still_served(s: Served) -> None:
    """A fresh, well-behaved stream gets the mesh's clusters."""
    c = RawStream(s.xds, "well-behaved")
    try:
        c.subscribe(CLUSTER, [])
        await asyncio.wait_for(c.progress.wait(), 60)
        assert c.error is None and c.responses >= 1
    finally:
        await c.close()


def settled_rss(s: Served) -> int:
    time.sleep(1.0)
    return s.rss()


def test_a_huge_subscribe_then_many_small_requests_stays_bounded_and_is_freed(served: Served) -> None:
    base = settled_rss(served)
    after: list[int] = []

    async def one_round(r: int) -> None:
        c = RawStream(served.xds, f"abuser-{r}")
        big = c.subscribe(ENDPOINT, long_names(f"r{r}", 9000))
        assert 1.6 * MiB < big.ByteSize() < 1.8 * MiB
        for i in range(300):
            small = c.subscribe(ENDPOINT, [f"n{i:05d}"])
            assert small.ByteSize() == 76
        await c.until(9300)  # every name answered (absent)
        assert c.error is None, c.error
        await c.close()
        await wait_no_proxies(served)

    with Watch(served) as w:
        for r in range(4):
            asyncio.run(one_round(r))
            after.append(settled_rss(served))
        asyncio.run(config_still_served(served))
    print(f"RSS base {base / MiB:.0f} MiB, peak {w.peak / MiB:.0f} MiB, after each round "
          f"{[round(a / MiB) for a in after]} MiB; {w.healthz_summary()}")
    assert w.peak - base < BUDGET
    assert after[-1] - after[0] < 20 * MiB  # nothing accumulates from round to round: freed on disconnect
    assert not w.errors and max(w.latencies) < HEALTHZ_BOUND_S


def test_many_streams_opening_and_leaving_stay_bounded_and_are_freed(served: Served) -> None:
    base = settled_rss(served)

    async def wave(w: int) -> None:
        clients = [RawStream(served.xds, f"wave-{w}-{i}") for i in range(5)]
        for i, c in enumerate(clients):
            c.subscribe(ENDPOINT, long_names(f"w{w}-{i}", 9000))
        for c in clients:
            await c.until(9000)
            assert c.error is None, c.error
        for c in clients:
            await c.close()

    after: list[int] = []
    with Watch(served) as watch:
        for w in range(40):  # 200 streams, 5 at a time, each holding 1.7 MiB of its own names
            asyncio.run(wave(w))
            if w % 10 == 9:
                asyncio.run(wait_no_proxies(served))
                after.append(settled_rss(served))
        asyncio.run(config_still_served(served))
    print(f"RSS base {base / MiB:.0f} MiB, peak {watch.peak / MiB:.0f} MiB, after every 50 streams "
          f"{[round(a / MiB) for a in after]} MiB; {watch.healthz_summary()}")
    assert watch.peak - base < BUDGET
    # Freed streams leave the allocator's fragmentation (a plateau ~+20-55 MiB here, reached by
    # the first samples, higher on a loaded machine; exact Python-level figures in the tracemalloc
    # test below), not memory per abandoned stream (before the fix: 200 sets of 9,000 names each
    # kept, ~0.5 GiB, i.e. ~94 MiB per sample, ~188 MiB from the second sample to the last).
    assert max(after) - base < BUDGET and after[-1] - after[1] < 100 * MiB
    assert not watch.errors and max(watch.latencies) < HEALTHZ_BOUND_S


def test_subscribes_over_the_caps_are_refused_without_growing_the_server(served: Served) -> None:
    base = settled_rss(served)

    async def abuse() -> list[str]:
        codes = []
        for r in range(20):
            c = RawStream(served.xds, f"over-{r}")
            # The review's 1.7 MiB subscribe as 50,000 short names: over the 10,000 per request.
            c.subscribe(ENDPOINT, [f"outbound|80||s-{r}-{i:06d}.svc" for i in range(50_000)])
            await asyncio.wait_for(c.progress.wait(), 60)
            assert c.error is not None
            codes.append(c.error.code().name)
            await c.close()
        await config_still_served(served)
        return codes

    with Watch(served) as w:
        codes = asyncio.run(abuse())
    print(f"RSS base {base / MiB:.0f} MiB, peak {w.peak / MiB:.0f} MiB; {w.healthz_summary()}")
    assert set(codes) == {"RESOURCE_EXHAUSTED"}
    assert w.peak - base < BUDGET
    assert not w.errors and max(w.latencies) < HEALTHZ_BOUND_S
    log = served.log.read_text()
    assert "50000 resources; at most 10000 per request" in log


async def test_what_abusive_streams_held_is_freed_when_they_go(fx: XdsFixture) -> None:
    """The same patterns against an in-process server, measured with tracemalloc (Python
    allocations, exact, unlike RSS): after the streams have gone, what they held is gone."""
    fx.control.publish({ENDPOINT: {"a": make_cla("a")}})
    target = f"127.0.0.1:{fx.port}"

    async def gone() -> None:
        for _ in range(1200):  # polled for up to a minute
            if not fx.xds.connections:
                return
            await asyncio.sleep(0.05)
        raise AssertionError("streams still held")

    async def huge_then_small(r: int) -> None:
        c = RawStream(target, f"abuser-{r}")
        c.subscribe(ENDPOINT, long_names(f"r{r}", 9000))
        for i in range(300):
            c.subscribe(ENDPOINT, [f"n{i:05d}"])
        await c.until(9300)
        await c.close()
        await gone()

    async def wave(w: int) -> None:
        clients = [RawStream(target, f"wave-{w}-{i}") for i in range(5)]
        for i, c in enumerate(clients):
            c.subscribe(ENDPOINT, long_names(f"w{w}-{i}", 9000))
        for c in clients:
            await c.until(9000)
        for c in clients:
            await c.close()
        await gone()

    await huge_then_small(-1)  # warm-up: the interpreter's own tables reach their size
    await wave(-1)
    gc.collect()
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        held = []
        for r in range(3):
            await huge_then_small(r)
            await wave(r)
            gc.collect()
            held.append(tracemalloc.get_traced_memory()[0] - base)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    print(f"traced: peak +{peak / MiB:.1f} MiB, after each round {[round(h / MiB, 2) for h in held]} MiB")
    assert peak < BUDGET
    assert max(held) < 8 * MiB  # 9,300 + 5 x 9,000 names of ~190 characters per round: ~13 MiB if kept
    assert len(fx.xds.name_sets) == 0 and fx.xds.name_sets.bytes == 0
