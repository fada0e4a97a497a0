"""Read-only REST status API (FastAPI): health, readiness, connected proxies, metrics.
Serves HTTP; reads the control plane through `status.view.StatusView` and changes nothing but
what an operator releases."""

from __future__ import annotations

import hmac
from collections import Counter
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from controlplane import __version__
from controlplane.gwstatus import gateway_views, route_views
from controlplane.status.dump import dump_resources
from controlplane.status.view import StatusView
from controlplane.translate.plan import PUSH_ORDER, SHORT_NAMES
from controlplane.xds.server import Connection
from controlplane.xds.stream import NackRecord


def _nack(n: NackRecord | None, quarantined: Collection[tuple[str, str, str]] = ()) -> dict[str, Any] | None:
    if n is None:
        return None
    return {
        "withheld": [s.display for s in n.sources if (s.kind, s.namespace, s.name) in quarantined],
        "version": n.version,
        "nonce": n.nonce,
        "message": n.message,
        "code": n.code,
        "time": n.at,
        "resources": list(n.resources),
        "sources": [
            {"object": s.display, **({"location": s.location} if s.file else {})} for s in n.sources
        ],
    }


def proxy_view(conn: Connection, quarantined: Collection[tuple[str, str, str]] = (),
               degraded: list[dict[str, object]] | None = None) -> dict[str, Any]:
    """A proxy's sync state. A type is NACKED while this proxy holds back a resource it
    rejected. The proxy is DEGRADED (never SYNCED) while it does not receive something it
    should: `degraded` lists what and why."""
    stream = conn.stream
    types: dict[str, Any] = {}
    overall = "SYNCED"
    rank = {"SYNCED": 0, "NOT_SENT": 1, "STALE": 2, "NACKED": 3}
    for t in PUSH_ORDER:
        v = stream.view(t)
        if v is None:
            continue
        state = v.state
        if v.last_nack is not None and state in ("SYNCED", "STALE") and any(
            (src.kind, src.namespace, src.name) in quarantined for src in v.last_nack.sources
        ):
            state = "NACKED"
        if rank[state] > rank[overall]:
            overall = state
        types[SHORT_NAMES[t]] = {
            "state": state,
            "subscribed": "*" if v.wildcard else sorted(v.subscribed),
            "version_sent": v.version_sent,
            "version_acked": v.version_acked,
            "nonce": v.nonce,
            "last_push": v.last_push or None,
            "resources": v.resources,
            "nacks": v.nacks,
            "last_nack": _nack(v.last_nack, quarantined),
        }
    m = conn.meta
    if degraded:
        overall = "DEGRADED"
    return {
        "id": m.node_id,
        "mode": m.mode,
        "namespace": m.namespace,
        "workload": m.workload,
        "service_account": m.service_account,
        # What the stream's token proved (None: unauthenticated, no certificates).
        "identity": {"namespace": conn.identity.namespace, "service_account": conn.identity.service_account}
        if conn.identity is not None else None,
        "capture": m.capture,
        "protocol": stream.protocol,
        "peer": conn.peer,
        "connected_at": stream.connected_at,
        "state": overall if types or degraded else "NOT_SENT",
        "degraded": degraded or [],
        "types": types,
    }


ConfigType = Literal["clusters", "listeners", "routes", "endpoints", "secrets"]
BY_SHORT = {v: k for k, v in SHORT_NAMES.items()}


