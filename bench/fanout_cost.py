"""Meshline's own CPU per endpoint change, without gRPC (issue 20): the runtime with the
directory source, its snapshot builder and N `AdsStream`s in one process, driven by
bench/simclients.py's client logic (Envoy's request pattern: SotW ACKs repeat the whole
subscription). Only the server's side is timed: rebuild and publish, `next_push`, the
push observer, and the handling of each request from its bytes (`XdsServer._handle`, the
runtime's ACK bookkeeping). So the figure is what Meshline adds above the bare grpc.aio floor
(bench/floor.py), and it is steady enough to compare two commits on a busy machine
(process CPU over many changes, no sockets, no second process).

    .venv/bin/python bench/fanout_cost.py --clients 100 --protocol sotw --changes 50

Prints one JSON line: CPU per change (ms) for the whole server side and its parts, and per
stream (µs). Does file I/O (the mesh directory, in a temporary directory).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from meshfiles import default_addresses, endpoint_slice_path, endpoint_slice_yaml, rewrite_atomic, write_mesh
from simclients import CLUSTER, LISTENER, Client, Decoder, Out, Stats, make_node

from controlplane.runtime import Settings
from controlplane.serve import build_runtime
from controlplane.xds.server import Connection, proxy_meta_from_node
from controlplane.xds.stream import AdsStream

ENDPOINTS = 3
RAW_SOTW = hasattr(AdsStream, "handle_sotw_bytes")  # (the server reads SotW requests as bytes)


class Timer:
    """Accumulated process CPU of the server's side, by part."""

    def __init__(self) -> None:
        self.parts: dict[str, float] = {}

    def add(self, part: str, since: float) -> None:
        self.parts[part] = self.parts.get(part, 0.0) + time.process_time() - since


def drain(server: Any, conn: Connection, client: Client, timer: Timer) -> int:
    """Push to `conn` until it is in sync, answering as the simulated client would; returns
    the responses sent."""
    sent = 0
    while True:
        t0 = time.process_time()
        out = conn.stream.next_push()
        if out is not None:
            server.observer.on_push(conn, out)
        timer.add("push", t0)
        if out is None:
            return sent
        sent += 1
        reqs, _changed = client.handle(out.payload)
        for req in reqs:
            raw = req.SerializeToString()
            t0 = time.process_time()
            got = raw if conn.stream.protocol == "sotw" and RAW_SOTW else type(req).FromString(raw)  # (grpc parses)
            server._handle(conn, got)
            conn.stream.may_push()
            timer.add("requests", t0)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="fanout-cost-"))
    write_mesh(root, args.services, ENDPOINTS)
    rt = build_runtime(Settings(config_dirs=(root,), validator_binary=None, xds_address="127.0.0.1:0"))
    sources = asyncio.create_task(rt.run_sources())
    while not rt.ready:
        await asyncio.sleep(0.02)
    server = rt.xds
    pairs: list[tuple[Connection, Client]] = []
    templates: dict[Any, Any] = {}
    dec, out, stats = Decoder(), Out(), Stats()
    for i in range(args.clients):
        node = make_node(i, "bench")
        conn = Connection(proxy_meta_from_node(node), AdsStream(args.protocol, i, server.name_sets, server.limits))
        server.connections[i] = conn
        client = Client(i, args.protocol, None, node, dec, out, stats, templates)  # type: ignore[arg-type]
        pairs.append((conn, client))
    rt.rebuild_now()
    timer = Timer()
    for conn, client in pairs:  # the initial sync (not timed: reset below)
        rt.attach(conn)
        first = client._sotw(CLUSTER) if args.protocol == "sotw" else client._delta(CLUSTER)
        raw = first.SerializeToString()
        server._handle(conn, raw if args.protocol == "sotw" and RAW_SOTW else first)
        drain(server, conn, client, timer)
        lds = client._sotw(LISTENER) if args.protocol == "sotw" else client._delta(LISTENER)
        server._handle(conn, lds.SerializeToString() if args.protocol == "sotw" and RAW_SOTW else lds)
        drain(server, conn, client, timer)
        if not client.holds_everything():
            raise RuntimeError(f"client {client.cid} did not sync")
    gc.collect()
    gc.freeze()  # (what the server does after the initial sync: no pauses scanning the config)
    per_change: list[float] = []
    timer = Timer()
    prof = None
    if args.profile:
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
    for k in range(args.changes):
        s = k % args.services
        addrs = default_addresses(s, ENDPOINTS)
        addrs[0] = f"10.{200 + k % 50}.{k // 250 % 250}.{k % 250 + 1}"
        generation = rt.store.generation
        rewrite_atomic(endpoint_slice_path(root, s), endpoint_slice_yaml(s, addrs))
        deadline = time.monotonic() + 10
        while rt.store.generation == generation:
            if time.monotonic() > deadline:
                raise RuntimeError("the change did not reach the store")
            await asyncio.sleep(0.002)
        before = sum(timer.parts.values())
        t0 = time.process_time()
        rt.rebuild_now()
        timer.add("rebuild", t0)
        for conn, client in pairs:
            if drain(server, conn, client, timer) != 1:
                raise RuntimeError("expected one response per stream per endpoint change")
        per_change.append(sum(timer.parts.values()) - before)
    if prof is not None:
        import pstats
        prof.disable()
        st = pstats.Stats(prof, stream=sys.stderr)
        st.sort_stats("tottime").print_stats(30)
        st.sort_stats("cumulative").print_stats("controlplane", 40)
    sources.cancel()
    n, c = args.changes, args.clients
    return {
        "protocol": args.protocol, "clients": c, "services": args.services, "changes": n,
        "cpu_ms_per_change": round(statistics.mean(per_change) * 1000, 2),
        "cpu_ms_per_change_p50": round(statistics.median(per_change) * 1000, 2),
        "parts_ms_per_change": {p: round(v / n * 1000, 2) for p, v in timer.parts.items()},
        "us_per_stream": round((sum(per_change) - timer.parts.get("rebuild", 0.0)) / n / c * 1e6, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--services", type=int, default=1000)
    p.add_argument("--protocol", choices=["sotw", "delta"], default="sotw")
    p.add_argument("--changes", type=int, default=50)
    p.add_argument("--profile", action="store_true", help="cProfile the changes (to stderr; includes the clients)")
    args = p.parse_args()
    print(json.dumps(asyncio.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
