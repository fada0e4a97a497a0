"""AdmissionReview (admission.k8s.io/v1) parsing and responses. Pure, no I/O.

`parse_review` accepts only a JSON object of kind AdmissionReview, apiVersion
admission.k8s.io/v1, with a `request` that has a non-empty `uid`; anything else raises
`ReviewError` (the server answers 400 with its message, since there is no uid to answer).
Everything after that is answered with a well-formed AdmissionReview response.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

API_VERSION = "admission.k8s.io/v1"
KIND = "AdmissionReview"


class ReviewError(Exception):
    """The body is not an AdmissionReview request this webhook can answer."""


@dataclass(frozen=True, slots=True)
class AdmissionRequest:
    uid: str
    operation: str  # CREATE, UPDATE, DELETE, CONNECT
    group: str
    version: str
    kind: str
    namespace: str
    name: str
    object: Any  # the object (a Mapping when well formed), or None
    old_object: Any  # UPDATE and DELETE: the stored object
    dry_run: bool


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def parse_review(body: bytes) -> AdmissionRequest:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ReviewError(f"the body is not JSON: {str(exc)[:200]}") from None
    if not isinstance(doc, dict):
        raise ReviewError(f"expected a JSON object ({KIND}), got {type(doc).__name__}")
    if doc.get("kind") != KIND or doc.get("apiVersion") != API_VERSION:
        raise ReviewError(f"expected kind {KIND} with apiVersion {API_VERSION}, got kind "
                          f"{str(doc.get('kind'))[:64]!r} apiVersion {str(doc.get('apiVersion'))[:64]!r}")
    req = doc.get("request")
    if not isinstance(req, dict):
        raise ReviewError(f"the {KIND} has no request")
    uid = req.get("uid")
    if not isinstance(uid, str) or not uid or len(uid) > 256:
        raise ReviewError("request.uid is missing")
    kind_field = req.get("kind")
    kind: dict[str, Any] = kind_field if isinstance(kind_field, dict) else {}
    return AdmissionRequest(
        uid=uid,
        operation=_str(req.get("operation")),
        group=_str(kind.get("group")),
        version=_str(kind.get("version")),
        kind=_str(kind.get("kind")),
        namespace=_str(req.get("namespace")),
        name=_str(req.get("name")),
        object=req.get("object"),
        old_object=req.get("oldObject"),
        dry_run=req.get("dryRun") is True,
    )


def response(uid: str, allowed: bool, *, message: str | None = None, code: int | None = None,
             reason: str | None = None, warnings: Sequence[str] = (),
             patch: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The AdmissionReview answer. A non-empty `patch` is sent as a base64 JSONPatch."""
    resp: dict[str, Any] = {"uid": uid, "allowed": allowed}
    if message is not None or code is not None:
        status: dict[str, Any] = {}
        if code is not None:
            status["code"] = code
        if reason is not None:
            status["reason"] = reason
        if message is not None:
            status["message"] = message
        resp["status"] = status
    if warnings:
        resp["warnings"] = list(warnings)
    if patch:
        resp["patchType"] = "JSONPatch"
        resp["patch"] = base64.b64encode(json.dumps(list(patch), separators=(",", ":")).encode()).decode()
    return {"apiVersion": API_VERSION, "kind": KIND, "response": resp}
