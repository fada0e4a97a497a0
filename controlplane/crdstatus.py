"""CRD status write-back: each VirtualService/DestinationRule from the cluster gets an
`Accepted` condition with its validation (or NACK) message. The computation is pure; the
writer does network I/O (Kubernetes API, in a thread) and runs only on the leader.

No hot loop: a status is written only when the condition differs from what the object
already carries (the watch shows it to us), at most once per `min_interval_s` per round;
the store ignores status-only changes, so our writes do not trigger rebuilds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from controlplane.model.ir import Issue
from controlplane.model.raw import ObjectKey, RawObject

log = logging.getLogger(__name__)

OWN_GROUPS = frozenset({"networking.meshline.io", "security.meshline.io", "telemetry.meshline.io"})
STATUS_KINDS = {"VirtualService": "virtualservices", "DestinationRule": "destinationrules", "Sidecar": "sidecars",
                "ServiceEntry": "serviceentries", "WorkloadEntry": "workloadentries", "Gateway": "gateways",
                "PeerAuthentication": "peerauthentications", "AuthorizationPolicy": "authorizationpolicies",
                "RequestAuthentication": "requestauthentications", "Telemetry": "telemetries"}


@dataclass(frozen=True, slots=True)
class Condition:
    status: str  # "True" | "False"
    reason: str
    message: str
    observed_generation: int | None

    def as_dict(self, now: str) -> dict[str, Any]:
        d: dict[str, Any] = {"type": "Accepted", "status": self.status, "reason": self.reason,
                             "message": self.message, "lastTransitionTime": now}
        if self.observed_generation is not None:
            d["observedGeneration"] = self.observed_generation
        return d


def desired_condition(raw: RawObject, issues: Iterable[Issue], quarantine: str | None) -> Condition:
    meta = raw.body.get("metadata")
    gen = meta.get("generation") if isinstance(meta, Mapping) else None
    generation = gen if isinstance(gen, int) else None
    if quarantine is not None:
        return Condition("False", "Rejected", f"WITHHELD: {quarantine}", generation)
    errors = [i for i in issues if i.severity == "error"]
    if errors:
        msg = "; ".join(f"{i.field}: {i.message}" if i.field else i.message for i in errors[:5])
        return Condition("False", "Invalid", msg, generation)
    warnings = [i for i in issues if i.severity == "warning"]
    msg = "; ".join(f"{i.field}: {i.message}" if i.field else i.message for i in warnings[:5])
    return Condition("True", "Accepted", msg or "accepted by Meshline", generation)


def current_condition(raw: RawObject) -> Condition | None:
    status = raw.body.get("status")
    if not isinstance(status, Mapping):
        return None
    for c in status.get("conditions") or ():
        if isinstance(c, Mapping) and c.get("type") == "Accepted":
            og = c.get("observedGeneration")
            return Condition(str(c.get("status")), str(c.get("reason", "")), str(c.get("message", "")),
                             og if isinstance(og, int) else None)
    return None


def plan_updates(objects: Mapping[ObjectKey, RawObject], issues: Mapping[ObjectKey, list[Issue]],
                 quarantined: Mapping[ObjectKey, str]) -> dict[ObjectKey, Condition]:
    """Conditions to write: only where the desired one differs from what the object carries."""
    out: dict[ObjectKey, Condition] = {}
    for key, raw in objects.items():
        if raw.kind not in STATUS_KINDS or raw.api_version.split("/")[0] not in OWN_GROUPS:
            continue  # Istio's objects (watched with --istio-api) belong to Istio: never written
        want = desired_condition(raw, issues.get(key, ()), quarantined.get(key))
        if current_condition(raw) != want:
            out[key] = want
    return out


class StatusWriter:
    def __init__(self, api_client: Any, snapshot: Callable[[], tuple[Mapping[ObjectKey, RawObject],
                                                                     Mapping[ObjectKey, list[Issue]],
                                                                     Mapping[ObjectKey, str]]],
                 is_leader: Callable[[], bool], min_interval_s: float = 1.0,
                 on_write: Callable[[int], None] | None = None) -> None:
        from kubernetes import client

        self.api = client.CustomObjectsApi(api_client)
        self.snapshot = snapshot
        self.is_leader = is_leader
        self.min_interval_s = min_interval_s
        self.trigger = asyncio.Event()
        self.writes = 0
        self.on_write = on_write
        self._written: dict[ObjectKey, Condition] = {}

    def poke(self) -> None:
        self.trigger.set()

    def forget(self) -> None:
        """Leadership (re)acquired: trust only what the objects carry, not our memory."""
        self._written.clear()

    def write_once(self) -> int:
        """Blocking: write every changed condition; returns how many were written."""
        from kubernetes.client.exceptions import ApiException

        objects, issues, quarantined = self.snapshot()
        n = 0
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        for key, cond in sorted(plan_updates(objects, issues, quarantined).items()):
            if self._written.get(key) == cond:
                continue  # written already; the watch has not shown it back yet
            raw = objects[key]
            group, _, version = raw.api_version.partition("/")
            body = {"status": {"conditions": [cond.as_dict(now)]}}
            try:
                self.api.patch_namespaced_custom_object_status(
                    group, version, raw.namespace, STATUS_KINDS[raw.kind], raw.name, body)
            except ApiException as exc:
                if exc.status == 404:
                    continue  # deleted meanwhile
                log.warning("cannot write status of %s/%s/%s: %s", *key, exc.reason)
                continue
            self._written[key] = cond
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
                    log.warning("status write-back failed: %s", exc)
            await asyncio.sleep(self.min_interval_s)
