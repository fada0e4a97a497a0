"""The webhook server (uvicorn over HTTPS) with a serving certificate from Meshline's CA,
re-issued before it expires, and the caBundle upkeep of the two webhook configurations.
Does network and file I/O.

- `serve_webhooks(address, ca, dns_names, config)`: runs until cancelled. The certificate
  and key live in a private temporary directory (0700, files 0600) that is removed on
  exit; rotation loads the new pair into the live SSL context, so new connections get it
  without a restart.
- `ca_bundle_patch(configuration, bundle_pem)`: the JSONPatch that sets every webhook's
  `clientConfig.caBundle` (pure); `patch_webhook_ca_bundles(api_client, names, bundle_pem)`
  reads and patches MutatingWebhookConfiguration `meshline-sidecar-injector` and
  ValidatingWebhookConfiguration `meshline-validator` (blocking: run it in a thread).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import socket
import ssl
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from cryptography import x509

from controlplane.bootstrap import split_address
from controlplane.ca import CertificateAuthority
from webhook.app import NamespaceInMesh, create_webhook_app
from webhook.config import WebhookConfig

log = logging.getLogger(__name__)

MUTATING_CONFIGURATION = "meshline-sidecar-injector"
VALIDATING_CONFIGURATION = "meshline-validator"
DEFAULT_CERT_TTL = dt.timedelta(hours=24)
RENEW_AT = 2 / 3
"""Re-issue the serving certificate after this fraction of its lifetime."""


def default_dns_names(service: str = "meshline", namespace: str = "meshline-system") -> tuple[str, ...]:
    """The names the API server may use to reach the webhook Service."""
    return (f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local", f"{service}.{namespace}",
            service)


# --------------------------------------------------------------------------- serving certificate


class ServingCertificate:
    """The webhook's certificate and key as files for uvicorn, re-issued on demand."""

    def __init__(self, ca: CertificateAuthority, dns_names: Sequence[str], ttl: dt.timedelta) -> None:
        self._ca = ca
        self._dns_names = tuple(dns_names)
        self._ttl = ttl
        self.directory = Path(tempfile.mkdtemp(prefix="meshline-webhook-tls-"))  # 0700
        self.cert_file = self.directory / "tls.crt"
        self.key_file = self.directory / "tls.key"
        self.issued_at = dt.datetime.now(dt.UTC)
        self.not_after = self.issued_at

    def issue(self) -> None:
        chain, key = self._ca.issue_server_cert(self._dns_names, self._ttl)
        for path, data in ((self.key_file, key), (self.cert_file, chain)):
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(data)
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        self.issued_at = dt.datetime.now(dt.UTC)
        self.not_after = x509.load_pem_x509_certificate(chain.encode()).not_valid_after_utc

    def renew_in(self) -> float:
        """Seconds until the certificate should be re-issued (after RENEW_AT of its life)."""
        due = self.issued_at + (self.not_after - self.issued_at) * RENEW_AT
        return max(0.0, (due - dt.datetime.now(dt.UTC)).total_seconds())

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


# --------------------------------------------------------------------------- server


