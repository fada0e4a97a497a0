"""Per-proxy resource snapshots, built from translation plans. Pure computation, no I/O.

Proxies of one class (same namespace and capture mode) share one outbound layer; each
proxy adds its own inbound layer. A type's resources are an immutable `TypeResources`
that remembers which names changed since its predecessor, so a stream that was in sync
with the predecessor diffs only those names.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from controlplane.cache.resources import Resource, ResourceMemo
from controlplane.model.ir import CaptureMode, Labels, ProxyMeta, TypeUrl
from controlplane.model.mesh import EndpointDelta, Mesh
from controlplane.translate.plan import PUSH_ORDER, ResourceSpec

log = logging.getLogger(__name__)
EMPTY: Mapping[str, Resource] = {}


_MASK = (1 << 64) - 1


def _item_hash(name: str, res: Resource) -> int:
    digest = hashlib.blake2b(f"{name}\0{res.version}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class TypeResources:
    """The resources of one type for one proxy (class). Never mutated after creation,
    except that `prev` is cleared when a successor is made (so chains stay one long).

    `version` is an order-independent hash of every (name, resource version): a sum of
    per-item hashes, so a successor that changes k items (`patched`) costs O(k) to version
    (plus one C-level dict copy), not O(n)."""

    __slots__ = ("_acc", "changed", "items", "prev", "type_url", "version")

    def __init__(
        self,
        type_url: TypeUrl,
        items: Mapping[str, Resource],
        prev: TypeResources | None = None,
        *,
        acc: int | None = None,
        changed: frozenset[str] | None = None,
    ) -> None:
        self.type_url = type_url
        self.items = items
        if acc is None:
            acc = sum(_item_hash(n, r) for n, r in items.items()) & _MASK
        self._acc = acc
        self.version = f"{acc:016x}"
        self.prev: TypeResources | None = None
        self.changed: frozenset[str] | None = None
        if prev is not None:
            self.prev = prev
            prev.prev = None
            if changed is None:
                old = prev.items
                found = {n for n, r in items.items() if old.get(n) is not r}
                found.update(n for n in old if n not in items)
                changed = frozenset(found)
            self.changed = changed

    def patched(self, updates: Mapping[str, Resource | None]) -> TypeResources:
        """A successor with `updates` applied (None removes the name); self if nothing changes."""
        acc = self._acc
        items: dict[str, Resource] | None = None
        changed: set[str] = set()
        for name, res in updates.items():
            old = self.items.get(name)
            if old is res:
                continue
            if items is None:
                items = dict(self.items)
            if old is not None:
                acc -= _item_hash(name, old)
                del items[name]
            if res is not None:
                acc += _item_hash(name, res)
                items[name] = res
            changed.add(name)
        if items is None:
            return self
        return TypeResources(self.type_url, items, self, acc=acc & _MASK, changed=frozenset(changed))


def _evolve(type_url: TypeUrl, items: dict[str, Resource], prev: TypeResources | None) -> TypeResources:
    if prev is not None and prev.items.keys() == items.keys() and all(prev.items[n] is r for n, r in items.items()):
        return prev
    return TypeResources(type_url, items, prev)


@dataclass(frozen=True, slots=True, eq=False)
class Snapshot:
    """Everything one proxy should hold, per type."""

    types: Mapping[TypeUrl, TypeResources]
    generation: int
    _version: str = field(default="", repr=False)  # (computed on first read: checked per proxy per push)

    def get(self, type_url: TypeUrl) -> TypeResources | None:
        return self.types.get(type_url)

    @property
    def version(self) -> str:
        if self._version:
            return self._version
        h = hashlib.blake2b(digest_size=8)
        for t in PUSH_ORDER:
            tr = self.types.get(t)
            if tr is not None:
                h.update(tr.version.encode())
        version = h.hexdigest()
        object.__setattr__(self, "_version", version)  # (frozen: set once, the same value every time)
        return version


OutboundKey = tuple[str, CaptureMode]
ProxyKey = tuple[str, str | None, Labels, CaptureMode, str, Labels, str, str | None, str | None, str | None]


def proxy_key(meta: ProxyMeta) -> ProxyKey:
    # `extra` carries the proxy's authenticated identity (controlplane.ca.identity): two
    # proxies of one workload with different identities get different own layers (secrets).
    return (meta.namespace, meta.workload, meta.labels, meta.capture, meta.mode, meta.extra, meta.outbound_address,
            meta.node, meta.waypoint, meta.gateway)


Planner = Callable[[Mesh, ProxyMeta], list[ResourceSpec]]
FULL_ROUND_EVERY = 32
"""Patched rounds in a row before a full one (patch rounds keep every memo variant)."""
HostPlanner = Callable[[Mesh, ProxyMeta, frozenset[str]], "list[ResourceSpec] | None"]
"""Plans just the shared resources that depend on the endpoints of some hosts (None: this
proxy class cannot be patched that way, plan it in full)."""


class SnapshotBuilder:
    """Turns a Mesh into per-proxy Snapshots, rebuilding only what changed.

    `shared(mesh, meta)` plans what proxies with equal `shared_key(meta)` have in common;
    `own(mesh, meta)` plans the proxy's own part (its inbound side)."""

    def __init__(self, shared: Planner, own: Planner, shared_key: Callable[[ProxyMeta], object],
                 shared_hosts: HostPlanner | None = None) -> None:
        self.memo = ResourceMemo()
        self._plan_shared_hosts = shared_hosts
        self._last_mesh: Mesh | None = None
        self.incremental_rebuilds = 0
        self._since_full = 0
        self._plan_shared = shared
        self._plan_own = own
        self._shared_key = shared_key
        self._shared: dict[object, dict[TypeUrl, TypeResources]] = {}
        self._own: dict[ProxyKey, dict[TypeUrl, TypeResources]] = {}
        self._snap: dict[ProxyKey, Snapshot] = {}
        self.generation = 0
        self.failures = 0
        self._metas: dict[tuple[str, object], ProxyMeta] = {}  # layer key -> a proxy it was planned for

    def rebuild(self, mesh: Mesh, proxies: Iterable[ProxyMeta],
                delta: EndpointDelta | None = None) -> dict[ProxyKey, Snapshot]:
        """Snapshots for every distinct proxy key among `proxies` for this mesh. With
        `delta` (this mesh is the last one built plus new endpoints for a few hosts), proxy
        classes that support it are patched: only those hosts' resources are re-planned, and
        the proxies' own layers (which do not depend on endpoints) are kept."""
        self.generation += 1
        patch = delta if delta is not None and delta.base is self._last_mesh and self._plan_shared_hosts else None
        if patch is not None and self._since_full >= FULL_ROUND_EVERY:
            patch = None  # now and then a full round, which also drops stale memo variants
        self._last_mesh = mesh
        if patch is not None:
            self.incremental_rebuilds += 1
            self._since_full += 1
        else:
            self._since_full = 0
            self.memo.begin_round()  # a full round: resources nobody uses any more are dropped
        shared_done: dict[object, dict[TypeUrl, TypeResources]] = {}
        metas: dict[tuple[str, object], ProxyMeta] = {}
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
                    patched: dict[TypeUrl, TypeResources] | None = None
                    if sk not in shared_done:
                        metas[("shared", sk)] = meta
                        try:
                            prev_shared = self._shared.get(sk)
                            if patch is not None and prev_shared is not None:
                                patched = self._patch(patch, mesh, meta, prev_shared)
                            shared_done[sk] = (patched if patched is not None else
                                               self._layer(self._plan_shared(mesh, meta), prev_shared))
                        except Exception:
                            failed.add(sk)
                            raise
                    prev_own = self._own.get(pk)
                    if patch is not None and prev_own is not None and self._patchable(pk):
                        own = prev_own
                    else:
                        own = self._layer(self._plan_own(mesh, meta), prev_own)
                    self._own[pk] = own
                    metas[("own", pk)] = meta
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
            if patch is None:
                self.memo.end_round()
        self._shared = shared_done
        self._metas = metas
        self._own = {k: v for k, v in self._own.items() if k in out}
        self._snap = {k: v for k, v in self._snap.items() if k in out}
        return out

    def layers(self) -> Iterator[tuple[ProxyMeta, Iterable[Resource]]]:
        """Every distinct layer of the last rebuild (shared outbound layers, proxies' own
        layers) with a proxy it was planned for: each resource once per layer, not once per
        proxy."""
        for (kind, key), meta in self._metas.items():
            types = self._shared.get(key) if kind == "shared" else self._own.get(key)  # type: ignore[call-overload]
            if types:
                for tr in types.values():
                    yield meta, tr.items.values()

    @staticmethod
    def _patchable(pk: ProxyKey) -> bool:
        # Sidecars' own layers (inbound, secrets) and node proxies' (per-pod listeners, identity
        # clusters, internal listeners) and gateways' (listeners, routes) never read endpoints.
        return pk[4] in ("sidecar", "node", "gateway")

    def _patch(self, delta: EndpointDelta, mesh: Mesh, meta: ProxyMeta,
               prev: dict[TypeUrl, TypeResources]) -> dict[TypeUrl, TypeResources] | None:
        """`prev` with the resources of `delta.hosts` re-planned; None when not patchable."""
        assert self._plan_shared_hosts is not None
        if not self._patchable(proxy_key(meta)):
            return None
        old = self._plan_shared_hosts(delta.base, meta, delta.hosts)
        new = self._plan_shared_hosts(mesh, meta, delta.hosts)
        if old is None or new is None:
            return None
        updates: dict[TypeUrl, dict[str, Resource | None]] = {}
        for spec in old:
            updates.setdefault(spec.type_url, {})[spec.name] = None
        for spec in new:
            updates.setdefault(spec.type_url, {})[spec.name] = self.memo.realize(spec)
        out = dict(prev)
        for t, upd in updates.items():
            cur = out.get(t)
            out[t] = cur.patched(upd) if cur is not None else _evolve(
                t, {n: r for n, r in upd.items() if r is not None}, None)
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
