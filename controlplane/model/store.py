"""The model store: raw objects in, a consistent `Mesh` out. Pure state, no I/O.

It keeps, per object key, the last raw object, the last *valid* IR value and the
object's current issues. An invalid update records issues and keeps the last valid value
serving; a delete removes both. `mesh()` assembles the IR lazily and caches it until the
next change.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from controlplane.model.convert import convert
from controlplane.model.events import Delete, ParseError, Replace, SourceEvent, Upsert
from controlplane.model.gamma import resolve as resolve_gamma
from controlplane.model.gateways import MESH, applies_to_gateways, bound_view
from controlplane.model.gwapi import ApiGateway, GatewayClass, GatewayRoute, ReferenceGrant
from controlplane.model.gwgateways import resolve_gateways
from controlplane.model.ir import (
    DEFAULT_ROOT_NAMESPACE,
    DEFAULT_TRUST_DOMAIN,
    AuthorizationPolicy,
    AuthzRule,
    DestinationRule,
    EndpointSet,
    Gateway,
    Hostname,
    Issue,
    Namespace,
    PeerAuthentication,
    PodNetns,
    RequestAuthentication,
    Service,
    ServiceEntry,
    Sidecar,
    SourceRef,
    Telemetry,
    TlsCredential,
    VirtualService,
    Workload,
    WorkloadEntry,
    service_fqdn,
)
from controlplane.model.mesh import EndpointDelta, Mesh, build_mesh, with_route_tables
from controlplane.model.meshconfig import NO_MESH_CONFIG, MeshConfig
from controlplane.model.raw import ObjectKey, RawObject
from controlplane.model.serviceentry import alias_entry_hosts, registry_services
from controlplane.model.validate import check_mesh

IRValue = object


@dataclass(frozen=True, slots=True)
class Entry:
    origin: str
    raw: RawObject
    good: IRValue | None
    issues: tuple[Issue, ...]
    prev_good: IRValue | None = None  # the valid value before `good`, served while quarantined
    changed_gen: int = 0  # store generation at which `good` last changed
    quarantine: str | None = None  # why `good` is withheld (a proxy rejected what it produced)

    @property
    def serving(self) -> IRValue | None:
        if self.quarantine is None:
            return self.good
        return withheld_value(self.good, self.prev_good)


def withheld_value(good: IRValue | None, prev_good: IRValue | None) -> IRValue | None:
    """What serves in place of a withheld object. Withholding never widens access (Istio's
    rule for policies it cannot translate): a withheld AuthorizationPolicy denies what it
    selects (a DENY or CUSTOM one: every request; an ALLOW one: allows nothing, so only the
    workloads' other ALLOW policies admit anything); a withheld PeerAuthentication is STRICT
    on every port. Other kinds serve their previous valid version, or nothing."""
    if isinstance(good, AuthorizationPolicy):
        if good.action == "AUDIT":
            return prev_good
        if good.action == "ALLOW":
            return replace(good, rules=())
        return replace(good, action="DENY", rules=(AuthzRule(),), provider=None)
    if isinstance(good, PeerAuthentication):
        return replace(good, mode="STRICT", port_level=tuple((p, "STRICT") for p, _ in good.port_level))
    return prev_good


FAIL_CLOSED_KINDS = frozenset({"AuthorizationPolicy", "PeerAuthentication"})


class MeshStore:
    def __init__(self, *, root_namespace: str = DEFAULT_ROOT_NAMESPACE,
                 trust_domain: str = DEFAULT_TRUST_DOMAIN, netns_annotations: bool = True,
                 mesh_config: MeshConfig = NO_MESH_CONFIG) -> None:
        """`netns_annotations`: honour pods' `meshline.io/netns` (directory mode); in a cluster
        a pod's author controls it, so only node agents' reports say where a netns is.
        `mesh_config`: Istio MeshConfig (extension providers), replaced by `set_mesh_config`."""
        self.netns_annotations = netns_annotations
        self.mesh_config = mesh_config
        self._mesh_config_issues: tuple[Issue, ...] = ()
        self.root_namespace = root_namespace
        self.trust_domain = trust_domain
        self._entries: dict[ObjectKey, Entry] = {}
        self._by_origin: dict[str, set[ObjectKey]] = {}
        # Definitions of a key from other origins that a later one replaced (fallbacks).
        self._shadowed: dict[ObjectKey, dict[str, RawObject]] = {}
        self._origin_errors: dict[str, tuple[ParseError, ...]] = {}
        self._mesh: Mesh | None = None
        self.generation = 0
        # Fast path bookkeeping: what changed since `_base` (the last assembled mesh).
        self._base: Mesh | None = None
        self._delta: EndpointDelta | None = None
        # key -> (the value it served in `_base`, whether it had issues then)
        self._dirty: dict[ObjectKey, tuple[IRValue | None, bool]] = {}
        self._dirty_all = False

    # ------------------------------------------------------------------ updates
    def apply(self, events: Iterable[SourceEvent]) -> bool:
        """Apply source events; True when the valid mesh may have changed."""
        changed = False
        for ev in events:
            if isinstance(ev, Replace):
                changed |= self._replace(ev)
            elif isinstance(ev, Upsert):
                changed |= self._upsert(ev.origin, ev.obj)
            elif isinstance(ev, Delete):
                changed |= self._delete(ev.origin, ev.key)
        if changed:
            self._invalidate()
        return changed

    def _invalidate(self, everything: bool = False) -> None:
        self._mesh = None
        self.generation += 1
        self._dirty_all |= everything

    def _touch(self, key: ObjectKey) -> None:
        """Remember what `key` served in the last assembled mesh, before it changes."""
        if key not in self._dirty:
            e = self._entries.get(key)
            self._dirty[key] = (e.serving, bool(e.issues) or e.quarantine is not None) if e is not None else (None, False)

    def _replace(self, ev: Replace) -> bool:
        prev_errors = self._origin_errors.get(ev.origin, ())
        if ev.errors:
            self._origin_errors[ev.origin] = ev.errors
        else:
            self._origin_errors.pop(ev.origin, None)
        changed = prev_errors != ev.errors
        if changed:
            self._dirty_all = True
        if ev.objects is None:
            return changed
        new_keys = {o.key for o in ev.objects}
        # The origin's previous keys, including definitions another origin currently overrides.
        before = self._by_origin.get(ev.origin, set()) | {k for k, s in self._shadowed.items() if ev.origin in s}
        for key in sorted(before - new_keys):
            changed |= self._delete(ev.origin, key)
        for obj in ev.objects:
            changed |= self._upsert(ev.origin, obj)
        if not self._by_origin.get(ev.origin):
            self._by_origin.pop(ev.origin, None)
        return changed

    def _upsert(self, origin: str, raw: RawObject) -> bool:
        key = raw.key
        prev = self._entries.get(key)
        if prev is not None and prev.origin == origin and prev.raw.file == raw.file and prev.raw.line == raw.line:
            if prev.raw.body == raw.body:
                return False
            if raw.kind in STATUS_OWNED_KINDS and _meaningful(prev.raw.body) == _meaningful(raw.body):
                # Only status or bookkeeping metadata moved (e.g. our own status write-back).
                # Pods are not in this set: their status (podIP, phase) is what we read.
                self._entries[key] = Entry(origin, raw, prev.good, prev.issues, prev.prev_good, prev.changed_gen,
                                           prev.quarantine)
                return False
        value, issues = convert(raw)
        self._touch(key)
        if prev is not None and prev.origin != origin:
            issues = (
                *issues,
                Issue(raw.ref, "metadata.name", f"also defined in {prev.origin}; this definition replaces it",
                      "warning", raw.line),
            )
            self._by_origin.get(prev.origin, set()).discard(key)
            self._shadowed.setdefault(key, {})[prev.origin] = prev.raw
        shadows = self._shadowed.get(key)
        if shadows is not None:
            shadows.pop(origin, None)
        if value is None:
            # Invalid: keep serving what we served before (and keep any quarantine).
            if prev is not None and prev.good is not None:
                issues = (*issues, Issue(raw.ref, "", "invalid update ignored: the last valid version keeps serving",
                                         "warning", raw.line))
                entry = Entry(origin, raw, prev.good, issues, prev.prev_good, prev.changed_gen, prev.quarantine)
            else:
                entry = Entry(origin, raw, None, issues)
        elif prev is not None and prev.good is not None and prev.good == value and not _reapplied(prev.raw, raw):
            entry = Entry(origin, raw, prev.good, issues, prev.prev_good, prev.changed_gen, prev.quarantine)
        elif (prev is not None and prev.good is not None and _meaningful(prev.raw.body) == _meaningful(raw.body)
              and not _reapplied(prev.raw, raw)):
            # The same content, moved within its file (or re-read): not a change. Only its
            # location (file:line) moves on; its history and any quarantine stay.
            entry = Entry(origin, raw, value, issues, prev.prev_good, prev.changed_gen, prev.quarantine)
        else:
            # A new valid version, or the same one re-applied (a new metadata.generation or
            # `meshline.io/retry-at`): a quarantine of the old one is lifted (it gets its chance).
            served = (prev.prev_good if prev.quarantine is not None else prev.good) if prev is not None else None
            entry = Entry(origin, raw, value, issues, served, self.generation + 1, None)
        self._entries[key] = entry
        self._by_origin.setdefault(origin, set()).add(key)
        return True

    def _delete(self, origin: str, key: ObjectKey) -> bool:
        entry = self._entries.get(key)
        shadows = self._shadowed.get(key, {})
        if entry is None or entry.origin != origin:
            self._by_origin.get(origin, set()).discard(key)
            if shadows.pop(origin, None) is not None and entry is not None:
                self._touch(key)
                # The duplicate is gone: drop the survivor's "also defined in ..." warning.
                issues = tuple(i for i in entry.issues if not i.message.startswith("also defined in"))
                self._entries[key] = Entry(entry.origin, entry.raw, entry.good, issues, entry.prev_good,
                                           entry.changed_gen, entry.quarantine)
                if not shadows:
                    self._shadowed.pop(key, None)
                return True
            return False
        self._touch(key)
        del self._entries[key]
        self._by_origin.get(origin, set()).discard(key)
        if shadows:
            # Another origin still defines the object: its definition serves again.
            fallback_origin = sorted(shadows)[-1]
            self._upsert(fallback_origin, shadows.pop(fallback_origin))
        if not shadows:
            self._shadowed.pop(key, None)
        return True

    def set_mesh_config(self, config: MeshConfig, issues: tuple[Issue, ...] = ()) -> bool:
        """Use `config` (and report `issues` of its file) from the next mesh on; True if it changed."""
        if config == self.mesh_config and issues == self._mesh_config_issues:
            return False
        self.mesh_config, self._mesh_config_issues = config, issues
        self._invalidate(everything=True)
        return True

    # ------------------------------------------------------------------ NACK quarantine
    def quarantine(self, keys: Iterable[ObjectKey], reason: str) -> list[ObjectKey]:
        """Withhold the current version of each object (its previous valid version, or
        nothing, serves instead) until the object changes again. Returns the keys newly
        quarantined."""
        done: list[ObjectKey] = []
        for key in keys:
            e = self._entries.get(key)
            if e is None or e.good is None or e.quarantine is not None:
                continue
            self._entries[key] = Entry(e.origin, e.raw, e.good, e.issues, e.prev_good, e.changed_gen, reason)
            done.append(key)
        if done:
            self._invalidate(everything=True)
        return done

    def release(self, keys: Iterable[ObjectKey]) -> None:
        released = False
        for key in keys:
            e = self._entries.get(key)
            if e is not None and e.quarantine is not None:
                self._entries[key] = Entry(e.origin, e.raw, e.good, e.issues, e.prev_good, e.changed_gen, None)
                released = True
        if released:
            self._invalidate(everything=True)

    def entry(self, key: ObjectKey) -> Entry | None:
        return self._entries.get(key)

    def objects(self, origin_prefix: str = "") -> dict[ObjectKey, RawObject]:
        return {k: e.raw for k, e in self._entries.items() if e.origin.startswith(origin_prefix)}

    def issues_by_key(self) -> dict[ObjectKey, list[Issue]]:
        """Every current issue (per-object and cross-object) grouped by object."""
        out: dict[ObjectKey, list[Issue]] = {}
        for i in self.mesh().issues:
            out.setdefault((i.ref.kind, i.ref.namespace, i.ref.name), []).append(i)
        return out

    def quarantined(self) -> dict[ObjectKey, str]:
        return {k: e.quarantine for k, e in self._entries.items() if e.quarantine is not None}

    # ------------------------------------------------------------------ views
    def object_issues(self) -> tuple[Issue, ...]:
        out: list[Issue] = []
        for key in sorted(self._entries):
            e = self._entries[key]
            out.extend(e.issues)
            if e.quarantine is not None:
                if e.raw.kind in FAIL_CLOSED_KINDS:
                    kept = "the workloads it selects fail closed (a DENY-all / STRICT stand-in serves)"
                elif e.prev_good is not None:
                    kept = "the previous version keeps serving"
                else:
                    kept = "it is not served"
                out.append(Issue(e.raw.ref, "", f"WITHHELD: {e.quarantine}; this version is withheld and {kept} "
                                 f"until the object changes (or is re-applied: annotation {RETRY_ANNOTATION})",
                                 "error", e.raw.line))
        out.extend(self._mesh_config_issues)
        for origin in sorted(self._origin_errors):
            for pe in self._origin_errors[origin]:
                out.append(Issue(SourceRef("File", "", origin, pe.file, pe.line), "", pe.message, pe.severity,
                                 pe.line))
        return tuple(out)

    def mesh(self) -> Mesh:
        return self.mesh_delta()[0]

    def trial_mesh(self, withheld: Iterable[ObjectKey], released: Iterable[ObjectKey] = ()) -> Mesh:
        """The mesh as it would be with `withheld` objects withheld and `released` ones not
        (for checking candidate configs before they are served). Changes nothing."""
        hold, free = set(withheld), set(released)
        values = []
        for key, e in sorted(self._entries.items()):
            if key in hold and e.good is not None:
                v = withheld_value(e.good, e.prev_good)
            elif key in free:
                v = e.good
            else:
                v = e.serving
            if v is not None:
                values.append(v)
        return assemble(values, (), root_namespace=self.root_namespace, trust_domain=self.trust_domain,
                        netns_annotations=self.netns_annotations, mesh_config=self.mesh_config)

    def endpoint_only_pending(self) -> bool:
        """Whether every change since the last mesh is an EndpointSlice update or delete."""
        return (self._mesh is None and not self._dirty_all and bool(self._dirty)
                and all(k[0] == "EndpointSlice" for k in self._dirty))

    def mesh_delta(self) -> tuple[Mesh, EndpointDelta | None]:
        """The current mesh and, when it differs from the previously assembled one only in
        some services' endpoints, that difference (built in O(changed), see `_fast_path`)."""
        if self._mesh is None:
            fast = self._fast_path()
            if fast is not None:
                self._mesh, self._delta = fast
            else:
                self._delta = None
                self._mesh = assemble(
                    (e.serving for _, e in sorted(self._entries.items()) if e.serving is not None),
                    self.object_issues(),
                    root_namespace=self.root_namespace,
                    trust_domain=self.trust_domain,
                    netns_annotations=self.netns_annotations,
                    mesh_config=self.mesh_config,
                )
            self._base = self._mesh
            self._dirty = {}
            self._dirty_all = False
        return self._mesh, self._delta

    def _fast_path(self) -> tuple[Mesh, EndpointDelta] | None:
        """When only EndpointSlices changed since the last mesh, each valid before and after,
        without issues, for services that have a selector (so no cross-object check reads
        their endpoints): that mesh with those services' endpoint sets replaced."""
        base = self._base
        if base is None or self._dirty_all or not self._dirty:
            return None
        hosts: set[Hostname] = set()
        news: dict[ObjectKey, EndpointSet] = {}
        for key, (old, had_issues) in self._dirty.items():
            e = self._entries.get(key)
            if key[0] != "EndpointSlice" or e is None or not isinstance(e.serving, EndpointSet):
                return None
            if not isinstance(old, EndpointSet) or had_issues or e.issues or e.quarantine is not None:
                return None
            news[key] = e.serving
            for v in (old, e.serving):
                host = service_fqdn(v.service, v.namespace)
                svc = base.services.get(host)
                if svc is None or not svc.selector:
                    return None
                hosts.add(host)
        endpoints = dict(base.endpoints)
        for host in hosts:
            kept = [s for s in base.endpoints.get(host, ()) if (s.ref.kind, s.ref.namespace, s.ref.name) not in news]
            kept += [s for s in news.values() if service_fqdn(s.service, s.namespace) == host]
            endpoints[host] = tuple(sorted(kept, key=lambda s: (s.ref.kind, s.ref.name)))
            if not endpoints[host]:
                del endpoints[host]
        mesh = replace(base, endpoints=endpoints)
        return mesh, EndpointDelta(base, frozenset(hosts))

    def sources_of(self, key: ObjectKey) -> RawObject | None:
        e = self._entries.get(key)
        return e.raw if e else None


STATUS_OWNED_KINDS = frozenset(
    {"VirtualService", "DestinationRule", "PeerAuthentication", "AuthorizationPolicy", "Sidecar",
     "HTTPRoute", "GRPCRoute", "TCPRoute", "TLSRoute", "ServiceEntry", "WorkloadEntry", "RequestAuthentication", "Telemetry",
     "Gateway", "GatewayClass"}
)
_VOLATILE_METADATA = frozenset({"resourceVersion", "managedFields", "generation", "uid", "creationTimestamp"})


RETRY_ANNOTATION = "meshline.io/retry-at"


def _reapplied(old: RawObject, new: RawObject) -> bool:
    """Whether a user re-applied the object: its metadata.generation or its
    `meshline.io/retry-at` annotation changed (lifts a quarantine of the same content)."""
    def marks(body: Mapping[str, Any]) -> tuple[object, object]:
        meta = body.get("metadata")
        if not isinstance(meta, Mapping):
            return None, None
        ann = meta.get("annotations")
        return meta.get("generation"), ann.get(RETRY_ANNOTATION) if isinstance(ann, Mapping) else None
    return marks(old.body) != marks(new.body)


def _meaningful(body: Mapping[str, Any]) -> dict[str, Any]:
    """An object without status and bookkeeping metadata: what translation can depend on."""
    out = {k: v for k, v in body.items() if k != "status"}
    meta = out.get("metadata")
    if isinstance(meta, Mapping):
        out["metadata"] = {k: v for k, v in meta.items() if k not in _VOLATILE_METADATA}
    return out


def assemble(
    values: Iterable[IRValue],
    issues: tuple[Issue, ...] = (),
    *,
    root_namespace: str = DEFAULT_ROOT_NAMESPACE,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    netns_annotations: bool = True,
    mesh_config: MeshConfig = NO_MESH_CONFIG,
) -> Mesh:
    """Build a Mesh from valid IR values (in key order) and add cross-object issues."""
    mesh = mesh_of(values, issues, root_namespace=root_namespace, trust_domain=trust_domain,
                   netns_annotations=netns_annotations)
    if mesh_config != mesh.mesh_config:
        mesh = replace(mesh, mesh_config=mesh_config)
    cross = check_mesh(mesh)
    if not cross:
        return mesh
    return replace(mesh, issues=(*issues, *cross))


def mesh_of(
    values: Iterable[IRValue],
    issues: tuple[Issue, ...] = (),
    *,
    root_namespace: str = DEFAULT_ROOT_NAMESPACE,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    netns_annotations: bool = True,
) -> Mesh:
    """A Mesh of valid IR values (in key order), without cross-object checks. Without
    `netns_annotations`, only node agents' reports give a pod's network namespace."""
    namespaces: dict[str, Namespace] = {}
    services: dict[Hostname, Service] = {}
    endpoints: dict[Hostname, list[EndpointSet]] = {}
    workloads: dict[tuple[str, str], Workload] = {}
    vss: list[VirtualService] = []
    drs: list[DestinationRule] = []
    pas: list[PeerAuthentication] = []
    aps: list[AuthorizationPolicy] = []
    scs: list[Sidecar] = []
    netns: list[PodNetns] = []
    credentials: dict[tuple[str, str], TlsCredential] = {}
    routes: list[GatewayRoute] = []
    api_gateways: list[ApiGateway] = []
    classes: list[GatewayClass] = []
    grants: list[ReferenceGrant] = []
    gateways: dict[str, Gateway] = {}
    ras: list[RequestAuthentication] = []
    tels: list[Telemetry] = []
    ses: list[ServiceEntry] = []
    wes: list[WorkloadEntry] = []
    # The kinds collected as lists, by their exact IR type (no IR class subclasses another).
    collected: dict[type, list[Any]] = {
        VirtualService: vss, DestinationRule: drs, PeerAuthentication: pas, AuthorizationPolicy: aps,
        Sidecar: scs, PodNetns: netns, GatewayRoute: routes, ReferenceGrant: grants, ApiGateway: api_gateways,
        GatewayClass: classes, RequestAuthentication: ras, Telemetry: tels, ServiceEntry: ses, WorkloadEntry: wes,
    }
    for v in values:
        items = v if isinstance(v, tuple) else (v,)
        for item in items:
            bucket = collected.get(type(item))
            if bucket is not None:
                bucket.append(item)
            elif isinstance(item, Namespace):
                namespaces[item.name] = item
            elif isinstance(item, Service):
                services[item.hostname] = item
            elif isinstance(item, EndpointSet):
                endpoints.setdefault(service_fqdn(item.service, item.namespace), []).append(item)
            elif isinstance(item, Workload):
                workloads[(item.namespace, item.name)] = item
            elif isinstance(item, TlsCredential):
                credentials[(item.namespace, item.name)] = item
            elif isinstance(item, Gateway):
                gateways[item.key] = item
    if not netns_annotations:
        for key, pod in list(workloads.items()):
            if pod.netns is not None:
                workloads[key] = replace(pod, netns=None)
    for report in netns:  # a node agent's report beats the annotation; only for a pod on that node
        wl = workloads.get((report.namespace, report.name))
        if wl is not None and (wl.node is None or wl.node == report.node):
            workloads[(report.namespace, report.name)] = replace(wl, netns=report.path,
                                                                 node=wl.node or report.node)
    vss.sort(key=lambda v: (v.namespace, v.name))
    # Sidecars and waypoints apply what is bound to `mesh`; gateways read the rest (model.gateways).
    gateway_vss = tuple(vs for vs in vss if applies_to_gateways(vs))
    vss = [view for view in (bound_view(vs, MESH) for vs in vss) if view is not None]
    drs.sort(key=lambda d: (d.namespace, d.name))
    pas.sort(key=lambda p: (p.namespace, p.name))
    aps.sort(key=lambda a: (a.namespace, a.name))
    scs.sort(key=lambda s: (s.namespace, s.name))
    if ses:  # ServiceEntry hosts join the registry (controlplane.model.serviceentry)
        ses.sort(key=lambda s: (s.namespace, s.name))
        se_services, se_endpoints, se_candidates = registry_services(
            ses, workloads, sorted(wes, key=lambda w: (w.namespace, w.name)), services, trust_domain)
        services.update(se_services)
        for host, sets in se_endpoints.items():
            endpoints[host] = list(sets)
        kube = {h: s for h, s in services.items() if s.entry is None}
        vss, drs = alias_entry_hosts(vss, drs, kube, se_services)  # `httpbin.org` names the entry's host
    mesh = build_mesh(
        namespaces,
        services,
        {h: tuple(sorted(sets, key=lambda s: (s.ref.kind, s.ref.name))) for h, sets in endpoints.items()},
        workloads,
        tuple(vss),
        tuple(drs),
        issues,
        peer_authentications=tuple(pas),
        authorization_policies=tuple(aps),
        root_namespace=root_namespace,
        trust_domain=trust_domain,
        sidecars=tuple(scs),
    )
    if ses or wes:
        mesh = replace(mesh, service_entries=tuple(ses),
                       workload_entries=tuple(sorted(wes, key=lambda w: (w.namespace, w.name))),
                       entry_candidates=se_candidates if ses else {})
    if ras or tels:
        mesh = replace(mesh, request_authentications=tuple(sorted(ras, key=lambda r: (r.namespace, r.name))),
                       telemetries=tuple(sorted(tels, key=lambda t: (t.namespace, t.name))))
    if gateways or gateway_vss:
        mesh = replace(mesh, gateways={k: gateways[k] for k in sorted(gateways)}, gateway_virtual_services=gateway_vss)
    if routes or grants:  # Gateway API routes attached to Services win their hosts (model.gamma)
        gamma = resolve_gamma(routes, grants, mesh.services)
        # each route table joins its host's VirtualService candidates (Mesh.virtual_service)
        mesh = replace(with_route_tables(mesh, gamma.virtual_services), gateway_routes=tuple(routes),
                       reference_grants=tuple(grants), route_status=gamma.status)
    if api_gateways or classes:  # Gateways of class meshline, for gateway proxies (model.gwgateways)
        gwr = resolve_gateways(api_gateways, classes, routes, grants, mesh.services, mesh.namespaces, mesh.gateways,
                               credentials)
        status = dict(mesh.route_status)
        for k, v in gwr.route_status.items():
            status[k] = (*status.get(k, ()), *v)
        mesh = replace(mesh, gateways={**mesh.gateways, **gwr.gateways}, route_status=status,
                       gateway_virtual_services=(*mesh.gateway_virtual_services, *gwr.virtual_services),
                       gateway_status=gwr.object_status)
    return replace(mesh, credentials=credentials) if credentials else mesh
