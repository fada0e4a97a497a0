"""One list/watch loop ("informer") per Kubernetes resource and namespace, run in its own
thread with the official blocking `kubernetes` client. Does network I/O.

An informer lists its resource (recording the list's resourceVersion), then watches from
there, keeping a cache of the objects it has reported. It hands changes to its owner as
`Batch`es of `Put`/`Removed` deltas through a thread-safe callback:

- a dropped watch (stream ended, connection error) resumes from the last resourceVersion
  seen, or relists when the server gives no resourceVersions (e.g. the kmock emulator);
- 410 Gone (HTTP status or an ERROR watch event) relists and reports the *difference* to
  the cache (adds, updates, and removals of objects that vanished), never a reset;
- BOOKMARK events only move the resourceVersion;
- an ADDED/MODIFIED event equal to the cached object reports nothing (watch replays);
- errors back off exponentially with jitter (capped), and the backoff resets once a watch
  has stayed up for a while or delivered a change;
- a resource the server does not serve (404 on its list, e.g. a CRD not installed) counts
  as listed and empty, and is retried with backoff until it appears.

Nothing here touches asyncio: the owner (`controlplane.sources.kubernetes`) bridges.
"""

from __future__ import annotations

import functools
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines
from urllib3.exceptions import MaxRetryError, ReadTimeoutError

from controlplane.model.convert import REPORTED_API_GROUPS
from controlplane.model.convert_secret import TLS_DATA_KEYS, has_tls_keys
from controlplane.model.raw import ObjectKey, RawObject

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Resource:
    """A watched API resource. `priority` orders resources that yield the same
    (kind, namespace, name) key, e.g. Meshline's and Istio's VirtualService: lower wins."""

    kind: str
    group: str
    version: str
    plural: str
    namespaced: bool = True
    priority: int = 0
    field_selector: str = ""
    """Filter applied by the API server to the list and the watch (e.g. a Secret `type`)."""

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def label(self) -> str:
        """The `source` label of its metrics: `kubernetes/<Kind>`, qualified by the API
        group for the Istio aliases."""
        alias = self.group.endswith(".istio.io")
        return f"kubernetes/{self.kind}.{self.group}" if alias else f"kubernetes/{self.kind}"


CORE_RESOURCES = (
    Resource("Namespace", "", "v1", "namespaces", namespaced=False),
    Resource("Service", "", "v1", "services"),
    Resource("Pod", "", "v1", "pods"),
    Resource("EndpointSlice", "discovery.k8s.io", "v1", "endpointslices"),
    Resource("VirtualService", "networking.meshline.io", "v1", "virtualservices"),
    Resource("DestinationRule", "networking.meshline.io", "v1", "destinationrules"),
    Resource("Sidecar", "networking.meshline.io", "v1", "sidecars"),
    Resource("ServiceEntry", "networking.meshline.io", "v1", "serviceentries"),
    Resource("WorkloadEntry", "networking.meshline.io", "v1", "workloadentries"),
    Resource("Gateway", "networking.meshline.io", "v1", "gateways"),
    Resource("PeerAuthentication", "security.meshline.io", "v1", "peerauthentications"),
    Resource("AuthorizationPolicy", "security.meshline.io", "v1", "authorizationpolicies"),
    Resource("RequestAuthentication", "security.meshline.io", "v1", "requestauthentications"),
    Resource("Telemetry", "telemetry.meshline.io", "v1", "telemetries"),
    # DestinationRule credentialName: only the Secret types that hold TLS credentials the way
    # Istio reads them (kubernetes.io/tls, and Opaque with cert/key/cacert), selected by the API
    # server; of those only the ones with TLS keys are kept, and only their TLS keys (`to_raw`).
    # Service-account tokens, registry credentials etc. are never listed. Never logged.
    Resource("Secret", "", "v1", "secrets", field_selector="type=kubernetes.io/tls"),
    Resource("Secret", "", "v1", "secrets", field_selector="type=Opaque"),
)
ISTIO_RESOURCES = (
    Resource("VirtualService", "networking.istio.io", "v1", "virtualservices", priority=1),
    Resource("DestinationRule", "networking.istio.io", "v1", "destinationrules", priority=1),
    Resource("Sidecar", "networking.istio.io", "v1", "sidecars", priority=1),
    Resource("ServiceEntry", "networking.istio.io", "v1", "serviceentries", priority=1),
    Resource("WorkloadEntry", "networking.istio.io", "v1", "workloadentries", priority=1),
    Resource("Gateway", "networking.istio.io", "v1", "gateways", priority=1),
    Resource("PeerAuthentication", "security.istio.io", "v1", "peerauthentications", priority=1),
    Resource("AuthorizationPolicy", "security.istio.io", "v1", "authorizationpolicies", priority=1),
    Resource("RequestAuthentication", "security.istio.io", "v1", "requestauthentications", priority=1),
    Resource("Telemetry", "telemetry.istio.io", "v1", "telemetries", priority=1),
)


