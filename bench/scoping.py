"""Config bytes per proxy with and without Sidecar scoping (issue 8). No servers, no I/O
beyond printing: a generated mesh (by default 1,000 services x 10 endpoints in 10
namespaces) goes through conversion, `assemble` and the same planners, shared-layer key
and snapshot builder `meshline serve` uses (`controlplane.translate.proxy`,
`controlplane.cache.snapshot`); a proxy's config size is the sum of the serialized bytes
of every resource in its snapshot (what a full sync sends it, before xDS framing).

    .venv/bin/python bench/scoping.py
    .venv/bin/python bench/scoping.py --services 10000 --namespaces 100 --endpoints 10

Scenarios: no Sidecar; a mesh-default Sidecar (root namespace, no selector) with `./*`
(each proxy gets its own namespace); `./*` plus one other namespace. Per the benchmark
convention the comparisons are ratios to the unscoped run; rebuild CPU is measured in the
same run.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from controlplane.cache.snapshot import Snapshot, SnapshotBuilder
from controlplane.model.convert import convert
from controlplane.model.ir import DEFAULT_ROOT_NAMESPACE, ProxyMeta, labels_of
from controlplane.model.mesh import Mesh
from controlplane.model.raw import RawObject
from controlplane.model.store import assemble
from controlplane.translate.plan import CLUSTER, ENDPOINT, LISTENER, ROUTE
from controlplane.translate.proxy import plan_own, plan_shared, shared_key

PORT = 8080


def namespace_name(n: int) -> str:
    return f"ns-{n:02d}"


def mesh_objects(services: int, namespaces: int, endpoints: int) -> Iterable[RawObject]:
    """Namespaces, and per service one HTTP Service and one EndpointSlice (10.x addresses)."""
    for n in range(namespaces):
        name = namespace_name(n)
        yield RawObject("Namespace", "v1", "", name, {"apiVersion": "v1", "kind": "Namespace",
                                                     "metadata": {"name": name}})
    for s in range(services):
        ns, name = namespace_name(s % namespaces), f"svc-{s:05d}"
        yield RawObject("Service", "v1", ns, name, {
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": PORT, "targetPort": PORT}]},
        })
        yield RawObject("EndpointSlice", "discovery.k8s.io/v1", ns, f"{name}-1", {
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-1", "namespace": ns, "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": PORT}],
            "endpoints": [{"addresses": [f"10.{(s >> 8) & 255}.{s & 255}.{e + 1}"], "conditions": {"ready": True}}
                          for e in range(endpoints)],
        })


def sidecar_object(hosts: list[str]) -> RawObject:
    body: dict[str, Any] = {
        "apiVersion": "networking.meshline.io/v1", "kind": "Sidecar",
        "metadata": {"name": "default", "namespace": DEFAULT_ROOT_NAMESPACE},
        "spec": {"egress": [{"hosts": hosts}]},
    }
    return RawObject("Sidecar", body["apiVersion"], DEFAULT_ROOT_NAMESPACE, "default", body)


def build_mesh(objects: Iterable[RawObject]) -> Mesh:
    values = []
    for raw in objects:
        value, issues = convert(raw)
        errors = [i.format() for i in issues if i.severity == "error"]
        if errors:
            raise SystemExit("\n".join(errors))
        values.append(value)
    return assemble(v for v in values if v is not None)


@dataclass
class Result:
    scenario: str
    proxies: int
    shared_layers: int
    counts: dict[str, float]  # per proxy, by type
    bytes_per_proxy: float
    unique_bytes: int  # bytes of all distinct resources held by the cache
    rebuild_cpu: float


def proxies_of(namespaces: int, per_namespace: int) -> list[ProxyMeta]:
    return [
        ProxyMeta(f"client-{w}.{namespace_name(n)}", namespace=namespace_name(n), workload=f"client-{w}",
                  labels=labels_of({"app": f"client-{w}"}))
        for n in range(namespaces) for w in range(per_namespace)
    ]


def snapshot_bytes(snap: Snapshot) -> int:
    return sum(len(r.body) for tr in snap.types.values() for r in tr.items.values())


def measure(scenario: str, mesh: Mesh, proxies: list[ProxyMeta]) -> Result:
    cpu = float("inf")
    for _ in range(3):  # fresh builders (nothing memoized); the least noisy of three runs
        builder = SnapshotBuilder(plan_shared, plan_own, lambda meta: shared_key(mesh, meta))
        t0 = time.process_time()
        snaps = builder.rebuild(mesh, proxies)
        cpu = min(cpu, time.process_time() - t0)
    layers = {id(s.types[CLUSTER]) for s in snaps.values() if CLUSTER in s.types}
    unique: dict[int, int] = {}
    for s in snaps.values():
        for tr in s.types.values():
            for r in tr.items.values():
                unique[id(r)] = len(r.body)
    n = len(snaps)
    counts = {}
    for label, t in (("clusters", CLUSTER), ("endpoints", ENDPOINT), ("listeners", LISTENER)):
        counts[label] = sum(len(s.types[t].items) if t in s.types else 0 for s in snaps.values()) / n
    counts["vhosts"] = sum(_vhosts(s) for s in snaps.values()) / n
    total = sum(snapshot_bytes(s) for s in snaps.values())
    return Result(scenario, n, len(layers), counts, total / n, sum(unique.values()), cpu)


def _vhosts(snap: Snapshot) -> int:
    from envoy.config.route.v3 import route_pb2

    tr = snap.types.get(ROUTE)
    if tr is None:
        return 0
    return sum(len(route_pb2.RouteConfiguration.FromString(r.body).virtual_hosts) for r in tr.items.values())


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--namespaces", type=int, default=10)
    ap.add_argument("--endpoints", type=int, default=10)
    ap.add_argument("--proxies-per-namespace", type=int, default=2)
    args = ap.parse_args()
    base = list(mesh_objects(args.services, args.namespaces, args.endpoints))
    proxies = proxies_of(args.namespaces, args.proxies_per_namespace)
    other = namespace_name(1 % args.namespaces)
    scenarios = [
        ("no Sidecar", base),
        ("./*", [*base, sidecar_object(["./*"])]),
        (f"./* + {other}/*", [*base, sidecar_object(["./*", f"{other}/*"])]),
    ]
    results = [measure(name, build_mesh(objs), proxies) for name, objs in scenarios]
    ref = results[0]
    print(f"mesh: {args.services} services x {args.endpoints} endpoints in {args.namespaces} namespaces; "
          f"{len(proxies)} sidecar proxies ({args.proxies_per_namespace} per namespace, bind capture)")
    print("Sidecar: mesh default (root namespace, no selector) with the egress hosts shown\n")
    header = ("egress hosts", "shared layers", "clusters", "endpoints", "listeners", "vhosts",
              "bytes/proxy", "vs none", "cache bytes", "vs none", "rebuild CPU vs none")
    rows = [header]
    for r in results:
        rows.append((
            r.scenario, str(r.shared_layers), f"{r.counts['clusters']:.0f}", f"{r.counts['endpoints']:.0f}",
            f"{r.counts['listeners']:.0f}", f"{r.counts['vhosts']:.0f}", human(r.bytes_per_proxy),
            f"{r.bytes_per_proxy / ref.bytes_per_proxy:.3f}", human(r.unique_bytes),
            f"{r.unique_bytes / ref.unique_bytes:.3f}", f"{r.rebuild_cpu / ref.rebuild_cpu:.2f}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths, strict=True))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("\nclusters/endpoints/listeners/vhosts: per proxy; bytes/proxy: serialized resources of one proxy's "
          "snapshot;\ncache bytes: every distinct resource held once for all proxies; rebuild CPU: one full "
          f"rebuild of all snapshots (none: {ref.rebuild_cpu:.2f} s)")


if __name__ == "__main__":
    main()
