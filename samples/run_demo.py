"""`make run`: Meshline on the bundled sample mesh with a real Envoy sidecar.

Starts `meshline serve` on samples/bookinfo, the sample backends on 127.0.0.x:9080 and one
Envoy sidecar in bind capture (its listener is 127.0.0.1:9080), prints curl commands to
try, and stops everything on Ctrl-C.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from controlplane.localrun import start_envoy, stop, wait_http, wait_port  # noqa: E402

BACKENDS = [
    "productpage-v1=127.0.0.41:9080", "details-v1=127.0.0.31:9080", "ratings-v1=127.0.0.21:9080",
    "reviews-v1=127.0.0.11:9080", "reviews-v2=127.0.0.12:9080", "reviews-v3=127.0.0.13:9080",
]


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="meshline-demo-"))
    bindir = Path(sys.executable).parent
    meshline = str(bindir / "meshline")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        cp_log = open(work / "meshline.log", "wb")
        procs.append(subprocess.Popen(
            [meshline, "serve", "--config-dir", str(ROOT / "samples" / "bookinfo"), "--ca-dir", str(work / "ca"),
             "--xds-address", "127.0.0.1:15010", "--status-address", "127.0.0.1:15014"],
            stdout=cp_log, stderr=subprocess.STDOUT, start_new_session=True))
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "samples" / "backend.py"), *BACKENDS],
                                      stdout=subprocess.DEVNULL, start_new_session=True))
        wait_http("http://127.0.0.1:15014/readyz", proc=procs[0])
        boot = subprocess.run(
            [meshline, "bootstrap", "--node-id", "sidecar~bookinfo/demo-client", "--namespace", "bookinfo",
             "--workload", "demo-client", "--labels", "app=demo-client", "--capture", "bind",
             "--ca-dir", str(work / "ca")],  # a bootstrap token: the sidecar gets its certificate
            check=True, capture_output=True, text=True).stdout
        envoy = start_envoy(boot, work, "sidecar", log_level="warning")
        procs.append(envoy)
        wait_http("http://127.0.0.1:15000/ready", proc=envoy)
        wait_port("127.0.0.1", 9080)
        wait_http("http://127.0.0.1:9080/", ok=(200, 404, 503), timeout=10)  # routes are loaded
        print(f"""
Meshline is serving the sample mesh in samples/bookinfo to a real Envoy sidecar.
  control plane: xDS 127.0.0.1:15010, status http://127.0.0.1:15014/v1/proxies
  sidecar:       admin http://127.0.0.1:15000, outbound listener 127.0.0.1:9080
  logs:          {work}

Try:
  # weighted routing: reviews is split 50/30/20 across v1/v2/v3
  for i in $(seq 20); do curl -s -H 'Host: reviews.bookinfo' http://127.0.0.1:9080/ | grep -o '"reviews-v[0-9]"'; done | sort | uniq -c

  # header routing: end-user jason always reaches reviews v2
  curl -s -H 'Host: reviews.bookinfo' -H 'end-user: jason' http://127.0.0.1:9080/

  # fault injection: the sidecar aborts with 503 (or delays 1.5 s with x-chaos: slow)
  curl -si -H 'Host: ratings.bookinfo' -H 'x-chaos: abort' http://127.0.0.1:9080/

Edit samples/bookinfo/*.yaml while this runs: changes reach Envoy within a second.
Press Ctrl-C to stop.""", flush=True)
        stopped = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stopped.set())
        while not stopped.is_set():
            for p in procs:
                if p.poll() is not None:
                    print(f"a process exited unexpectedly ({p.args[0]}); see {work}", file=sys.stderr)
                    return 1
            stopped.wait(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for p in reversed(procs):
            stop(p)
        print("\nstopped Envoy, the backends and meshline.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
