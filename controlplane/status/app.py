"""Read-only REST status API (FastAPI): health, readiness, connected proxies, metrics.
Serves HTTP; reads the runtime's bookkeeping and never changes it."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from controlplane import __version__
from controlplane.runtime import Runtime
from controlplane.translate.plan import PUSH_ORDER, SHORT_NAMES
from controlplane.xds.server import Connection
from controlplane.xds.stream import NackRecord


def _nack(n: NackRecord | None) -> dict[str, Any] | None:
    if n is None:
        return None
    return {
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


def proxy_view(conn: Connection) -> dict[str, Any]:
    stream = conn.stream
    types: dict[str, Any] = {}
    overall = "SYNCED"
    rank = {"SYNCED": 0, "NOT_SENT": 1, "STALE": 2, "NACKED": 3}
    for t in PUSH_ORDER:
        st = stream.types.get(t)
        if st is None:
            continue
        state = stream.sync_state(t)
        if rank[state] > rank[overall]:
            overall = state
        types[SHORT_NAMES[t]] = {
            "state": state,
            "subscribed": "*" if st.wildcard else sorted(st.names),
            "version_sent": st.version_sent,
            "version_acked": st.version_acked,
            "nonce": st.nonce,
            "last_push": st.last_push or None,
            "resources": len(st.known),
            "nacks": st.nacks,
            "last_nack": _nack(st.last_nack),
        }
    m = conn.meta
    return {
        "id": m.node_id,
        "mode": m.mode,
        "namespace": m.namespace,
        "workload": m.workload,
        "service_account": m.service_account,
        "capture": m.capture,
        "protocol": stream.protocol,
        "peer": conn.peer,
        "connected_at": stream.connected_at,
        "state": overall if types else "NOT_SENT",
        "types": types,
    }


def create_app(runtime: Runtime) -> FastAPI:
    app = FastAPI(title="Meshline status", version=__version__)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> Response:
        if runtime.ready:
            return JSONResponse({"ready": True})
        return JSONResponse({"ready": False}, status_code=503)

    @app.get("/v1/proxies")
    def proxies(namespace: str | None = None, mode: str | None = None, state: str | None = None) -> list[dict[str, Any]]:
        out = [proxy_view(c) for c in runtime.xds.connections.values()]
        out = [p for p in out if (namespace is None or p["namespace"] == namespace)
               and (mode is None or p["mode"] == mode) and (state is None or p["state"] == state.upper())]
        return sorted(out, key=lambda p: p["id"])

    @app.get("/v1/config/errors")
    def errors() -> list[dict[str, Any]]:
        return [
            {"object": i.ref.display, "kind": i.ref.kind, "namespace": i.ref.namespace, "name": i.ref.name,
             "file": i.ref.file, "line": i.line or i.ref.line, "field": i.field, "severity": i.severity,
             "message": i.message, "text": i.format()}
            for i in runtime.mesh().issues
        ]

    @app.get("/metrics")
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
