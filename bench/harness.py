"""The benchmark's machinery (bench/run.py is its command line): the processes it starts,
the simulated clients' event feed, one xDS scale case (`Case`: a control plane on a
generated mesh, N simulated ADS clients in a separate process, K single-endpoint changes)
and the per-case table. bench/suite.py and bench/peers/ build on it; it imports neither.
Does process, file and network I/O.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import math
import os
import pstats
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from meshfiles import (
    default_addresses,
    endpoint_slice_path,
    endpoint_slice_yaml,
    hostname,
    rewrite_atomic,
    write_mesh,
)

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
ENDPOINTS = 10
SIZES = ((100, 100), (1000, 1000))
XDS_SHORT = {"Cluster": "CDS", "ClusterLoadAssignment": "EDS", "Listener": "LDS", "RouteConfiguration": "RDS",
             "Secret": "SDS"}


class BenchError(Exception):
    """A step did not finish in time or a process failed; the message says which."""


# --------------------------------------------------------------------------- processes
def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM if this benchmark dies without cleaning up."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


async def run_build_script(name: str, script: Path, timeout: float) -> Path:
    """Run a peer's build script (it builds on first use, then answers from its cache) and
    return the path it prints last; BenchError saying why not."""
    proc = await asyncio.create_subprocess_exec(
        "bash", str(script), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        preexec_fn=die_with_parent)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise BenchError(f"{name}: {script.name} did not finish in {timeout:g} s") from None
    if proc.returncode != 0:
        tail = "\n".join("    " + ln for ln in err.decode(errors="replace").splitlines()[-15:])
        raise BenchError(f"{name}: {script.name} failed (exit {proc.returncode}):\n{tail}")
    return Path(out.decode().strip().splitlines()[-1])


@dataclass
class Child:
    name: str
    proc: asyncio.subprocess.Process
    ps: psutil.Process
    log: Path


class Children:
    """Every process the benchmark started; `stop_all` ends them (TERM, then KILL)."""

    def __init__(self) -> None:
        self.items: list[Child] = []

    async def start(self, name: str, argv: list[str], log: Path, **kw: Any) -> Child:
        kw.setdefault("cwd", ROOT)
        with open(log, "ab") as logf:
            proc = await asyncio.create_subprocess_exec(
                *argv, stderr=logf, start_new_session=True,
                preexec_fn=die_with_parent if sys.platform == "linux" else None, **kw)
        child = Child(name, proc, psutil.Process(proc.pid), log)
        self.items.append(child)
        return child

    async def stop(self, child: Child, grace: float = 10.0) -> None:
        if child.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.proc.terminate()
            try:
                await asyncio.wait_for(child.proc.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()
                await child.proc.wait()
        if child in self.items:
            self.items.remove(child)

    async def stop_all(self) -> None:
        for c in list(reversed(self.items)):
            await self.stop(c, grace=5.0)

    def kill_now(self) -> None:
        """Last resort outside the event loop (e.g. after Ctrl-C): SIGKILL what is left."""
        for c in self.items:
            with contextlib.suppress(psutil.Error):
                if c.ps.is_running():  # also guards against pid reuse
                    c.ps.kill()
        self.items.clear()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + ln for ln in text[-lines:]) or "    (empty)"


def cpu_seconds(ps: psutil.Process) -> float:
    t = ps.cpu_times()
    return float(t.user + t.system)


def vm_hwm(pid: int) -> int | None:
    """Peak resident set size from /proc (Linux), in bytes."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# --------------------------------------------------------------------------- client events
