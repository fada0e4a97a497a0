"""`make run`: Meshline on the bundled sample mesh with a real Envoy sidecar.

Starts `meshline serve` on samples/bookinfo, the sample backends on 127.0.0.x:9080 and one
Envoy sidecar in bind capture (its listener is 127.0.0.1:9080), prints curl commands to
try, and stops everything on Ctrl-C.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from demo import ROOT, bootstrap, control_plane, run_until_stopped

from controlplane.localrun import start_envoy, wait_http, wait_port


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="meshline-demo-"))
    with control_plane(work, [ROOT / "samples" / "bookinfo"]) as procs:
        boot = bootstrap("--node-id", "sidecar~bookinfo/demo-client", "--namespace", "bookinfo",
                         "--workload", "demo-client", "--labels", "app=demo-client", "--capture", "bind",
                         "--ca-dir", str(work / "ca"))  # a bootstrap token: the sidecar gets its certificate
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
        code = run_until_stopped(procs, work)
    print("\nstopped Envoy, the backends and meshline.")
    return code


if __name__ == "__main__":
    sys.exit(main())
