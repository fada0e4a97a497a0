"""What pre-flight costs, per change class, measured in one run (in-process, real Envoy in
validate mode, no gRPC): the time from a change reaching the store to the snapshots being
published, with pre-flight on vs. off, on the same mesh. Endpoint changes must stay on their
fast path (ratio ~1); object changes pay one `envoy --mode validate` run over the resources
that changed. Also: the first full check of a whole mesh (start-up), and a bad
VirtualService among three changed at once (bisection).

    python bench/preflight.py [--services 200] [--rounds 7] [--doc docs/preflight.md]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from controlplane.model.ir import ProxyMeta  # noqa: E402
from controlplane.runtime import Runtime, Settings  # noqa: E402
from controlplane.sources.base import Replace  # noqa: E402
from controlplane.sources.yamlload import parse_documents  # noqa: E402
from controlplane.xds.server import Connection  # noqa: E402
from controlplane.xds.stream import AdsStream  # noqa: E402

NS = "bench"


def mesh_docs(services: int, tweak: dict[str, str]) -> str:
    out = [f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n"]
    for i in range(services):
        name = f"svc-{i:04d}"
        ip = f"10.{i // 250}.{i % 250}.{1 + (1 if tweak.get('ep') == name else 0)}"
        out.append(f"""apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {NS}}}
spec:
  selector: {{app: {name}}}
  ports: [{{name: http, port: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: {NS}, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints: [{{addresses: ["{ip}"], conditions: {{ready: true}}}}]
---
apiVersion: networking.meshline.io/v1
kind: VirtualService
metadata: {{name: {name}, namespace: {NS}}}
spec:
  hosts: [{name}]
  http:
  - route:
    - destination: {{host: {name}}}
    headers:
      request:
        set: {{x-v: "{tweak.get('vs', 'v0') if tweak.get('vs_name') == name else 'v0'}"}}
---
apiVersion: networking.meshline.io/v1
kind: DestinationRule
metadata: {{name: {name}, namespace: {NS}}}
spec:
  host: {name}
  trafficPolicy:
    connectionPool: {{tcp: {{maxConnections: {tweak.get('dr', '100') if tweak.get('dr_name') == name else '100'}}}}}
""")
    out.append(f"""apiVersion: v1
kind: Pod
metadata: {{name: svc-0000-0, namespace: {NS}, labels: {{app: svc-0000}}}}
spec: {{containers: [{{name: app, image: x, ports: [{{containerPort: 8080}}]}}]}}
status: {{podIP: 10.0.0.1}}
""")
    out.append(f"""apiVersion: security.meshline.io/v1
kind: AuthorizationPolicy
metadata: {{name: allow, namespace: {NS}}}
spec:
  action: ALLOW
  rules:
  - to:
    - operation: {{paths: ["{tweak.get('ap', '/api')}*"]}}
""")
    return "---\n".join(out)


def event(text: str) -> Replace:
    objs, errors = parse_documents(text, "mesh.yaml")
    assert not errors, errors[:3]
    return Replace("mesh.yaml", tuple(objs), ())


async def runtime(preflight: bool, services: int) -> Runtime:
    rt = Runtime(Settings(preflight=preflight), [])
    for i, wl in enumerate(["client", "svc-0000-0"]):
        meta = ProxyMeta(node_id=wl, namespace=NS, workload=wl, labels=(("app", "svc-0000"),) if i else (),
                         capture="bind")
        rt.xds.connections[i + 1] = Connection(meta, AdsStream("delta", i + 1))
    rt._synced.add("bench")
    rt.sources = [type("S", (), {"name": "bench"})()]  # type: ignore[list-item]
    rt.store.apply([event(mesh_docs(services, {}))])
    t0 = time.perf_counter()
    await rt.rebuild_checked()
    rt.startup_s = time.perf_counter() - t0  # type: ignore[attr-defined]
    return rt


async def timed(rt: Runtime, text: str) -> float:
    rt.store.apply([event(text)])
    t0 = time.perf_counter()
    await rt.rebuild_checked()
    return time.perf_counter() - t0


CLASSES = {
    "endpoint (EndpointSlice)": lambda r: {"ep": f"svc-{r % 50:04d}"},
    "VirtualService": lambda r: {"vs_name": f"svc-{r % 50:04d}", "vs": f"v{r + 1}"},
    "DestinationRule": lambda r: {"dr_name": f"svc-{r % 50:04d}", "dr": str(200 + r)},
    "AuthorizationPolicy": lambda r: {"ap": f"/api{r + 1}"},
}


async def main(services: int, rounds: int) -> list[tuple[str, float, float]]:
    on, off = await runtime(True, services), await runtime(False, services)
    rows = [("start-up: whole mesh", on.startup_s * 1000, off.startup_s * 1000)]  # type: ignore[attr-defined]
    for name, tweak in CLASSES.items():
        t_on, t_off = [], []
        for r in range(rounds):
            text = mesh_docs(services, tweak(r))
            t_off.append(await timed(off, text))
            t_on.append(await timed(on, text))
            back = mesh_docs(services, {})
            await timed(off, back)
            await timed(on, back)
        rows.append((name, statistics.median(t_on) * 1000, statistics.median(t_off) * 1000))
    # A bad VirtualService among three changed at once: pre-flight finds it (bisection).
    bad = mesh_docs(services, {}).replace('set: {x-v: "v0"}', 'set: {x-v: "%NO_SUCH%"}', 1)
    bad = bad.replace('maxConnections: 100', 'maxConnections: 101', 2)
    runs = on.validator.runs
    t = await timed(on, bad)
    assert list(on.store.quarantined()) == [("VirtualService", NS, "svc-0000")], on.store.quarantined()
    rows.append((f"bad VirtualService among 3 changes (found in {on.validator.runs - runs} Envoy runs)",
                 t * 1000, float("nan")))
    return rows


def render(rows: list[tuple[str, float, float]], services: int) -> str:
    lines = [f"Pre-flight cost per change class ({services} services with a VirtualService and a "
             "DestinationRule each, 2 sidecars; median of the rounds; same run, same mesh):", "",
             "| change | with pre-flight (ms) | without (ms) | ratio |", "|---|---:|---:|---:|"]
    for name, a, b in rows:
        ratio = f"{a / b:.2f}x" if b == b and b > 0 else "-"
        lines.append(f"| {name} | {a:.1f} | {'-' if b != b else f'{b:.1f}'} | {ratio} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--doc", type=Path, default=None)
    args = ap.parse_args()
    out = render(asyncio.run(main(args.services, args.rounds)), args.services)
    print(out)
    if args.doc:
        args.doc.write_text("# Pre-flight cost\n\nMeasured by `python bench/preflight.py` (part of `make bench`).\n\n"
                            + out)
