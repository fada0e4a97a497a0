"""What `make run` and `make run-gateway` share: the control plane on config directories,
the sample backends, and the loop that keeps them until Ctrl-C or SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from controlplane.localrun import stop, wait_http  # noqa: E402

BACKENDS = [
    "productpage-v1=127.0.0.41:9080", "details-v1=127.0.0.31:9080", "ratings-v1=127.0.0.21:9080",
    "reviews-v1=127.0.0.11:9080", "reviews-v2=127.0.0.12:9080", "reviews-v3=127.0.0.13:9080",
]
MESHLINE = str(Path(sys.executable).parent / "meshline")


@contextmanager
def control_plane(work: Path, config_dirs: list[Path]) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`meshline serve` on `config_dirs` (xDS 127.0.0.1:15010, status 127.0.0.1:15014, CA in
    work/ca) and the sample backends, ready; yields the process list (append yours to it) and
    stops every process in it, newest first, on the way out."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        cp_log = open(work / "meshline.log", "wb")
        dirs = [arg for d in config_dirs for arg in ("--config-dir", str(d))]
        procs.append(subprocess.Popen(
            [MESHLINE, "serve", *dirs, "--ca-dir", str(work / "ca"),
             "--xds-address", "127.0.0.1:15010", "--status-address", "127.0.0.1:15014"],
            stdout=cp_log, stderr=subprocess.STDOUT, start_new_session=True))
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "samples" / "backend.py"), *BACKENDS],
                                      stdout=subprocess.DEVNULL, start_new_session=True))
        wait_http("http://127.0.0.1:15014/readyz", proc=procs[0])
        yield procs
    finally:
        for p in reversed(procs):
            stop(p)


def bootstrap(*args: str) -> str:
    """`meshline bootstrap ARGS`: the Envoy bootstrap it prints."""
    return subprocess.run([MESHLINE, "bootstrap", *args], check=True, capture_output=True, text=True).stdout


def run_until_stopped(procs: list[subprocess.Popen[bytes]], work: Path) -> int:
    """Wait for Ctrl-C or SIGTERM (0), or for a process to exit on its own (1, said on stderr)."""
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    try:
        while not stopped.is_set():
            for p in procs:
                if p.poll() is not None:
                    print(f"a process exited unexpectedly ({p.args[0]}); see {work}", file=sys.stderr)
                    return 1
            stopped.wait(0.5)
    except KeyboardInterrupt:
        pass
    return 0
