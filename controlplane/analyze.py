"""Offline validation for `meshline analyze`: reads YAML files, reports every issue. Does
file I/O (reading only)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from controlplane.model.ir import DEFAULT_ROOT_NAMESPACE, Issue
from controlplane.model.store import MeshStore
from controlplane.sources.directory import read_paths
from controlplane.sources.meshconfig_file import load_mesh_config


def analyze_paths(paths: Sequence[str], root_namespace: str = DEFAULT_ROOT_NAMESPACE,
                  mesh_config: Path | None = None) -> list[Issue]:
    """All issues (parse errors, per-object and cross-object validation) for `paths`, with the
    extension providers of `mesh_config` (Istio MeshConfig YAML)."""
    store = MeshStore(root_namespace=root_namespace)
    if mesh_config is not None:
        store.set_mesh_config(*load_mesh_config(mesh_config))
    store.apply(read_paths([Path(p) for p in paths]))
    issues = [_at_field(store, i) for i in store.mesh().issues]
    issues.sort(key=lambda i: (i.ref.file or "", i.line or i.ref.line or 0, i.ref.display))
    return issues


def _at_field(store: MeshStore, issue: Issue) -> Issue:
    """Point a cross-object issue (which knows its field but not its line) at the field's
    line in the object's file."""
    if issue.line is not None or not issue.field:
        return issue
    raw = store.sources_of((issue.ref.kind, issue.ref.namespace, issue.ref.name))
    if raw is None or raw.file != issue.ref.file:
        return issue
    return replace(issue, line=raw.line_of(issue.field))
