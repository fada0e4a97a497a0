"""Gateway API route status: `status.parents[]` as the Gateway API requires, one entry per
parentRef Meshline owns (controllerName `meshline.io/mesh-controller` for Service parents),
with `Accepted` and `ResolvedRefs` conditions and `observedGeneration`. Entries of other
controllers are kept as they are. The planning is pure; `RouteStatusWriter` does network
I/O (Kubernetes API, in a thread) and runs only on the leader, like `crdstatus`.

The same entries are what `GET /v1/routes` shows (directory mode included): `route_views`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from controlplane.model.gwapi import GATEWAY_GROUP, MESH_CONTROLLER, Condition, ParentStatus
from controlplane.model.ir import Issue
from controlplane.model.mesh import Mesh
from controlplane.model.raw import ObjectKey, RawObject

log = logging.getLogger(__name__)

ROUTE_PLURALS = {"HTTPRoute": "httproutes", "GRPCRoute": "grpcroutes", "TCPRoute": "tcproutes"}
OUR_CONTROLLERS = frozenset({MESH_CONTROLLER})

Snapshot = tuple[Mapping[ObjectKey, RawObject], Mapping[ObjectKey, tuple[ParentStatus, ...]],
                 Mapping[ObjectKey, list[Issue]]]


def _generation(raw: RawObject) -> int | None:
    meta = raw.body.get("metadata")
    gen = meta.get("generation") if isinstance(meta, Mapping) else None
    return gen if isinstance(gen, int) and not isinstance(gen, bool) else None


def _invalid_statuses(raw: RawObject, issues: Iterable[Issue]) -> tuple[ParentStatus, ...]:
    """A route Meshline could not read (errors): each Service parentRef it names is told so."""
    from controlplane.model.gwapi import ParentRef

    errors = [i for i in issues if i.severity == "error"]
    if not errors:
        return ()
    msg = "; ".join(f"{i.field}: {i.message}" if i.field else i.message for i in errors[:5])
    spec = raw.body.get("spec")
    refs = spec.get("parentRefs") if isinstance(spec, Mapping) else None
    out: list[ParentStatus] = []
    for ref in refs if isinstance(refs, list) else ():
        if not isinstance(ref, Mapping) or ref.get("kind") != "Service" or ref.get("group", "") not in ("", "core"):
            continue
        given = tuple((k, ref[k]) for k in ("group", "kind", "namespace", "name", "sectionName", "port")
                      if isinstance(ref.get(k), str | int))
        parent = ParentRef(str(ref.get("group", "")), "Service", str(ref.get("namespace") or raw.namespace),
                           str(ref.get("name", "")), None, None, given)
        out.append(ParentStatus(parent, MESH_CONTROLLER, (
            Condition("Accepted", "False", "UnsupportedValue", f"invalid route, not applied: {msg}"),
            Condition("ResolvedRefs", "False", "UnsupportedValue", "not resolved: the route is invalid"))))
    return tuple(out)


def desired_entries(statuses: tuple[ParentStatus, ...], gen: int | None) -> list[dict[str, Any]]:
    """The `status.parents` entries of `statuses` (without lastTransitionTime)."""
    out: list[dict[str, Any]] = []
    for st in statuses:
        conds: list[dict[str, Any]] = []
        for c in st.conditions:
            d: dict[str, Any] = {"type": c.type, "status": c.status, "reason": c.reason, "message": c.message}
            if gen is not None:
                d["observedGeneration"] = gen
            conds.append(d)
        out.append({"parentRef": dict(st.parent.given), "controllerName": st.controller, "conditions": conds})
    return out


def _current(raw: RawObject) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(our entries, other controllers' entries) of the object's status.parents."""
    status = raw.body.get("status")
    parents = status.get("parents") if isinstance(status, Mapping) else None
    ours: list[dict[str, Any]] = []
    others: list[dict[str, Any]] = []
    for p in parents if isinstance(parents, list) else ():
        if isinstance(p, Mapping):
            (ours if p.get("controllerName") in OUR_CONTROLLERS else others).append(dict(p))
    return ours, others


def _strip_times(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**e, "conditions": [{k: v for k, v in c.items() if k != "lastTransitionTime"}
                                 for c in e.get("conditions", ()) if isinstance(c, Mapping)]} for e in entries]


