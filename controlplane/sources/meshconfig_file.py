"""The `--mesh-config` file: read it, and watch it for changes. Does file I/O.

The file holds Istio's MeshConfig (the `mesh` key of Istio's `istio` ConfigMap) or that whole
ConfigMap; `controlplane.model.meshconfig` parses it. A file that cannot be read or parsed
gives a mesh config without providers and an error naming the file, so every CUSTOM policy
fails closed until the file is fixed. Changes are followed with `watchfiles` (inotify) on the
file's directory, so an editor's write-and-rename and a Kubernetes ConfigMap volume's
symlink swap are both seen.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import watchfiles

from controlplane.model.ir import Issue, SourceRef
from controlplane.model.meshconfig import MESH_CONFIG_KIND, MeshConfig, parse_mesh_config

log = logging.getLogger(__name__)
MAX_BYTES = 4 * 1024 * 1024


def load_mesh_config(path: Path) -> tuple[MeshConfig, tuple[Issue, ...]]:
    """The mesh config in `path` and its issues (an unreadable file is an error, not an exception)."""
    file = str(path)
    try:
        data = path.read_bytes()
        if len(data) > MAX_BYTES:
            raise OSError(f"{len(data)} bytes, the limit is {MAX_BYTES}")
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        issue = Issue(SourceRef(MESH_CONFIG_KIND, "", "mesh", file, None), "",
                      f"cannot read the mesh config ({exc}): no extension provider is usable, CUSTOM policies deny")
        return MeshConfig(source=file), (issue,)
    return parse_mesh_config(text, file)


async def watch_mesh_config(path: Path, apply: Callable[[MeshConfig, tuple[Issue, ...]], None],
                            debounce_ms: int = 100, stop: asyncio.Event | None = None) -> None:
    """Call `apply` with the file's mesh config whenever the file (or what it links to)
    changes, until cancelled (or `stop` is set)."""
    parent = path.resolve().parent if path.exists() else path.parent
    last = load_mesh_config(path)
    async for _ in watchfiles.awatch(parent, debounce=debounce_ms, step=min(50, debounce_ms), stop_event=stop,
                                     recursive=True):
        now = load_mesh_config(path)
        if now != last:
            last = now
            names = ", ".join(p.name for p in now[0].providers) or "none"
            log.info("mesh config %s reloaded: extension providers %s (%d issues)", path, names, len(now[1]))
            apply(*now)
