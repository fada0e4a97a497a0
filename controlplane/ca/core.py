"""The CA core: one signing key and certificate, loaded from (or created in) a directory,
that issues short-lived leaf certificates. Uses `cryptography`; does file I/O only in
`CertificateAuthority.load_or_create`, and only in its own directory.

Two layouts, told apart by the files present (names as Istio's `cacerts`):

- self-signed (the default): `root-cert.pem` and `ca-key.pem` (0600). Created on first
  use as an EC P-256 root valid for ten years; the root signs leaves directly.
- plug-in: `ca-cert.pem` (the signing certificate, usually an intermediate), `ca-key.pem`,
  `root-cert.pem` (the trust anchors) and optionally `cert-chain.pem` (ca-cert up to the
  root, any intermediates in between). Issued chains carry the signing certificate and the
  intermediates, never the root.

The signing key never leaves the object except to its own file: there is no accessor, the
object refuses to pickle, and `repr` shows only public facts. Leaves:

- `issue_server_cert(dns_names, ttl)`: a fresh key and a serverAuth certificate (the
  webhook's serving certificate); returns (chain PEM, key PEM).
- `issue_workload(identity, csr_or_public_key, ttl)`: a certificate whose only name is the
  SPIFFE URI SAN `spiffe://<trust domain>/ns/<ns>/sa/<sa>` (subject empty, SAN critical),
  for serverAuth and clientAuth; a CSR must carry a valid self-signature (proof of
  possession) and its requested names are ignored. Its key must be EC P-256/P-384 or RSA
  of 2048-4096 bits (`check_public_key`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controlplane.ca.spiffe import TRUST_DOMAIN_PATTERN, SpiffeId, fail

ROOT_CERT_FILE = "root-cert.pem"
CA_KEY_FILE = "ca-key.pem"
CA_CERT_FILE = "ca-cert.pem"
CERT_CHAIN_FILE = "cert-chain.pem"
_LOCK_FILE = ".ca.lock"

DEFAULT_ROOT_TTL = dt.timedelta(days=3650)
DEFAULT_LEAF_TTL = dt.timedelta(hours=24)
CLOCK_SKEW = dt.timedelta(minutes=5)
"""Leaves are valid from this long before issuance, for peers whose clocks run behind."""
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 4096

_DNS_NAME = re.compile(r"^(\*\.)?([a-zA-Z0-9_]([-a-zA-Z0-9_]{0,61}[a-zA-Z0-9])?\.)*"
                       r"[a-zA-Z0-9_]([-a-zA-Z0-9_]{0,61}[a-zA-Z0-9])?$")

Clock = Callable[[], dt.datetime]
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
_SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# --------------------------------------------------------------------------- files


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialize load-or-create between processes sharing the directory. A read-only
    directory (a mounted Secret holding a plug-in CA) needs no lock: nothing is created."""
    try:
        fd = os.open(directory / _LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o600)
    except OSError:
        if os.access(directory, os.W_OK):
            raise
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)  # the umask may have narrowed or the file pre-existed
    os.replace(tmp, path)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror or exc}")


def _load_certs(path: Path) -> list[x509.Certificate]:
    data = _read(path)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        fail(f"{path}: not a PEM certificate file ({exc})")
    return certs


