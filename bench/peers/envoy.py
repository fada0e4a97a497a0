"""Real-Envoy benchmark scenarios for bench/suite.py (P8, P9). Does process, file and network I/O.

P8: the same S clusters (10 endpoints each) reach ONE real Envoy from Meshline (delta
ADS, EDS) and from sovereign (REST-JSON polling, clusters with inline endpoints; its own
venv at .venv/sovereign, see the Makefile). Per control plane: Envoy's initial sync, then
K single-endpoint changes written to the control plane's source, one every `interval`
seconds; for each, the time from the file write until Envoy's admin (`/config_dump`,
filtered to the changed cluster) shows the new address, and the control plane's CPU
(process tree, psutil) over the whole change window (the same wall time for both, so
sovereign's idle polling work counts, as it would in production).

P9: Meshline's initial sync of that Envoy, split into Meshline's and Envoy's time from
timestamps on both sides: Meshline's log (`--log-level debug`: the stream's first request
and each push) and Envoy's admin (`cluster_manager.cds.update_time`, and polled
`cluster_manager.warming_clusters` / `active_clusters`, which reach 0 / S+1 when the
clusters have warmed, which is when Envoy ACKs CDS).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import harness as R
import httpx
import psutil
import yaml
from meshfiles import (
    default_addresses,
    endpoint_slice_path,
    endpoint_slice_yaml,
    hostname,
    rewrite_atomic,
    write_mesh,
)

SOVEREIGN_VENV = R.ROOT / ".venv" / "sovereign"
PORT = 8080

SOVEREIGN_TEMPLATE = '''"""sovereign template (bench): one STATIC cluster with inline endpoints per instance."""

PORT = @PORT@

def call(instances, discovery_request=None, **kwargs):
    for inst in instances:
        name = inst["cluster"]
        yield {
            "name": name,
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": a, "port_value": PORT}}}}
                for a in inst["addresses"]]}]},
        }
'''.replace("@PORT@", str(PORT))


@dataclass
class PeerResult:
    name: str
    clusters: int
    sync_s: float = 0.0  # Envoy exec -> all clusters active and warm
    propagation: list[float] = field(default_factory=list)
    window_s: float = 0.0
    cpu_window: float = 0.0  # control-plane CPU seconds over the change window
    envoy_cpu_window: float = 0.0
    rss_peak: int = 0
    split: dict[str, float] = field(default_factory=dict)  # P9 (Meshline only)


def sovereign_command() -> Path | None:
    exe = SOVEREIGN_VENV / "bin" / "sovereign"
    return exe if exe.exists() else None


def cluster_name(s: int) -> str:
    return f"outbound|{PORT}||{hostname(s)}"


def tree_cpu(ps: psutil.Process) -> float:
    total = 0.0
    for p in [ps, *_children(ps)]:
        with contextlib.suppress(psutil.Error):
            total += R.cpu_seconds(p)
    return total


def tree_rss(ps: psutil.Process) -> int:
    total = 0
    for p in [ps, *_children(ps)]:
        with contextlib.suppress(psutil.Error):
            total += int(p.memory_info().rss)
    return total


def _children(ps: psutil.Process) -> list[psutil.Process]:
    try:
        return list(ps.children(recursive=True))
    except psutil.Error:
        return []


# --------------------------------------------------------------------------- bootstraps
def _admin(port: int) -> dict[str, Any]:
    return {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}


def _static_cluster(name: str, port: int, http2: bool) -> dict[str, Any]:
    c: dict[str, Any] = {
        "name": name, "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
            "socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]},
    }
    if http2:
        c["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}}
    return c


def meshline_bootstrap(xds_port: int, admin_port: int) -> str:
    """Delta ADS, clusters (and their endpoints) only: the same resources sovereign serves."""
    return yaml.safe_dump({
        "node": {"id": "bench-envoy-meshline", "cluster": "bench",
                 "metadata": {"namespace": "bench", "capture": "bind"}},
        "admin": _admin(admin_port),
        "dynamic_resources": {
            "ads_config": {"api_type": "DELTA_GRPC", "set_node_on_first_message_only": True,
                           "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}]},
            "cds_config": {"ads": {}},
        },
        "static_resources": {"clusters": [_static_cluster("xds", xds_port, http2=True)]},
    })


def sovereign_bootstrap(port: int, admin_port: int) -> str:
    return yaml.safe_dump({
        "node": {"id": "bench-envoy-sovereign", "cluster": "bench"},
        "admin": _admin(admin_port),
        "dynamic_resources": {"cds_config": {"api_config_source": {
            "api_type": "REST", "transport_api_version": "V3", "cluster_names": ["sovereign"],
            "refresh_delay": "1s", "request_timeout": "10s"}, "resource_api_version": "V3"}},
        "static_resources": {"clusters": [_static_cluster("sovereign", port, http2=False)]},
    })


# --------------------------------------------------------------------------- one peer
class EnvoyRun:
    """A control plane under test (already started) plus one Envoy fed by it."""

    def __init__(self, name: str, children: R.Children, tmp: Path, S: int) -> None:
        self.name, self.children, self.tmp, self.S = name, children, tmp, S
        self.http = httpx.AsyncClient(timeout=10.0)
        self.envoy: R.Child | None = None
        self.admin = ""
        self.cp: R.Child | None = None
        self.res = PeerResult(name, S)

    def say(self, msg: str) -> None:
        print(f"  [P8 {self.name} S={self.S}] {msg}", file=sys.stderr, flush=True)

    def check(self) -> None:
        for c in (self.cp, self.envoy):
            if c is not None and c.proc.returncode is not None:
                raise R.BenchError(f"{c.name} exited with code {c.proc.returncode}:\n{R.log_tail(c.log)}")

    async def stats(self, pattern: str) -> dict[str, float]:
        r = await self.http.get(f"{self.admin}/stats", params={"filter": pattern})
        out: dict[str, float] = {}
        for line in r.text.splitlines():
            k, _, v = line.partition(": ")
            with contextlib.suppress(ValueError):
                out[k] = float(v)
        return out

    async def start_envoy(self, bootstrap: str) -> float:
        """Start Envoy; returns its exec time (time.time())."""
        from controlplane.localrun import envoy_binary

        cfg = self.tmp / "envoy.yaml"
        cfg.write_text(bootstrap)
        t0 = time.time()
        self.envoy = await self.children.start(
            "envoy", [envoy_binary(), "-c", str(cfg), "--disable-hot-restart", "--concurrency", "1", "-l", "warning"],
            self.tmp / "envoy.log", stdout=asyncio.subprocess.DEVNULL, stdin=asyncio.subprocess.DEVNULL)
        return t0

    async def wait_synced(self, timeout: float) -> float:
        """Poll Envoy's admin until every cluster is active and none is warming; returns then."""
        deadline = time.monotonic() + timeout
        want = self.S + 1  # + the static xDS cluster
        last: dict[str, float] = {}
        while True:
            self.check()
            with contextlib.suppress(httpx.TransportError):
                last = await self.stats(r"^cluster_manager\.(active|warming)_clusters$")
                if (last.get("cluster_manager.active_clusters", 0) >= want
                        and last.get("cluster_manager.warming_clusters", 1) == 0):
                    return time.time()
            if time.monotonic() > deadline:
                raise R.BenchError(f"{self.name}: Envoy not synced after {timeout:g} s ({last})")
            await asyncio.sleep(0.005)

    async def shows(self, s: int, marker: str, resource: str) -> bool:
        name = cluster_name(s)
        params = {"resource": resource, "name_regex": "^" + re.escape(name) + "$"}
        url = f"{self.admin}/config_dump?" + urllib.parse.urlencode(params)
        if resource == "dynamic_endpoint_configs":
            url += "&include_eds"
        r = await self.http.get(url)
        return marker in r.text

    async def changes(self, K: int, interval: float, prepare: Any, resource: str, tail: float = 2.5) -> None:
        """K changes, one every `interval` s; `prepare(s, addrs)` returns the function that
        writes service s's new addresses into the source (timed from its call)."""
        assert self.cp is not None and self.envoy is not None
        await asyncio.sleep(2.0)  # let start-up work finish
        c0, e0, t0 = tree_cpu(self.cp.ps), tree_cpu(self.envoy.ps), time.monotonic()
        for k in range(K):
            slot = t0 + k * interval
            await asyncio.sleep(max(0.0, slot - time.monotonic()))
            s = (k * 7919 + 13) % self.S
            addrs = default_addresses(s, R.ENDPOINTS)
            marker = f"10.251.{k % 250}.{s % 250 + 1}"
            addrs[k % R.ENDPOINTS] = marker
            commit = prepare(s, addrs)
            t_write = time.time()
            commit()
            deadline = time.monotonic() + 30
            while not await self.shows(s, f'"{marker}"', resource):
                self.check()
                if time.monotonic() > deadline:
                    raise R.BenchError(f"{self.name}: change {k + 1} never reached Envoy")
                await asyncio.sleep(0.005)
            self.res.propagation.append(time.time() - t_write)
            self.say(f"change {k + 1}/{K}: {self.res.propagation[-1] * 1000:.0f} ms")
        # The same wall time for every control plane: K slots plus a tail that the slowest
        # propagation fits in, so CPU spent polling while idle counts equally.
        await asyncio.sleep(max(0.0, t0 + K * interval + tail - time.monotonic()))
        self.res.window_s = time.monotonic() - t0
        self.res.cpu_window = tree_cpu(self.cp.ps) - c0
        self.res.envoy_cpu_window = tree_cpu(self.envoy.ps) - e0
        self.res.rss_peak = tree_rss(self.cp.ps)

    async def close(self) -> None:
        for c in (self.envoy, self.cp):
            if c is not None:
                await self.children.stop(c, grace=10.0)
        await self.http.aclose()


