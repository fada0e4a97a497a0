"""Leader election with a coordination.k8s.io/v1 Lease. Does network I/O (Kubernetes API,
through the official client, in a thread).

Every replica serves xDS; only the leader runs singleton work (CRD status write-back, CA
root handling, webhook CA bundles). The elector follows client-go's algorithm: create the
Lease if absent, renew it while holding it, take it over once it has not been renewed for
`lease_duration`. Writes carry the Lease's resourceVersion (when the server provides one)
so two replicas cannot both win a takeover. It uses create and merge-patch only, no PUT.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

log = logging.getLogger(__name__)

LEASE_API = "coordination.k8s.io/v1"


def _now() -> datetime:
    return datetime.now(UTC)


def _fmt(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(s: str | None) -> datetime | None:
    """RFC 3339 MicroTime as servers write it ("...Z" or "+00:00")."""
    if not s:
        return None
    try:
        t = datetime.fromisoformat(s)
    except ValueError:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class ElectionConfig:
    namespace: str
    name: str
    identity: str
    lease_duration_s: float = 15.0
    renew_deadline_s: float = 10.0
    retry_period_s: float = 2.0


class LeaderElector:
    """Runs the election loop; `is_leader` is what singleton work checks."""

    def __init__(self, api_client: Any, config: ElectionConfig,
                 on_change: Callable[[bool], None] | None = None) -> None:
        from kubernetes import client

        self.api = client.CoordinationV1Api(api_client)
        self.cfg = config
        self.on_change = on_change
        self.is_leader = False
        self._last_renew: datetime | None = None

    # ------------------------------------------------------------------ one attempt (blocking)
    def try_acquire_or_renew(self) -> bool:
        from kubernetes.client.exceptions import ApiException

        cfg = self.cfg
        now = _now()
        try:
            lease = self.api.read_namespaced_lease(cfg.name, cfg.namespace, _preload_content=False)
            body = _json(lease)
        except ApiException as exc:
            if exc.status != 404:
                raise
            spec: dict[str, Any] = {"holderIdentity": cfg.identity, "leaseDurationSeconds": int(cfg.lease_duration_s),
                    "acquireTime": _fmt(now), "renewTime": _fmt(now), "leaseTransitions": 0}
            try:
                lease_body: Any = {
                    "apiVersion": LEASE_API, "kind": "Lease",
                    "metadata": {"name": cfg.name, "namespace": cfg.namespace}, "spec": spec,
                }
                self.api.create_namespaced_lease(cfg.namespace, lease_body, _preload_content=False)
            except ApiException as exc2:
                if exc2.status == 409:  # someone else created it first
                    return False
                raise
            return True
        cur: dict[str, Any] = body.get("spec") or {}
        holder = cur.get("holderIdentity")
        renew = _parse(cur.get("renewTime")) or _parse(cur.get("acquireTime"))
        duration = float(cur.get("leaseDurationSeconds") or cfg.lease_duration_s)
        expired = renew is None or now > renew + timedelta(seconds=duration)
        if holder and holder != cfg.identity and not expired:
            return False
        new_spec: dict[str, Any] = {"holderIdentity": cfg.identity, "renewTime": _fmt(now),
                                    "leaseDurationSeconds": int(cfg.lease_duration_s)}
        if holder != cfg.identity:
            new_spec["acquireTime"] = _fmt(now)
            new_spec["leaseTransitions"] = int(cur.get("leaseTransitions") or 0) + 1
        patch: dict[str, Any] = {"spec": new_spec}
        rv = (body.get("metadata") or {}).get("resourceVersion")
        if rv:
            patch["metadata"] = {"resourceVersion": rv}  # optimistic concurrency: 409 if it moved
        try:
            self.api.patch_namespaced_lease(cfg.name, cfg.namespace, patch, _preload_content=False)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def release(self) -> None:
        """Give the Lease up on shutdown so another replica takes over at once."""
        if not self.is_leader:
            return
        try:
            past = _fmt(_now() - timedelta(seconds=self.cfg.lease_duration_s + 1))
            self.api.patch_namespaced_lease(self.cfg.name, self.cfg.namespace,
                                            {"spec": {"renewTime": past, "holderIdentity": ""}},
                                            _preload_content=False)
        except Exception as exc:  # best effort
            log.info("could not release the lease: %s", exc)
        self._set(False)

    def _set(self, leader: bool) -> None:
        if leader != self.is_leader:
            self.is_leader = leader
            log.warning("%s leadership (%s/%s as %s)", "acquired" if leader else "lost",
                        self.cfg.namespace, self.cfg.name, self.cfg.identity)
            if self.on_change is not None:
                self.on_change(leader)

    # ------------------------------------------------------------------ loop
    async def run(self) -> None:
        attempt: asyncio.Future[bool] | None = None
        try:
            while True:
                try:
                    attempt = asyncio.ensure_future(asyncio.to_thread(self.try_acquire_or_renew))
                    ok = await asyncio.shield(attempt)
                    if ok:
                        self._last_renew = _now()
                    elif self.is_leader:
                        self._set(False)
                except Exception as exc:
                    log.warning("leader election: %s", exc)
                    ok = False
                if ok:
                    self._set(True)
                elif self.is_leader and self._last_renew is not None and (
                    _now() - self._last_renew > timedelta(seconds=self.cfg.renew_deadline_s)
                ):
                    self._set(False)  # could not renew in time: stop acting as leader
                jitter = 1.0 + random.uniform(0, 0.2) if not self.is_leader else 1.0
                await asyncio.sleep(self.cfg.retry_period_s * jitter)
        finally:
            if attempt is not None and not attempt.done():
                # Cancelled while an acquire/renew runs in its thread: let it finish first, or
                # it could take the Lease back right after the release (seen under load: the
                # next replica then waited for the whole lease).
                await asyncio.wait([attempt])
                if not attempt.cancelled() and attempt.exception() is None and attempt.result():
                    self.is_leader = True  # it holds the Lease now (acquired or renewed): released below
            await asyncio.to_thread(self.release)


def _json(resp: Any) -> dict[str, Any]:
    import json

    data = resp.data if hasattr(resp, "data") else resp
    out = json.loads(data)
    return out if isinstance(out, dict) else {}
