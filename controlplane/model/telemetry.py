"""Telemetry (access logging) as IR values, and the access logs in force for a proxy, the
way Istio merges them. Pure, no I/O.

Istio's precedence: the mesh level (a Telemetry without selector in the root namespace),
then the namespace level (without selector, in the workload's namespace), then the workload
level (a selector matching the workload's labels); at each level the first Telemetry by name
counts. Each level's `accessLogging` entries that match the traffic direction (`match.mode`:
CLIENT is outbound, SERVER inbound, CLIENT_AND_SERVER both, the default) override, per
provider, what the levels above said: an entry without providers speaks for the mesh
config's `defaultProviders.accessLogging`; `disabled: true` turns its providers off; its
`filter.expression` (CEL) replaces their filter. What is left on are the proxy's access logs
(`AccessLog`: provider name and filter), resolved against the mesh config's providers in
`controlplane.translate.accesslog`. Telemetries with `targetRefs` are waypoints': attached to
the waypoint (kind Gateway) or to a service bound to it (kind Service), they are the
waypoint's workload level (`waypoint_access_logs`; a waypoint's traffic counts as SERVER).
"""

from __future__ import annotations

from collections.abc import Iterator

from controlplane.model.ir import (
    BUILTIN_PROVIDER,
    AccessLog,
    Direction,
    Issue,
    Labels,
    SourceRef,
    Telemetry,
    labels_match,
)
from controlplane.model.mesh import Mesh


def _levels(mesh: Mesh, namespace: str, labels: Labels,
            attached: frozenset[tuple[str, str]] | None = None) -> list[Telemetry]:
    """(mesh, namespace, workload) level Telemetries that exist, in that order. `attached`:
    for a waypoint, the targetRefs that make a Telemetry its workload level."""
    mesh_level = ns_level = workload_level = None
    for t in mesh.telemetries:  # sorted by (namespace, name): the first at each level counts
        if t.target_refs:
            if (attached is not None and workload_level is None and t.namespace == namespace
                    and attached & set(t.target_refs)):
                workload_level = t
            continue
        if t.namespace == mesh.root_namespace and not t.selector and mesh_level is None:
            mesh_level = t
        if t.namespace == namespace:
            if not t.selector and ns_level is None:
                ns_level = t
            elif t.selector and attached is None and workload_level is None and labels_match(t.selector, labels):
                workload_level = t
    if namespace == mesh.root_namespace:
        ns_level = None  # the root namespace's own namespace level is the mesh level
    return [t for t in (mesh_level, ns_level, workload_level) if t is not None]


def access_logs_for(mesh: Mesh, namespace: str, labels: Labels, direction: Direction,
                    attached: frozenset[tuple[str, str]] | None = None
                    ) -> tuple[tuple[AccessLog, ...], tuple[SourceRef, ...]]:
    """The access logs a workload's proxy writes for `direction` traffic, sorted by provider,
    and the Telemetries that decided them."""
    state: dict[str, AccessLog | None] = {}
    refs: list[SourceRef] = []
    defaults = mesh.mesh_config.default_access_logging
    for t in _levels(mesh, namespace, labels, attached):
        used = False
        for entry in t.access_logging:
            if entry.mode != "CLIENT_AND_SERVER" and entry.mode != direction:
                continue
            used = True
            for name in entry.providers or defaults:
                state[name] = None if entry.disabled else AccessLog(name, entry.filter)
        if used:
            refs.append(t.ref)
    logs = tuple(v for _, v in sorted(state.items()) if v is not None)
    return logs, tuple(refs)


def waypoint_access_logs(mesh: Mesh, namespace: str, waypoint: str, services: tuple[str, ...]
                         ) -> tuple[tuple[AccessLog, ...], tuple[SourceRef, ...]]:
    """What waypoint `waypoint` of `namespace` logs for `services` (names in `namespace`)."""
    attached = frozenset({("Gateway", waypoint), *(("Service", s) for s in services)})
    return access_logs_for(mesh, namespace, (), "SERVER", attached)


def check_telemetries(mesh: Mesh) -> Iterator[Issue]:
    """Cross-object warnings: providers the mesh config does not define (or not as an access
    log), entries without providers when the mesh config names no default."""
    cfg = mesh.mesh_config
    known = {p.name for p in cfg.access_log_providers} | {BUILTIN_PROVIDER}
    for t in mesh.telemetries:
        for i, entry in enumerate(t.access_logging):
            path = f"spec.accessLogging[{i}]"
            if not entry.providers and not cfg.default_access_logging:
                yield Issue(t.ref, f"{path}.providers", "no providers, and the mesh config names no "
                            "defaultProviders.accessLogging: this entry changes nothing", "warning")
            for j, name in enumerate(entry.providers):
                if name not in known:
                    other = name in cfg.other_providers
                    why = ("is not an envoyFileAccessLog provider (Meshline writes file access logs only)"
                           if other else "is not a provider of the mesh config (--mesh-config)")
                    yield Issue(t.ref, f"{path}.providers[{j}].name", f"{name!r} {why}: nothing is logged for it",
                                "warning")
