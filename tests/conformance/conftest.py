"""Fixtures of the conformance corpus: `make_mesh` starts one Meshline + backends + Envoy
setup (tests/conformance/harness.py) for a task directory and stops it afterwards."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conformance.harness import Mesh

MeshFactory = Callable[..., Mesh]


@pytest.fixture(scope="module")
def make_mesh() -> Iterator[MeshFactory]:
    meshes: list[Mesh] = []
    dirs: list[tempfile.TemporaryDirectory[str]] = []

    def make(**kw: object) -> Mesh:
        d = tempfile.TemporaryDirectory(prefix="meshline-conformance-")
        dirs.append(d)
        m = Mesh(Path(d.name), **kw)  # type: ignore[arg-type]
        meshes.append(m)
        return m

    try:
        yield make
    finally:
        for m in meshes:
            m.close()
        for d in dirs:
            d.cleanup()
