"""Gateway API status: routes' `status.parents[]` as the Gateway API requires, one entry per
parentRef Meshline owns (controllerName `meshline.io/mesh-controller` for Service parents,
`meshline.io/gateway-controller` for Gateways of class meshline), and the whole status of
those Gateways (conditions, listeners with attachedRoutes) and of Meshline's GatewayClasses,
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

from controlplane.model.gwapi import (
    GATEWAY_CONTROLLER,
    GATEWAY_GROUP,
    MESH_CONTROLLER,
    Condition,
    ObjectStatus,
    ParentStatus,
)
from controlplane.model.ir import Issue
from controlplane.model.mesh import Mesh
from controlplane.model.raw import ObjectKey, RawObject

log = logging.getLogger(__name__)

ROUTE_PLURALS = {"HTTPRoute": "httproutes", "GRPCRoute": "grpcroutes", "TCPRoute": "tcproutes",
                 "TLSRoute": "tlsroutes"}
OBJECT_PLURALS = {"Gateway": "gateways", "GatewayClass": "gatewayclasses"}
OUR_CONTROLLERS = frozenset({MESH_CONTROLLER, GATEWAY_CONTROLLER})

Snapshot = tuple[Mapping[ObjectKey, RawObject], Mapping[ObjectKey, tuple[ParentStatus, ...]],
                 Mapping[ObjectKey, list[Issue]], Mapping[ObjectKey, ObjectStatus]]


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


def _conditions(conds: Iterable[Condition], gen: int | None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for c in conds:
        d: dict[str, Any] = {"type": c.type, "status": c.status, "reason": c.reason, "message": c.message}
        if gen is not None:
            d["observedGeneration"] = gen
        out.append(d)
    return out


def object_status_body(st: ObjectStatus) -> dict[str, Any]:
    """The `status` of a Gateway or GatewayClass (without lastTransitionTime)."""
    body: dict[str, Any] = {"conditions": _conditions(st.conditions, st.generation)}
    if st.listeners:
        body["listeners"] = [{"name": ls.name, "supportedKinds": [{"group": GATEWAY_GROUP, "kind": k}
                                                                  for k in ls.supported_kinds],
                              "attachedRoutes": ls.attached_routes,
                              "conditions": _conditions(ls.conditions, st.generation)} for ls in st.listeners]
    return body


def _with_times(new: list[dict[str, Any]], old: object, now: str) -> None:
    prev = {c.get("type"): c for c in old if isinstance(c, Mapping)} if isinstance(old, list) else {}
    for c in new:
        p = prev.get(c["type"])
        keep = p is not None and p.get("status") == c["status"] and p.get("lastTransitionTime")
        c["lastTransitionTime"] = p["lastTransitionTime"] if keep and p is not None else now


def _strip_status(body: object) -> object:
    if isinstance(body, Mapping):
        return {k: _strip_status(v) for k, v in body.items() if k != "lastTransitionTime"}
    if isinstance(body, list):
        return [_strip_status(v) for v in body]
    return body


def plan_object_updates(objects: Mapping[ObjectKey, RawObject], status: Mapping[ObjectKey, ObjectStatus],
                        now: str) -> dict[ObjectKey, dict[str, Any]]:
    """The status to write per Gateway (of class meshline) and GatewayClass (of Meshline's
    controller), only where it differs from what the object carries."""
    out: dict[ObjectKey, dict[str, Any]] = {}
    for key, st in status.items():
        raw = objects.get(key)
        if raw is None or raw.kind not in OBJECT_PLURALS:
            continue
        want = object_status_body(st)
        got = raw.body.get("status")
        cur: Mapping[str, Any] = got if isinstance(got, Mapping) else {}
        current = {k: cur.get(k) for k in want}
        if _strip_status(current) == want:
            continue
        _with_times(want["conditions"], cur.get("conditions"), now)
        old_listeners = {ls.get("name"): ls for ls in cur.get("listeners") or () if isinstance(ls, Mapping)}
        for ls in want.get("listeners", ()):
            _with_times(ls["conditions"], (old_listeners.get(ls["name"]) or {}).get("conditions"), now)
        out[key] = want
    return out


def gateway_views(mesh: Mesh) -> list[dict[str, Any]]:
    """Gateways of class meshline and GatewayClasses of Meshline's controller, with the
    status Meshline computes (`GET /v1/gateways`)."""
    return [{"kind": k[0].split(".", 1)[0], "namespace": k[1], "name": k[2], "status": object_status_body(st)}
            for k, st in sorted(mesh.gateway_status.items())]


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
        self._written_objects: dict[ObjectKey, dict[str, Any]] = {}

    def poke(self) -> None:
        self.trigger.set()

    def forget(self) -> None:
        self._written.clear()
        self._written_objects.clear()

    def write_once(self) -> int:
        """Blocking: write every changed route status; returns how many were written."""
        from kubernetes.client.exceptions import ApiException

        objects, status, issues, object_status = self.snapshot()
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        n = self._write_objects(objects, object_status, now)
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

    def _write_objects(self, objects: Mapping[ObjectKey, RawObject], status: Mapping[ObjectKey, ObjectStatus],
                       now: str) -> int:
        from kubernetes.client.exceptions import ApiException

        n = 0
        for key, body in sorted(plan_object_updates(objects, status, now).items()):
            if _strip_status(self._written_objects.get(key)) == _strip_status(body):
                continue
            raw = objects[key]
            group, _, version = raw.api_version.partition("/")
            plural = OBJECT_PLURALS[raw.kind]
            try:
                if raw.kind == "GatewayClass":
                    self.api.patch_cluster_custom_object_status(group, version, plural, raw.name, {"status": body})
                else:
                    self.api.patch_namespaced_custom_object_status(group, version, raw.namespace, plural, raw.name,
                                                                   {"status": body})
            except ApiException as exc:
                if exc.status != 404:
                    log.warning("cannot write status of %s/%s/%s: %s", *key, exc.reason)
                continue
            self._written_objects[key] = body
            n += 1
        self._written_objects = {k: v for k, v in self._written_objects.items() if k in objects}
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