def resources(istio_api: bool | None = False) -> tuple[Resource, ...]:
    return CORE_RESOURCES + (ISTIO_RESOURCES if istio_api else ())


MESH_GROUPS = REPORTED_API_GROUPS
"""API groups whose kinds Meshline translates or reports: Istio's, the Gateway API's and
SIG-Network's experimental ones (the list is the model's, `controlplane.model.convert`)."""
GROUP_VERSIONS = ("v1", "v1beta1", "v1alpha3", "v1alpha2", "v1alpha1")
"""Versions asked for, most preferred first (a kind is watched in the first that serves it)."""
GATEWAY_API_KINDS = frozenset((kind, "gateway.networking.k8s.io")
                              for kind in ("HTTPRoute", "GRPCRoute", "TCPRoute", "TLSRoute", "ReferenceGrant", "Gateway",
                                           "GatewayClass"))
"""Gateway API kinds Meshline translates (controlplane.model.convert_gatewayapi): watched
when served, in the version discovery found, and counted for Synced."""
UNSUPPORTED_PRIORITY = 5


def discover(api: Any, groups: Sequence[str] = MESH_GROUPS) -> list[Resource]:
    """Every listable, watchable top-level kind the API server serves in `groups` (each kind
    in its most preferred version). A group or version that is not served is skipped."""
    custom = k8s.CustomObjectsApi(api)
    out: list[Resource] = []
    for group in groups:
        seen: set[str] = set()
        for version in GROUP_VERSIONS:
            try:
                listing = custom.get_api_resources(group, version)
            except ApiException as exc:
                if exc.status == 404:
                    continue
                raise
            for r in (listing.resources if listing is not None else None) or []:
                verbs = set(r.verbs or ())
                if "/" in r.name or r.kind in seen or not {"list", "watch"} <= verbs:
                    continue
                seen.add(r.kind)
                out.append(Resource(r.kind, group, version, r.name, bool(r.namespaced)))
    return sorted(out, key=lambda r: (r.group, r.kind))


def plan_resources(discovered: Sequence[Resource], istio_api: bool | None
                   ) -> tuple[tuple[Resource, ...], bool, list[Resource]]:
    """(what to watch, whether Istio's groups are used, the unsupported kinds among them):
    the core resources; Istio's networking/security kinds Meshline translates (`istio_api`
    True: always, False: never, None: when the server serves them); and every other served
    kind of the mesh groups, watched only to report each object as unsupported."""
    translated = {(r.kind, r.group) for r in ISTIO_RESOURCES}
    served = {(r.kind, r.group) for r in discovered}
    use_istio = istio_api if istio_api is not None else bool(translated & served)
    gateway_api = tuple(r for r in discovered if (r.kind, r.group) in GATEWAY_API_KINDS)
    unsupported = [replace(r, priority=UNSUPPORTED_PRIORITY + i)
                   for i, r in enumerate(r for r in discovered
                                         if (r.kind, r.group) not in translated | GATEWAY_API_KINDS)]
    return (CORE_RESOURCES + (ISTIO_RESOURCES if use_istio else ()) + gateway_api + tuple(unsupported), use_istio,
            unsupported)


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with jitter: attempt n (1-based) waits
    `min(cap, base * factor**(n-1))`, minus up to `jitter` of it at random."""

    base: float = 0.5
    cap: float = 30.0
    factor: float = 2.0
    jitter: float = 0.5

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        d = min(self.cap, self.base * self.factor ** max(0, attempt - 1))
        return d * (1.0 - self.jitter * rand())


@dataclass(frozen=True, slots=True)
class WatchOptions:
    watch_timeout: float = 300.0
    """Sent as timeoutSeconds; the read timeout is this plus `read_grace`, since servers
    that ignore timeoutSeconds (kmock) would otherwise keep a quiet stream forever."""
    read_grace: float = 15.0
    connect_timeout: float = 10.0
    list_timeout: float = 60.0
    page_size: int = 500
    backoff: Backoff = field(default_factory=Backoff)
    healthy_after: float = 10.0
    """A watch that stayed up this long (or delivered a change) resets the backoff."""


@dataclass(frozen=True, slots=True)
class Put:
    obj: RawObject


@dataclass(frozen=True, slots=True)
class Removed:
    key: ObjectKey


Delta = Put | Removed


@dataclass(frozen=True, slots=True)
class Batch:
    informer: int
    priority: int
    deltas: tuple[Delta, ...]
    listed: bool = False
    """True when the batch is the outcome of a complete list (the informer is in sync)."""


class Stopped(Exception):
    """The informer's owner is gone; the thread should end."""


