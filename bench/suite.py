"""The goal scenarios of issue 8 (P1-P9) for `make bench` / `make bench-quick`
(`bench/run.py --suite full|quick`): runs the cases, prints the per-case table of
bench/run.py, then one table of goals with the measured value and PASS/MISS. Benchmarks
never fail the build: the exit code is 0 whenever every scenario ran, whatever it measured.
Does process, file and network I/O (through bench/harness.py and bench/peers/).

Full suite (about 6-8 minutes on 2 cores):
  sweep   S=1,000 services, N = 100 / 300 / 1,000 delta clients, 20 changes each -> P1
          (N=1,000), the convergence plot, and P4's 1,000-service side (N=100)
  mixed   S=1,000, N=1,000 (half SotW, half delta), 20 changes -> P2, P3, P5, P6
  large   S=10,000, N=100 delta, 20 changes -> P4 (vs the sweep's S=1,000 N=100)
  workers S=1,000, N=1,000 mixed with `serve --workers 2`, initial sync only -> P7
          (vs the mixed case's sync, same clients, same mesh)
  floor   a bare grpc.aio server (Meshline's options, no xDS logic) writing one message of
          the sweep's CLA size to each of N=1,000 streams and reading each reply (bench/floor.py):
          what a change costs in gRPC alone, reported with P2
  envoy   S=1,000 clusters to one real Envoy: Meshline vs sovereign, 10 changes -> P8; the
          Meshline run's initial sync timeline -> P9
  peers   (issue 20, `--compare`, default go-control-plane) the sweep's sizes again with a Go
          control plane on the same simulated proxies, delta (right after each sweep point)
          and SotW (Meshline, then the peer, per N) -> G1-G3 and the comparison table/plot;
          `--compare go-control-plane,istiod` adds istiod (bench/peers/istiod.py: a real API
          server holding the mesh as objects) -> GI1-GI2
`--suite peers`: the full sizes of the sweep, the floor and the peers only (P1 and G1-G3).
`--sweep 100,300`: other proxy counts for the sweep and the comparison.
Quick suite (under a minute): the same scenarios at reduced sizes (the table says which).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import harness as R
from peers import compare, gcp, istiod
from peers import envoy as real_envoy


@dataclass(frozen=True)
class Plan:
    S: int
    sweep: tuple[int, ...]
    changes: int
    p4_large: int
    p4_clients: int
    mixed_n: int
    envoy_S: int
    envoy_K: int
    envoy_interval: float


FULL = Plan(S=1000, sweep=(100, 300, 1000), changes=20, p4_large=10000, p4_clients=100, mixed_n=1000,
            envoy_S=1000, envoy_K=10, envoy_interval=2.3)
QUICK = Plan(S=300, sweep=(100,), changes=5, p4_large=3000, p4_clients=100, mixed_n=300,
             envoy_S=100, envoy_K=2, envoy_interval=1.7)


@dataclass
class Goal:
    id: str
    goal: str
    measured: str
    ok: bool | None  # None: not measured


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


async def run_suite(args: argparse.Namespace, children: R.Children) -> int:
    plan = QUICK if args.suite == "quick" else FULL
    if getattr(args, "sweep", None):
        plan = dataclasses.replace(plan, sweep=tuple(args.sweep))
    t_start = time.monotonic()
    results: dict[str, R.Result] = {}
    envoy: dict[str, real_envoy.PeerResult] = {}
    failures: list[str] = []
    floor: dict[str, Any] | None = None
    floors: dict[int, dict[str, Any]] = {}  # the bare gRPC floor per sweep N, next to the peer rows
    sotw_floors: dict[int, dict[str, Any]] = {}  # ...with SotW-sized ACKs, next to the SotW rows

    async def case(key: str, S: int, N: int, mix: str, workers: int = 1, changes: int | None = None,
                   binary: Path | None = None, peer: str = gcp.NAME) -> None:
        K = plan.changes if changes is None else changes
        cp = "meshline" if binary is None else peer
        print(f"running {key}: {cp}, S={S} x N={N} {mix} clients, workers={workers}, {K} changes...",
              file=sys.stderr, flush=True)
        try:
            if binary is None:
                results[key] = await R.Case(args, children, S, N, mix=mix, workers=workers, changes=K).run()
            elif peer == istiod.NAME:
                results[key] = await istiod.IstiodCase(args, children, S, N, mix=mix, changes=K, binary=binary).run()
            else:
                results[key] = await gcp.GcpCase(args, children, S, N, mix=mix, changes=K, binary=binary).run()
        except R.BenchError as exc:
            failures.append(f"{key}: {exc}")
            print(f"  {key} failed: {exc}", file=sys.stderr, flush=True)

    wanted = [p for p in getattr(args, "compare", gcp.NAME).split(",") if p and p != "none"]
    gcp_bin: Path | None = None
    istiod_bin: Path | None = None
    for name in wanted:
        if name not in (gcp.NAME, istiod.NAME):
            failures.append(f"{name} (skipped): unknown peer (known: {gcp.NAME}, {istiod.NAME})")
            continue
        try:  # (istiod: a cold build takes ~35 minutes on 2 cores, then it is cached)
            if name == gcp.NAME:
                gcp_bin = await gcp.build()
            else:
                istiod_bin = await istiod.build()
        except R.BenchError as exc:  # the peer is skipped, the rest of the suite runs
            failures.append(f"{name} (skipped): {exc}")
            print(f"  {name} skipped: {exc}", file=sys.stderr, flush=True)
    try:
        for n in plan.sweep:
            await case(f"sweep{n}", plan.S, n, "delta")
            if (gcp_bin is not None or istiod_bin is not None) and n != max(plan.sweep) and f"sweep{n}" in results:
                if (at_n := await run_floor(results[f"sweep{n}"], plan.changes)) is not None:
                    floors[n] = at_n  # (the largest N's floor is run below, once, for P1f/P2f too)
            if gcp_bin is not None:
                await case(f"gcp-delta{n}", plan.S, n, "delta", binary=gcp_bin)
            if istiod_bin is not None:
                await case(f"istiod-delta{n}", plan.S, n, "delta", binary=istiod_bin, peer=istiod.NAME)
        for n in plan.sweep if gcp_bin is not None or istiod_bin is not None else ():
            await case(f"sotw{n}", plan.S, n, "sotw")
            if f"sotw{n}" in results:  # the floor with SotW's ACKs, which repeat every name
                at_n = await run_floor(results[f"sotw{n}"], plan.changes, reply=sotw_ack_bytes(plan.S))
                if at_n is not None:
                    sotw_floors[n] = at_n
            if gcp_bin is not None:
                await case(f"gcp-sotw{n}", plan.S, n, "sotw", binary=gcp_bin)
            if istiod_bin is not None:
                await case(f"istiod-sotw{n}", plan.S, n, "sotw", binary=istiod_bin, peer=istiod.NAME)
        top = results.get(f"sweep{max(plan.sweep)}")
        if top is not None:
            floor = await run_floor(top, plan.changes)
            if floor is not None:
                floors[max(plan.sweep)] = floor
        if args.suite != "peers":
            await case("mixed", plan.S, plan.mixed_n, "mixed")
            await case("large", plan.p4_large, plan.p4_clients, "delta")
            await case("workers2", plan.S, plan.mixed_n, "mixed", workers=2, changes=0)
        for name, fn in (("meshline", real_envoy.run_meshline), ("sovereign", real_envoy.run_sovereign)):
            if args.suite == "peers" or (name == "sovereign" and args.peer == "none"):
                continue
            print(f"running P8/P9 {name}: S={plan.envoy_S} clusters to one Envoy, {plan.envoy_K} changes...",
                  file=sys.stderr, flush=True)
            try:
                envoy[name] = await fn(children, plan.envoy_S, plan.envoy_K, plan.envoy_interval, args.keep)
            except R.BenchError as exc:
                failures.append(f"{name} + Envoy: {exc}")
                print(f"  {name} + Envoy failed: {exc}", file=sys.stderr, flush=True)
    finally:
        await children.stop_all()
        await istiod.shutdown()

    ordered = list(results.values())
    if ordered:
        print(R.report(ordered, plan.changes))
    goals = evaluate(plan, results, envoy, floor)
    peer_goals = [Goal(*g) for g in compare.goals(compared(results, plan.sweep), plan.sweep, gcp.NAME)]
    istiod_goals = [Goal(*g) for g in istiod.goals(compared(results, plan.sweep), plan.sweep,
                                                   {"delta": floors, "sotw": sotw_floors})]
    print(goal_table(goals, plan, args.suite, time.monotonic() - t_start))
    print(envoy_table(envoy))
    cmp = compared(results, plan.sweep)
    peer_names = [p for p, b in ((gcp.NAME, gcp_bin), (istiod.NAME, istiod_bin)) if b is not None]
    if peer_names:
        print(compare.table(cmp, plan.sweep, peer_names, floors, sotw_floors))
    if gcp_bin is not None:
        print(goal_table(peer_goals, plan, args.suite, time.monotonic() - t_start,
                         head="Goals against go-control-plane (issue 20), same run"))
    if istiod_bin is not None:
        print(goal_table(istiod_goals, plan, args.suite, time.monotonic() - t_start,
                         head="Goals against istiod (issue 20), same run"))
    if failures:
        print("\nScenarios that did not complete:\n  " + "\n  ".join(failures))
    sweep = [(n, results[f"sweep{n}"]) for n in plan.sweep if f"sweep{n}" in results]
    if args.plot is not None and len(sweep) > 1 and args.suite != "peers":
        plot(sweep, plan.S, args.plot)
        print(f"\nconvergence plot written to {args.plot}")
    if args.plot is not None and len(sweep) > 1:
        if peer_names:
            peers_png = args.plot.with_name("peers.png")
            try:
                compare.plot(compared(results, plan.sweep), plan.sweep, peer_names, peers_png)
                print(f"comparison plot written to {peers_png}")
            except ImportError as exc:  # (make bench installs matplotlib, the bench extra)
                print(f"comparison plot not written: {exc}")
    if args.results is not None:
        args.results.write_text(json.dumps({
            "suite": args.suite, "plan": dataclasses.asdict(plan),
            "cases": {k: _jsonable(dataclasses.asdict(v)) for k, v in results.items()},
            "envoy": {k: _jsonable(dataclasses.asdict(v)) for k, v in envoy.items()}, "floor": floor,
            "floors": {str(n): f for n, f in floors.items()},
            "floors_sotw": {str(n): f for n, f in sotw_floors.items()},
            "goals": [dataclasses.asdict(g) for g in goals + peer_goals + istiod_goals], "failures": failures,
            "load": {"uptime": _uptime(), "cpus": os.cpu_count()}}, indent=1))
        print(f"results written to {args.results}")
    return 0


def sotw_ack_bytes(services: int) -> int:
    """The size of a SotW EDS ACK of the bench mesh: Envoy repeats every subscribed name."""
    from envoy.service.discovery.v3 import discovery_pb2
    from meshfiles import PORT, hostname

    from controlplane.translate.names import outbound_cluster_name
    req = discovery_pb2.DiscoveryRequest(
        type_url="type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment", version_info="f" * 16,
        response_nonce="1234", resource_names=[outbound_cluster_name(PORT, hostname(s)) for s in range(services)])
    return len(req.SerializeToString())


async def run_floor(ref: R.Result, rounds: int, reply: int = 80) -> dict[str, Any] | None:
    """bench/floor.py with the reference case's proxy count and CLA response size; `reply`:
    the bytes of each stream's answer (80: a delta ACK; SotW: `sotw_ack_bytes`)."""
    payload = max(64, round(ref.client_bytes_per_change.get("EDS", 0) / max(1, ref.clients)))
    print(f"running floor: bare gRPC fan-out to N={ref.clients} streams, {payload} B each, {reply} B replies, "
          f"{rounds} rounds...", file=sys.stderr, flush=True)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(R.BENCH / "floor.py"), "--clients", str(ref.clients), "--rounds", str(rounds),
        "--payload", str(payload), "--reply", str(reply), stdout=asyncio.subprocess.PIPE,
        preexec_fn=R.die_with_parent)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 300)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        print("  floor timed out", file=sys.stderr, flush=True)
        return None
    if proc.returncode != 0 or not out.strip():
        print(f"  floor failed (exit {proc.returncode})", file=sys.stderr, flush=True)
        return None
    d: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return d


