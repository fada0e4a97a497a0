"""The validating webhook's decision: a mesh object is converted with the same
`controlplane.model.convert.convert` that `analyze`, the sources and the CRD status use;
errors deny it with one `field: message` line each, warnings pass through as AdmissionReview
warnings. Pure, no I/O."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from controlplane.model.convert import convert
from controlplane.model.raw import RawObject


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def message(self) -> str:
        return "\n".join(self.errors)


def _line(field: str, message: str) -> str:
    return f"{field}: {message}" if field else message


def validate_object(obj: Any, namespace: str = "", name: str = "") -> Verdict:
    """Validate one object as the API server is about to store it. `namespace` and `name`
    are the request's (the object may carry only `generateName`)."""
    if not isinstance(obj, Mapping):
        return Verdict(False, ("object: expected a Kubernetes object (a JSON object)",))
    kind, api_version = obj.get("kind"), obj.get("apiVersion")
    if not isinstance(kind, str) or not kind:
        return Verdict(False, ("kind: is required",))
    if not isinstance(api_version, str) or not api_version:
        return Verdict(False, ("apiVersion: is required",))
    meta_field = obj.get("metadata")
    meta: Mapping[str, Any] = meta_field if isinstance(meta_field, Mapping) else {}
    name = name or (meta.get("name") if isinstance(meta.get("name"), str) else "") or ""
    if not name and isinstance(meta.get("generateName"), str):
        name = meta["generateName"] + "generated"  # the API server appends a random suffix
    namespace = namespace or (meta.get("namespace") if isinstance(meta.get("namespace"), str) else "") or ""
    raw = RawObject(kind=kind, api_version=api_version, namespace=namespace, name=name, body=obj)
    _, issues = convert(raw)
    errors = tuple(_line(i.field, i.message) for i in issues if i.severity == "error")
    warnings = tuple(_line(i.field, i.message) for i in issues if i.severity != "error")
    return Verdict(not errors, errors, warnings)
