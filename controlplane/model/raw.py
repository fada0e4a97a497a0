"""Raw Kubernetes-shaped objects as sources hand them to the model. Pure data, no I/O.

A `RawObject` is one YAML document or API object: its kind, apiVersion, identity, the
decoded body, and where it came from (file and line, plus the line of each field path when
the source knows it, so validation errors can point at the offending field).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from controlplane.model.ir import SourceRef

ObjectKey = tuple[str, str, str]
"""(kind, namespace, name); namespace is "" for cluster-scoped kinds. A kind that two API
groups define (Istio's and the Gateway API's `Gateway`) is qualified by its group for the
less usual one (`Gateway.gateway.networking.k8s.io`), so that both can exist with one name."""

GROUP_QUALIFIED_KINDS = frozenset({("Gateway", "gateway.networking.k8s.io"), ("Gateway", "gateway.networking.x-k8s.io")})


def key_kind(kind: str, api_version: str) -> str:
    """The kind as it appears in object keys and references (see `ObjectKey`)."""
    group = api_version.split("/", 1)[0] if "/" in api_version else ""
    return f"{kind}.{group}" if (kind, group) in GROUP_QUALIFIED_KINDS else kind


@dataclass(frozen=True, slots=True, eq=False)
class RawObject:
    kind: str
    api_version: str
    namespace: str
    name: str
    body: Mapping[str, Any]
    file: str | None = None
    line: int | None = None
    field_lines: Mapping[str, int] = field(default_factory=dict)
    """Dotted field path (e.g. `spec.http[0].match[0].uri.regex`) -> 1-based line."""

    @property
    def key(self) -> ObjectKey:
        return (key_kind(self.kind, self.api_version), self.namespace, self.name)

    @property
    def ref(self) -> SourceRef:
        return SourceRef(key_kind(self.kind, self.api_version), self.namespace, self.name, self.file, self.line)

    def line_of(self, path: str) -> int | None:
        """Line of `path`, or of its closest ancestor that has one."""
        p = path
        while p:
            if p in self.field_lines:
                return self.field_lines[p]
            cut = max(p.rfind("."), p.rfind("["))
            if cut <= 0:
                break
            p = p[:cut]
        return self.line