class WatchExpired(Exception):
    """410 Gone: the resourceVersion is too old to resume from."""


class WatchError(Exception):
    """An ERROR event other than 410 in a watch stream."""


class ResourceAbsent(Exception):
    """The API server does not serve the resource (404 on its list: e.g. a CRD that is not
    installed). The informer reports it as synced and empty, and keeps retrying."""


def to_raw(res: Resource, item: Mapping[str, Any], namespace: str | None = None) -> RawObject:
    """An API object (decoded JSON) as a RawObject. List items carry no apiVersion/kind, so
    both are set from the resource; `metadata.managedFields` is dropped (noise)."""
    meta_in = item.get("metadata")
    meta = {k: v for k, v in meta_in.items() if k != "managedFields"} if isinstance(meta_in, dict) else {}
    body: dict[str, Any] = {"apiVersion": res.api_version, "kind": res.kind}
    body.update((k, v) for k, v in item.items() if k not in ("apiVersion", "kind", "metadata"))
    body["metadata"] = meta
    if res.kind == "Secret" and not res.group:  # its TLS keys only: nothing else is held in memory
        for f in ("data", "stringData"):
            if isinstance(body.get(f), dict):
                body[f] = {k: v for k, v in body[f].items() if k in TLS_DATA_KEYS}
    ns = "" if not res.namespaced else str(meta.get("namespace") or namespace or "default")
    return RawObject(kind=res.kind, api_version=res.api_version, namespace=ns, name=str(meta.get("name") or ""),
                     body=body)


def _rv(obj: Any) -> str | None:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    rv = meta.get("resourceVersion") if isinstance(meta, dict) else None
    return str(rv) if rv else None


def list_function(api: Any, res: Resource, namespace: str | None) -> Callable[..., Any]:
    """The official client's list call for `res` (watch=True turns it into a watch)."""
    if res.group == "":
        core = k8s.CoreV1Api(api)
        if not res.namespaced:
            return functools.partial(getattr(core, f"list_{res.kind.lower()}"))
        snake = "".join(f"_{c.lower()}" if c.isupper() else c for c in res.kind).lstrip("_")
        if namespace is None:
            return functools.partial(getattr(core, f"list_{snake}_for_all_namespaces"))
        return functools.partial(getattr(core, f"list_namespaced_{snake}"), namespace)
    if res.group == "discovery.k8s.io" and res.plural == "endpointslices":
        disc = k8s.DiscoveryV1Api(api)
        if namespace is None:
            return functools.partial(disc.list_endpoint_slice_for_all_namespaces)
        return functools.partial(disc.list_namespaced_endpoint_slice, namespace)
    custom = k8s.CustomObjectsApi(api)
    if namespace is None or not res.namespaced:
        return functools.partial(custom.list_cluster_custom_object, res.group, res.version, res.plural)
    return functools.partial(custom.list_namespaced_custom_object, res.group, res.version, namespace, res.plural)


def _tls_secrets(res: Resource, keep: Callable[[RawObject], bool] | None) -> Callable[[RawObject], bool]:
    """`keep`, narrowed to Secrets of the selected type (checked here too: a server that
    ignores field selectors, like kmock) holding TLS keys."""
    want = res.field_selector.partition("type=")[2]

    def tls(raw: RawObject) -> bool:
        typ = str(raw.body.get("type") or "Opaque")
        return (not want or typ == want) and has_tls_keys(raw.body) and (keep is None or keep(raw))

    return tls