def compared(results: dict[str, R.Result], sweep: tuple[int, ...]) -> dict[str, R.Result]:
    """The comparison's cases, keyed for bench/peers/compare.py."""
    out: dict[str, R.Result] = {}
    for n in sweep:
        for k, cp, mix in ((f"sweep{n}", compare.MESHLINE, "delta"), (f"sotw{n}", compare.MESHLINE, "sotw"),
                           (f"gcp-delta{n}", gcp.NAME, "delta"), (f"gcp-sotw{n}", gcp.NAME, "sotw"),
                           (f"istiod-delta{n}", istiod.NAME, "delta"), (f"istiod-sotw{n}", istiod.NAME, "sotw")):
            if k in results:
                out[compare.key(cp, mix, n)] = results[k]
    return out


def _uptime() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "?"


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    d = dict(d)
    d.pop("profiles", None)
    return d


# --------------------------------------------------------------------------- goals
def p9_split(split: dict[str, float]) -> dict[str, float] | None:
    """Meshline's and Envoy's parts of the CDS request -> CDS ACK (clusters warm) time."""
    need = ("connected", "cds_sent", "cds_applied", "eds_sent", "warm")
    if any(k not in split for k in need):
        return None
    a, b, c, d, e = (split[k] for k in need)
    total = e - a
    mesh = (b - a) + max(0.0, d - c)
    return {"total": total, "meshline": mesh, "envoy": total - mesh, "share": _ratio(mesh, total),
            "cds_build": b - a, "envoy_cds": c - b, "eds_build": max(0.0, d - c), "envoy_warm": e - d,
            "cpu_share": _ratio(split.get("meshline_cpu_sync", math.nan), split["warm"] - split["exec"])}