def _load_key(path: Path) -> _SigningKey:
    mode = path.stat().st_mode & 0o777
    # In a directory Meshline manages the key must stay private; a read-only mount (a
    # Kubernetes Secret) has the modes its volume gives it.
    if mode & 0o077 and os.access(path.parent, os.W_OK):
        fail(f"{path} is readable by others (mode {mode:04o}); chmod 600 it")
    try:
        key = serialization.load_pem_private_key(_read(path), password=None)
    except (ValueError, TypeError) as exc:
        fail(f"{path}: not an unencrypted PEM private key ({exc})")
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        fail(f"{path}: unsupported key type {type(key).__name__} (use EC or RSA)")
    return key


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _same_key(a: PublicKey | Any, b: PublicKey | Any) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return bool(a.public_bytes(*fmt) == b.public_bytes(*fmt))


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return bool(bc.ca)


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _self_signed(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject and _issued_by(cert, cert)


# --------------------------------------------------------------------------- the CA


class CertificateAuthority:
    """A signing CA. Build it with `load_or_create`; see the module docstring."""

    __slots__ = ("__key", "_clock", "_directory", "_intermediates", "_plugged_in", "_roots", "_signing",
                 "_trust_domain")

    def __init__(self, *, key: _SigningKey, signing: x509.Certificate, intermediates: Sequence[x509.Certificate],
                 roots: Sequence[x509.Certificate], trust_domain: str, directory: Path, plugged_in: bool,
                 clock: Clock) -> None:
        self.__key = key
        self._signing = signing
        self._intermediates = tuple(intermediates)
        self._roots = tuple(roots)
        self._trust_domain = trust_domain
        self._directory = directory
        self._plugged_in = plugged_in
        self._clock = clock

    # ------------------------------------------------------------------ construction

    @classmethod
    def load_or_create(cls, directory: Path, trust_domain: str = "cluster.local", *,
                       root_ttl: dt.timedelta = DEFAULT_ROOT_TTL, clock: Clock | None = None) -> CertificateAuthority:
        """Load the CA in `directory` (plug-in files if `ca-cert.pem` is there, else the
        self-signed root), creating a self-signed root when the directory has neither."""
        if not TRUST_DOMAIN_PATTERN.match(trust_domain):
            fail(f"invalid trust domain {trust_domain!r} (lowercase letters, digits, '.', '-', '_')")
        clock = clock or _utcnow
        directory = Path(directory)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _locked(directory):
            if (directory / CA_CERT_FILE).exists():
                return cls._load_plugin(directory, trust_domain, clock)
            have = [n for n in (ROOT_CERT_FILE, CA_KEY_FILE) if (directory / n).exists()]
            if len(have) == 2:
                return cls._load_self_signed(directory, trust_domain, clock)
            if have:
                fail(f"{directory}: found {have[0]} without {({ROOT_CERT_FILE, CA_KEY_FILE} - set(have)).pop()}; "
                      "restore it or remove both to create a new root")
            return cls._create(directory, trust_domain, root_ttl, clock)

    @classmethod
    def _create(cls, directory: Path, trust_domain: str, ttl: dt.timedelta, clock: Clock) -> CertificateAuthority:
        if ttl <= dt.timedelta(0):
            fail("root_ttl must be positive")
        key = ec.generate_private_key(ec.SECP256R1())
        now = clock()
        name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Meshline"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"Meshline root CA {trust_domain}"[:64]),
        ])
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + ttl)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(key, hashes.SHA256())
        )
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        _write_atomic(directory / CA_KEY_FILE, key_pem, 0o600)
        _write_atomic(directory / ROOT_CERT_FILE, _pem(cert).encode(), 0o644)
        return cls(key=key, signing=cert, intermediates=(), roots=(cert,), trust_domain=trust_domain,
                   directory=directory, plugged_in=False, clock=clock)

    @classmethod
    def _load_self_signed(cls, directory: Path, trust_domain: str, clock: Clock) -> CertificateAuthority:
        roots = _load_certs(directory / ROOT_CERT_FILE)
        key = _load_key(directory / CA_KEY_FILE)
        signing = next((c for c in roots if _same_key(c.public_key(), key.public_key())), None)
        if signing is None:
            fail(f"{directory / CA_KEY_FILE} does not match any certificate in {directory / ROOT_CERT_FILE}")
        cls._check_signing(signing, directory / ROOT_CERT_FILE, clock)
        return cls(key=key, signing=signing, intermediates=(), roots=roots, trust_domain=trust_domain,
                   directory=directory, plugged_in=False, clock=clock)

    @classmethod
    def _load_plugin(cls, directory: Path, trust_domain: str, clock: Clock) -> CertificateAuthority:
        missing = [n for n in (CA_KEY_FILE, ROOT_CERT_FILE) if not (directory / n).exists()]
        if missing:
            fail(f"{directory}: plug-in CA has {CA_CERT_FILE} but lacks {', '.join(missing)}")
        signing, *_rest = _load_certs(directory / CA_CERT_FILE)
        key = _load_key(directory / CA_KEY_FILE)
        if not _same_key(signing.public_key(), key.public_key()):
            fail(f"{directory / CA_KEY_FILE} does not match {directory / CA_CERT_FILE}")
        cls._check_signing(signing, directory / CA_CERT_FILE, clock)
        roots = _load_certs(directory / ROOT_CERT_FILE)
        chain: list[x509.Certificate] = []
        if (directory / CERT_CHAIN_FILE).exists():
            chain = _load_certs(directory / CERT_CHAIN_FILE)
        intermediates = [c for c in chain if c != signing and c not in roots and not _self_signed(c)]
        # The signing certificate must chain to one of the roots through the intermediates.
        current = signing
        pool = list(intermediates)
        for _ in range(len(pool) + 1):
            if any(_issued_by(current, r) for r in roots):
                break
            parent = next((c for c in pool if _issued_by(current, c)), None)
            if parent is None:
                fail(f"{directory / CA_CERT_FILE} does not chain to {ROOT_CERT_FILE} "
                      f"(through {CERT_CHAIN_FILE}: {len(intermediates)} intermediate(s))")
            pool.remove(parent)
            current = parent
        else:
            fail(f"{directory / CERT_CHAIN_FILE}: chain loops")
        ordered = cls._order_chain(signing, intermediates)
        return cls(key=key, signing=signing, intermediates=ordered, roots=roots, trust_domain=trust_domain,
                   directory=directory, plugged_in=True, clock=clock)

    @staticmethod
    def _order_chain(signing: x509.Certificate, intermediates: Sequence[x509.Certificate]) -> list[x509.Certificate]:
        out: list[x509.Certificate] = []
        current, pool = signing, list(intermediates)
        while True:
            parent = next((c for c in pool if _issued_by(current, c)), None)
            if parent is None:
                return out
            out.append(parent)
            pool.remove(parent)
            current = parent

    @staticmethod
    def _check_signing(cert: x509.Certificate, path: Path, clock: Clock) -> None:
        if not _is_ca(cert):
            fail(f"{path}: the signing certificate is not a CA (basicConstraints CA:TRUE missing)")
        now = clock()
        if now >= cert.not_valid_after_utc:
            fail(f"{path}: the signing certificate expired at {cert.not_valid_after_utc.isoformat()}")
        try:
            ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            return
        if not ku.key_cert_sign:
            fail(f"{path}: the signing certificate's keyUsage lacks keyCertSign")

    # ------------------------------------------------------------------ public facts

    @property
    def trust_domain(self) -> str:
        return self._trust_domain

    @property
    def directory(self) -> Path:
        return self._directory

    @property
    def plugged_in(self) -> bool:
        return self._plugged_in

    @property
    def not_after(self) -> dt.datetime:
        """When the signing certificate expires (no leaf outlives it)."""
        return self._signing.not_valid_after_utc

    def trust_bundle(self) -> str:
        """The root certificate(s), PEM: what peers and the API server trust."""
        return "".join(_pem(c) for c in self._roots)

    def signing_chain(self) -> str:
        """The certificates issued chains carry after the leaf (empty for a self-signed root)."""
        if not self._plugged_in:
            return ""
        return "".join(_pem(c) for c in (self._signing, *self._intermediates))

    @property
    def signing_certificate(self) -> x509.Certificate:
        """The certificate that signs leaves (public; tells one signing key from another)."""
        return self._signing

    def __repr__(self) -> str:
        kind = "plug-in" if self._plugged_in else "self-signed"
        return (f"CertificateAuthority({kind}, trust_domain={self._trust_domain!r}, "
                f"subject={self._signing.subject.rfc4514_string()!r}, not_after={self.not_after.isoformat()})")

    def __reduce_ex__(self, protocol: Any) -> NoReturn:
        raise TypeError("a CertificateAuthority holds a signing key and cannot be pickled or copied")

    # ------------------------------------------------------------------ issuance

    def _validity(self, ttl: dt.timedelta) -> tuple[dt.datetime, dt.datetime]:
        if ttl <= dt.timedelta(0):
            fail(f"ttl must be positive, got {ttl}")
        now = self._clock()
        not_after = min(now + ttl, self.not_after)
        if not_after <= now:
            fail("the signing certificate has expired")
        return max(now - CLOCK_SKEW, self._signing.not_valid_before_utc), not_after

    def _builder(self, public_key: PublicKey, ttl: dt.timedelta) -> x509.CertificateBuilder:
        start, end = self._validity(ttl)
        issuer_ski = self._issuer_ski()
        return (
            x509.CertificateBuilder()
            .issuer_name(self._signing.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski), critical=False)
        )

    def _issuer_ski(self) -> x509.SubjectKeyIdentifier:
        # The AKI must repeat the issuer's own SKI (a plug-in CA may compute it differently).
        try:
            return self._signing.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        except x509.ExtensionNotFound:
            return x509.SubjectKeyIdentifier.from_public_key(self.__key.public_key())

    @staticmethod
    def _key_usage(public_key: PublicKey) -> x509.KeyUsage:
        return x509.KeyUsage(digital_signature=True, key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                             content_commitment=False, data_encipherment=False, key_agreement=False,
                             key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False)

    def _sign(self, builder: x509.CertificateBuilder) -> str:
        cert = builder.sign(self.__key, hashes.SHA256())
        return _pem(cert) + self.signing_chain()

    def issue_server_cert(self, dns_names: Sequence[str],
                          ttl: dt.timedelta = DEFAULT_LEAF_TTL) -> tuple[str, str]:
        """A serving certificate for `dns_names` (IP literals become IP SANs) with a fresh
        EC P-256 key: (certificate chain PEM, PKCS#8 key PEM)."""
        if isinstance(dns_names, str) or not dns_names:
            fail("issue_server_cert needs a non-empty list of DNS names")
        sans: list[x509.GeneralName] = []
        for name in dict.fromkeys(dns_names):
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
                continue
            except ValueError:
                pass
            if len(name) > 253 or not _DNS_NAME.match(name):
                fail(f"{name!r} is not a valid DNS name")
            sans.append(x509.DNSName(name.lower()))
        key = ec.generate_private_key(ec.SECP256R1())
        cn = str(dns_names[0])[:64]
        builder = (
            self._builder(key.public_key(), ttl)
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(self._key_usage(key.public_key()), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        )
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
        return self._sign(builder), key_pem

    def issue_workload(self, identity: str | SpiffeId | tuple[str, str],
                       csr_or_public_key: str | bytes | PublicKey,
                       ttl: dt.timedelta = DEFAULT_LEAF_TTL) -> str:
        """A workload certificate for `identity` (a SPIFFE URI in this CA's trust domain, a
        SpiffeId, or (namespace, service account)) over the key of `csr_or_public_key` (a PEM
        CSR, a PEM public key, or a key object). Returns the chain PEM (leaf first)."""
        if isinstance(identity, tuple):
            sid = SpiffeId(self._trust_domain, *identity)
        elif isinstance(identity, SpiffeId):
            sid = identity
        else:
            sid = SpiffeId.parse(identity)
        if sid.trust_domain != self._trust_domain:
            fail(f"identity {sid.uri} is outside this CA's trust domain {self._trust_domain!r}")
        public_key = _public_key_of(csr_or_public_key)
        builder = (
            self._builder(public_key, ttl)
            .subject_name(x509.Name([]))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(sid.uri)]), critical=True)
            .add_extension(self._key_usage(public_key), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
        )
        return self._sign(builder)


