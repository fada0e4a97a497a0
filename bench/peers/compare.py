"""Meshline against the Go control planes on the same simulated proxies (issue 20): the
comparison table, its goals (ratios in one run) and its plot, from bench/harness.py
Results. Pure, except `plot` (writes a PNG).

Results are keyed "<control plane>/<mix>/<N>"; the control plane's CPU, RSS and bytes are
its own process's; the simulated clients (one process, sharing the same 2 cores) are shown
beside them in every row.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import harness as R

MESHLINE = "meshline"


def key(cp: str, mix: str, n: int) -> str:
    return f"{cp}/{mix}/{n}"


def bytes_per_change(r: R.Result) -> float:
    return sum(r.client_bytes_per_change.values())


def cpu_change(r: R.Result) -> float:
    return R.median(r.change_cpu_net) if r.change_cpu_net else math.nan


def peak(r: R.Result) -> float:
    return float(r.vm_hwm or r.rss_peak)


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


FLOOR = "gRPC floor (P1f)"


def floor_cells(floor: dict[str, Any]) -> tuple[str, str, str]:
    """p50, p99 of the last reply and the CPU per round of bench/floor.py's bare fan-out."""
    return (R.fmt_ms(statistics.median(floor["lat"])), R.fmt_ms(R.pct(floor["lat"], 99)),
            f"{statistics.median(floor['cpu']) * 1000:.0f} ms")


def table(res: dict[str, R.Result], sweep: tuple[int, ...], peers: list[str],
          floors: dict[int, dict[str, Any]] | None = None,
          sotw_floors: dict[int, dict[str, Any]] | None = None) -> str:
    """One row per (mix, N, control plane), with the ratio to Meshline for each peer; with
    `floors` (bench/floor.py at that N, same run) a context row: the bare gRPC fan-out to the
    same number of streams (no xDS logic, no file watch, no rebuild; a slow machine shows
    there as a slower floor, not as a regression). `sotw_floors`: the same with SotW-sized
    ACKs (every name repeated), for the SotW rows."""
    head = ("mix", "N", "control plane", "sync", "CPU sync", "p50", "p99", "first p50", "CPU/change", "peak RSS",
            "bytes/change", "clients CPU/change", "clients RSS")
    rows: list[tuple[str, ...]] = []
    for mix in ("delta", "sotw"):
        for n in sweep:
            ml = res.get(key(MESHLINE, mix, n))
            for cp in (MESHLINE, *peers):
                r = res.get(key(cp, mix, n))
                if r is None or not r.lat_last:
                    rows.append((mix, str(n), cp, *(["-"] * (len(head) - 3))))
                    continue
                cells = [f"{r.sync_s:.2f} s", f"{r.sync_cpu:.2f} s", R.fmt_ms(R.median(r.lat_last)),
                         R.fmt_ms(R.pct(r.lat_last, 99)), R.fmt_ms(R.median(r.lat_first)),
                         f"{cpu_change(r) * 1000:.0f} ms", R.fmt_mb(peak(r)),
                         f"{bytes_per_change(r) / 1024:.0f} KB", f"{R.median(r.client_cpu) * 1000:.0f} ms",
                         R.fmt_mb(r.client_rss_peak)]
                if cp != MESHLINE and ml is not None and ml.lat_last:
                    cells[3] += f" (ML {_ratio(R.pct(ml.lat_last, 99), R.pct(r.lat_last, 99)):.2f}x)"
                    cells[5] += f" (ML {_ratio(cpu_change(ml), cpu_change(r)):.2f}x)"
                    cells[6] += f" (ML {_ratio(peak(ml), peak(r)):.2f}x)"
                rows.append((mix, str(n), cp, *cells))
            floor = ((sotw_floors if mix == "sotw" and sotw_floors else floors) or {}).get(n)
            if floor and floor.get("lat"):
                p50, p99, cpu = floor_cells(floor)
                rows.append((mix, str(n), FLOOR, "-", "-", p50, p99, "-", cpu, *(["-"] * (len(head) - 9))))
    w = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    lines = ["\nMeshline vs Go control planes, same simulated proxies, same run (ML Nx = Meshline's value / "
             "the peer's; p50/p99: change -> last ACK; first p50: change -> first ACK, i.e. the trigger path "
             "(Meshline: file write, watch, quiet window, rebuild; the peer: an HTTP POST); CPU/change net of "
             "idle; peak RSS = VmHWM):"]
    lines += ["  " + "  ".join(c.ljust(w[i]) for i, c in enumerate(x)) for x in [head, *rows]]
    return "\n".join(lines)


