"""xDS scale benchmark (`make bench`): `meshline serve` on a generated mesh of S services
x E endpoints, N simulated ADS clients (bench/simclients.py, half delta, half SotW) in a
separate process, then K single-endpoint changes. Does process, file and network I/O.

Per (S, N) it measures the initial sync (until every client holds clusters, endpoints,
listeners and routes), the latency from an EndpointSlice file write to the LAST client
ACKing the changed ClusterLoadAssignment, control-plane CPU (psutil user+system) and peak
RSS, and serializations per change (the `meshline_resource_serializations` gauge). Per
the project's benchmark convention the headline numbers are ratios from one run; the
absolute times are printed to explain them, not as goals.

    .venv/bin/python bench/run.py                  # (100,100) and (1000,1000)
    .venv/bin/python bench/run.py --only 100,100   # one size
    .venv/bin/python bench/run.py --quick          # (100,100), 5 changes
    .venv/bin/python bench/run.py --profile        # also cProfile the control plane per
                                                   # phase (or MESHLINE_BENCH_PROFILE=1)
    .venv/bin/python bench/run.py --suite full     # the goal scenarios P1-P9 of issue 8 and a
    .venv/bin/python bench/run.py --suite quick    # PASS/MISS table (bench/suite.py); quick
                                                   # runs reduced sizes in under a minute
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

import harness as H
from harness import BenchError, Case, Children, Result, report
from harness import die_with_parent as die_with_parent  # (bench/floor.py imports it from here)
from suite import run_suite


# --------------------------------------------------------------------------- main
def _counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected proxy counts like 100,300, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected positive proxy counts like 100,300, got {text!r}")
    return counts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Meshline xDS scale benchmark")
    p.add_argument("--only", help="one size S,N (services,clients), e.g. 100,100")
    p.add_argument("--quick", action="store_true", help="(100,100) only and 5 changes")
    p.add_argument("--mix", choices=["mixed", "delta", "sotw"], default="mixed",
                   help="the size grid's client protocols (default: mixed)")
    p.add_argument("--changes", type=int, default=None, help="endpoint changes per size (default 20)")
    p.add_argument("--profile", action="store_true", default=bool(os.environ.get("MESHLINE_BENCH_PROFILE")),
                   help="run the control plane under cProfile and print its top functions")
    p.add_argument("--keep", action="store_true", help="keep the temp dirs (mesh, logs, profile)")
    p.add_argument("--ready-timeout", type=float, default=120.0)
    p.add_argument("--sync-timeout", type=float, default=None, help="default scales with S*N")
    p.add_argument("--change-timeout", type=float, default=60.0)
    p.add_argument("--suite", choices=["full", "quick", "peers"], default=None,
                   help="run the goal scenarios P1-P9 (bench/suite.py) instead of the size grid")
    p.add_argument("--peer", choices=["sovereign", "none"], default="sovereign",
                   help="with --suite: the peer control plane for P8 (none: skip P8)")
    p.add_argument("--compare", default="go-control-plane",
                   help="with --suite full: the Go control planes to run on the same simulated proxies "
                        "(comma-separated: go-control-plane, istiod; none: skip the comparison)")
    p.add_argument("--sweep", type=_counts, default=None,
                   help="with --suite: the sweep's and the comparison's proxy counts, e.g. 100,300 "
                        "(default: the suite's, 100,300,1000 for full and peers)")
    p.add_argument("--plot", type=Path, default=None, help="with --suite full: write the convergence plot here")
    p.add_argument("--results", type=Path, default=None, help="with --suite: write the results as JSON here")
    args = p.parse_args(argv)
    if args.only:
        try:
            s, n = (int(x) for x in args.only.split(","))
        except ValueError:
            p.error("--only takes S,N, e.g. --only 1000,1000")
        args.sizes = [(s, n)]
    else:
        args.sizes = [H.SIZES[0]] if args.quick else list(H.SIZES)
    if args.changes is None:
        args.changes = 5 if args.quick else 20
    return args


async def amain(args: argparse.Namespace, children: Children) -> int:
    if args.suite is not None:
        return await run_suite(args, children)
    results: list[Result] = []
    try:
        for s, n in args.sizes:
            print(f"running S={s} services x N={n} clients ({H.ENDPOINTS} endpoints each, "
                  f"{args.changes} changes)...", file=sys.stderr, flush=True)
            results.append(await Case(args, children, s, n, mix=args.mix).run())
    except BenchError as exc:
        print(f"\nbenchmark failed: {exc}", file=sys.stderr)
        if results:
            print(report(results, args.changes))
        return 1
    finally:
        await children.stop_all()
    print(report(results, args.changes))
    for r in results:
        for phase, text in r.profiles.items():
            print(f"\ncProfile of the control plane, S={r.services} N={r.clients}, {phase} "
                  f"(times inflated by the profiler):\n{text}")
    return 0


def main() -> int:
    args = parse_args()
    children = Children()
    loop = asyncio.new_event_loop()
    task = loop.create_task(amain(args, children))
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        loop.add_signal_handler(signal.SIGINT, task.cancel)
    try:
        return loop.run_until_complete(task)
    except asyncio.CancelledError:
        print("\ninterrupted; stopped every process the benchmark started", file=sys.stderr)
        return 130
    finally:
        children.kill_now()
        loop.close()


if __name__ == "__main__":
    sys.exit(main())
