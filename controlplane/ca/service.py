"""The identity service of a running control plane: the CA loaded from its directory,
per-identity workload certificates, the served trust bundle, stream authentication, CSR
signing, and the reaction to CA directory changes. Does file I/O (the CA directory, in
threads) and watches it with `watchfiles`.

Root rotation as the running server sees it (`meshline ca rotate-root`, then
`finish-rotation`, or a new root adopted from the Kubernetes Secret):

1. the bundle changes first: proxies get the union of the new bundle and the roots trusted
   so far, while workload certificates still come from the current signer;
2. once every proxy that subscribes to `ROOTCA` has ACKed that bundle (or after
   `propagation_timeout`), the new signer takes over and every workload certificate is
   re-issued from it; the bundle becomes exactly the directory's.

So old and new roots are both trusted while certificates change hands. `on_change` asks
the runtime for a rebuild; `bundle_synced(bundle)` tells whether the proxies hold it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization

from controlplane.ca import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    CERT_CHAIN_FILE,
    ROOT_CERT_FILE,
    CAError,
    CertificateAuthority,
    tokens,
)
from controlplane.ca.authn import Authenticator, TokenReviewer
from controlplane.ca.identity import Identity
from controlplane.ca.workload import WorkloadIssuer, fingerprint
from controlplane.translate.secrets import TlsMaterial

log = logging.getLogger(__name__)

WATCHED_FILES = frozenset({ROOT_CERT_FILE, CA_KEY_FILE, CA_CERT_FILE, CERT_CHAIN_FILE, tokens.TOKEN_KEY_FILE})
DEFAULT_WORKLOAD_TTL = dt.timedelta(hours=24)
RETRY_S = 5.0


def _certs(pem: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem.encode()) if pem.strip() else []


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def union_bundle(first: str, *more: str) -> str:
    """The certificates of `first` then those of `more` not already in it (PEM)."""
    seen: set[bytes] = set()
    out: list[str] = []
    for pem in (first, *more):
        for c in _certs(pem):
            fp = c.fingerprint(hashes.SHA256())
            if fp not in seen:
                seen.add(fp)
                out.append(_pem(c))
    return "".join(out)


@dataclass(frozen=True, slots=True)
class IdentitySettings:
    ca_dir: Path
    trust_domain: str = "cluster.local"
    workload_ttl: dt.timedelta = DEFAULT_WORKLOAD_TTL
    create: bool = True  # create a self-signed root when the directory has none (directory mode)
    bootstrap_tokens: bool = True  # accept `meshline bootstrap` tokens signed with the directory's key
    propagation_timeout: dt.timedelta = dt.timedelta(seconds=30)


class IdentityService:
    def __init__(self, settings: IdentitySettings, reviewer: TokenReviewer | None = None,
                 clock: Callable[[], dt.datetime] | None = None) -> None:
        self.settings = settings
        self.clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self.ca: CertificateAuthority | None = None
        self.bundle = ""
        self.issuer = WorkloadIssuer(settings.workload_ttl, self.clock)
        self._token_key: bytes | None = None
        self.authenticator = Authenticator(lambda: self._token_key, reviewer)
        self.on_change: Callable[[], None] = lambda: None
        self.bundle_synced: Callable[[str], bool] = lambda _bundle: True
        self.tls_listeners: list[Callable[[], None]] = []  # told when the CA or bundle changed
        self.generation = 0
        self._reload_lock = asyncio.Lock()

    # ------------------------------------------------------------------ facts
    @property
    def trust_domain(self) -> str:
        return self.settings.trust_domain

    @property
    def ca_dir(self) -> Path:
        return self.settings.ca_dir

    @property
    def ready(self) -> bool:
        return self.ca is not None

    # ------------------------------------------------------------------ loading
    def _load(self) -> tuple[CertificateAuthority | None, bytes | None]:
        d = self.settings.ca_dir
        have_ca = (d / CA_CERT_FILE).exists() or (d / ROOT_CERT_FILE).exists() or (d / CA_KEY_FILE).exists()
        ca = None
        if self.settings.create or have_ca:
            ca = CertificateAuthority.load_or_create(d, self.settings.trust_domain, clock=self.clock)
        key = None
        if self.settings.bootstrap_tokens:
            key = tokens.load_or_create_token_key(d)
        return ca, key

    def start(self) -> None:
        """Load (or, in directory mode, create) the CA and the token key. Raises CAError."""
        ca, key = self._load()
        self._token_key = key
        if ca is not None:
            self._install(ca, ca.trust_bundle())
            log.info("CA ready in %s (%r); trust bundle of %d root(s)", self.settings.ca_dir, ca,
                     len(_certs(self.bundle)))
        else:
            log.info("waiting for the CA root to appear in %s", self.settings.ca_dir)

    def _install(self, ca: CertificateAuthority | None, bundle: str) -> None:
        changed = ca is not self.ca or bundle != self.bundle
        self.ca = ca
        self.bundle = bundle
        if changed:
            self.generation += 1
            for listener in self.tls_listeners:
                listener()
            self.on_change()

    async def reload(self) -> None:
        """Re-read the CA directory and roll out what changed (see the module docstring)."""
        async with self._reload_lock:
            try:
                new, key = await asyncio.to_thread(self._load)
            except CAError as exc:
                log.error("CA directory %s: %s; keeping the current CA", self.settings.ca_dir, exc)
                return
            if key is not None and key != self._token_key:
                if self._token_key is not None:
                    log.warning("token signing key in %s changed: tokens minted with the old key are refused",
                                self.settings.ca_dir)
                self._token_key = key
            if new is None:
                return
            cur = self.ca
            if cur is None:
                self._install(new, new.trust_bundle())
                log.info("CA ready (%r)", new)
                return
            new_bundle = new.trust_bundle()
            same_signer = fingerprint(new.signing_certificate) == fingerprint(cur.signing_certificate)
            if same_signer:
                if new_bundle != self.bundle:
                    log.warning("trust bundle changed: %d root(s)", len(_certs(new_bundle)))
                self._install(new, new_bundle)
                return
            # Phase 1: trust the new roots everywhere while certificates still come from the old signer.
            overlap = union_bundle(new_bundle, self.bundle)
            log.warning("CA signer changed to %s: pushing the trust bundle (%d roots) first",
                        new.signing_certificate.subject.rfc4514_string(), len(_certs(overlap)))
            self._install(cur, overlap)
            await self._wait_bundle(overlap)
            # Phase 2: the new signer; every workload certificate is re-issued on the rebuild.
            self._install(new, new_bundle)
            log.warning("issuing workload certificates from the new CA signer; trust bundle of %d root(s)",
                        len(_certs(new_bundle)))

    async def _wait_bundle(self, bundle: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.propagation_timeout.total_seconds()
        while not self.bundle_synced(bundle):
            if loop.time() >= deadline:
                log.warning("not every proxy acknowledged the new trust bundle within %s; switching signer anyway",
                            self.settings.propagation_timeout)
                return
            await asyncio.sleep(0.05)

    async def watch(self) -> None:
        """Reload on changes to the CA directory's files (runs until cancelled)."""
        import watchfiles

        d = self.settings.ca_dir
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        async for changes in watchfiles.awatch(d, debounce=50, step=10, recursive=False, rust_timeout=0):
            if any(Path(p).name in WATCHED_FILES and Path(p).parent == d for _c, p in changes):
                await self.reload()

    # ------------------------------------------------------------------ workload certificates
    def material(self, identity: Identity) -> TlsMaterial | None:
        """The identity's key pair and chain (issued or rotated as needed); None without a CA.
        When issuing fails (e.g. the CA expired), the identity keeps its current certificate."""
        if self.ca is None:
            return None
        try:
            return self.issuer.get(self.ca, identity).material
        except CAError as exc:
            current = self.issuer.current().get(identity)
            log.error("cannot issue a certificate for %s: %s%s", identity, exc,
                      "; keeping the current one" if current is not None else "")
            return current.material if current is not None else None

    def sweep(self, live: Iterable[Identity]) -> float | None:
        """Drop certificates of identities no longer connected; seconds until the next
        half-life among the rest (None: nothing to rotate). A half-life already past means
        re-issuing just failed: try again in RETRY_S."""
        self.issuer.retain(live)
        due = self.issuer.next_rotation()
        if due is None:
            return None
        delay = (due - self.clock()).total_seconds()
        return delay if delay > 0 else RETRY_S

    def sign_csr(self, identity: Identity, csr_pem: str, ttl: dt.timedelta) -> list[str]:
        """Sign a CSR (already checked to name exactly `identity`): leaf, intermediates, root."""
        if self.ca is None:
            raise CAError("the CA is not ready yet")
        chain = _certs(self.ca.issue_workload(identity.spiffe(self.trust_domain), csr_pem, ttl))
        top = chain[-1]
        anchor = next((r for r in _certs(self.bundle) if _issued_by(top, r)), None)
        return [_pem(c) for c in chain] + ([_pem(anchor)] if anchor is not None else [])

    def issue_serving(self, dns_names: Iterable[str], ttl: dt.timedelta) -> tuple[str, str]:
        if self.ca is None:
            raise CAError("the CA is not ready yet")
        return self.ca.issue_server_cert(list(dns_names), ttl)


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    with contextlib.suppress(ValueError, TypeError, InvalidSignature):
        cert.verify_directly_issued_by(issuer)
        return True
    return False