def goals(res: dict[str, R.Result], sweep: tuple[int, ...], peer: str) -> list[tuple[str, str, str, bool | None]]:
    """(id, goal, measured, ok) for Meshline against `peer` at the largest N, delta and SotW."""
    out: list[tuple[str, str, str, bool | None]] = []
    n = max(sweep)
    for mix in ("delta", "sotw"):
        ml, pr = res.get(key(MESHLINE, mix, n)), res.get(key(peer, mix, n))
        tag = f"{n} {mix} proxies"
        if not (ml and pr and ml.lat_last and pr.lat_last):
            out.append((f"G-{mix}", f"vs {peer}, {tag}", "not measured", None))
            continue
        a, b = R.pct(ml.lat_last, 99), R.pct(pr.lat_last, 99)
        out.append((f"G1-{mix}", f"change -> last ACK p99 <= {peer}'s ({tag})",
                    f"{_ratio(a, b):.2f}x ({a * 1000:.0f} vs {b * 1000:.0f} ms)", a <= b))
        a, b = cpu_change(ml), cpu_change(pr)
        out.append((f"G2-{mix}", f"control-plane CPU per change <= 1.5x {peer}'s ({tag})",
                    f"{_ratio(a, b):.2f}x ({a * 1000:.0f} vs {b * 1000:.0f} ms)", a <= 1.5 * b))
        a, b = peak(ml), peak(pr)
        out.append((f"G3-{mix}", f"control-plane peak RSS <= {peer}'s ({tag})",
                    f"{_ratio(a, b):.2f}x ({a / 2**20:.0f} vs {b / 2**20:.0f} MB)", a <= b))
    return out


def plot(res: dict[str, R.Result], sweep: tuple[int, ...], peers: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12.0, 3.8), dpi=100)
    style = {"delta": "-", "sotw": "--"}
    for cp, colour in zip((MESHLINE, *peers), ("tab:blue", "tab:orange", "tab:green"), strict=False):
        for mix in ("delta", "sotw"):
            pts = [(n, r) for n in sweep if (r := res.get(key(cp, mix, n))) is not None and r.lat_last]
            if not pts:
                continue
            ns = [n for n, _ in pts]
            kw = {"color": colour, "linestyle": style[mix], "marker": "o", "label": f"{cp} {mix}"}
            axes[0].plot(ns, [R.pct(r.lat_last, 99) * 1000 for _, r in pts], **kw)
            axes[1].plot(ns, [cpu_change(r) * 1000 for _, r in pts], **kw)
            axes[2].plot(ns, [peak(r) / 2**20 for _, r in pts], **kw)
    for ax, ylabel in zip(axes, ("change -> last ACK p99 (ms)", "CPU per change (ms)", "peak RSS (MB)"),
                          strict=True):
        ax.set_xscale("log")
        ax.set_xticks(list(sweep), [f"{n:,}" for n in sweep])
        ax.set_xlabel("simulated proxies")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("One endpoint change, 1,000 services x 10 endpoints, same simulated proxies, same run", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def markdown(res: dict[str, R.Result], sweep: tuple[int, ...], peers: list[str],
             floors: dict[int, dict[str, Any]] | None = None,
             sotw_floors: dict[int, dict[str, Any]] | None = None) -> str:
    """The comparison as a Markdown table (for docs/benchmarks.md), with the floor rows of `table`."""
    lines = ["| proxies | control plane | initial sync (CPU) | change -> last ACK p50 / p99 | change -> first ACK "
             "p50 (trigger path) | CPU per change | peak RSS | bytes per change (all proxies) "
             "| simulated clients: CPU per change, RSS |",
             "|---|---|---|---|---|---|---|---|---|"]
    for mix in ("delta", "sotw"):
        for n in sweep:
            ml = res.get(key(MESHLINE, mix, n))
            for cp in (MESHLINE, *peers):
                r = res.get(key(cp, mix, n))
                if r is None or not r.lat_last:
                    lines.append(f"| {n:,} {mix} | {cp} | not measured | | | | | | |")
                    continue
                p99 = R.pct(r.lat_last, 99)
                rel = ""
                if cp != MESHLINE and ml is not None and ml.lat_last:
                    rel = (f" (Meshline {_ratio(R.pct(ml.lat_last, 99), p99):.2f}x, CPU "
                           f"{_ratio(cpu_change(ml), cpu_change(r)):.2f}x, RSS {_ratio(peak(ml), peak(r)):.2f}x)")
                lines.append(
                    f"| {n:,} {mix} | {cp}{rel} | {r.sync_s:.1f} s ({r.sync_cpu:.1f} s) | "
                    f"{R.median(r.lat_last) * 1000:.0f} / {p99 * 1000:.0f} ms | {R.median(r.lat_first) * 1000:.0f} ms | "
                    f"{cpu_change(r) * 1000:.0f} ms | "
                    f"{peak(r) / 2**20:.0f} MB | {bytes_per_change(r) / 1024:.0f} KB | "
                    f"{R.median(r.client_cpu) * 1000:.0f} ms, {r.client_rss_peak / 2**20:.0f} MB |")
            floor = ((sotw_floors if mix == "sotw" and sotw_floors else floors) or {}).get(n)
            if floor and floor.get("lat"):
                p50, p99, cpu = floor_cells(floor)
                lines.append(f"| {n:,} {mix} | {FLOOR}: bare grpc.aio fan-out, same N | - | {p50} / {p99} | - | "
                             f"{cpu} | - | {floor['payload']} B per stream, {floor.get('reply', 80)} B replies | - |")
    return "\n".join(lines)