def evaluate(plan: Plan, res: dict[str, R.Result], envoy: dict[str, real_envoy.PeerResult],
             floor: dict[str, Any] | None = None) -> list[Goal]:
    g: list[Goal] = []
    nmax = max(plan.sweep)
    r = res.get(f"sweep{nmax}")
    if r and r.lat_last:
        p99 = R.pct(r.lat_last, 99)
        g.append(Goal("P1", f"one endpoint change -> last of {nmax} delta proxies ACKs, p99 <= 150 ms "
                      f"(S={r.services}, {len(r.lat_last)} changes, default debounce 100 ms)",
                      f"p99 {p99 * 1000:.0f} ms (p50 {R.median(r.lat_last) * 1000:.0f} ms)", p99 <= 0.150))
        if floor and floor.get("lat"):
            g.append(Goal("P1f", f"context: bare gRPC fan-out to {floor['clients']} streams, last reply "
                          "(bench/floor.py, no xDS logic, no file watch, no rebuild)",
                          f"p50 {statistics.median(floor['lat']) * 1000:.0f} ms, p99 "
                          f"{R.pct(floor['lat'], 99) * 1000:.0f} ms", None))
    else:
        g.append(Goal("P1", "change -> last delta ACK p99 <= 150 ms", "not measured", None))
    m = res.get("mixed")
    if m and m.change_cpu_net and m.sync_cpu:
        ratio = _ratio(R.median(m.change_cpu_net), m.sync_cpu)
        g.append(Goal("P2", f"CPU of one endpoint change <= 1/50 of a full push (initial sync of all "
                      f"{m.clients} proxies, S={m.services})",
                      f"{ratio:.3f} = 1/{1 / ratio:.0f} ({R.median(m.change_cpu_net):.3f} s / {m.sync_cpu:.2f} s)",
                      ratio <= 1 / 50))
        top = res.get(f"sweep{nmax}")
        if top and top.change_cpu_net and top.sync_cpu:
            d = _ratio(R.median(top.change_cpu_net), top.sync_cpu)
            g.append(Goal("P2d", f"the same, all {top.clients} proxies delta (sweep)",
                          f"{d:.3f} = 1/{1 / d:.0f} ({R.median(top.change_cpu_net):.3f} s / {top.sync_cpu:.2f} s)",
                          d <= 1 / 50))
        if floor and floor.get("cpu") and top and top.change_cpu_net and top.sync_cpu:
            f = statistics.median(floor["cpu"])
            g.append(Goal("P2f", f"context: bare gRPC fan-out to {floor['clients']} streams ({floor['payload']} B "
                          "each, one reply each), CPU per round",
                          f"{f:.3f} s; Meshline's delta change = {R.median(top.change_cpu_net) / f:.2f}x it; "
                          f"at this floor P2 could reach 1/{top.sync_cpu / f:.0f} (delta)"
                          + (f", 1/{m.sync_cpu / f:.0f} (mixed)" if m.clients == floor["clients"] else ""), None))
        worst = max(m.serializations)
        g.append(Goal("P3", "serializations per push = resources changed (1 CLA), not x proxies",
                      f"p50 {R.median(m.serializations):.0f}, max {worst:.0f} for {m.clients} proxies", worst <= 1))
    else:
        g += [Goal("P2", "change CPU <= 1/50 of full push", "not measured", None),
              Goal("P3", "serializations per push = resources changed", "not measured", None)]
    small, large = res.get(f"sweep{plan.p4_clients}"), res.get("large")
    if small and large and small.change_cpu_net and large.change_cpu_net:
        # The mean, not the median: a change costs a few 10 ms CPU-clock ticks here, and the
        # median of tick-quantized values swings by a whole tick between runs.
        big, little = statistics.fmean(large.change_cpu_net), statistics.fmean(small.change_cpu_net)
        ratio = _ratio(big, little)
        g.append(Goal("P4", f"change cost with {large.services:,} services <= 1.5x with {small.services:,} "
                      f"(N={large.clients} proxies both)",
                      f"{ratio:.2f}x (mean CPU {big * 1000:.0f} vs {little * 1000:.0f} ms; latency p50 "
                      f"{R.median(large.lat_last) * 1000:.0f} vs {R.median(small.lat_last) * 1000:.0f} ms)",
                      ratio <= 1.5))
    else:
        g.append(Goal("P4", "change cost 10x services <= 1.5x", "not measured", None))
    if m:
        peak = m.vm_hwm or m.rss_peak
        g.append(Goal("P5", f"control-plane peak RSS <= 400 MB ({m.services} services x {R.ENDPOINTS} endpoints, "
                      f"{m.clients} proxies)", f"{peak / 2**20:.0f} MB (VmHWM)", peak <= 400 * 2**20))
        g.append(Goal("P6", f"initial sync of {m.clients} proxies (mixed SotW/delta) <= 10 s",
                      f"{m.sync_s:.2f} s", m.sync_s <= 10))
    else:
        g += [Goal("P5", "peak RSS <= 400 MB", "not measured", None),
              Goal("P6", "initial sync <= 10 s", "not measured", None)]
    w2 = res.get("workers2")
    if m and w2 and w2.sync_s:
        ratio = _ratio(m.sync_s, w2.sync_s)
        # What this machine allows at best: the one-worker run's server + client CPU spread
        # over every core (the simulated clients need about as much CPU as the server).
        cores = os.cpu_count() or 1
        bound = _ratio(m.sync_s, (m.sync_cpu + m.sync_client_cpu) / cores)
        g.append(Goal("P7", f"full-sync throughput, --workers 2 vs 1 >= 1.6x ({m.clients} proxies, "
                      f"clients in a separate process)",
                      f"{ratio:.2f}x ({m.sync_s:.2f} s vs {w2.sync_s:.2f} s; CPU server {m.sync_cpu:.1f} vs "
                      f"{w2.sync_cpu:.1f} s, clients {m.sync_client_cpu:.1f} vs {w2.sync_client_cpu:.1f} s; "
                      f"best possible on {cores} cores {bound:.2f}x)", ratio >= 1.6))
    else:
        g.append(Goal("P7", "--workers 2 sync throughput >= 1.6x", "not measured", None))
    ml, sv = envoy.get("meshline"), envoy.get("sovereign")
    if ml and sv and ml.propagation and sv.propagation:
        speed = _ratio(R.median(sv.propagation), R.median(ml.propagation))
        cpu = _ratio(ml.cpu_window, sv.cpu_window)
        g.append(Goal("P8a", f"update propagation to one Envoy ({ml.clusters} clusters): Meshline >= 5x faster "
                      "than sovereign (p50)",
                      f"{speed:.1f}x ({R.median(ml.propagation) * 1000:.0f} ms vs "
                      f"{R.median(sv.propagation) * 1000:.0f} ms)", speed >= 5))
        g.append(Goal("P8b", "control-plane CPU over the same change window <= 0.5x sovereign's",
                      f"{cpu:.2f}x ({ml.cpu_window:.2f} s vs {sv.cpu_window:.2f} s in {ml.window_s:.0f} s)",
                      cpu <= 0.5))
    else:
        g.append(Goal("P8", "vs sovereign: >= 5x faster, <= 0.5x CPU", "not measured", None))
    sp = p9_split(ml.split) if ml else None
    if sp is not None:
        g.append(Goal("P9", f"Meshline's share of CDS request -> CDS ACK for one Envoy ({ml.clusters if ml else 0} "
                      "clusters + endpoints) <= 20%",
                      f"{sp['share'] * 100:.0f}% ({sp['meshline'] * 1000:.0f} of {sp['total'] * 1000:.0f} ms; "
                      f"by CPU {sp['cpu_share'] * 100:.0f}%)", sp["share"] <= 0.20))
    else:
        g.append(Goal("P9", "Meshline's share of CDS->ACK <= 20%", "not measured", None))
    return g