_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")


def _log_times(path: Path, node: str) -> dict[str, float]:
    """First 'connected', 'push Cluster' and 'push ClusterLoadAssignment' lines of a proxy."""
    out: dict[str, float] = {}
    for line in path.read_text(errors="replace").splitlines():
        if node not in line:
            continue
        m = _LOG_TIME.match(line)
        if m is None:
            continue
        t = dt.datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S").timestamp() + int(m[2]) / 1000
        for key, needle in (("connected", f"proxy {node} connected"), ("cds_sent", "push Cluster to"),
                            ("eds_sent", "push ClusterLoadAssignment to")):
            if needle in line and key not in out:
                out[key] = t
    return out


async def run_meshline(children: R.Children, S: int, K: int, interval: float, keep: bool) -> PeerResult:
    tmp = Path(tempfile.mkdtemp(prefix=f"meshline-bench-envoy-{S}-"))
    er = EnvoyRun("meshline", children, tmp, S)
    try:
        mesh = tmp / "mesh"
        mesh.mkdir()
        write_mesh(mesh, S, R.ENDPOINTS)
        xds, status, admin = R.free_port(), R.free_port(), R.free_port()
        er.say("starting meshline serve")
        er.cp = await children.start("meshline", [
            sys.executable, "-m", "controlplane.cli", "serve", "--config-dir", str(mesh), "--no-ca",
            "--xds-address", f"127.0.0.1:{xds}", "--status-address", f"127.0.0.1:{status}",
            "--log-level", "debug"], tmp / "server.log", stdout=asyncio.subprocess.DEVNULL,
            stdin=asyncio.subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while True:
            er.check()
            with contextlib.suppress(httpx.TransportError):
                if (await er.http.get(f"http://127.0.0.1:{status}/readyz")).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise R.BenchError("meshline serve not ready")
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        er.admin = f"http://127.0.0.1:{admin}"
        cpu0 = tree_cpu(er.cp.ps)
        t_exec = await er.start_envoy(meshline_bootstrap(xds, admin))
        t_done = await er.wait_synced(120)
        cpu_sync = tree_cpu(er.cp.ps) - cpu0
        er.res.sync_s = t_done - t_exec
        st = await er.stats(r"^cluster_manager\.cds\.update_time$")
        marks = _log_times(tmp / "server.log", "bench-envoy-meshline")
        split: dict[str, float] = {"exec": t_exec, "warm": t_done, "meshline_cpu_sync": cpu_sync}
        split.update(marks)
        if "cluster_manager.cds.update_time" in st:
            split["cds_applied"] = st["cluster_manager.cds.update_time"] / 1000
        er.res.split = split
        er.say(f"Envoy synced in {er.res.sync_s:.2f} s")

        def prepare(s: int, addrs: list[str]) -> Callable[[], None]:
            text = endpoint_slice_yaml(s, addrs)
            return lambda: rewrite_atomic(endpoint_slice_path(mesh, s), text)

        await er.changes(K, interval, prepare, "dynamic_endpoint_configs")
        return er.res
    finally:
        await er.close()
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


async def run_sovereign(children: R.Children, S: int, K: int, interval: float, keep: bool) -> PeerResult:
    exe = sovereign_command()
    if exe is None:
        raise R.BenchError(f"sovereign is not installed in {SOVEREIGN_VENV} (run `make bench`, which creates it)")
    tmp = Path(tempfile.mkdtemp(prefix=f"meshline-bench-sovereign-{S}-"))
    er = EnvoyRun("sovereign", children, tmp, S)
    try:
        addresses = {s: default_addresses(s, R.ENDPOINTS) for s in range(S)}
        source = tmp / "instances.yaml"

        def dump() -> str:
            return yaml.safe_dump([{"cluster": cluster_name(s), "addresses": addresses[s]} for s in range(S)])

        source.write_text(dump())
        (tmp / "clusters_tmpl.py").write_text(SOVEREIGN_TEMPLATE)
        (tmp / "config.yaml").write_text(yaml.safe_dump({
            "templates": {"default": [{"type": "clusters", "spec": {
                "protocol": "python", "serialization": "raw", "path": str(tmp / "clusters_tmpl.py")}}]},
            "sources": [{"type": "file", "config": {"path": f"file://{source}"}}],
            "matching": {"enabled": False},
        }))
        port, admin = R.free_port(), R.free_port()
        env = {**os.environ, "SOVEREIGN_CONFIG": f"file://{tmp / 'config.yaml'}", "SOVEREIGN_HOST": "127.0.0.1",
               "SOVEREIGN_PORT": str(port), "SOVEREIGN_WORKERS": "1", "SOVEREIGN_SOURCES_REFRESH_RATE": "1",
               "SOVEREIGN_ENABLE_ACCESS_LOGS": "false", "SOVEREIGN_NODE_MATCHING_ENABLED": "false"}
        env.pop("VIRTUAL_ENV", None)
        er.say("starting sovereign")
        er.cp = await children.start("sovereign", [str(exe)], tmp / "sovereign.log", env=env, cwd=tmp,
                                     stdout=asyncio.subprocess.DEVNULL, stdin=asyncio.subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while True:
            er.check()
            with contextlib.suppress(httpx.TransportError):
                if (await er.http.get(f"http://127.0.0.1:{port}/healthcheck")).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise R.BenchError(f"sovereign not ready:\n{R.log_tail(tmp / 'sovereign.log')}")
            await asyncio.sleep(0.1)
        er.admin = f"http://127.0.0.1:{admin}"
        t_exec = await er.start_envoy(sovereign_bootstrap(port, admin))
        er.res.sync_s = await er.wait_synced(120) - t_exec
        er.say(f"Envoy synced in {er.res.sync_s:.2f} s")

        def prepare(s: int, addrs: list[str]) -> Callable[[], None]:
            addresses[s] = addrs
            text = dump()
            return lambda: rewrite_atomic(source, text)

        await er.changes(K, interval, prepare, "dynamic_active_clusters")
        return er.res
    finally:
        await er.close()
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
