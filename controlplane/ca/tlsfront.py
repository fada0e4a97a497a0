"""Port 15012: TLS in front of an internal gRPC server that carries the xDS services and
the certificate-signing API. Does network and file I/O.

grpcio's server credentials either require *and* verify a client certificate or never
ask for one; 15012 must accept proxies that have no certificate yet (they authenticate
with a bearer token) and still check the certificate of those that present one. So TLS is
terminated here with Python's `ssl` (`CERT_OPTIONAL`: a client certificate is requested;
when one is sent it must chain to the trust bundle, else the handshake fails; ALPN h2),
and each connection is spliced to the gRPC server listening on a Unix socket in a private
0700 directory, which nothing else can reach.

The serving certificate (DNS names from `--ca-dns-names`) is issued by the CA, re-issued
at half life and whenever the CA or the trust bundle changes; each handshake uses the
newest context, so open connections are unaffected.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import shutil
import ssl
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509

from controlplane.bootstrap import split_address
from controlplane.ca import CAError
from controlplane.ca.service import IdentityService

log = logging.getLogger(__name__)

DEFAULT_DNS_NAMES = ("meshline.meshline-system.svc", "localhost")
DEFAULT_SERVING_TTL = dt.timedelta(hours=24)
HANDSHAKE_TIMEOUT_S = 10.0
_CHUNK = 256 * 1024


class TlsFront:
    def __init__(self, address: str, identity: IdentityService, dns_names: Sequence[str] = DEFAULT_DNS_NAMES,
                 serving_ttl: dt.timedelta = DEFAULT_SERVING_TTL) -> None:
        self.address = address
        self.identity = identity
        self.dns_names = tuple(dns_names)
        self.serving_ttl = serving_ttl
        self.private_dir = Path(tempfile.mkdtemp(prefix="meshline-15012-"))  # 0700
        self.backend = str(self.private_dir / "grpc.sock")
        self.port = 0
        self._ctx: ssl.SSLContext | None = None
        self._renew_at: dt.datetime | None = None
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        identity.tls_listeners.append(self.invalidate)

    @property
    def backend_address(self) -> str:
        """The gRPC address (`unix:...`) of the internal server this front feeds."""
        return f"unix:{self.backend}"

    # ------------------------------------------------------------------ TLS context
    def invalidate(self) -> None:
        self._ctx = None

    def context(self) -> ssl.SSLContext:
        now = self.identity.clock()
        if self._ctx is not None and self._renew_at is not None and now < self._renew_at:
            return self._ctx
        chain, key = self.identity.issue_serving(self.dns_names, self.serving_ttl)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["h2"])
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.load_verify_locations(cadata=self.identity.bundle)
        fd, path = tempfile.mkstemp(dir=self.private_dir, suffix=".pem")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(key + chain)
            ctx.load_cert_chain(path)
        finally:
            os.unlink(path)
        issued = now
        not_after = x509.load_pem_x509_certificate(chain.encode()).not_valid_after_utc
        self._ctx, self._renew_at = ctx, issued + (not_after - issued) / 2
        log.info("15012 serving certificate issued for %s (valid until %s)", ", ".join(self.dns_names),
                 not_after.isoformat())
        return ctx

    # ------------------------------------------------------------------ server
    async def start(self) -> int:
        if self.identity.ready:
            self.context()  # fail early if the CA cannot issue it
        host, port = split_address(self.address)
        self._server = await asyncio.start_server(self._accept, host, port, reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._conns):
            t.cancel()
        for t in list(self._conns):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
        shutil.rmtree(self.private_dir, ignore_errors=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            self._conns.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            await writer.start_tls(self.context(), ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S)
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError, CAError) as exc:
            log.info("TLS handshake with %s on 15012 failed: %s", peer, getattr(exc, "reason", None) or exc)
            writer.transport.abort()
            return
        except Exception:
            log.exception("TLS handshake with %s on 15012 failed", peer)
            writer.transport.abort()
            return
        try:
            b_reader, b_writer = await asyncio.open_unix_connection(self.backend)
        except OSError as exc:
            log.error("internal gRPC server unreachable: %s", exc)
            writer.close()
            return
        up = asyncio.create_task(_pipe(reader, b_writer))
        down = asyncio.create_task(_pipe(b_reader, writer))
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (up, down):
                t.cancel()
            for w in (writer, b_writer):
                with contextlib.suppress(Exception):
                    w.close()
            for t in (up, down):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, ConnectionError, ssl.SSLError):
        while data := await src.read(_CHUNK):
            dst.write(data)
            await dst.drain()