def plan_route_updates(objects: Mapping[ObjectKey, RawObject], status: Mapping[ObjectKey, tuple[ParentStatus, ...]],
                       issues: Mapping[ObjectKey, list[Issue]], now: str) -> dict[ObjectKey, list[dict[str, Any]]]:
    """The full `status.parents` list to write per route, only where ours differ from what
    the object carries. A condition keeps its lastTransitionTime while its status holds."""
    out: dict[ObjectKey, list[dict[str, Any]]] = {}
    for key, raw in objects.items():
        if raw.kind not in ROUTE_PLURALS or not raw.api_version.startswith(GATEWAY_GROUP + "/"):
            continue
        statuses = status.get(key)
        if statuses is None:
            statuses = _invalid_statuses(raw, issues.get(key, ()))
        want = desired_entries(statuses, _generation(raw))
        ours, others = _current(raw)
        if _strip_times(ours) == want:
            continue
        old = {(repr(sorted(e.get("parentRef", {}).items())), c.get("type")): c
               for e in ours for c in e.get("conditions", ()) if isinstance(c, Mapping)}
        for e in want:
            pref = repr(sorted(e["parentRef"].items()))
            for c in e["conditions"]:
                prev = old.get((pref, c["type"]))
                same = prev is not None and prev.get("status") == c["status"] and prev.get("lastTransitionTime")
                c["lastTransitionTime"] = prev["lastTransitionTime"] if same and prev is not None else now
        out[key] = others + want
    return out


def route_views(mesh: Mesh) -> list[dict[str, Any]]:
    """Every Gateway API route of the mesh with the status.parents Meshline computes for it
    (what `GET /v1/routes` shows; in Kubernetes mode the leader also writes it back)."""
    out: list[dict[str, Any]] = []
    for route in sorted(mesh.gateway_routes, key=lambda r: (r.kind, r.namespace, r.name)):
        key = (route.kind, route.namespace, route.name)
        out.append({"kind": route.kind, "namespace": route.namespace, "name": route.name,
                    "location": route.ref.location or None,
                    "parents": desired_entries(mesh.route_status.get(key, ()), route.generation)})
    return out


class RouteStatusWriter:
    def __init__(self, api_client: Any, snapshot: Callable[[], Snapshot], is_leader: Callable[[], bool],
                 min_interval_s: float = 1.0, on_write: Callable[[int], None] | None = None) -> None:
        from kubernetes import client

        self.api = client.CustomObjectsApi(api_client)
        self.snapshot = snapshot
        self.is_leader = is_leader
        self.min_interval_s = min_interval_s
        self.trigger = asyncio.Event()
        self.writes = 0
        self.on_write = on_write
        self._written: dict[ObjectKey, list[dict[str, Any]]] = {}

    def poke(self) -> None:
        self.trigger.set()

    def forget(self) -> None:
        self._written.clear()

    def write_once(self) -> int:
        """Blocking: write every changed route status; returns how many were written."""
        from kubernetes.client.exceptions import ApiException

        objects, status, issues = self.snapshot()
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        n = 0
        for key, parents in sorted(plan_route_updates(objects, status, issues, now).items()):
            if _strip_times(self._written.get(key, [])) == _strip_times(parents):
                continue  # written already; the watch has not shown it back yet
            raw = objects[key]
            group, _, version = raw.api_version.partition("/")
            try:
                self.api.patch_namespaced_custom_object_status(
                    group, version, raw.namespace, ROUTE_PLURALS[raw.kind], raw.name, {"status": {"parents": parents}})
            except ApiException as exc:
                if exc.status != 404:
                    log.warning("cannot write status of %s/%s/%s: %s", *key, exc.reason)
                continue
            self._written[key] = parents
            n += 1
        self.writes += n
        if n and self.on_write is not None:
            self.on_write(n)
        self._written = {k: v for k, v in self._written.items() if k in objects}
        return n

    async def run(self) -> None:
        while True:
            await self.trigger.wait()
            self.trigger.clear()
            if self.is_leader():
                try:
                    await asyncio.to_thread(self.write_once)
                except Exception as exc:
                    log.warning("route status write-back failed: %s", exc)
            await asyncio.sleep(self.min_interval_s)
