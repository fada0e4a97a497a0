"""Offline validation for `meshline analyze`: reads YAML files, reports every issue. Does
file I/O (reading only)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from controlplane.model.ir import Issue
from controlplane.model.store import MeshStore
from controlplane.sources.directory import read_file, yaml_files


def analyze_paths(paths: Sequence[str]) -> list[Issue]:
    """All issues (parse errors, per-object and cross-object validation) for `paths`."""
    store = MeshStore()
    files = yaml_files([Path(p) for p in paths])
    store.apply([read_file(f) for f in files])
    issues = list(store.mesh().issues)
    issues.sort(key=lambda i: (i.ref.file or "", i.line or i.ref.line or 0, i.ref.display))
    return issues