def _public_key_of(value: str | bytes | PublicKey) -> PublicKey:
    if isinstance(value, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        key: Any = value
    else:
        data = value.encode() if isinstance(value, str) else value
        if b"CERTIFICATE REQUEST" in data:
            try:
                csr = x509.load_pem_x509_csr(data)
            except ValueError as exc:
                fail(f"not a valid PEM CSR: {exc}")
            if not csr.is_signature_valid:
                fail("the CSR's signature does not verify (no proof of possession of its key)")
            key = csr.public_key()
        else:
            try:
                key = serialization.load_pem_public_key(data)
            except (ValueError, TypeError) as exc:
                fail(f"neither a PEM CSR nor a PEM public key: {exc}")
    return check_public_key(key)


def check_public_key(key: object) -> PublicKey:
    """`key` if a workload certificate may carry it: EC P-256 or P-384, or RSA of
    MIN_RSA_BITS to MAX_RSA_BITS bits (larger keys only cost the CA and every peer time).
    Raises CAError naming what is wrong."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1 | ec.SECP384R1):
            fail(f"unsupported EC curve {key.curve.name} (use P-256 or P-384)")
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            fail(f"RSA key of {key.key_size} bits is too small (at least {MIN_RSA_BITS})")
        if key.key_size > MAX_RSA_BITS:
            fail(f"RSA key of {key.key_size} bits is too large (at most {MAX_RSA_BITS})")
        return key
    fail(f"unsupported key type {type(key).__name__} "
         f"(use EC P-256/P-384 or RSA of {MIN_RSA_BITS}-{MAX_RSA_BITS} bits)")
