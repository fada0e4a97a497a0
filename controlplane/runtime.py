"""The running control plane: sources -> store -> snapshots -> xDS streams, with
debounce. Owns the asyncio tasks; does I/O only through the sources and servers it wires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controlplane.ca.identity import Identity, identity_of, proven_node
from controlplane.cache.resources import Resource
from controlplane.cache.snapshot import ProxyKey, SnapshotBuilder, proxy_key
from controlplane.gcpolicy import GcPolicy
from controlplane.metrics import Metrics
from controlplane.model.ir import Hostname, ProxyMeta
from controlplane.model.mesh import Mesh
from controlplane.model.store import MeshStore
from controlplane.quarantine import Bisector, Step
from controlplane.sources.base import Source, SourceEvent, Synced
from controlplane.translate.ambient import identity_secret, node_identities, plan_node, plan_waypoint
from controlplane.translate.plan import SECRET, ResourceSpec
from controlplane.translate.scope import proxy_scope, scope_key
from controlplane.translate.secrets import ROOT_SECRET, plan_named_secrets, plan_secrets, root_secret
from controlplane.translate.sidecar import plan_inbound, plan_outbound, plan_outbound_hosts
from controlplane.xds.server import Connection, XdsServer
from controlplane.xds.stream import NackRecord, Outgoing

if TYPE_CHECKING:
    from controlplane.ca.service import IdentityService

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Settings:
    config_dirs: tuple[Path, ...] = ()
    kubernetes: bool = False
    xds_address: str = "127.0.0.1:15010"
    status_address: str = "127.0.0.1:15014"
    webhook_address: str | None = None
    debounce_ms: int = 100
    debounce_max_ms: int = 1000
    status_token_file: Path | None = None
    kubeconfig: Path | None = None  # else $KUBECONFIG, else the in-cluster service account
    watch_namespaces: tuple[str, ...] | None = None  # None: every namespace
    leader_namespace: str = "meshline-system"
    leader_lease_seconds: float = 15.0
    istio_api: bool = False  # also watch networking.istio.io/v1 VirtualServices/DestinationRules
    # Identity (controlplane.ca): off unless ca_enabled. ca_dir None with ca_enabled: a private
    # temporary directory (Kubernetes mode, where the root lives in a Secret).
    ca_enabled: bool = False
    ca_dir: Path | None = None
    trust_domain: str = "cluster.local"
    root_namespace: str = "meshline-system"  # mesh-wide PeerAuthentication/AuthorizationPolicy live here
    workload_cert_ttl_s: float = 86400.0
    ca_address: str | None = None  # TLS port for xDS + the CSR API (15012); None: off
    ca_address_required: bool = True  # False: a port already taken is logged and skipped
    ca_dns_names: tuple[str, ...] = ("meshline.meshline-system.svc", "localhost")
    environmental_retry_s: float = 5.0  # a NACK for a missing pod netns: offer the config again after this
    bundle_propagation_s: float = 30.0  # root rotation: wait this long at most for proxies to ACK the bundle
    node_agents: bool = False  # serve the NodeAgent.Report API on the xDS port; PodNetns objects as a source


NODE_PROXY_SERVICE_ACCOUNT = "meshline-node-proxy"


def node_proxy_identity(root_namespace: str) -> Identity:
    """The identity node proxies (and their node agents) must prove: `<root ns>/meshline-node-proxy`."""
    return Identity(root_namespace, NODE_PROXY_SERVICE_ACCOUNT)


ENVIRONMENTAL_NACKS = ("failed to set netns",)
"""Envoy errors that no configuration object causes (a node proxy cannot enter a pod's
network namespace, e.g. before the node agent mounted it or after the pod went away)."""


def _plan_shared(mesh: Mesh, meta: ProxyMeta) -> list[ResourceSpec]:
    if meta.mode != "sidecar":
        return []
    return plan_outbound(mesh, meta.namespace, meta.capture, meta.outbound_address, proxy_scope(mesh, meta))


def _plan_shared_hosts(mesh: Mesh, meta: ProxyMeta, hosts: frozenset[str]) -> list[ResourceSpec] | None:
    if meta.mode != "sidecar":
        return None
    return plan_outbound_hosts(mesh, meta.namespace, meta.capture, [Hostname(h) for h in hosts],
                               proxy_scope(mesh, meta))


def _plan_own(mesh: Mesh, meta: ProxyMeta) -> list[ResourceSpec]:
    if meta.mode == "node":
        return plan_node(mesh, meta.node) if meta.node else []
    if meta.mode == "waypoint":
        return plan_waypoint(mesh, meta)
    return plan_inbound(mesh, meta)


def _shared_key(mesh: Mesh, meta: ProxyMeta) -> object:
    """Proxies with equal keys share one outbound layer: same mode, namespace, capture
    (and bind address), and the same effective Sidecar (or none)."""
    return (meta.mode, meta.namespace, meta.capture, meta.outbound_address if meta.capture == "bind" else "",
            scope_key(mesh, meta))


@dataclass
class Runtime:
    settings: Settings
    sources: Sequence[Source]
    metrics: Metrics = field(default_factory=Metrics)
    identity: IdentityService | None = None
    gc_policy: GcPolicy | None = None  # `serve` sets one; tests leave the collector alone

    def __post_init__(self) -> None:
        self.store = MeshStore(trust_domain=self.settings.trust_domain, root_namespace=self.settings.root_namespace,
                               netns_annotations=not self.settings.kubernetes)
        # The builder asks for keys while it rebuilds from `store.mesh()` (rebuild_now).
        self.builder = SnapshotBuilder(_plan_shared, self._plan_own_layer,
                                       lambda meta: _shared_key(self.store.mesh(), meta), _plan_shared_hosts)
        self.xds = XdsServer(self, self, self.identity.authenticator if self.identity is not None else None,
                             node_proxy_identity(self.settings.root_namespace))
        self._rotation_timer: asyncio.TimerHandle | None = None
        if self.identity is not None:
            self.identity.on_change = self._identity_changed
            self.identity.bundle_synced = self.bundle_synced
        self._synced: set[str] = set()
        self._dirty = asyncio.Event()
        self._first_dirty: float | None = None
        self._last_change: float = 0.0
        self._last_rebuild: float = float("-inf")
        self._full_rebuild = False
        self.rebuilds = 0
        self._snapshots: dict[ProxyKey, object] = {}
        self._mesh: Mesh | None = None
        self._mesh_generation = -1
        self.pushes_since_start = 0
        self.change_started: float | None = None
        self._gen_started: dict[int, float] = {}
        self.bisector = Bisector()
        self._store_gen_of: dict[int, int] = {}  # snapshot generation -> store generation it was built from
        self.after_rebuild: list[Callable[[], None]] = []
        self.leader: bool | None = None  # None: no leader election (directory mode)
        self._arm_pending = False
        self._push_counters: dict[str, Any] = {}  # type URL -> its pushes counter child

    # ------------------------------------------------------------------ readiness
    @property
    def ready(self) -> bool:
        return all(s.name in self._synced for s in self.sources)

    def unsynced_sources(self) -> list[str]:
        return sorted(s.name for s in self.sources if s.name not in self._synced)

    # ------------------------------------------------------------------ sources
    async def sink(self, events: list[SourceEvent]) -> None:
        newly_synced = False
        for ev in events:
            if isinstance(ev, Synced) and ev.source not in self._synced:
                self._synced.add(ev.source)
                newly_synced = True
        if self.store.apply(events) or newly_synced:
            self.mark_dirty()

    def mark_dirty(self, urgent: bool = False) -> None:
        now = time.monotonic()
        if self._first_dirty is None:
            self._first_dirty = now
        if self.change_started is None and not urgent:
            self.change_started = time.time()
        self._last_change = now if not urgent else now - 10.0
        self._dirty.set()

    # ------------------------------------------------------------------ xDS hooks
    def attach(self, conn: Connection) -> None:
        self.metrics.proxies.labels(conn.meta.mode, conn.stream.protocol).inc()
        snap = self._snapshots.get(proxy_key(conn.meta))
        if snap is not None and self._mesh_generation == self.store.generation:
            conn.update(snap)  # type: ignore[arg-type]
        else:
            self.mark_dirty(urgent=True)

    def detach(self, conn: Connection) -> None:
        self.metrics.proxies.labels(conn.meta.mode, conn.stream.protocol).dec()

    def on_push(self, conn: Connection, out: Outgoing) -> None:
        counter = self._push_counters.get(out.type_url)
        if counter is None:
            counter = self._push_counters[out.type_url] = self.metrics.pushes.labels(_short(out.type_url))
        counter.inc()
        target = conn.stream.target
        if target is not None and conn.extra.get("pushed") != target.generation:
            conn.extra["pushed"] = target.generation
            started = self._gen_started.get(target.generation)
            if started is not None:
                self.metrics.push_seconds.observe(max(0.0, time.time() - started))
        if log.isEnabledFor(logging.DEBUG):
            log.debug("push %s to %s: %d resources, %d removed, nonce %s", _short(out.type_url), conn.meta.node_id,
                      out.count, out.removed, out.nonce)

    def on_nack(self, conn: Connection, nack: NackRecord) -> None:
        self.metrics.nacks.labels(_short(nack_type(conn, nack))).inc()
        if any(marker in nack.message for marker in ENVIRONMENTAL_NACKS):
            # Not the configuration's fault (a pod's network namespace is not reachable yet, or
            # already gone): blame no object; this proxy keeps what it has and retries later.
            log.warning("proxy %s could not apply its config (%s); retrying in %.0f s", conn.meta.node_id,
                        nack.message.strip()[:300], self.settings.environmental_retry_s,
                        extra={"proxy": conn.meta.node_id})
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().call_later(self.settings.environmental_retry_s, self._retry, conn)
            return
        if self.bisector.expired():
            self._abort_bisection()
        step = self.bisector.on_nack(conn.meta.node_id, nack.generation)
        if step is not None:
            log.info("bisect: the released objects hold a culprit; narrowing down")
            self._apply(step, f"rejected by proxy {conn.meta.node_id}: {nack.message.strip()}")
            return
        culprits = self.nack_culprits(nack)
        if not culprits:
            return
        reason = f"rejected by proxy {conn.meta.node_id}: {nack.message.strip()}"
        done = self.store.quarantine(culprits, reason)
        if done:
            log.warning("withholding %s: %s", ", ".join("/".join(k) for k in done), reason,
                        extra={"proxy": conn.meta.node_id, "objects": ["/".join(k) for k in done]})
            if len(done) > 1:
                self._apply(self.bisector.start(conn.meta.node_id, done, reason), reason)
            self.metrics.quarantined.set(len(self.store.quarantined()))
            self.mark_dirty(urgent=True)

    def _retry(self, conn: Connection) -> None:
        """Offer a proxy again what it rejected for an environmental reason."""
        if conn.stream.stream_id in {c.stream.stream_id for c in self.xds.connections.values()}:
            conn.stream.clear_quarantine()
            self.mark_dirty(urgent=True)

    def _abort_bisection(self) -> None:
        undecided = self.bisector.abort()
        if undecided:
            log.warning("bisect abandoned (no verdict from the proxy under test); releasing %s",
                        ", ".join("/".join(k) for k in undecided))
            self.store.release(undecided)
            self.metrics.quarantined.set(len(self.store.quarantined()))
            self.mark_dirty(urgent=True)

    def _check_bisection(self) -> None:
        if self.bisector.expired():
            self._abort_bisection()

    def _apply(self, step: Step, reason: str) -> None:
        if step.quarantine:
            self.store.quarantine(step.quarantine, reason)
        if step.release:
            self.store.release(step.release)
            self._arm_pending = True
            with contextlib.suppress(RuntimeError):  # no running loop (unit tests drive it by hand)
                asyncio.get_running_loop().call_later(self.bisector.timeout_s + 1.0, self._check_bisection)
        if step.done:
            log.warning("bisect finished: withholding only %s",
                        ", ".join("/".join(k) for k in sorted(self.store.quarantined())))
        self.metrics.quarantined.set(len(self.store.quarantined()))
        self.mark_dirty(urgent=True)

    def nack_culprits(self, nack: NackRecord) -> list[tuple[str, str, str]]:
        """The source objects most likely behind a rejected response: of the objects that
        shaped the rejected resources, the most recently changed ones, preferring routing
        policy (VirtualService, DestinationRule) over Services when they changed together."""
        cands = []
        # Objects changed after the rejected snapshot was built are not what Envoy saw (a late
        # NACK must not quarantine the fix), and objects under bisection are decided there.
        seen_gen = self._store_gen_of.get(nack.generation)
        deciding = self.bisector.involved()
        for s in nack.sources:
            key = (s.kind, s.namespace, s.name)
            e = self.store.entry(key)
            if e is None or e.quarantine is not None or e.good is None or key in deciding:
                continue
            if seen_gen is not None and e.changed_gen > seen_gen:
                continue
            cands.append((key, e.changed_gen))
        if not cands:
            return []
        latest = max(g for _, g in cands)
        newest = [k for k, g in cands if g == latest]
        policy = [k for k in newest if k[0] in ("VirtualService", "DestinationRule")]
        return sorted(policy or newest)

    def on_ack(self, conn: Connection) -> None:
        stream = conn.stream
        target = stream.target
        if target is None or conn.extra.get("converged") == target.generation:
            return
        if any(st.pending for st in stream.types.values()) or not stream.synced():
            return
        conn.extra["converged"] = target.generation
        if self.bisector.active is not None:
            if self.bisector.expired():
                self._abort_bisection()
            else:
                self._apply(self.bisector.on_ack(conn.meta.node_id, target.generation), "")
        started = self._gen_started.get(target.generation)
        if started is not None:
            self.metrics.convergence_seconds.observe(max(0.0, time.time() - started))

    # ------------------------------------------------------------------ identities (SDS)
    def _plan_own_layer(self, mesh: Mesh, meta: ProxyMeta) -> list[ResourceSpec]:
        """The proxy's own layer: its inbound side plus, for an authenticated identity, its
        certificate and the trust bundle."""
        specs = _plan_own(mesh, meta)
        ident = identity_of(meta)
        if ident is None or self.identity is None:
            return specs
        if meta.mode == "node":
            return [*specs, *self._node_secrets(mesh, meta)]
        material = self.identity.material(ident)
        if material is None:
            return specs
        return [*specs, *plan_secrets(material, self.identity.bundle)]

    def _node_secrets(self, mesh: Mesh, meta: ProxyMeta) -> list[ResourceSpec]:
        """A node proxy's certificates: one per identity of the ambient pods on the node its
        credential proves, and no other (the CA issues nothing else to it)."""
        assert self.identity is not None
        node = proven_node(meta)
        if node is None or node != meta.node:
            return []
        named = []
        for ns, sa in node_identities(mesh, node):
            material = self.identity.material(Identity(ns, sa))
            if material is not None:
                named.append((identity_secret(mesh.trust_domain, ns, sa), material))
        return plan_named_secrets(named, self.identity.bundle)

    def _identity_changed(self) -> None:
        """Certificates or the trust bundle may change: the next rebuild re-plans every own
        layer (an endpoint-only patch would keep the old secrets)."""
        self._full_rebuild = True
        self.mark_dirty(urgent=True)

    def _identity_upkeep(self, conns: Sequence[Connection]) -> None:
        """Forget certificates nobody holds; wake up at the next half-life to rotate."""
        if self.identity is None:
            return
        live = {c.identity for c in conns if c.identity is not None}
        mesh = self.store.mesh()
        for c in conns:
            node = proven_node(c.meta) if c.meta.mode == "node" else None
            if node is not None and node == c.meta.node:
                live.update(Identity(ns, sa) for ns, sa in node_identities(mesh, node))
        delay = self.identity.sweep(live)
        if self._rotation_timer is not None:
            self._rotation_timer.cancel()
            self._rotation_timer = None
        if delay is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._rotation_timer = loop.call_later(delay + 0.01, self._identity_changed)

    def bundle_synced(self, bundle: str) -> bool:
        """Whether every authenticated proxy that subscribes to ROOTCA has ACKed `bundle`."""
        want = Resource(SECRET, ROOT_SECRET, root_secret(bundle).SerializeToString(deterministic=True)).version
        for c in list(self.xds.connections.values()):
            st = c.stream.types.get(SECRET)
            if c.identity is None or st is None or not st.subscribed(ROOT_SECRET):
                continue
            acked = st.acked.get(ROOT_SECRET)
            if acked is None or acked.version != want:
                return False
        return True

    # ------------------------------------------------------------------ rebuild loop
    def mesh(self) -> Mesh:
        return self.store.mesh()

    def rebuild_now(self) -> None:
        if not self.ready:
            return
        t0 = time.perf_counter()
        mesh, delta = self.store.mesh_delta()
        if self._full_rebuild:
            delta, self._full_rebuild = None, False
        if delta is None:  # (an endpoint-only patch never changes an object's issues)
            self.metrics.validation_errors.set(sum(1 for i in self.store.object_issues() if i.severity == "error"))
        conns = list(self.xds.connections.values())
        store_gen = self.store.generation
        snaps = self.builder.rebuild(mesh, [c.meta for c in conns], delta)
        self._snapshots = dict(snaps)
        self._store_gen_of[self.builder.generation] = store_gen
        while len(self._store_gen_of) > 256:
            del self._store_gen_of[next(iter(self._store_gen_of))]
        if self.change_started is not None:
            self._gen_started[self.builder.generation] = self.change_started
            self.change_started = None
            while len(self._gen_started) > 64:
                del self._gen_started[next(iter(self._gen_started))]
        self._mesh = mesh
        self._mesh_generation = self.store.generation
        if self._arm_pending and self.bisector.active is not None:
            # The proxy under test must try the released config even if it equals what it
            # rejected before: clear its per-stream hold-back.
            self._arm_pending = False
            self.bisector.armed(self.builder.generation)
            for c in conns:
                if c.meta.node_id == self.bisector.active.proxy:
                    c.stream.clear_quarantine()
        for c in conns:
            snap = snaps.get(proxy_key(c.meta))
            if snap is not None:  # None: its first build failed (logged); it waits for the next
                c.update(snap)
        self._identity_upkeep(conns)
        self.metrics.rebuild_seconds.observe(time.perf_counter() - t0)
        for hook in self.after_rebuild:
            hook()
        self.metrics.serializations.set(self.builder.memo.stats.serializations)
        if delta is None and self.gc_policy is not None:
            self.gc_policy.after_full_rebuild(streams=len(conns))
            self.metrics.gc_settle_pending.set(1)

    async def rebuild_loop(self) -> None:
        debounce = self.settings.debounce_ms / 1000
        max_wait = self.settings.debounce_max_ms / 1000
        failures = 0
        while True:
            await self._dirty.wait()
            # Debounce. An endpoint change after a quiet window (no rebuild for `debounce`) is
            # pushed at once: the first change of a burst costs no waiting. Changes that follow within the
            # window are coalesced: pushed once they pause for `debounce`, or after `max_wait`.
            first = self._first_dirty or time.monotonic()
            # (Only endpoint changes skip the wait: objects that belong together, e.g. a
            # VirtualService and its DestinationRule, arrive a few ms apart and must go together.)
            if first - self._last_rebuild < debounce or not self.store.endpoint_only_pending():
                while True:
                    now = time.monotonic()
                    first = self._first_dirty or now
                    quiet_until = self._last_change + debounce
                    if now >= quiet_until or now - first >= max_wait:
                        break
                    await asyncio.sleep(min(quiet_until, first + max_wait) - now)
            self._dirty.clear()
            self._first_dirty = None
            try:
                self.rebuild_now()
                self._last_rebuild = time.monotonic()
                self.rebuilds += 1
                failures = 0
            except Exception:  # a translation bug must not kill the control plane
                failures = min(failures + 1, 6)
                log.exception("rebuilding snapshots failed; proxies keep their last config (retry in %ss)",
                              2 ** failures)
                asyncio.get_running_loop().call_later(2 ** failures, self.mark_dirty)

    async def gc_maintenance_loop(self, check_every_s: float = 0.5) -> None:
        """The collector's settle passes (see gcpolicy), only while nothing is being rebuilt."""
        policy = self.gc_policy
        assert policy is not None, "started only with a GC policy"
        while True:
            await asyncio.sleep(check_every_s)
            if policy.maybe_settle(self._dirty.is_set()):
                self.metrics.gc_settle_seconds.observe(policy.last_pass_s)
                self.metrics.gc_settle_pending.set(0)

    async def run_sources(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for s in self.sources:
                tg.create_task(s.run(self.sink))


def _short(type_url: str) -> str:
    return type_url.rsplit(".", 1)[-1]


def nack_type(conn: Connection, nack: NackRecord) -> str:
    for t, st in conn.stream.types.items():
        if st.last_nack is nack:
            return t
    return "unknown"


async def cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await t
