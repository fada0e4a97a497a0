"""What a rejected config may change, and pre-flight. Decisions here; I/O only through the
validator (Meshline's own Envoy, `controlplane.envoycheck`).

- A fleet proxy's NACK is evidence about that proxy: its stream keeps the versions it last
  accepted of the rejected resources (`xds.stream`), everything else keeps flowing to it,
  and no other proxy's config changes. The NACK is recorded as a `Fault` of that proxy.
- Only a NACK from an authenticated stream is taken further: the rejected resources are
  checked by the validator. If Meshline's Envoy rejects them too, it is a content fault:
  the source objects behind them are found by bisection *against the validator* (never
  against a fleet proxy) and withheld mesh-wide. If the validator accepts, the failure is
  local to that proxy (a port in use, a namespace not ready): reported, nothing withheld.
  With no validator, nothing is ever withheld mesh-wide, and the fault says why.
- Pre-flight: before a rebuild that changed objects (not endpoint-only patches) reaches
  any proxy, its new resources are checked by the validator; an object whose resources
  Envoy refuses is withheld (its last good version, or for security objects a fail-closed
  stand-in, serves instead) and no proxy ever sees the bad version.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

from controlplane.cache.resources import Resource
from controlplane.envoycheck import CHECKED_TYPES, EnvoyValidator
from controlplane.model.ir import ProxyMeta, SourceRef
from controlplane.model.mesh import Mesh
from controlplane.model.store import FAIL_CLOSED_KINDS, MeshStore
from controlplane.translate.plan import ENDPOINT, SHORT_NAMES
from controlplane.xds.stream import AdsStream, sanitize

log = logging.getLogger(__name__)

Key = tuple[str, str, str]
Planner = Callable[[Mesh, ProxyMeta], Sequence[Resource]]
"""Plans one proxy's resources for a (trial) mesh, without touching live state."""

@dataclass(frozen=True, slots=True)
class Fault:
    """Something one proxy does not receive, and why. `verdict`: `checking` (the validator
    is on it), `proxy-local` (Meshline's Envoy accepts it: only this proxy fails),
    `content` (Meshline's Envoy rejects it too: the culprits are withheld mesh-wide),
    `unverified` (no verdict: unauthenticated stream, or no validator)."""

    type_url: str
    resources: tuple[str, ...]
    message: str
    sources: tuple[SourceRef, ...]
    verdict: str
    detail: str
    at: float


@dataclass(slots=True)
class PolicyStats:
    preflight_runs: int = 0
    preflight_rejections: int = 0
    reproductions: int = 0
    proxy_local: int = 0
    content_faults: int = 0
    last_preflight_s: float = 0.0