def goal_table(goals: list[Goal], plan: Plan, suite: str, elapsed: float, head: str = "Goals (issue 8)") -> str:
    head = f"\n{head}, suite {suite}" + (" - REDUCED SIZES, not the goal sizes" if suite == "quick" else "")
    rows = [(g.id, g.goal, g.measured, "PASS" if g.ok else "MISS" if g.ok is False else "n/a") for g in goals]
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [head, f"  {'id':<{w[0]}}  {'goal':<{w[1]}}  {'measured':<{w[2]}}  result"]
    lines += [f"  {a:<{w[0]}}  {b:<{w[1]}}  {c:<{w[2]}}  {d}" for a, b, c, d in rows]
    lines.append(f"  ({sum(g.ok is True for g in goals)} PASS, {sum(g.ok is False for g in goals)} MISS; "
                 f"suite took {elapsed:.0f} s)")
    return "\n".join(lines)


def envoy_table(envoy: dict[str, real_envoy.PeerResult]) -> str:
    if not envoy:
        return ""
    lines = ["\nOne real Envoy (P8, P9):"]
    for name, r in envoy.items():
        lines.append(f"  {name:<10} clusters {r.clusters}: Envoy initial sync {r.sync_s:.2f} s; propagation p50 "
                     f"{R.median(r.propagation) * 1000:.0f} ms, max {max(r.propagation, default=math.nan) * 1000:.0f}"
                     f" ms ({len(r.propagation)} changes); CPU in the {r.window_s:.0f} s change window: control "
                     f"plane {r.cpu_window:.2f} s, Envoy {r.envoy_cpu_window:.2f} s; control-plane RSS "
                     f"{r.rss_peak / 2**20:.0f} MB")
    ml = envoy.get("meshline")
    sp = p9_split(ml.split) if ml else None
    if sp is not None:
        lines.append(
            f"  P9 timeline (CDS request -> clusters warm = CDS ACK), {sp['total'] * 1000:.0f} ms: Meshline builds "
            f"and sends CDS {sp['cds_build'] * 1000:.0f} ms | Envoy applies CDS {sp['envoy_cds'] * 1000:.0f} ms | "
            f"Meshline answers EDS {sp['eds_build'] * 1000:.0f} ms | Envoy applies EDS and warms "
            f"{sp['envoy_warm'] * 1000:.0f} ms")
    return "\n".join(lines)


def plot(sweep: list[tuple[int, R.Result]], services: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [n for n, _ in sweep]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    ax.plot(ns, [R.median(r.lat_last) * 1000 for _, r in sweep], "o-", label="p50")
    ax.plot(ns, [R.pct(r.lat_last, 99) * 1000 for _, r in sweep], "s-", label="p99")
    ax.plot(ns, [R.median(r.lat_first) * 1000 for _, r in sweep], "^:", label="p50, first proxy")
    ax.axhline(150, color="grey", linestyle="--", linewidth=1, label="P1 goal (p99 150 ms)")
    ax.set_xscale("log")
    ax.set_xticks(ns, [f"{n:,}" for n in ns])
    ax.set_xlabel("delta proxies (simulated, separate process)")
    ax.set_ylabel("EndpointSlice write -> last ACK (ms)")
    ax.set_title(f"One endpoint change, {services:,} services, debounce 100 ms", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
