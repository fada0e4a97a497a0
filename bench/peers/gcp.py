"""go-control-plane on the benchmark's simulated proxies (issue 20), for bench/suite.py.
Does process, file and network I/O.

The peer is a small Go program of ours (go-control-plane/main.go: snapshot cache for
CDS/LDS/RDS, linear cache for EDS, SotW and delta ADS on one port), built by
go-control-plane/build.sh into ~/.cache/meshline/peers/. It serves the very resources
Meshline serves a bench sidecar: `GcpCase` starts `meshline serve` on the same generated
mesh, fetches a sidecar's config with one simulated client (bench/simclients.py's own
client, state-of-the-world), stops Meshline and hands the serialized resources to the peer.
So both control planes send the same bytes per resource; what differs is how they fan a
change out. A change is a POST to the peer's control port, timed from the request (Meshline's
changes are timed from the EndpointSlice file write, so Meshline also pays its file watch).
Everything else (clients, waits, CPU and RSS accounting) is bench/harness.py's `Case`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import harness as R
import httpx
import simclients

HERE = Path(__file__).resolve().parent / "go-control-plane"
NAME = "go-control-plane"


async def build(timeout: float = 1200.0) -> Path:
    """The peer's binary (built on first use, then cached); BenchError saying why not."""
    return await R.run_build_script(NAME, HERE / "build.sh", timeout)


async def fetch_config(target: str, timeout: float = 120.0) -> dict[str, list[bytes]]:
    """A bench sidecar's whole config from the xDS server at `target`: the serialized
    resources by type URL, as one simulated state-of-the-world client received them."""
    dec, out, stats = simclients.Decoder(), simclients.Out(), simclients.Stats(clients=1)
    channel = grpc.aio.insecure_channel(target, options=[("grpc.max_receive_message_length", 512 * 1024 * 1024)])
    client = simclients.Client(0, "sotw", channel, simclients.make_node(0, "bench"), dec, out, stats, {})
    task = asyncio.create_task(client.run())
    try:
        deadline = time.monotonic() + timeout
        while not client.full:
            if task.done() or stats.errors:
                raise R.BenchError(f"fetching the sidecar config from {target} failed: {out.buf[-1:]}")
            if time.monotonic() > deadline:
                raise R.BenchError(f"fetching the sidecar config from {target}: not complete after {timeout:g} s")
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await channel.close(grace=None)
    held = {simclients.CLUSTER: client.clusters, simclients.ENDPOINT: client.cla,
            simclients.LISTENER: client.listeners, simclients.ROUTE: client.routes}
    config: dict[str, list[bytes]] = {}
    for type_url, names in held.items():
        latest = {info.name: raw for raw, info in dec.cache[type_url].items()}  # (arrival order: last wins)
        config[type_url] = [latest[n] for n in sorted(names)]
    return config


class GcpCase(R.Case):
    """A Case whose control plane is the go-control-plane peer."""

    control_plane = NAME
    dumps: dict[int, str] = {}  # S -> the JSON dump of Meshline's resources (per process)

    def __init__(self, *a: Any, binary: Path, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.binary = binary
        self.control_url = ""

    async def _meshline_config(self) -> str:
        """Run `meshline serve` on this case's mesh just long enough to fetch its config."""
        await R.Case.start_server(self)
        assert self.server is not None
        try:
            config = await fetch_config(self.xds_address)
        finally:
            if self._sampler is not None:
                self._sampler.cancel()
                self._sampler = None
            await self.children.stop(self.server, grace=10.0)
            self.server = None
            self.res.rss_peak = 0
        counts = {simclients.SHORT[t]: len(v) for t, v in config.items()}
        self.say(f"Meshline's sidecar config fetched for the peer: {counts}")
        return json.dumps({t: [base64.b64encode(b).decode() for b in v] for t, v in config.items()})

    async def start_server(self) -> None:
        if self.S not in self.dumps:
            self.dumps[self.S] = await self._meshline_config()
        dump = self.tmp / "resources.json"
        dump.write_text(self.dumps[self.S])
        xds, ctl = R.free_port(), R.free_port()
        self.xds_address = f"127.0.0.1:{xds}"
        self.control_url = f"http://127.0.0.1:{ctl}"
        self.status_url = self.control_url
        log = self.tmp / "server.log"
        self.server = await self.children.start(
            NAME, [str(self.binary), "--resources", str(dump), "--xds-address", self.xds_address,
                   "--control-address", f"127.0.0.1:{ctl}"],
            log, stdout=asyncio.subprocess.DEVNULL, stdin=asyncio.subprocess.DEVNULL)
        deadline = time.monotonic() + self.args.ready_timeout
        while True:
            self.check_server()
            with contextlib.suppress(httpx.TransportError):
                if (await self.http.get(f"{self.control_url}/ready")).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise R.BenchError(f"{NAME} not ready after {self.args.ready_timeout:g} s; log:\n{R.log_tail(log)}")
            await asyncio.sleep(0.05)
        self._sampler = asyncio.create_task(self._sample_rss())

    async def metrics(self) -> dict[str, float]:
        return {}  # (Meshline's own gauges: serializations, rebuild time, GC; the peer has none)

    async def apply_change(self, s: int, cluster: str, addrs: list[str]) -> None:
        r = await self.http.post(f"{self.control_url}/cla", json={"cluster": cluster, "addresses": addrs})
        if r.status_code != 204:
            raise R.BenchError(f"{NAME} refused the change of {cluster}: HTTP {r.status_code} {r.text.strip()}")


def say(msg: str) -> None:
    print(f"  [{NAME}] {msg}", file=sys.stderr, flush=True)
