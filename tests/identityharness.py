"""Test harness for identities: an in-process control plane with its CA (the same wiring as
`meshline serve`, on free ports), authenticated ADS clients, and helpers to read the Secret
resources they receive."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
from cryptography import x509
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from controlplane.ca import tokens
from controlplane.ca.identity import Identity
from controlplane.localrun import free_port
from controlplane.runtime import Runtime, Settings
from controlplane.serve import build_identity, build_runtime, start_ca_server, start_identity_tasks
from controlplane.status.app import create_app
from controlplane.translate.plan import SECRET
from controlplane.xds.server import start_grpc
from tests.xdsharness import AdsClient


def token_for(ca_dir: Path, namespace: str, sa: str, ttl: dt.timedelta = dt.timedelta(hours=1),
              now: dt.datetime | None = None) -> str:
    return tokens.mint(tokens.load_or_create_token_key(ca_dir), Identity(namespace, sa), ttl, now)


def auth(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


@dataclass
class Received:
    """A Secret as a client saw it."""

    name: str
    secret: Any
    at: dt.datetime

    @property
    def certs(self) -> list[x509.Certificate]:
        if self.secret.HasField("tls_certificate"):
            pem = self.secret.tls_certificate.certificate_chain.inline_bytes
        else:
            pem = self.secret.validation_context.trusted_ca.inline_bytes
        return x509.load_pem_x509_certificates(pem)

    @property
    def key_pem(self) -> bytes:
        return bytes(self.secret.tls_certificate.private_key.inline_bytes)


def secrets_of(resp: Any) -> dict[str, Received]:
    now = dt.datetime.now(dt.UTC)
    out = {}
    for r in resp.resources:
        any_msg = r.resource if hasattr(r, "resource") and r.HasField("resource") else r
        s = secret_pb2.Secret()
        any_msg.Unpack(s)
        out[s.name] = Received(s.name, s, now)
    return out


class ControlPlane:
    """`meshline serve`'s pieces in this event loop: directory source on `config`, CA in
    `ca_dir`, xDS on a free port, 15012 (TLS) on another."""

    def __init__(self, tmp: Path, *, ttl_s: float = 3600.0, tls: bool = True, propagation_s: float = 5.0,
                 config: Path | None = None, reviewer: Any = None) -> None:
        self.reviewer = reviewer  # a TokenReviewer: Kubernetes service-account tokens accepted too
        self.ca_dir = tmp / "ca"
        self.config = config or tmp / "mesh"
        self.config.mkdir(parents=True, exist_ok=True)
        self.settings = Settings(
            config_dirs=(self.config,), xds_address=f"127.0.0.1:{free_port()}", debounce_ms=10,
            ca_enabled=True, ca_dir=self.ca_dir, workload_cert_ttl_s=ttl_s,
            ca_address=f"127.0.0.1:{free_port()}" if tls else None, bundle_propagation_s=propagation_s)
        self.runtime: Runtime | None = None
        self.xds_port = 0
        self.ca_port = 0
        self._server: grpc.aio.Server | None = None
        self._stop_ca: Any = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> ControlPlane:
        identity = build_identity(self.settings, self.ca_dir)
        identity.authenticator.reviewer = self.reviewer
        rt = self.runtime = build_runtime(self.settings, identity)
        self._server, self.xds_port = await start_grpc(self.settings.xds_address, rt.xds.handlers())
        if self.settings.ca_address:
            started = await start_ca_server(rt, self.settings)
            assert started is not None
            self._stop_ca, self.ca_port = started
        self._tasks = [asyncio.create_task(rt.run_sources()), asyncio.create_task(rt.rebuild_loop()),
                       *start_identity_tasks(rt, self.settings, None)]
        for _ in range(200):
            if rt.ready:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # the CA directory watcher is up
        return self

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._server is not None:
            await self._server.stop(0)
        if self._stop_ca is not None:
            await self._stop_ca()

    @property
    def rt(self) -> Runtime:
        assert self.runtime is not None
        return self.runtime

    @property
    def bundle(self) -> str:
        assert self.rt.identity is not None
        return self.rt.identity.bundle

    def token(self, namespace: str, sa: str, **kw: Any) -> str:
        return token_for(self.ca_dir, namespace, sa, **kw)

    def client(self, node_id: str, namespace: str, sa: str | None = None, *, token: str | None = None,
               protocol: str = "delta", channel: grpc.aio.Channel | None = None) -> AdsClient:
        meta = {"namespace": namespace, **({"service_account": sa} if sa else {})}
        return AdsClient(f"127.0.0.1:{self.xds_port}", protocol, node_id, meta,
                         metadata=auth(token) if token else (), channel=channel)

    def tls_channel(self, key_pem: bytes | None = None, chain_pem: bytes | None = None) -> grpc.aio.Channel:
        creds = grpc.ssl_channel_credentials(self.bundle.encode(), key_pem, chain_pem)
        return grpc.aio.secure_channel(f"localhost:{self.ca_port}", creds)

    def status(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(self.rt)), base_url="http://status")


async def subscribe_secrets(c: AdsClient, names: tuple[str, ...] = ("default", "ROOTCA"),
                            timeout: float = 5.0) -> tuple[Any, dict[str, Received]]:
    """Subscribe (delta or SotW), ACK the answer, return (response, secrets)."""
    if c.protocol == "delta":
        c.send_delta(SECRET, subscribe=list(names))
        r = await c.recv(timeout)
        c.send_delta(SECRET, nonce=r.nonce)
    else:
        c.send(SECRET, list(names))
        r = await c.recv(timeout)
        c.send(SECRET, list(names), version=r.version_info, nonce=r.nonce)
    return r, secrets_of(r)


async def ack(c: AdsClient, r: Any, names: tuple[str, ...] = ("default", "ROOTCA")) -> None:
    if c.protocol == "delta":
        c.send_delta(SECRET, nonce=r.nonce)
    else:
        c.send(SECRET, list(names), version=r.version_info, nonce=r.nonce)


def spiffe_uris(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in san.get_values_for_type(x509.UniformResourceIdentifier)]


def all_sans(cert: x509.Certificate) -> list[x509.GeneralName]:
    return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
