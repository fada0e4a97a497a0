"""Kubernetes mode: the self-signed root lives in the Secret `meshline-system/meshline-ca-root`
(keys `root-cert.pem`, `ca-key.pem`), so every replica signs with the same CA and a restart
keeps it. Does network I/O (official client, blocking: run `sync_once` in a thread) and
file I/O in the replica's local CA directory.

The Secret is the source of truth. Each pass compares three states: the Secret, the local
directory, and what the two held when last in agreement.
- No Secret: the leader creates it from its local CA (creating that first if needed);
  followers wait. A create that loses a race (409) is re-read on the next pass.
- A Secret without both keys: the leader fills it in (patch).
- Secret and directory differ: if only the directory moved since the last agreement and
  this replica leads (e.g. `meshline ca rotate-root` run against the leader's directory),
  the leader patches the Secret; otherwise the Secret's files are written to the
  directory (`adopted`) and the running server reloads them like any CA change.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from controlplane.ca import CA_KEY_FILE, ROOT_CERT_FILE, CertificateAuthority
from controlplane.ca.core import _locked, _write_atomic

log = logging.getLogger(__name__)

SECRET_NAMESPACE = "meshline-system"
SECRET_NAME = "meshline-ca-root"
FILES = (ROOT_CERT_FILE, CA_KEY_FILE)
MODES = {ROOT_CERT_FILE: 0o644, CA_KEY_FILE: 0o600}


def _digest(files: dict[str, bytes] | None) -> str | None:
    if files is None:
        return None
    h = hashlib.sha256()
    for name in FILES:
        h.update(name.encode() + b"\0" + files[name] + b"\0")
    return h.hexdigest()


class RootSecretSync:
    def __init__(self, api_client: Any, ca_dir: Path, is_leader: Callable[[], bool], *,
                 namespace: str = SECRET_NAMESPACE, name: str = SECRET_NAME, trust_domain: str = "cluster.local",
                 timeout_s: float = 10.0) -> None:
        self.api_client = api_client
        self.ca_dir = Path(ca_dir)
        self.is_leader = is_leader
        self.namespace = namespace
        self.name = name
        self.trust_domain = trust_domain
        self.timeout_s = timeout_s
        self._agreed: str | None = None
        self._last_problem = ""

    # ------------------------------------------------------------------ local files
    def _local(self) -> dict[str, bytes] | None:
        with _locked(self.ca_dir):
            try:
                return {n: (self.ca_dir / n).read_bytes() for n in FILES}
            except FileNotFoundError:
                return None

    def _write_local(self, files: dict[str, bytes]) -> None:
        self.ca_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _locked(self.ca_dir):
            # Bundle first, then the key (the same order as a rotation).
            for n in FILES:
                _write_atomic(self.ca_dir / n, files[n], MODES[n])

    # ------------------------------------------------------------------ the Secret
    def _read_secret(self) -> tuple[bool, dict[str, bytes] | None]:
        """(exists, files) — files None when the Secret lacks one of the keys."""
        from kubernetes import client as k8s
        from kubernetes.client.exceptions import ApiException

        try:
            resp = k8s.CoreV1Api(self.api_client).read_namespaced_secret(
                self.name, self.namespace, _preload_content=False, _request_timeout=self.timeout_s)
        except ApiException as exc:
            if exc.status == 404:
                return False, None
            raise
        doc = json.loads(resp.data)
        data = doc.get("data") if isinstance(doc, dict) else None
        data = data if isinstance(data, dict) else {}
        if not all(isinstance(data.get(n), str) and data.get(n) for n in FILES):
            return True, None
        return True, {n: base64.b64decode(data[n]) for n in FILES}

    def _body(self, files: dict[str, bytes]) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": self.name, "namespace": self.namespace,
                             "labels": {"app.kubernetes.io/part-of": "meshline"}},
                "data": {n: base64.b64encode(files[n]).decode() for n in FILES}}

    def _create_secret(self, files: dict[str, bytes]) -> bool:
        from kubernetes import client as k8s
        from kubernetes.client.exceptions import ApiException

        try:
            k8s.CoreV1Api(self.api_client).create_namespaced_secret(
                self.namespace, self._body(files), _preload_content=False, _request_timeout=self.timeout_s)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def _patch_secret(self, files: dict[str, bytes]) -> None:
        from kubernetes import client as k8s

        k8s.CoreV1Api(self.api_client).patch_namespaced_secret(
            self.name, self.namespace, {"data": self._body(files)["data"]}, _preload_content=False,
            _request_timeout=self.timeout_s)

    # ------------------------------------------------------------------ one pass
    def sync_once(self) -> str:
        """One reconciliation pass (blocking). Returns what it did: created, patched,
        adopted, unchanged, waiting (follower, no usable Secret yet) or raced."""
        exists, remote = self._read_secret()
        local = self._local()
        leader = self.is_leader()
        if remote is None:
            if not leader:
                return "waiting"
            if local is None:
                CertificateAuthority.load_or_create(self.ca_dir, self.trust_domain)
                local = self._local()
                assert local is not None
            if not exists:
                if not self._create_secret(local):
                    return "raced"
                log.warning("persisted the CA root in Secret %s/%s", self.namespace, self.name)
                self._agreed = _digest(local)
                return "created"
            self._patch_secret(local)
            log.warning("filled in the CA root in Secret %s/%s", self.namespace, self.name)
            self._agreed = _digest(local)
            return "patched"
        if local == remote:
            self._agreed = _digest(local)
            return "unchanged"
        if leader and local is not None and self._agreed is not None and _digest(remote) == self._agreed:
            self._patch_secret(local)
            log.warning("CA root in %s changed locally: updated Secret %s/%s", self.ca_dir, self.namespace, self.name)
            self._agreed = _digest(local)
            return "patched"
        self._write_local(remote)
        self._agreed = _digest(remote)
        log.warning("adopted the CA root from Secret %s/%s", self.namespace, self.name)
        return "adopted"

    async def run(self, on_update: Callable[[], Awaitable[None]], interval_s: float = 10.0,
                  fast_interval_s: float = 0.5) -> None:
        """Reconcile until cancelled: every `fast_interval_s` until the CA is in place,
        then every `interval_s`; `on_update()` after anything changed the local files."""
        settled = False
        while True:
            try:
                what = await asyncio.to_thread(self.sync_once)
                self._last_problem = ""
            except Exception as exc:
                what = "error"
                problem = f"{type(exc).__name__}: {getattr(exc, 'status', '')} {getattr(exc, 'reason', '')}"
                if problem != self._last_problem:
                    log.warning("CA root Secret %s/%s: %s", self.namespace, self.name, problem.strip())
                    self._last_problem = problem
            if what in ("created", "patched", "adopted", "unchanged"):
                if what != "unchanged" or not settled:
                    await on_update()
                settled = True
            await asyncio.sleep(interval_s if settled else fast_interval_s)