@dataclass
class NackPolicy:
    store: MeshStore
    validator: EnvoyValidator
    plan: Planner
    withheld_changed: Callable[[], None]  # the store's quarantine changed: rebuild
    preflight_enabled: bool = True
    stats: PolicyStats = field(default_factory=PolicyStats)

    def __post_init__(self) -> None:
        self.faults: dict[int, dict[str, Fault]] = {}  # stream id -> type URL -> fault
        self._validated_gen = -1  # store generation of the last mesh that passed pre-flight
        self._tasks: set[asyncio.Task[None]] = set()
        self._reproduced: dict[str, str] = {}  # resource version -> verdict (bounded)

    # ------------------------------------------------------------------ status
    @property
    def mode(self) -> str:
        if not self.validator.available:
            return f"off: {self.validator.unavailable_reason}; NACKs affect only the proxy that sends them"
        return "on" if self.preflight_enabled else "pre-flight off (NACKs are still checked by the validator)"

    def faults_of(self, stream_id: int) -> dict[str, Fault]:
        return self.faults.get(stream_id, {})

    def forget(self, stream_id: int) -> None:
        self.faults.pop(stream_id, None)

    def has_faults(self, stream_id: int) -> bool:
        """Whether a fault of this stream is recorded (cheap: checked on every converged ACK)."""
        return stream_id in self.faults

    def cleared(self, stream_id: int, type_url: str) -> None:
        """The proxy holds nothing back of this type any more."""
        f = self.faults.get(stream_id)
        if f is not None:
            f.pop(type_url, None)
            if not f:
                del self.faults[stream_id]

    # ------------------------------------------------------------------ NACKs
    def on_nack(self, stream_id: int, meta: ProxyMeta, type_url: str, rejected: Sequence[Resource],
                message: str, sources: Sequence[SourceRef], authenticated: bool) -> None:
        msg = sanitize(message)
        names = tuple(sorted(r.name for r in rejected))
        if not authenticated:
            verdict, detail = "unverified", ("the stream is not authenticated: its NACK changes only what this "
                                              "stream receives")
        elif not self.validator.available:
            verdict, detail = "unverified", f"nothing withheld mesh-wide: {self.validator.unavailable_reason}"
        else:
            verdict, detail = "checking", "Meshline's Envoy is checking the rejected resources"
        self._record(stream_id, Fault(type_url, names, msg, tuple(sources), verdict, detail, time.time()))
        if verdict != "checking":
            return
        checkable = [r for r in rejected if r.type_url in CHECKED_TYPES]
        known = {self._reproduced.get(r.version) for r in checkable}
        if not checkable or known == {"proxy-local"}:
            self._record(stream_id, Fault(type_url, names, msg, tuple(sources), "proxy-local",
                                          "Meshline's Envoy accepts these resources: the failure is local to "
                                          "this proxy (e.g. a port in use or a network namespace not ready); "
                                          "nothing is withheld from other proxies", time.time()))
            return
        self._spawn(self._reproduce(stream_id, meta, type_url, checkable, msg, tuple(sources)))

    def _record(self, stream_id: int, fault: Fault) -> None:
        self.faults.setdefault(stream_id, {})[fault.type_url] = fault

    def _spawn(self, coro: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await coro
            except Exception:
                log.exception("checking a NACK failed")
        try:
            task = asyncio.get_running_loop().create_task(run())
        except RuntimeError:  # no loop (unit tests drive the policy by hand)
            if hasattr(coro, "close"):
                coro.close()
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reproduce(self, stream_id: int, meta: ProxyMeta, type_url: str, rejected: list[Resource],
                         msg: str, sources: tuple[SourceRef, ...]) -> None:
        self.stats.reproductions += 1
        names = tuple(sorted(r.name for r in rejected))
        verdict, bad = await self.validator.rejected(rejected)
        if verdict.ok is None:
            detail = f"no verdict from Meshline's Envoy ({verdict.message}): nothing withheld mesh-wide"
            self._update(stream_id, Fault(type_url, names, msg, sources, "unverified", detail, time.time()))
            return
        if not bad:
            self.stats.proxy_local += 1
            self._remember({r.version: "proxy-local" for r in rejected})
            log.warning("proxy %s rejected %s, which Meshline's Envoy accepts: a fault local to that proxy (%s)",
                        meta.node_id, ", ".join(names), msg, extra={"proxy": meta.node_id})
            self._update(stream_id, Fault(type_url, names, msg, sources, "proxy-local",
                                          "Meshline's Envoy accepts these resources: the failure is local to "
                                          "this proxy; nothing is withheld from other proxies", time.time()))
            return
        self.stats.content_faults += 1
        self._remember({r.version: "content" for r, _ in bad})
        suspects = self._suspects(bad, changed_only=False)
        seen = {k: self._changed_gen(k) for k in suspects}
        culprits = await self.find_culprits(meta, bad, suspects)
        culprits = self._unchanged(culprits, seen)
        reason = "; ".join(sorted({f"rejected by proxy {meta.node_id} and reproduced by Meshline's Envoy: {m}"
                                   for _, m in bad}))
        self._withhold(culprits, reason)
        detail = ("content fault reproduced by Meshline's Envoy; withheld mesh-wide: "
                  + (", ".join("/".join(k) for k in sorted(culprits)) or "no single object could be blamed"))
        self._update(stream_id, Fault(type_url, names, msg, sources, "content", detail, time.time()))

    def _update(self, stream_id: int, fault: Fault) -> None:
        """Record a verdict for a fault still open on that stream."""
        cur = self.faults.get(stream_id, {}).get(fault.type_url)
        if cur is not None:
            self._record(stream_id, fault)

    def _remember(self, verdicts: dict[str, str]) -> None:
        self._reproduced.update(verdicts)
        while len(self._reproduced) > 10_000:
            del self._reproduced[next(iter(self._reproduced))]

    # ------------------------------------------------------------------ pre-flight
    async def preflight(self, resources_by_proxy: Iterable[tuple[ProxyMeta, Iterable[Resource]]]) -> bool:
        """Check the new resources of a rebuild before any proxy sees them. True: publish
        as built. False: objects were withheld (the store changed): rebuild first."""
        if not self.preflight_enabled or not self.validator.available:
            return True
        todo: dict[str, tuple[Resource, ProxyMeta]] = {}
        for meta, resources in resources_by_proxy:
            for r in resources:
                if r.type_url in CHECKED_TYPES and r.type_url != ENDPOINT and r.version not in todo \
                        and not self.validator.known_good(r):
                    todo[r.version] = (r, meta)
        gen = self.store.generation
        if not todo:
            self._validated_gen = gen
            return True
        t0 = time.perf_counter()
        self.stats.preflight_runs += 1
        verdict, bad = await self.validator.rejected([r for r, _ in todo.values()])
        self.stats.last_preflight_s = time.perf_counter() - t0
        if verdict.ok is None:
            log.warning("pre-flight gave no verdict (%s); pushing unchecked", verdict.message)
            return True
        if not bad:
            self._validated_gen = gen
            return True
        self.stats.preflight_rejections += 1
        by_meta: dict[str, tuple[ProxyMeta, list[tuple[Resource, str]]]] = {}
        for r, m in bad:
            meta = todo[r.version][1]
            by_meta.setdefault(meta.node_id, (meta, []))[1].append((r, m))
        withheld = False
        for meta, rejected in by_meta.values():
            suspects = self._suspects(rejected, changed_only=True)
            seen = {k: self._changed_gen(k) for k in suspects}
            culprits = self._unchanged(await self.find_culprits(meta, rejected, suspects), seen)
            if not culprits:
                log.error("pre-flight: Meshline's Envoy rejects %s and no changed object explains it; proxies "
                          "will reject it too: %s", ", ".join(r.name for r, _ in rejected),
                          sanitize(rejected[0][1]))
                continue
            reasons = {k: sanitize(m) for r, m in rejected for k in _keys(r.sources) if k in culprits}
            for key in culprits:
                self._withhold([key], f"rejected in pre-flight by Meshline's Envoy: {reasons.get(key, '')}")
            withheld = True
        if withheld or self.store.generation != gen:
            return False  # rebuild from the store as it is now (and check that again)
        self._validated_gen = gen
        return True

    def _suspects(self, rejected: Sequence[tuple[Resource, str]], changed_only: bool) -> list[Key]:
        """Objects behind the rejected resources, most recently changed first. With
        `changed_only`, only those changed since the last mesh that passed pre-flight (an
        object that merely moved within its file has not changed)."""
        found: dict[Key, int] = {}
        for r, _ in rejected:
            for key in _keys(r.sources):
                e = self.store.entry(key)
                if e is None or e.good is None or e.quarantine is not None:
                    continue
                if changed_only and e.changed_gen <= self._validated_gen:
                    continue
                found[key] = e.changed_gen
        if changed_only and not found:
            return self._suspects(rejected, changed_only=False)
        return sorted(found, key=lambda k: (-found[k], k))

    async def find_culprits(self, meta: ProxyMeta, rejected: Sequence[tuple[Resource, str]],
                            suspects: Sequence[Key]) -> list[Key]:
        """The suspects that must be withheld for Meshline's Envoy to accept `meta`'s
        config: adaptive group testing, each test one validate run of the re-planned
        resources. [] when withholding every suspect does not help (nothing to blame)."""
        if not suspects:
            return []
        names = {(r.type_url, r.name) for r, _ in rejected}

        async def bad(withheld: set[Key]) -> bool | None:
            mesh = self.store.trial_mesh(withheld)
            planned = [r for r in self.plan(mesh, meta) if r.type_url in CHECKED_TYPES
                       and (r.type_url != ENDPOINT or (r.type_url, r.name) in names)]
            verdict, _ = await self.validator.rejected(planned)
            return None if verdict.ok is None else not verdict.ok

        # The most recently changed suspects first: widen to older ones only when withholding
        # the newer ones does not help (withholding a Service would also hide the resources a
        # bad VirtualService for it produces, but the Service is not what changed).
        gens = [self._changed_gen(k) for k in suspects]
        remaining: list[Key] = []
        for g in sorted(set(gens), reverse=True):
            remaining = [k for k, kg in zip(suspects, gens, strict=True) if kg >= g]
            verdict = await bad(set(remaining))
            if verdict is None:
                return []
            if not verdict:
                break
        else:
            return []
        culprits: list[Key] = []
        while remaining and await bad(set(culprits)):
            # One culprit among `remaining` (released), the others found so far withheld.
            cand, held = list(remaining), set(culprits)
            while len(cand) > 1:
                half, rest = cand[: len(cand) // 2], cand[len(cand) // 2:]
                verdict = await bad(held | set(rest))
                if verdict is None:
                    return culprits
                if verdict:
                    cand = half  # releasing `half` is enough to be rejected: `rest` stays withheld
                    held |= set(rest)
                else:
                    cand = rest  # `half` is innocent by itself; it stays released
            culprits.append(cand[0])
            remaining.remove(cand[0])
        return sorted(culprits)

    def _unchanged(self, keys: list[Key], seen: dict[Key, int]) -> list[Key]:
        """Of `keys`, those still at the version the check began with: a verdict is about the
        version it checked, never about a newer one (e.g. a fix applied meanwhile)."""
        return [k for k in keys if self._changed_gen(k) == seen.get(k)]

    def _changed_gen(self, key: Key) -> int:
        e = self.store.entry(key)
        return e.changed_gen if e is not None else -1

    def _withhold(self, keys: Iterable[Key], reason: str) -> None:
        done = self.store.quarantine(keys, sanitize(reason))
        if done:
            log.warning("withholding %s: %s", ", ".join("/".join(k) for k in done), sanitize(reason),
                        extra={"objects": ["/".join(k) for k in done]})
            self.withheld_changed()

    # ------------------------------------------------------------------ operator
    def release(self, keys: Iterable[Key]) -> list[Key]:
        keys = [k for k in keys if k in self.store.quarantined()]
        if keys:
            self.store.release(keys)
            self.withheld_changed()
        return keys

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t


VISIBLE_EVERYWHERE = frozenset({"VirtualService", "DestinationRule", "ServiceEntry", "HTTPRoute", "GRPCRoute",
                                "TCPRoute"})
"""Kinds that apply to clients in every namespace by default (exportTo `*`; Gateway API
routes attached to a Service of their own namespace)."""


def degradation(stream: AdsStream, faults: dict[str, Fault], withheld: dict[Key, str], meta: ProxyMeta,
                root_namespace: str, locate: Callable[[Key], str | None]) -> list[dict[str, object]]:
    """What one proxy does not receive that it should, and why: resources its stream holds
    back after its own NACKs, objects withheld mesh-wide that apply to it (their previous
    version serves), security objects served fail-closed in their place. Read-only."""
    out: list[dict[str, object]] = []
    for t, held in stream.held_back().items():
        f = faults.get(t)
        nack = stream.last_nack(t)
        out.append({
            "kind": "held-back", "type": SHORT_NAMES.get(t, t), "resources": sorted(held),
            "message": f.message if f else (nack.message if nack else ""),
            "verdict": f.verdict if f else "unverified", "detail": f.detail if f else "",
            "objects": [{"object": s.display, **({"location": s.location} if s.file else {})}
                        for s in (f.sources if f else nack.sources if nack else ())],
        })
    for key, reason in sorted(withheld.items()):
        kind, ns, _ = key
        if kind not in VISIBLE_EVERYWHERE and ns not in (meta.namespace, root_namespace):
            continue
        out.append({
            "kind": "fail-closed" if kind in FAIL_CLOSED_KINDS else "withheld",
            "object": "/".join(key), "location": locate(key), "message": reason,
        })
    return out


def _keys(sources: Iterable[SourceRef]) -> list[Key]:
    return [(s.kind, s.namespace, s.name) for s in sources]