def describe(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status} {exc.reason or ''}".strip()
    if isinstance(exc, MaxRetryError) and exc.reason is not None:
        return describe(exc.reason)
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


class Informer:
    """List + watch of one resource in one namespace (None: all), run by `run()` in a
    thread. `emit` receives each batch (it may raise `Stopped`); `on_restart` is called
    with the resource's label each time the watch is re-established after an error."""

    def __init__(self, ident: int, api: Any, res: Resource, namespace: str | None,
                 emit: Callable[[Batch], None], on_restart: Callable[[str], None] | None = None,
                 options: WatchOptions | None = None, keep: Callable[[RawObject], bool] | None = None) -> None:
        self.ident = ident
        self.res = res
        self.namespace = namespace
        self.options = options or WatchOptions()
        self._list = list_function(api, res, namespace)
        self._emit = emit
        self._on_restart = on_restart
        if res.kind == "Secret" and not res.group:
            keep = _tls_secrets(res, keep)
        self._keep = keep
        self._stopped = threading.Event()
        self._resp: Any = None
        self._lock = threading.Lock()
        self.cache: dict[tuple[str, str], RawObject] = {}
        self.rv: str | None = None
        self.failures = 0
        self.restarts = 0
        self._changes = 0  # changes delivered by the current watch

    @property
    def where(self) -> str:
        return self.res.label + (f" in namespace {self.namespace}" if self.namespace else "")

    # ------------------------------------------------------------------ lifecycle
    def stop(self) -> None:
        """Ask the loop to end and unblock a pending read (safe from any thread)."""
        self._stopped.set()
        with self._lock:
            resp = self._resp
        if resp is not None:
            try:
                resp.shutdown()
            except Exception:  # already closed, or an older urllib3
                log.debug("shutting down the watch of %s failed", self.where, exc_info=True)

    def run(self) -> None:
        try:
            self._loop()
        except Stopped:
            pass
        finally:
            log.debug("informer for %s stopped", self.where)

    def _loop(self) -> None:
        need_list = True
        while not self._stopped.is_set():
            expected = False  # a restart we asked for (timeout on a quiet stream): not an error
            gone = False
            started: float | None = None
            self._changes = 0
            try:
                if need_list:
                    self._relist()
                    need_list = False
                started = time.monotonic()
                self._watch()
                if self._stopped.is_set():
                    return
                expected = time.monotonic() - started >= self.options.watch_timeout * 0.9
                reason = "the watch stream ended"
            except WatchExpired:
                gone = True
                reason = "410 Gone in the watch stream"
            except ResourceAbsent:
                reason = "the API server does not serve it (CRD not installed?); counted as empty"
            except ReadTimeoutError:
                expected = started is not None  # a quiet watch reached its read timeout
                reason = "no data before the read timeout"
            except Stopped:
                raise
            except Exception as exc:
                if self._stopped.is_set():
                    return
                gone = isinstance(exc, ApiException) and exc.status == 410
                reason = describe(exc)
                if not isinstance(exc, (ApiException, WatchError, OSError, ValueError)) and not type(
                        exc).__module__.startswith("urllib3"):
                    log.warning("unexpected error in the informer for %s", self.where, exc_info=True)
            # Resume from the last resourceVersion when there is one; relist after a 410, or
            # when the server gives no resourceVersions (then only a list tells the truth).
            need_list = need_list or gone or self.rv is None
            healthy = started is not None and (
                self._changes > 0 or time.monotonic() - started >= self.options.healthy_after)
            delay = 0.0
            if expected or healthy:
                self.failures = 0
            else:
                self.failures += 1
                if not (gone and self.failures == 1):  # the first 410 relists at once
                    delay = self.options.backoff.delay(self.failures)
            if expected:
                log.debug("watch of %s restarting (%s)", self.where, reason)
                continue
            self.restarts += 1
            if self._on_restart is not None:
                self._on_restart(self.res.label)
            # The first failure of a streak is a warning; the retries that follow are info.
            log.log(logging.WARNING if self.failures <= 1 else logging.INFO,
                    "watch of %s restarting (%s%s); retry in %.2fs", self.where, reason,
                    ", relisting" if need_list else f", resuming at resourceVersion {self.rv}", delay)
            if delay and self._stopped.wait(delay):
                return

    # ------------------------------------------------------------------ list
    def _relist(self) -> None:
        items: list[Any] = []
        cont: str | None = None
        list_rv: str | None = None
        while True:
            kw: dict[str, Any] = {"_preload_content": False,
                                  "_request_timeout": (self.options.connect_timeout, self.options.list_timeout),
                                  "limit": self.options.page_size}
            if cont:
                kw["_continue"] = cont
            if self.res.field_selector:
                kw["field_selector"] = self.res.field_selector
            try:
                resp = self._list(**kw)
            except ApiException as exc:
                if exc.status != 404 or cont:
                    raise
                self._absent()
            try:
                page = json.loads(resp.data)
            finally:
                resp.release_conn()
            meta = page.get("metadata") or {}
            items.extend(page.get("items") or [])
            list_rv = str(meta.get("resourceVersion") or "") or None
            cont = meta.get("continue") or None
            if not cont:
                break
            if self._stopped.is_set():
                return  # a partial list must not be diffed
        fresh: dict[tuple[str, str], RawObject] = {}
        for item in items:
            raw = to_raw(self.res, item, self.namespace)
            if raw.name and (self._keep is None or self._keep(raw)):
                fresh[(raw.namespace, raw.name)] = raw
        deltas: list[Delta] = []
        for key in sorted(self.cache.keys() - fresh.keys()):
            deltas.append(Removed(self.cache[key].key))
        for key in sorted(fresh):
            old = self.cache.get(key)
            if old is None or old.body != fresh[key].body:
                deltas.append(Put(fresh[key]))
        self.cache = fresh
        # A server that does not version its objects (kmock) cannot resume a watch.
        self.rv = list_rv if all(_rv(i) for i in items) else None
        log.debug("listed %s: %d objects, %d changes, resourceVersion %s", self.where, len(fresh), len(deltas),
                  self.rv)
        self._emit(Batch(self.ident, self.res.priority, tuple(deltas), listed=True))

    def _absent(self) -> None:
        deltas = tuple(Removed(self.cache[k].key) for k in sorted(self.cache))
        self.cache = {}
        self.rv = None
        self._emit(Batch(self.ident, self.res.priority, deltas, listed=True))
        raise ResourceAbsent()

    # ------------------------------------------------------------------ watch
    def _watch(self) -> None:
        o = self.options
        kw: dict[str, Any] = {"watch": True, "allow_watch_bookmarks": True,
                              "timeout_seconds": max(1, round(o.watch_timeout)), "_preload_content": False,
                              "_request_timeout": (o.connect_timeout, o.watch_timeout + o.read_grace)}
        if self.rv:
            kw["resource_version"] = self.rv
        if self.res.field_selector:
            kw["field_selector"] = self.res.field_selector
        resp = self._list(**kw)
        with self._lock:
            self._resp = resp
        try:
            if self._stopped.is_set():
                return
            for line in iter_resp_lines(resp):
                if self._stopped.is_set():
                    return
                if line.strip():
                    self._event(json.loads(line))
        finally:
            with self._lock:
                self._resp = None
            resp.close()  # never hand a half-read stream back to the pool
            resp.release_conn()

    def _event(self, ev: Any) -> None:
        if not isinstance(ev, dict):
            return
        typ = ev.get("type")
        obj = ev.get("object")
        if typ == "ERROR":
            code = obj.get("code") if isinstance(obj, dict) else None
            if code == 410:
                raise WatchExpired()
            msg = obj.get("message") if isinstance(obj, dict) else obj
            raise WatchError(f"ERROR event {code}: {msg}")
        if typ == "BOOKMARK":
            rv = _rv(obj)
            if rv:
                self.rv = rv
            return
        if typ not in ("ADDED", "MODIFIED", "DELETED") or not isinstance(obj, dict):
            log.debug("ignoring watch event %r for %s", typ, self.where)
            return
        self.rv = _rv(obj)
        raw = to_raw(self.res, obj, self.namespace)
        if not raw.name:
            return
        key = (raw.namespace, raw.name)
        old = self.cache.get(key)
        if typ == "DELETED" or (self._keep is not None and not self._keep(raw)):
            if old is None:
                return
            del self.cache[key]
            delta: Delta = Removed(old.key)
        else:
            if old is not None and old.body == raw.body:
                return  # a replay of what we already have
            self.cache[key] = raw
            delta = Put(raw)
        self._changes += 1
        self._emit(Batch(self.ident, self.res.priority, (delta,)))