def token_guard(token_file: Path | None) -> Callable[[Request], None]:
    """Optional bearer-token auth; the token file is re-read so it can be rotated."""

    def guard(request: Request) -> None:
        if token_file is None:
            return
        try:
            expected = token_file.read_text().strip()
        except OSError:
            expected = ""
        got = request.headers.get("authorization", "")
        scheme, _, value = got.partition(" ")
        # An empty (or unreadable) token file accepts nobody, never an empty bearer.
        if (not expected or scheme.lower() != "bearer"
                or not hmac.compare_digest(value.strip().encode(), expected.encode())):
            raise HTTPException(status_code=401, detail="missing or wrong bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    return guard


def create_app(runtime: StatusView, token_file: Path | None = None) -> FastAPI:
    app = FastAPI(title="Meshline status", version=__version__,
                  description="Read-only view of the Meshline control plane: proxies, sync state, config, errors "
                              "(one operator write: releasing a withheld object).")
    auth = [Depends(token_guard(token_file))]

    def find(proxy_id: str) -> Connection:
        for c in runtime.connections():
            if c.meta.node_id == proxy_id:
                return c
        raise HTTPException(status_code=404, detail=f"no connected proxy with id {proxy_id!r}")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> Response:
        if runtime.ready:
            return JSONResponse({"ready": True})
        return JSONResponse({"ready": False, "waiting_for": runtime.unsynced_sources()}, status_code=503)

    @app.get("/v1/proxies", dependencies=auth)
    def proxies(namespace: str | None = None, mode: str | None = None, state: str | None = None) -> list[dict[str, Any]]:
        held = runtime.quarantined()
        out = [proxy_view(c, held, runtime.degradation(c)) for c in runtime.connections()]
        out = [p for p in out if (namespace is None or p["namespace"] == namespace)
               and (mode is None or p["mode"] == mode) and (state is None or p["state"] == state.upper())]
        return sorted(out, key=lambda p: (p["id"], p["connected_at"]))

    @app.get("/v1/proxies/{proxy_id}", dependencies=auth)
    def proxy(proxy_id: str) -> dict[str, Any]:
        conn = find(proxy_id)
        return proxy_view(conn, runtime.quarantined(), runtime.degradation(conn))

    @app.get("/v1/proxies/{proxy_id}/config", dependencies=auth)
    def proxy_config(proxy_id: str, type: ConfigType = "clusters") -> dict[str, Any]:
        conn = find(proxy_id)
        t = BY_SHORT[type]
        v = conn.stream.view(t)
        return {"id": proxy_id, "type": type, "version": v.version_sent if v is not None else "",
                "resources": dump_resources(t, conn.stream.held_resources(t))}

    @app.get("/v1/services", dependencies=auth)
    def services(namespace: str | None = None) -> list[dict[str, Any]]:
        """One row per hostname, and one more per other ServiceEntry of a hostname several
        entries declare (a row of a ServiceEntry host names the namespaces resolving the
        hostname to it: `Mesh.service`)."""
        mesh = runtime.mesh()
        spaces = sorted({*mesh.namespaces, *(ns for ns, _ in mesh.workloads),
                         *(se.namespace for se in mesh.service_entries)})
        out = []
        for host in sorted(mesh.services):
            held = mesh.services[host]
            for svc in mesh.entry_candidates.get(host, (held,)):
                if namespace is not None and svc.namespace != namespace:
                    continue
                key = mesh.registry_key(svc)
                eps = [ep for es in mesh.endpoints.get(key, ()) for ep in es.endpoints]
                vs = mesh.vs_by_host.get(host)
                dr = mesh.dr_by_host.get(host)
                row: dict[str, Any] = {
                    "hostname": host, "namespace": svc.namespace, "name": svc.name, "cluster_ip": svc.cluster_ip,
                    "ports": [{"name": p.name, "port": p.port, "target_port": p.target_port,
                               "protocol": p.protocol.value} for p in svc.ports],
                    "endpoints": {"ready": sum(1 for e in eps if e.ready),
                                  "not_ready": sum(1 for e in eps if not e.ready)},
                    "virtual_service": vs.ref.display if vs else None,
                    "destination_rule": dr.ref.display if dr else None,
                    "subsets": [s.name for s in dr.subsets] if dr else [],
                }
                if svc.entry is not None:
                    row["service_entry"] = {
                        "object": svc.ref.display, "registry_key": key, "addresses": list(svc.entry.addresses),
                        "export_to": list(svc.entry.export_to), "resolution": svc.entry.resolution,
                        "resolved_by": [ns for ns in spaces if (got := mesh.service(host, ns)) is not None
                                        and got.ref == svc.ref],
                    }
                out.append(row)
        return out

    @app.get("/v1/config/errors", dependencies=auth)
    def errors(severity: str | None = None) -> list[dict[str, Any]]:
        return [
            {"object": i.ref.display, "kind": i.ref.kind, "namespace": i.ref.namespace, "name": i.ref.name,
             "file": i.ref.file, "line": i.line or i.ref.line, "field": i.field, "severity": i.severity,
             "message": i.message, "nacked": i.message.startswith("WITHHELD"), "withheld": i.message.startswith("WITHHELD"), "text": i.format()}
            for i in runtime.mesh().issues
            if severity is None or i.severity == severity
        ]

    @app.get("/v1/routes", dependencies=auth)
    def gateway_routes(namespace: str | None = None) -> list[dict[str, Any]]:
        """Gateway API routes with the status.parents Meshline computes (Accepted, ResolvedRefs)."""
        return [r for r in route_views(runtime.mesh()) if namespace is None or r["namespace"] == namespace]

    @app.get("/v1/gateways", dependencies=auth)
    def gateway_api_gateways() -> list[dict[str, Any]]:
        """Gateway API Gateways of class meshline and Meshline's GatewayClasses, with their status."""
        return gateway_views(runtime.mesh())

    @app.get("/v1/mesh", dependencies=auth)
    def mesh_summary() -> dict[str, Any]:
        mesh = runtime.mesh()
        held = runtime.quarantined()
        views = [proxy_view(c, held, runtime.degradation(c)) for c in runtime.connections()]
        return {
            "version": __version__,
            "ready": runtime.ready,
            "leader": runtime.leader,
            "generation": runtime.store_generation(),
            "proxies": {
                "total": len(views),
                "by_mode": dict(Counter(v["mode"] for v in views)),
                "by_protocol": dict(Counter(v["protocol"] for v in views)),
                "by_state": dict(Counter(v["state"] for v in views)),
            },
            "objects": {
                "namespaces": len(mesh.namespaces), "services": len(mesh.services),
                "workloads": len(mesh.workloads), "virtual_services": len(mesh.virtual_services),
                "destination_rules": len(mesh.destination_rules),
            },
            "errors": sum(1 for i in mesh.issues if i.severity == "error"),
            "warnings": sum(1 for i in mesh.issues if i.severity == "warning"),
            "quarantined": ["/".join(k) for k in sorted(held)],
            **runtime.control_summary(),
        }

    @app.get("/v1/quarantine", dependencies=auth)
    def quarantine_list() -> list[dict[str, Any]]:
        """Objects withheld mesh-wide because Meshline's own Envoy rejects what they produce."""
        out = []
        for key, reason in sorted(runtime.quarantined().items()):
            out.append({"object": "/".join(key), "kind": key[0], "namespace": key[1], "name": key[2],
                        "location": runtime.location_of(key), "reason": reason})
        return out

    @app.post("/v1/quarantine/release", dependencies=auth)
    def quarantine_release(body: dict[str, str]) -> dict[str, Any]:
        """The one write of this API (an operator's): offer a withheld object again. If
        Envoy still rejects it, pre-flight withholds it again."""
        obj = body.get("object", "")
        parts = obj.split("/")
        if len(parts) != 3 or not all(parts[::2]):
            raise HTTPException(status_code=400, detail="object must be KIND/NAMESPACE/NAME")
        key = (parts[0], parts[1], parts[2])
        if key not in runtime.quarantined():
            raise HTTPException(status_code=404, detail=f"{obj} is not withheld")
        return {"released": ["/".join(k) for k in runtime.release_withheld([key])]}

    @app.get("/metrics")
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(runtime.metrics_registry()), media_type=CONTENT_TYPE_LATEST)

    return app
