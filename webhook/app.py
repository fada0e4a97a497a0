"""The admission webhooks as a FastAPI app: POST /inject (mutating: sidecar injection) and
POST /validate (validating: mesh resources), AdmissionReview admission.k8s.io/v1; GET
/healthz. Serves HTTP (TLS is the server's business, see `webhook.server`).

Bad input never yields a 5xx or a hang: a body over `max_body_bytes` answers 413 (checked
on Content-Length and while streaming), a body slower than `body_timeout_seconds` 408,
anything that is not an AdmissionReview v1 request with a uid 400 with a JSON `error`.
With a uid, every answer is a well-formed AdmissionReview: /inject always allows (with
warnings for what it could not inject); /validate denies invalid objects with one
`field: message` line per error.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from webhook.config import WebhookConfig
from webhook.inject import inject
from webhook.review import AdmissionRequest, ReviewError, parse_review, response
from webhook.validate import validate_object

log = logging.getLogger(__name__)

NamespaceInMesh = Callable[[str], bool | None]
"""namespace -> True (labelled dataplane-mode sidecar), False (not), None (unknown)."""


class _BodyError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    length = request.headers.get("content-length")
    if length is not None:
        if not length.strip().isdigit():
            raise _BodyError(400, "invalid Content-Length")
        if int(length) > limit:
            raise _BodyError(413, f"the body ({int(length)} bytes) exceeds the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _BodyError(413, f"the body exceeds the {limit}-byte limit")
                chunks.append(chunk)
    except TimeoutError:
        raise _BodyError(408, f"the body did not arrive within {timeout:g}s") from None
    return b"".join(chunks)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_webhook_app(config: WebhookConfig | None = None, *,
                       namespace_in_mesh: NamespaceInMesh | None = None) -> FastAPI:
    """The webhook app. `namespace_in_mesh` (optional) tells the injector what is known of a
    namespace's `meshline.io/dataplane-mode` label, e.g. from the control plane's store."""
    cfg = config or WebhookConfig()
    app = FastAPI(title="Meshline admission webhooks", docs_url=None, redoc_url=None, openapi_url=None)

    async def review(request: Request) -> AdmissionRequest | JSONResponse:
        try:
            body = await _read_body(request, cfg.max_body_bytes, cfg.body_timeout_seconds)
        except _BodyError as exc:
            return _error(exc.status, str(exc))
        try:
            return parse_review(body)
        except ReviewError as exc:
            return _error(400, str(exc))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/inject")
    async def inject_endpoint(request: Request) -> Any:
        req = await review(request)
        if isinstance(req, JSONResponse):
            return req
        try:
            return _inject(req, cfg, namespace_in_mesh)
        except Exception as exc:  # fail closed: a pod of an opted-in namespace never runs outside the mesh
            log.exception("injection failed for %s/%s", req.namespace, req.name)
            return response(req.uid, False, code=500, reason="InternalError",
                            message=f"meshline could not inject the sidecar ({type(exc).__name__}); the pod is "
                                    "refused rather than run outside the mesh (retry, or opt it out with the "
                                    "annotation meshline.io/inject: \"false\")")

    @app.post("/validate")
    async def validate_endpoint(request: Request) -> Any:
        req = await review(request)
        if isinstance(req, JSONResponse):
            return req
        try:
            return _validate(req)
        except Exception as exc:
            log.exception("validation failed for %s %s/%s", req.kind, req.namespace, req.name)
            return response(req.uid, False, code=500, reason="InternalError",
                            message=f"meshline could not validate this object: {type(exc).__name__}")

    return app


def _inject(req: AdmissionRequest, cfg: WebhookConfig, namespace_in_mesh: NamespaceInMesh | None) -> dict[str, Any]:
    if req.kind != "Pod" or req.group != "" or req.operation not in ("CREATE", ""):
        return response(req.uid, True, warnings=[f"meshline: only Pod CREATE is injected, got {req.kind or '?'} "
                                                 f"{req.operation or '?'}"[:200]])
    if not isinstance(req.object, dict):
        return response(req.uid, True, warnings=["meshline: sidecar not injected: request.object is missing"])
    meta = req.object.get("metadata")
    namespace = req.namespace or (meta.get("namespace") if isinstance(meta, dict) else None) or "default"
    in_mesh = namespace_in_mesh(namespace) if namespace_in_mesh is not None else None
    result = inject(req.object, str(namespace), cfg, in_mesh)
    name = req.name or (meta.get("generateName") if isinstance(meta, dict) else None) or "?"
    log.log(logging.INFO if result.warnings else logging.DEBUG, "inject %s/%s: %s%s", namespace, name,
            result.outcome, "".join(f"; {w}" for w in result.warnings))
    return response(req.uid, True, warnings=result.warnings, patch=result.patch)


def _metadata_only(new: Any, old: Any) -> bool:
    """True when an UPDATE leaves everything but metadata (and status) as stored, or the
    object is being deleted (finalizers must be removable)."""
    if not isinstance(new, dict) or not isinstance(old, dict):
        return False
    meta = new.get("metadata")
    if isinstance(meta, dict) and meta.get("deletionTimestamp"):
        return True
    strip = ("metadata", "status")
    return {k: v for k, v in new.items() if k not in strip} == {k: v for k, v in old.items() if k not in strip}


def _validate(req: AdmissionRequest) -> dict[str, Any]:
    if req.operation in ("DELETE", "CONNECT"):
        return response(req.uid, True)
    if req.object is None:
        return response(req.uid, False, code=400, reason="BadRequest", message="request.object is missing")
    verdict = validate_object(req.object, req.namespace, req.name)
    if verdict.allowed:
        return response(req.uid, True, warnings=verdict.warnings)
    if req.operation == "UPDATE" and _metadata_only(req.object, req.old_object):
        # An object stored before this webhook existed (or before a stricter Meshline) must
        # stay deletable and labelable: only changes to what it means are refused.
        return response(req.uid, True, warnings=[f"this object is invalid and ignored by Meshline: {e}"
                                                 for e in verdict.errors][:10])
    kind = req.object.get("kind") if isinstance(req.object, dict) else None
    what = f"{kind or 'object'} {req.namespace + '/' if req.namespace else ''}{req.name}".strip()
    return response(req.uid, False, code=422, reason="Invalid", warnings=verdict.warnings,
                    message=f"{what} is invalid:\n{verdict.message}")
