"""Run `meshline` (controlplane.cli) with a phase-switchable cProfile, for bench/run.py
--profile. Does file I/O (writes profiles) besides whatever the CLI does.

SIGUSR1 starts profiling the main thread (where the asyncio loop runs); SIGUSR2 stops it
and writes the profile to `$MESHLINE_BENCH_PROFILE_OUT.<n>` (n = 0, 1, ...), so the
benchmark can profile its phases (initial sync, endpoint changes) separately.

    python bench/profserve.py serve --config-dir DIR ...
"""

from __future__ import annotations

import cProfile
import os
import signal
import sys
from types import FrameType


class PhaseProfiler:
    def __init__(self, out: str) -> None:
        self.out = out
        self.prof: cProfile.Profile | None = None
        self.dumped = 0

    def start(self, _sig: int, _frame: FrameType | None) -> None:
        if self.prof is None:
            self.prof = cProfile.Profile()
            self.prof.enable()

    def stop(self, _sig: int, _frame: FrameType | None) -> None:
        if self.prof is None:
            return
        self.prof.disable()
        path = f"{self.out}.{self.dumped}"
        self.prof.dump_stats(path + ".part")
        os.replace(path + ".part", path)  # the benchmark waits for the final name
        self.dumped += 1
        self.prof = None


def main() -> None:
    profiler = PhaseProfiler(os.environ.get("MESHLINE_BENCH_PROFILE_OUT", "meshline.prof"))
    signal.signal(signal.SIGUSR1, profiler.start)
    signal.signal(signal.SIGUSR2, profiler.stop)
    from controlplane.cli import main as cli

    sys.argv[0] = "meshline"
    cli()


if __name__ == "__main__":
    main()