def _listen(address: str) -> socket.socket:
    host, port = split_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit it: without it, TLS records written back to back meet
        # the client's delayed ACK and every answer waits ~40 ms.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class WebhookServer:
    """`serve()` runs the HTTPS webhook server until cancelled; `port` is the bound port
    once `started` is set (useful with port 0)."""

    def __init__(self, address: str, ca: CertificateAuthority, dns_names: Sequence[str] | None = None,
                 config: WebhookConfig | None = None, *, cert_ttl: dt.timedelta = DEFAULT_CERT_TTL,
                 namespace_in_mesh: NamespaceInMesh | None = None) -> None:
        self.address = address
        self.ca = ca
        self.dns_names = tuple(dns_names or default_dns_names())
        self.config = config or WebhookConfig()
        self.cert_ttl = cert_ttl
        self.namespace_in_mesh = namespace_in_mesh
        self.port = 0
        self._ssl: ssl.SSLContext | None = None
        self._cert: ServingCertificate | None = None

    def _ssl_factory(self, _config: Any, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        ctx = default()
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self._ssl = ctx
        return ctx

    def rotate(self) -> None:
        """Issue a new serving certificate now (e.g. after the CA changed)."""
        assert self._cert is not None
        self._cert.issue()
        if self._ssl is not None:
            self._ssl.load_cert_chain(str(self._cert.cert_file), str(self._cert.key_file))
        log.info("webhook serving certificate issued for %s", ", ".join(self.dns_names))

    async def _rotate_loop(self) -> None:
        assert self._cert is not None
        while True:
            await asyncio.sleep(max(self._cert.renew_in(), 0.5))
            try:
                self.rotate()
            except Exception:  # keep serving the current certificate; try again soon
                log.exception("could not re-issue the webhook serving certificate")
                await asyncio.sleep(30)

    async def serve(self, started: asyncio.Event | None = None) -> None:
        self._cert = ServingCertificate(self.ca, self.dns_names, self.cert_ttl)
        sock: socket.socket | None = None
        try:
            self._cert.issue()
            sock = _listen(self.address)
            self.port = int(sock.getsockname()[1])
            app = create_webhook_app(self.config, namespace_in_mesh=self.namespace_in_mesh)
            uconfig = uvicorn.Config(
                app, log_level="warning", lifespan="off", access_log=False,
                ssl_certfile=str(self._cert.cert_file), ssl_keyfile=str(self._cert.key_file),
                ssl_context_factory=self._ssl_factory, timeout_keep_alive=30, timeout_graceful_shutdown=3,
                limit_concurrency=256, server_header=False,
            )
            server = uvicorn.Server(uconfig)
            server.capture_signals = contextlib.nullcontext  # the composition root owns signals
            serving = asyncio.create_task(server.serve(sockets=[sock]), name="webhook-https")
            rotating = asyncio.create_task(self._rotate_loop(), name="webhook-cert-rotation")
            try:
                while not server.started and not serving.done():
                    await asyncio.sleep(0.01)
                if started is not None and server.started:
                    started.set()
                log.info("webhooks serving HTTPS on %s (port %d)", self.address, self.port)
                await asyncio.wait({serving, rotating}, return_when=asyncio.FIRST_COMPLETED)
                if serving.done() and serving.exception() is not None:
                    raise RuntimeError("the webhook server stopped") from serving.exception()
            finally:
                server.should_exit = True
                rotating.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(asyncio.shield(serving), 5.0)
                serving.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await rotating
        finally:
            if sock is not None:
                sock.close()
            self._cert.remove()


async def serve_webhooks(address: str, ca: CertificateAuthority, dns_names: Sequence[str] | None = None,
                         config: WebhookConfig | None = None, *, started: asyncio.Event | None = None,
                         cert_ttl: dt.timedelta = DEFAULT_CERT_TTL,
                         namespace_in_mesh: NamespaceInMesh | None = None) -> None:
    """Serve /inject and /validate over HTTPS on `address` (H:P) until cancelled, with a
    certificate for `dns_names` (default: the `meshline` Service in meshline-system)
    issued by `ca` and re-issued after 2/3 of `cert_ttl`."""
    await WebhookServer(address, ca, dns_names, config, cert_ttl=cert_ttl,
                        namespace_in_mesh=namespace_in_mesh).serve(started)


# --------------------------------------------------------------------------- caBundle


def ca_bundle_patch(configuration: Mapping[str, Any], bundle_pem: str) -> list[dict[str, Any]]:
    """JSONPatch setting `clientConfig.caBundle` of every webhook in a Mutating- or
    ValidatingWebhookConfiguration (as a dict) to `bundle_pem`; [] when all are current.
    Each change is guarded by a `test` of that webhook's name, so a concurrent edit that
    reorders the webhooks fails the patch instead of changing the wrong entry."""
    want = base64.b64encode(bundle_pem.encode()).decode()
    ops: list[dict[str, Any]] = []
    webhooks = configuration.get("webhooks")
    for i, hook in enumerate(webhooks if isinstance(webhooks, list) else []):
        if not isinstance(hook, Mapping) or not isinstance(hook.get("clientConfig"), Mapping):
            continue
        if hook["clientConfig"].get("caBundle") == want:
            continue
        ops.append({"op": "test", "path": f"/webhooks/{i}/name", "value": hook.get("name")})
        ops.append({"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": want})
    return ops


@dataclass(frozen=True, slots=True)
class WebhookConfigurationNames:
    mutating: tuple[str, ...] = (MUTATING_CONFIGURATION,)
    validating: tuple[str, ...] = (VALIDATING_CONFIGURATION,)


def patch_webhook_ca_bundles(api_client: Any, names: WebhookConfigurationNames | None,
                             bundle_pem: str, *, timeout: float = 10.0) -> dict[str, str]:
    """Bring the caBundle of our webhook configurations up to date through `api_client`
    (a kubernetes.client.ApiClient). Returns `Kind/name` -> patched | unchanged | missing.
    Blocking; raises kubernetes' ApiException for errors other than 404 (after one retry
    when the guard `test` failed because the object changed underneath)."""
    from kubernetes import client as k8s
    from kubernetes.client.rest import ApiException

    api = k8s.AdmissionregistrationV1Api(api_client)
    names = names or WebhookConfigurationNames()
    targets = [("MutatingWebhookConfiguration", n, api.read_mutating_webhook_configuration,
                api.patch_mutating_webhook_configuration) for n in names.mutating]
    targets += [("ValidatingWebhookConfiguration", n, api.read_validating_webhook_configuration,
                 api.patch_validating_webhook_configuration) for n in names.validating]
    out: dict[str, str] = {}
    for kind, name, read, patch in targets:
        key = f"{kind}/{name}"
        for attempt in range(2):
            try:
                current = json.loads(read(name, _preload_content=False, _request_timeout=timeout).data)
                ops = ca_bundle_patch(current, bundle_pem)
                if not ops:
                    out[key] = "unchanged"
                    break
                patch(name, ops, _content_type="application/json-patch+json", _request_timeout=timeout,
                      _preload_content=False)
                out[key] = "patched"
                log.info("caBundle of %s updated", key)
                break
            except ApiException as exc:
                if exc.status == 404:
                    out[key] = "missing"
                    log.warning("%s not found: its caBundle cannot be set", key)
                    break
                if exc.status in (409, 422) and attempt == 0:
                    continue
                raise
    return out
