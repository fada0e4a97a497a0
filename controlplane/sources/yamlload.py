"""Parse multi-document Kubernetes YAML into RawObjects with line numbers. Pure (text in).

Field lines are recorded for every mapping key and sequence item, so a validation error
can point at `spec.http[0].match[0].uri.regex` on its own line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from controlplane.model.raw import RawObject

CLUSTER_SCOPED = frozenset({"Namespace"})
# libyaml's C parser when available (several times faster on large meshes); same marks.
_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True, slots=True)
class ParseError:
    """A document that could not be read at all (YAML syntax, not a mapping, no kind)."""

    file: str
    line: int
    message: str

    def format(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


def _lines(node: yaml.Node, path: str, out: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = str(k.value)
            p = f"{path}.{key}" if path else key
            out[p] = k.start_mark.line + 1
            _lines(v, p, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            p = f"{path}[{i}]"
            out[p] = item.start_mark.line + 1
            _lines(item, p, out)


def parse_documents(text: str, file: str) -> tuple[list[RawObject], list[ParseError]]:
    """Every non-empty document of `text` as a RawObject; unreadable ones as ParseErrors.

    A YAML syntax error stops the file at that point (the YAML stream cannot be resumed):
    the caller should keep the file's previous objects."""
    objects: list[RawObject] = []
    errors: list[ParseError] = []
    loader = _Loader(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            line = node.start_mark.line + 1
            try:
                data: Any = loader.construct_document(node)
            except yaml.YAMLError as exc:
                errors.append(ParseError(file, line, f"invalid YAML: {exc}"))
                continue
            if data is None:
                continue
            if not isinstance(data, dict):
                errors.append(ParseError(file, line, "document is not a mapping (expected a Kubernetes object)"))
                continue
            kind = data.get("kind")
            if data.get("apiVersion") == "v1" and kind == "List" and isinstance(data.get("items"), list):
                errors.append(ParseError(file, line, "kind List is not supported: write one document per object"))
                continue
            if not isinstance(kind, str) or not kind:
                errors.append(ParseError(file, line, "missing `kind`"))
                continue
            meta = data.get("metadata")
            meta = meta if isinstance(meta, dict) else {}
            name = meta.get("name")
            ns = meta.get("namespace")
            field_lines: dict[str, int] = {}
            _lines(node, "", field_lines)
            objects.append(
                RawObject(
                    kind=kind,
                    api_version=str(data.get("apiVersion", "")),
                    namespace="" if kind in CLUSTER_SCOPED else (str(ns) if ns else "default"),
                    name=str(name) if name is not None else "",
                    body=data,
                    file=file,
                    line=line,
                    field_lines=field_lines,
                )
            )
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 0
        problem = getattr(exc, "problem", None) or str(exc)
        errors.append(ParseError(file, line, f"invalid YAML: {problem}"))
    finally:
        loader.dispose()
    return objects, errors
