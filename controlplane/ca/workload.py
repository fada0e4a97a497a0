"""Workload certificates held by the control plane: one EC P-256 key pair and certificate
per identity, generated here, kept in memory only, shared by every proxy authenticated as
that identity and re-issued at half life (or when the signing CA changed). Pure
computation over the CA object and a clock; no I/O.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from controlplane.ca import CertificateAuthority
from controlplane.ca.identity import Identity
from controlplane.translate.secrets import TlsMaterial

Clock = Callable[[], dt.datetime]


def fingerprint(cert: x509.Certificate) -> bytes:
    return cert.fingerprint(hashes.SHA256())


@dataclass(frozen=True, slots=True, eq=False)
class WorkloadCert:
    identity: Identity
    material: TlsMaterial  # chain + key; the key never leaves except in the identity's own Secret
    issued_at: dt.datetime
    not_after: dt.datetime
    rotate_at: dt.datetime
    signer: bytes  # fingerprint of the signing certificate

    def __repr__(self) -> str:
        return (f"WorkloadCert({self.identity}, not_after={self.not_after.isoformat()}, "
                f"rotate_at={self.rotate_at.isoformat()})")


class WorkloadIssuer:
    """Issues and caches per-identity certificates; see the module docstring."""

    def __init__(self, ttl: dt.timedelta, clock: Clock | None = None) -> None:
        if ttl <= dt.timedelta(0):
            raise ValueError("the workload certificate lifetime must be positive")
        self.ttl = ttl
        self.clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self._certs: dict[Identity, WorkloadCert] = {}
        self.issued = 0

    def get(self, ca: CertificateAuthority, identity: Identity) -> WorkloadCert:
        """The identity's current certificate, issued now if it has none, if it reached
        half its life, or if `ca` is not the CA that signed it."""
        now = self.clock()
        cur = self._certs.get(identity)
        if cur is not None and now < cur.rotate_at and cur.signer == fingerprint(ca.signing_certificate):
            return cur
        cert = self._issue(ca, identity, now)
        self._certs[identity] = cert
        return cert

    def _issue(self, ca: CertificateAuthority, identity: Identity, now: dt.datetime) -> WorkloadCert:
        key = ec.generate_private_key(ec.SECP256R1())
        chain = ca.issue_workload(identity.spiffe(ca.trust_domain), key.public_key(), self.ttl)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
        not_after = x509.load_pem_x509_certificate(chain.encode()).not_valid_after_utc
        self.issued += 1
        return WorkloadCert(identity, TlsMaterial(chain, key_pem), now, not_after,
                            now + (not_after - now) / 2, fingerprint(ca.signing_certificate))

    def retain(self, live: Iterable[Identity]) -> None:
        """Forget the keys and certificates of identities no proxy holds any more."""
        keep = set(live)
        for ident in [i for i in self._certs if i not in keep]:
            del self._certs[ident]

    def next_rotation(self) -> dt.datetime | None:
        """The earliest half-life among the certificates held."""
        return min((c.rotate_at for c in self._certs.values()), default=None)

    def current(self) -> dict[Identity, WorkloadCert]:
        return dict(self._certs)
