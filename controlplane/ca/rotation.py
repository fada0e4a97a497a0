"""Root rotation of a self-signed CA directory, in two steps an operator runs
(`meshline ca rotate-root` / `meshline ca finish-rotation`). File I/O in the CA directory
only, under the CA's own lock; a running `meshline serve` notices the files change.

1. `rotate_root`: a new root and signing key; `root-cert.pem` becomes new root + previous
   root(s) (the overlap: peers trust both), `ca-key.pem` the new key. Nothing else is
   re-signed: the control plane pushes the two-root bundle first, then re-issues workload
   certificates from the new root.
2. `finish_rotation`: `root-cert.pem` keeps only the root that matches `ca-key.pem`. Run it
   once every workload holds a certificate from the new root (at most one workload
   certificate lifetime after step 1).
"""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from controlplane.ca import CA_CERT_FILE, CA_KEY_FILE, ROOT_CERT_FILE, CAError, CertificateAuthority
from controlplane.ca.core import DEFAULT_ROOT_TTL, _locked, _write_atomic


@dataclass(frozen=True, slots=True)
class RootInfo:
    subject: str
    fingerprint: str  # SHA-256, hex
    not_after: dt.datetime
    signing: bool  # matches ca-key.pem


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _spki(obj: x509.Certificate) -> bytes:
    return obj.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def _self_signed_files(directory: Path) -> tuple[list[x509.Certificate], bytes]:
    if (directory / CA_CERT_FILE).exists():
        raise CAError(f"{directory} holds a plug-in CA ({CA_CERT_FILE}): rotate it by replacing its files")
    try:
        roots = x509.load_pem_x509_certificates((directory / ROOT_CERT_FILE).read_bytes())
        key_pem = (directory / CA_KEY_FILE).read_bytes()
    except FileNotFoundError as exc:
        raise CAError(f"{directory}: no CA here ({Path(exc.filename).name} missing); start `meshline serve "
                      f"--ca-dir {directory}` once to create it") from None
    except ValueError as exc:
        raise CAError(f"{directory / ROOT_CERT_FILE}: {exc}") from None
    return roots, key_pem


def _signing_spki(key_pem: bytes) -> bytes:
    key = serialization.load_pem_private_key(key_pem, password=None)
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def roots(directory: Path) -> list[RootInfo]:
    """The roots in the CA directory's trust bundle, the signing one flagged."""
    directory = Path(directory)
    with _locked(directory):
        certs, key_pem = _self_signed_files(directory)
    signing = _signing_spki(key_pem)
    return [RootInfo(c.subject.rfc4514_string(), c.fingerprint(hashes.SHA256()).hex(), c.not_valid_after_utc,
                     _spki(c) == signing) for c in certs]


def rotate_root(directory: Path, trust_domain: str = "cluster.local", *,
                root_ttl: dt.timedelta = DEFAULT_ROOT_TTL) -> RootInfo:
    """Step 1 (see the module docstring). Refuses while a rotation is unfinished."""
    directory = Path(directory)
    with _locked(directory):
        old, _key = _self_signed_files(directory)
        if len(old) > 1:
            raise CAError(f"{directory / ROOT_CERT_FILE} already holds {len(old)} roots: a rotation is in "
                          "progress; run `meshline ca finish-rotation` first")
        scratch = Path(tempfile.mkdtemp(prefix=".rotate-", dir=directory))
        try:
            new = CertificateAuthority.load_or_create(scratch, trust_domain, root_ttl=root_ttl)
            new_root = (scratch / ROOT_CERT_FILE).read_bytes()
            new_key = (scratch / CA_KEY_FILE).read_bytes()
            cert = new.signing_certificate
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        # Bundle first, then the key: a reader under the lock sees both or neither.
        _write_atomic(directory / ROOT_CERT_FILE, new_root + "".join(_pem(c) for c in old).encode(), 0o644)
        _write_atomic(directory / CA_KEY_FILE, new_key, 0o600)
    return RootInfo(cert.subject.rfc4514_string(), cert.fingerprint(hashes.SHA256()).hex(),
                    cert.not_valid_after_utc, True)


def finish_rotation(directory: Path) -> list[RootInfo]:
    """Step 2: drop every root but the signing one. Returns the dropped roots."""
    directory = Path(directory)
    with _locked(directory):
        certs, key_pem = _self_signed_files(directory)
        signing = _signing_spki(key_pem)
        keep = [c for c in certs if _spki(c) == signing]
        if not keep:
            raise CAError(f"{directory / CA_KEY_FILE} matches no root in {directory / ROOT_CERT_FILE}")
        dropped = [c for c in certs if _spki(c) != signing]
        if dropped:
            _write_atomic(directory / ROOT_CERT_FILE, "".join(_pem(c) for c in keep[:1]).encode(), 0o644)
    return [RootInfo(c.subject.rfc4514_string(), c.fingerprint(hashes.SHA256()).hex(),
                     c.not_valid_after_utc, False) for c in dropped]
