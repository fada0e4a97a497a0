"""Per-proxy resource snapshots, built from translation plans. Pure computation, no I/O.

Proxies of one class (same namespace and capture mode) share one outbound layer; each
proxy adds its own inbound layer. A type's resources are an immutable `TypeResources`
that remembers which names changed since its predecessor, so a stream that was in sync
with the predecessor diffs only those names.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from controlplane.cache.resources import Resource, ResourceMemo
from controlplane.model.ir import CaptureMode, Labels, ProxyMeta, TypeUrl
from controlplane.model.mesh import Mesh
from controlplane.translate.plan import PUSH_ORDER, ResourceSpec

log = logging.getLogger(__name__)
EMPTY: Mapping[str, Resource] = {}


class TypeResources:
    """The resources of one type for one proxy (class). Never mutated after creation,
    except that `prev` is cleared when a successor is made (so chains stay one long)."""

    __slots__ = ("changed", "items", "prev", "type_url", "version")

    def __init__(
        self,
        type_url: TypeUrl,
        items: Mapping[str, Resource],
        prev: TypeResources | None = None,
    ) -> None:
        self.type_url = type_url
        self.items = items
        h = hashlib.blake2b(digest_size=8)
        for name in sorted(items):
            h.update(name.encode())
            h.update(items[name].version.encode())
        self.version = h.hexdigest()
        self.prev: TypeResources | None = None
        self.changed: frozenset[str] | None = None
        if prev is not None:
            self.prev = prev
            prev.prev = None
            old = prev.items
            changed = {n for n, r in items.items() if old.get(n) is not r}
            changed.update(n for n in old if n not in items)
            self.changed = frozenset(changed)


def _evolve(type_url: TypeUrl, items: dict[str, Resource], prev: TypeResources | None) -> TypeResources:
    if prev is not None and prev.items.keys() == items.keys() and all(prev.items[n] is r for n, r in items.items()):
        return prev
    return TypeResources(type_url, items, prev)


@dataclass(frozen=True, slots=True, eq=False)
class Snapshot:
    """Everything one proxy should hold, per type."""

    types: Mapping[TypeUrl, TypeResources]
    generation: int

    def get(self, type_url: TypeUrl) -> TypeResources | None:
        return self.types.get(type_url)

    @property
    def version(self) -> str:
        h = hashlib.blake2b(digest_size=8)
        for t in PUSH_ORDER:
            tr = self.types.get(t)
            if tr is not None:
                h.update(tr.version.encode())
        return h.hexdigest()


OutboundKey = tuple[str, CaptureMode]
ProxyKey = tuple[str, str | None, Labels, CaptureMode, str, Labels, str, str | None, str | None]


def proxy_key(meta: ProxyMeta) -> ProxyKey:
    # `extra` carries the proxy's authenticated identity (controlplane.ca.identity): two
    # proxies of one workload with different identities get different own layers (secrets).
    return (meta.namespace, meta.workload, meta.labels, meta.capture, meta.mode, meta.extra, meta.outbound_address,
            meta.node, meta.waypoint)


Planner = Callable[[Mesh, ProxyMeta], list[ResourceSpec]]


class SnapshotBuilder:
    """Turns a Mesh into per-proxy Snapshots, rebuilding only what changed.

    `shared(mesh, meta)` plans what proxies with equal `shared_key(meta)` have in common;
    `own(mesh, meta)` plans the proxy's own part (its inbound side)."""

    def __init__(self, shared: Planner, own: Planner, shared_key: Callable[[ProxyMeta], object]) -> None:
        self.memo = ResourceMemo()
        self._plan_shared = shared
        self._plan_own = own
        self._shared_key = shared_key
        self._shared: dict[object, dict[TypeUrl, TypeResources]] = {}
        self._own: dict[ProxyKey, dict[TypeUrl, TypeResources]] = {}
        self._snap: dict[ProxyKey, Snapshot] = {}
        self.generation = 0
        self.failures = 0

    def rebuild(self, mesh: Mesh, proxies: Iterable[ProxyMeta]) -> dict[ProxyKey, Snapshot]:
        """Snapshots for every distinct proxy key among `proxies` for this mesh."""
        self.generation += 1
        self.memo.begin_round()
        shared_done: dict[object, dict[TypeUrl, TypeResources]] = {}
        out: dict[ProxyKey, Snapshot] = {}
        failed: set[object] = set()
        try:
            for meta in proxies:
                pk = proxy_key(meta)
                if pk in out:
                    continue
                try:
                    sk = self._shared_key(meta)
                    if sk in failed:
                        raise RuntimeError("shared layer failed")
                    if sk not in shared_done:
                        try:
                            shared_done[sk] = self._layer(self._plan_shared(mesh, meta), self._shared.get(sk))
                        except Exception:
                            failed.add(sk)
                            raise
                    own = self._layer(self._plan_own(mesh, meta), self._own.get(pk))
                    self._own[pk] = own
                    out[pk] = self._combine(pk, shared_done[sk], own)
                except Exception:
                    # One proxy's (or class's) translation failing must not freeze the others:
                    # it keeps its last snapshot, everyone else moves on.
                    log.exception("building the config of proxy %s failed; it keeps its last config",
                                  meta.node_id)
                    self.failures += 1
                    prev = self._snap.get(pk)
                    if prev is not None:
                        out[pk] = prev
        finally:
            self.memo.end_round()
        self._shared = shared_done
        self._own = {k: v for k, v in self._own.items() if k in out}
        self._snap = {k: v for k, v in self._snap.items() if k in out}
        return out

    def _layer(
        self, specs: list[ResourceSpec], prev: dict[TypeUrl, TypeResources] | None
    ) -> dict[TypeUrl, TypeResources]:
        by_type: dict[TypeUrl, dict[str, Resource]] = {}
        for spec in specs:
            by_type.setdefault(spec.type_url, {})[spec.name] = self.memo.realize(spec)
        return {
            t: _evolve(t, items, prev.get(t) if prev else None)
            for t, items in by_type.items()
        }

    def _combine(
        self, pk: ProxyKey, shared: dict[TypeUrl, TypeResources], own: dict[TypeUrl, TypeResources]
    ) -> Snapshot:
        prev = self._snap.get(pk)
        types: dict[TypeUrl, TypeResources] = {}
        for t in PUSH_ORDER:
            s, o = shared.get(t), own.get(t)
            if o is None or not o.items:
                types[t] = s if s is not None else _evolve(t, {}, prev.types.get(t) if prev else None)
            elif s is None or not s.items:
                types[t] = o
            else:
                merged = dict(s.items)
                merged.update(o.items)
                types[t] = _evolve(t, merged, prev.types.get(t) if prev else None)
        if prev is not None and all(prev.types.get(t) is types[t] for t in types):
            return prev
        snap = Snapshot(types, self.generation)
        self._snap[pk] = snap
        return snap