class ClientFeed:
    """Reads the simulated clients' JSON lines and lets the benchmark wait on them."""

    def __init__(self, child: Child) -> None:
        self.child = child
        self.ready = False
        self.full: dict[int, dict[str, Any]] = {}
        self.eds: dict[str, list[dict[str, Any]]] = {}
        self.errors: list[dict[str, Any]] = []
        self.stats: dict[str, Any] | None = None
        self.closed = False
        self._wake = asyncio.Event()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.child.proc.stdout is not None
        try:
            while line := await self.child.proc.stdout.readline():
                ev = json.loads(line)
                kind = ev.get("e")
                if kind == "ready":
                    self.ready = True
                elif kind == "full":
                    self.full.setdefault(ev["c"], ev)
                elif kind == "eds":  # one line per (cluster, addresses), every client that got it
                    got = self.eds.setdefault(ev["n"], [])
                    addrs = ev["a"]
                    got.extend({"c": c, "a": addrs, "t": t} for c, t in ev["ct"])
                elif kind == "error":
                    self.errors.append(ev)
                elif kind == "stats":
                    self.stats = ev
                self._wake.set()
        finally:
            self.closed = True
            self._wake.set()

    def send(self, cmd: str) -> None:
        assert self.child.proc.stdin is not None
        self.child.proc.stdin.write(cmd.encode() + b"\n")

    async def wait(self, done: Callable[[], bool], timeout: float, what: Callable[[], str],
                   check: Callable[[], None]) -> None:
        """Wait until `done()`; raise BenchError saying `what()` on timeout, client errors
        or exit. `check()` raises when another process (the control plane) died."""
        deadline = time.monotonic() + timeout
        while not done():
            if self.errors:
                first = self.errors[0]
                raise BenchError(f"{len(self.errors)} simulated client stream(s) failed while waiting for "
                                 f"{what()}; first: client {first['c']}: {first['msg']}")
            if self.closed:
                raise BenchError(f"the client process exited while waiting for {what()}:\n"
                                 f"{log_tail(self.child.log)}")
            check()
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"timed out after {timeout:g} s waiting for {what()}")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(left, 0.5))


# --------------------------------------------------------------------------- results
@dataclass
class Result:
    services: int
    clients: int
    mix: str = "mixed"
    workers: int = 1
    control_plane: str = "meshline"
    startup_cpu: float = 0.0
    sync_s: float = 0.0
    sync_cpu: float = 0.0
    sync_client_cpu: float = 0.0
    idle_cpu_rate: float = 0.0
    lat_last: list[float] = field(default_factory=list)
    lat_first: list[float] = field(default_factory=list)
    lat_delta: list[float] = field(default_factory=list)
    lat_sotw: list[float] = field(default_factory=list)
    client_cpu: list[float] = field(default_factory=list)
    change_cpu: list[float] = field(default_factory=list)
    change_cpu_net: list[float] = field(default_factory=list)
    serializations: list[float] = field(default_factory=list)
    rebuild_s: list[float] = field(default_factory=list)
    pushes_per_change: dict[str, float] = field(default_factory=dict)
    client_resources_per_change: dict[str, float] = field(default_factory=dict)
    client_bytes_per_change: dict[str, float] = field(default_factory=dict)
    rss_peak: int = 0
    vm_hwm: int | None = None
    client_rss_peak: int = 0
    gc_settle_s: float = math.nan  # mean duration of the control plane's GC settle passes
    counts: dict[str, int] = field(default_factory=dict)
    profiles: dict[str, str] = field(default_factory=dict)


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def median(values: list[float]) -> float:
    return pct(values, 50)


_METRIC = re.compile(r'^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)$')


_WORKER_LABEL = re.compile(r'(^|,)worker="\d+"')


def parse_metrics(text: str) -> dict[str, float]:
    """Samples by name{labels}; with `serve --workers N` the per-worker samples (label
    `worker`) are summed."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _METRIC.match(line)
        if m is None:
            continue
        labels = _WORKER_LABEL.sub("", m["labels"] or "").lstrip(",")
        key = m["name"] + (f"{{{labels}}}" if labels else "")
        with contextlib.suppress(ValueError):
            out[key] = out.get(key, 0.0) + float(m["value"])
    return out


def pushes_by_type(metrics: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if k.startswith("meshline_xds_pushes_total{"):
            t = re.search(r'type="([^"]*)"', k)
            if t is not None:
                out[t[1]] = v
    return out


# --------------------------------------------------------------------------- one case
class Case:
    """One case on `meshline serve`; bench/peers/ subclasses it for other control planes
    (overriding `start_server`, `apply_change`, `metrics`)."""

    control_plane = "meshline"
    client_script = BENCH / "simclients.py"  # (the simulated clients' program; a peer may wrap it)

    def __init__(self, args: argparse.Namespace, children: Children, services: int, clients: int,
                 mix: str = "mixed", workers: int = 1, changes: int | None = None) -> None:
        self.args, self.children = args, children
        self.S, self.N = services, clients
        self.mix, self.workers = mix, workers
        self.K = args.changes if changes is None else changes
        self.res = Result(services, clients, mix, workers, self.control_plane)
        self.tmp = Path(tempfile.mkdtemp(prefix=f"meshline-bench-{services}x{clients}-"))
        self.mesh_dir = self.tmp / "mesh"
        self.http = httpx.AsyncClient(timeout=10.0)
        self.server: Child | None = None
        self.status_url = ""
        self._sampler: asyncio.Task[None] | None = None
        self.client: Child | None = None

    @property
    def tag(self) -> str:
        extra = ("" if self.mix == "mixed" else f" {self.mix}") + (f" w{self.workers}" if self.workers > 1 else "")
        cp = "" if self.control_plane == "meshline" else f" {self.control_plane}"
        return f"{self.S}x{self.N}{extra}{cp}"

    def say(self, msg: str) -> None:
        print(f"  [{self.tag}] {msg}", file=sys.stderr, flush=True)

    def server_procs(self) -> list[psutil.Process]:
        """The control plane's processes: `meshline serve` and, with --workers, its workers."""
        assert self.server is not None
        procs = [self.server.ps]
        if self.workers > 1:
            with contextlib.suppress(psutil.Error):
                procs += self.server.ps.children(recursive=True)
        return procs

    def server_cpu(self) -> float:
        total = 0.0
        for ps in self.server_procs():
            with contextlib.suppress(psutil.Error):
                total += cpu_seconds(ps)
        return total

    def server_rss(self) -> int:
        total = 0
        for ps in self.server_procs():
            with contextlib.suppress(psutil.Error):
                total += int(ps.memory_info().rss)
        return total

    def server_hwm(self) -> int | None:
        """VmHWM of the serving process (with --workers: the sum over the workers)."""
        procs = self.server_procs()
        if self.workers > 1:
            procs = procs[1:]
        values = [v for v in (vm_hwm(p.pid) for p in procs) if v is not None]
        return sum(values) if values else None

    # control plane ----------------------------------------------------------------
    def check_server(self) -> None:
        assert self.server is not None
        rc = self.server.proc.returncode
        if rc is not None:
            raise BenchError(f"{self.control_plane} exited with code {rc}; log {self.server.log}:\n"
                             f"{log_tail(self.server.log)}")

    async def metrics(self) -> dict[str, float]:
        r = await self.http.get(f"{self.status_url}/metrics")
        r.raise_for_status()
        return parse_metrics(r.text)

    async def start_server(self) -> None:
        xds, status = free_port(), free_port()
        self.xds_address = f"127.0.0.1:{xds}"
        self.status_url = f"http://127.0.0.1:{status}"
        serve = ["serve", "--config-dir", str(self.mesh_dir), "--xds-address", self.xds_address,
                 "--status-address", f"127.0.0.1:{status}", "--no-ca"]
        if self.workers > 1:
            serve += ["--workers", str(self.workers)]
        env = None
        if self.args.profile:
            argv = [sys.executable, str(BENCH / "profserve.py"), *serve]
            env = {**os.environ, "MESHLINE_BENCH_PROFILE_OUT": str(self.tmp / "server.prof")}
        else:
            argv = [sys.executable, "-m", "controlplane.cli", *serve]
        log = self.tmp / "server.log"
        self.server = await self.children.start("meshline", argv, log, stdout=asyncio.subprocess.DEVNULL,
                                                stdin=asyncio.subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + self.args.ready_timeout
        while True:
            self.check_server()
            with contextlib.suppress(httpx.TransportError):
                if (await self.http.get(f"{self.status_url}/readyz")).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise BenchError(f"meshline serve not ready (/readyz) after {self.args.ready_timeout:g} s; "
                                 f"log:\n{log_tail(log)}")
            await asyncio.sleep(0.05)
        self._sampler = asyncio.create_task(self._sample_rss())

    async def _sample_rss(self) -> None:
        while True:
            if self.server is not None:
                self.res.rss_peak = max(self.res.rss_peak, self.server_rss())
            if self.client is not None:
                with contextlib.suppress(psutil.Error):
                    self.res.client_rss_peak = max(self.res.client_rss_peak, int(self.client.ps.memory_info().rss))
            await asyncio.sleep(0.1)

    def profile_start(self) -> None:
        if self.args.profile and self.server is not None:
            self.server.proc.send_signal(signal.SIGUSR1)

    async def profile_stop(self, phase: str) -> None:
        if not self.args.profile or self.server is None:
            return
        path = self.tmp / f"server.prof.{len(self.res.profiles)}"
        self.server.proc.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 60
        while not path.exists():
            self.check_server()
            if time.monotonic() > deadline:
                raise BenchError(f"the control plane did not write its {phase} profile ({path})")
            await asyncio.sleep(0.05)
        self.res.profiles[phase] = profile_summary(path)

    async def settle(self, max_wait: float = 15.0) -> float:
        """Wait until the control plane is idle (two quiet 100 ms windows in a row), and
        return its CPU seconds then."""
        assert self.server is not None
        window, quiet = 0.1, max(0.012, 2.0 * self.res.idle_cpu_rate * 0.1)
        deadline = time.monotonic() + max_wait
        prev, calm = self.server_cpu(), 0
        while time.monotonic() < deadline:
            await asyncio.sleep(window)
            self.check_server()
            cur = self.server_cpu()
            calm = calm + 1 if cur - prev <= quiet else 0
            prev = cur
            if calm >= 2:
                break
        return prev

    # phases -------------------------------------------------------------------------
    async def initial_sync(self) -> None:
        assert self.server is not None
        args = [sys.executable, str(self.client_script), "--target", self.xds_address,
                "--clients", str(self.N), "--mix", self.mix]
        self.client = await self.children.start("simclients", args, self.tmp / "clients.log",
                                                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        self.feed = feed = ClientFeed(self.client)
        await feed.wait(lambda: feed.ready, 60, lambda: "the client process to start", self.check_server)
        cpu0 = await self.settle()
        self.profile_start()
        ccpu0 = cpu_seconds(self.client.ps)
        t0 = time.time()
        feed.send("go")
        sync_timeout = self.args.sync_timeout or 60.0 + self.S * self.N / 20000
        await feed.wait(lambda: len(feed.full) >= self.N, sync_timeout,
                        lambda: f"the initial sync ({len(feed.full)} of {self.N} clients hold the full config)",
                        self.check_server)
        done_at = max(ev["t"] for ev in feed.full.values())
        self.res.sync_client_cpu = cpu_seconds(self.client.ps) - ccpu0
        cpu1 = await self.settle()
        await self.profile_stop("initial sync")
        self.res.sync_s = done_at - t0
        self.res.sync_cpu = cpu1 - cpu0
        counts = [ev["counts"] for ev in feed.full.values()]
        self.res.counts = {k: min(c[k] for c in counts) for k in counts[0]}
        odd = [(ev, why) for ev in feed.full.values() if (why := self.unexpected_config(ev["counts"]))]
        if odd:
            raise BenchError(f"{len(odd)} clients synced with an unexpected config, e.g. {odd[0][0]} ({odd[0][1]})")

    def unexpected_config(self, counts: dict[str, int]) -> str | None:
        """Why a synced client's config (resource counts by kind) is not this mesh's; None if it is."""
        if counts["clusters"] != self.S or counts["endpoints"] != self.S:
            return f"expected {self.S} clusters and endpoints"
        return None

    async def gc_settled(self, max_wait: float = 15.0) -> None:
        """Wait for the control plane's one-off GC settle pass after the initial sync's full
        rebuilds (controlplane/gcpolicy.py), so it counts neither as idle CPU nor as part of a
        change. Its duration is reported (`gc_settle_s`)."""
        deadline = time.monotonic() + max_wait
        m: dict[str, float] = {}
        while time.monotonic() < deadline:
            m = await self.metrics()
            if not m.get("meshline_gc_settle_pending"):
                break
            await asyncio.sleep(0.1)
        count = m.get("meshline_gc_settle_seconds_count", 0.0)
        if count:
            self.res.gc_settle_s = m.get("meshline_gc_settle_seconds_sum", 0.0) / count

    async def measure_idle(self, seconds: float = 1.0) -> None:
        assert self.server is not None
        c0, t0 = self.server_cpu(), time.monotonic()
        await asyncio.sleep(seconds)
        self.res.idle_cpu_rate = (self.server_cpu() - c0) / (time.monotonic() - t0)

    async def client_stats(self) -> dict[str, Any]:
        self.feed.stats = None
        self.feed.send("stats")
        await self.feed.wait(lambda: self.feed.stats is not None, 30, lambda: "client stats", self.check_server)
        assert self.feed.stats is not None
        return self.feed.stats

    async def changes(self) -> None:
        assert self.server is not None
        feed, K = self.feed, self.K
        delta_ids = {c for c, ev in feed.full.items() if ev.get("p") == "delta"}
        m0 = await self.metrics()
        stats0 = await self.client_stats()
        await self.settle()
        m_prev = await self.metrics()
        assert self.client is not None
        self.profile_start()
        cpu_prev, ccpu_prev = self.server_cpu(), cpu_seconds(self.client.ps)
        for k in range(K):
            s = (k * 7919 + 13) % self.S  # spread over services, deterministic
            cluster = f"outbound|8080||{hostname(s)}"
            addrs = default_addresses(s, ENDPOINTS)
            marker = f"10.250.{k % 250}.{s % 250 + 1}"
            addrs[k % ENDPOINTS] = marker
            seen_before = len(feed.eds.get(cluster, []))
            t_write = time.time()
            await self.apply_change(s, cluster, addrs)

            def got(cluster: str = cluster, marker: str = marker, seen: int = seen_before) -> set[int]:
                return {ev["c"] for ev in feed.eds.get(cluster, [])[seen:] if marker in ev["a"]}

            await feed.wait(lambda got=got: len(got()) >= self.N, self.args.change_timeout,
                            lambda got=got, cluster=cluster, k=k: f"change {k + 1}/{K} of {cluster} "
                            f"({len(got())} of {self.N} clients have it)", self.check_server)
            evs = [ev for ev in feed.eds[cluster][seen_before:] if marker in ev["a"]]
            self.res.lat_last.append(max(ev["t"] for ev in evs) - t_write)
            self.res.lat_first.append(min(ev["t"] for ev in evs) - t_write)
            for delta, dst in ((True, self.res.lat_delta), (False, self.res.lat_sotw)):
                ts = [ev["t"] for ev in evs if (ev["c"] in delta_ids) is delta]
                if ts:
                    dst.append(max(ts) - t_write)
            t_done = time.monotonic()
            cpu_now = await self.settle()
            window = time.monotonic() - t_done + self.res.lat_last[-1]
            m_now = await self.metrics()
            ccpu_now = cpu_seconds(self.client.ps)
            self.res.client_cpu.append(ccpu_now - ccpu_prev)
            self.res.change_cpu.append(cpu_now - cpu_prev)
            self.res.change_cpu_net.append(max(0.0, cpu_now - cpu_prev - self.res.idle_cpu_rate * window))
            self.res.serializations.append(
                m_now.get("meshline_resource_serializations", math.nan)
                - m_prev.get("meshline_resource_serializations", math.nan))
            self.res.rebuild_s.append(m_now.get("meshline_snapshot_rebuild_seconds_sum", math.nan)
                                      - m_prev.get("meshline_snapshot_rebuild_seconds_sum", math.nan))
            m_prev, cpu_prev, ccpu_prev = m_now, self.server_cpu(), ccpu_now
            self.say(f"change {k + 1}/{K}: last client {self.res.lat_last[-1] * 1000:.0f} ms, "
                     f"cpu {self.res.change_cpu[-1]:.3f} s")
        await self.profile_stop(f"{K} endpoint changes")
        p0, p1 = pushes_by_type(m0), pushes_by_type(m_prev)
        self.res.pushes_per_change = {t: (p1.get(t, 0) - p0.get(t, 0)) / K for t in p1}
        stats1 = await self.client_stats()
        for key, dst in (("resources", self.res.client_resources_per_change),
                         ("bytes", self.res.client_bytes_per_change)):
            for t, v in stats1[key].items():
                dst[t] = (v - stats0[key].get(t, 0)) / K

    async def apply_change(self, s: int, cluster: str, addrs: list[str]) -> None:
        """Make the control plane's source say service `s` (cluster `cluster`) has `addrs`
        (timed from this call): Meshline reads it from its EndpointSlice file."""
        rewrite_atomic(endpoint_slice_path(self.mesh_dir, s), endpoint_slice_yaml(s, addrs))

    async def run(self) -> Result:
        try:
            self.mesh_dir.mkdir()
            write_mesh(self.mesh_dir, self.S, ENDPOINTS)
            self.say(f"mesh written ({self.S} services x {ENDPOINTS} endpoints); starting {self.control_plane}")
            await self.start_server()
            assert self.server is not None
            self.res.startup_cpu = self.server_cpu()
            await self.measure_idle(0.5)
            self.say(f"ready; starting {self.N} clients")
            await self.initial_sync()
            self.say(f"initial sync {self.res.sync_s:.2f} s, control-plane cpu {self.res.sync_cpu:.2f} s")
            if self.K > 0:
                await self.gc_settled()
                await self.measure_idle(1.0)
                await self.changes()
            self.res.vm_hwm = self.server_hwm()
            return self.res
        finally:
            await self.close()

    async def close(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.proc.stdin.close()  # type: ignore[union-attr]
            await self.children.stop(self.client, grace=5.0)
        if self.server is not None:
            await self.children.stop(self.server, grace=10.0)
        await self.http.aclose()
        if self.args.keep:
            print(f"  [{self.tag}] kept {self.tmp}", file=sys.stderr)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _where(key: tuple[str, int, str]) -> str:
    file, line, func = key
    if file == "~":
        return func
    path = Path(file)
    with contextlib.suppress(ValueError):
        return f"{path.relative_to(ROOT)}:{line}({func})"
    return f"{path.name}:{line}({func})"


def profile_summary(path: Path, top: int = 14) -> str:
    """Top functions by own time, and Meshline's own functions by cumulative time."""
    st: dict[tuple[str, int, str], tuple[int, int, float, float, object]] = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    st = {k: v for k, v in st.items() if "select.epoll" not in k[2]}  # the event loop idling
    total = sum(v[2] for v in st.values()) or 1.0
    lines = [f"    {'own s':>7} {'own %':>6} {'cum s':>7} {'calls':>9}  function (by own time; idle epoll excluded)"]
    for key, (_cc, nc, tt, ct, _callers) in sorted(st.items(), key=lambda kv: -kv[1][2])[:top]:
        lines.append(f"    {tt:7.2f} {tt / total * 100:5.1f}% {ct:7.2f} {nc:9d}  {_where(key)}")
    lines.append(f"    {'':>7} {'':>6} {'cum s':>7} {'calls':>9}  controlplane/ function (by cumulative time)")
    own = [(k, v) for k, v in st.items() if "controlplane" in k[0]]
    for key, (_cc, nc, _tt, ct, _callers) in sorted(own, key=lambda kv: -kv[1][3])[:top]:
        lines.append(f"    {'':>7} {'':>6} {ct:7.2f} {nc:9d}  {_where(key)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- report
def fmt_ms(v: float) -> str:
    return f"{v * 1000:.0f} ms" if v < 10 else f"{v:.1f} s"


def fmt_mb(v: float | None) -> str:
    return "-" if v is None else f"{v / 2**20:.0f} MB"


def col_name(r: Result) -> str:
    return (("" if r.control_plane == "meshline" else f"{r.control_plane} ") + f"S={r.services} N={r.clients}"
            + ("" if r.mix == "mixed" else f" {r.mix}") + (f" w{r.workers}" if r.workers > 1 else ""))


def report(results: list[Result], changes: int) -> str:
    cols = [col_name(r) for r in results]
    rows: list[tuple[str, list[str]]] = [
        ("initial sync, all N hold everything", [f"{r.sync_s:.2f} s" for r in results]),
        ("  control-plane CPU (sync)", [f"{r.sync_cpu:.2f} s" for r in results]),
        ("  control-plane CPU (startup, no clients)", [f"{r.startup_cpu:.2f} s" for r in results]),
        ("  client process CPU (sync)", [f"{r.sync_client_cpu:.2f} s" for r in results]),
        (f"change -> last client ACK  p50 ({changes} changes)", [fmt_ms(median(r.lat_last)) for r in results]),
        ("change -> last client ACK  p99", [fmt_ms(pct(r.lat_last, 99)) for r in results]),
        ("change -> first client ACK p50", [fmt_ms(median(r.lat_first)) for r in results]),
        ("change -> last delta / SotW client p50",
         [f"{fmt_ms(median(r.lat_delta))} / {fmt_ms(median(r.lat_sotw))}" for r in results]),
        ("control-plane CPU per change  p50", [f"{median(r.change_cpu):.3f} s" for r in results]),
        ("  same, net of idle CPU", [f"{median(r.change_cpu_net):.3f} s" for r in results]),
        ("  idle CPU (N streams connected)", [f"{r.idle_cpu_rate * 100:.1f} %" for r in results]),
        ("  client process CPU per change p50", [f"{median(r.client_cpu):.3f} s" for r in results]),
        ("  snapshot rebuild time per change p50", [fmt_ms(median(r.rebuild_s)) for r in results]),
        ("GC settle pass after the sync (once)", [fmt_ms(r.gc_settle_s) for r in results]),
        ("serializations per change (p50 / max)",
         [f"{median(r.serializations):.0f} / {max(r.serializations, default=math.nan):.0f}" for r in results]),
        ("xDS responses sent per change",
         [", ".join(f"{XDS_SHORT.get(t, t)} {v:.0f}" for t, v in sorted(r.pushes_per_change.items()) if v)
          or "0" for r in results]),
        ("EDS resources received per change (all clients)",
         [f"{r.client_resources_per_change.get('EDS', 0):.0f}" for r in results]),
        ("EDS bytes received per change (all clients)",
         [f"{r.client_bytes_per_change.get('EDS', 0) / 1024:.0f} KB" for r in results]),
        ("peak RSS control plane (sampled / VmHWM)",
         [f"{fmt_mb(r.rss_peak)} / {fmt_mb(r.vm_hwm)}" for r in results]),
        ("peak RSS client process (sampled)", [fmt_mb(r.client_rss_peak) for r in results]),
    ]
    w0 = max(len(r[0]) for r in rows)
    widths = [max(len(c), *(len(r[1][i]) for r in rows)) for i, c in enumerate(cols)]
    lines = ["", "  ".join([" " * w0, *(c.rjust(w) for c, w in zip(cols, widths, strict=True))])]
    for label, vals in rows:
        lines.append("  ".join([label.ljust(w0), *(v.rjust(w) for v, w in zip(vals, widths, strict=True))]))
    lines += ["", "Ratios (measured in this run):"]
    for r in results:
        tag = f"  {col_name(r)}:"
        ratio = median(r.change_cpu) / r.sync_cpu if r.sync_cpu else math.nan
        ratio_net = median(r.change_cpu_net) / r.sync_cpu if r.sync_cpu else math.nan
        share = median(r.rebuild_s) / median(r.change_cpu_net) if median(r.change_cpu_net) else math.nan
        eds_per_client = r.client_resources_per_change.get("EDS", 0) / r.clients
        lines += [
            f"{tag} CPU of one endpoint change / CPU of the initial sync = {ratio:.3f} "
            f"(net of idle {ratio_net:.3f})",
            f"{' ' * len(tag)} snapshot rebuild / net change CPU = {share:.2f}; "
            f"CLAs received per client per change = {eds_per_client:.1f} (1 is the minimum)",
            f"{' ' * len(tag)} serializations per change = {median(r.serializations):.0f} (1 changed CLA)",
        ]
    changed = [r for r in results if r.lat_last]
    if len(changed) >= 2:
        a, b = changed[0], changed[-1]
        grow = (b.services * b.clients) / (a.services * a.clients)

        def g(f: Callable[[Result], float]) -> str:
            return f"{f(b) / f(a):.1f}x" if f(a) else "n/a"

        lines += [
            f"  S={b.services},N={b.clients} vs S={a.services},N={a.clients} (S*N grows {grow:.0f}x, "
            f"N grows {b.clients / a.clients:.0f}x):",
            f"    sync CPU {g(lambda r: r.sync_cpu)}, change CPU {g(lambda r: median(r.change_cpu_net))}, "
            f"change latency p50 {g(lambda r: median(r.lat_last))}, peak RSS {g(lambda r: float(r.rss_peak))}",
        ]
    return "\n".join(lines)
