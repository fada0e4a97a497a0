"""The CA core: self-signed root persisted with safe modes and reused, plug-in CA with
intermediates, serving and SPIFFE workload certificates that verify with `cryptography`'s
X.509 path validation against the trust bundle, and the refusals a user would hit."""

from __future__ import annotations

import copy
import datetime as dt
import os
import pickle
import shutil
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controlplane.ca import CAError, CertificateAuthority, SpiffeId

NOW = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)


def clock(at: dt.datetime = NOW) -> object:
    return lambda: at


def certs(pem: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem.encode())


def store(ca: CertificateAuthority) -> verification.Store:
    return verification.Store(certs(ca.trust_bundle()))


def verify_server(ca: CertificateAuthority, chain_pem: str, name: str, at: dt.datetime) -> list[x509.Certificate]:
    leaf, *rest = certs(chain_pem)
    verifier = (verification.PolicyBuilder().store(store(ca)).time(at)
                .build_server_verifier(verification.DNSName(name)))
    return verifier.verify(leaf, rest)


def verify_client(ca: CertificateAuthority, chain_pem: str, at: dt.datetime) -> verification.VerifiedClient:
    leaf, *rest = certs(chain_pem)
    verifier = verification.PolicyBuilder().store(store(ca)).time(at).build_client_verifier()
    return verifier.verify(leaf, rest)


def csr_for(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, uri: str = "spiffe://evil/ns/x/sa/y") -> str:
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "asks-for-more")]))
           .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri),
                                                       x509.DNSName("kubernetes.default")]), critical=False)
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


# --------------------------------------------------------------------------- self-signed


def test_creates_a_self_signed_p256_root_with_private_files(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    ca = CertificateAuthority.load_or_create(d, clock=clock())
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE((d / "ca-key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((d / "root-cert.pem").stat().st_mode) == 0o644
    (root,) = certs(ca.trust_bundle())
    assert (d / "root-cert.pem").read_text() == ca.trust_bundle()
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert root.public_key().curve.name == "secp256r1"
    assert root.issuer == root.subject
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert root.not_valid_after_utc - NOW >= dt.timedelta(days=3649)
    assert not ca.plugged_in and ca.signing_chain() == ""
    assert ca.trust_domain == "cluster.local"


def test_reloads_the_same_root(tmp_path: Path) -> None:
    first = CertificateAuthority.load_or_create(tmp_path)
    key_before = (tmp_path / "ca-key.pem").read_bytes()
    second = CertificateAuthority.load_or_create(tmp_path)
    assert second.trust_bundle() == first.trust_bundle()
    assert (tmp_path / "ca-key.pem").read_bytes() == key_before
    chain, _ = second.issue_server_cert(["meshline.meshline-system.svc"])
    verify_server(first, chain, "meshline.meshline-system.svc", dt.datetime.now(dt.UTC))


def test_concurrent_creation_agrees_on_one_root(tmp_path: Path) -> None:
    with ThreadPoolExecutor(8) as pool:
        bundles = set(pool.map(lambda _: CertificateAuthority.load_or_create(tmp_path).trust_bundle(), range(8)))
    assert len(bundles) == 1


def test_key_never_leaves_the_object(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path)
    key_pem = (tmp_path / "ca-key.pem").read_text()
    assert "PRIVATE KEY" not in repr(ca) and key_pem not in repr(ca)
    assert not any("key" in name for name in dir(ca) if not name.startswith("_"))
    with pytest.raises(TypeError):
        pickle.dumps(ca)
    with pytest.raises(TypeError):
        copy.copy(ca)


# --------------------------------------------------------------------------- issuance


def test_server_certificate_chains_to_the_root(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path, clock=clock())
    names = ["meshline.meshline-system.svc", "meshline.meshline-system.svc.cluster.local", "127.0.0.1"]
    chain, key_pem = ca.issue_server_cert(names, dt.timedelta(hours=1))
    leaf, *_ = certs(chain)
    for name in names[:2]:
        verify_server(ca, chain, name, NOW)
    with pytest.raises(verification.VerificationError):
        verify_server(ca, chain, "evil.example.com", NOW)
    with pytest.raises(verification.VerificationError):
        verify_server(ca, chain, names[0], NOW + dt.timedelta(hours=2))  # expired
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == names[:2]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.SERVER_AUTH])
    key = serialization.load_pem_private_key(key_pem.encode(), None)
    assert key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) \
        == leaf.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize("names", [[], ["bad name"], ["-x.example"], ["a" * 300]])
def test_server_certificate_rejects_bad_names(tmp_path: Path, names: list[str]) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path)
    with pytest.raises(CAError):
        ca.issue_server_cert(names)


def test_workload_certificate_carries_only_the_spiffe_uri(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path, "mesh.example", clock=clock())
    key = ec.generate_private_key(ec.SECP256R1())
    chain = ca.issue_workload(("shop", "reviews"), csr_for(key), dt.timedelta(hours=1))
    leaf, *_ = certs(chain)
    assert leaf.subject == x509.Name([])
    ext = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert ext.critical  # an empty subject requires a critical SAN
    assert list(ext.value) == [x509.UniformResourceIdentifier("spiffe://mesh.example/ns/shop/sa/reviews")]
    assert set(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    verified = verify_client(ca, chain, NOW)
    assert verified.subjects == [x509.UniformResourceIdentifier("spiffe://mesh.example/ns/shop/sa/reviews")]
    # The same identity given as a URI, a SpiffeId, or over a bare public key.
    for identity in ("spiffe://mesh.example/ns/shop/sa/reviews", SpiffeId("mesh.example", "shop", "reviews")):
        pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        leaf2, *_ = certs(ca.issue_workload(identity, pub))
        assert leaf2.public_key() == leaf.public_key()
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    leaf3, *_ = certs(ca.issue_workload(("shop", "reviews"), rsa_key.public_key()))
    assert leaf3.extensions.get_extension_for_class(x509.KeyUsage).value.key_encipherment


def test_workload_requests_that_are_refused(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path, clock=clock())
    key = ec.generate_private_key(ec.SECP256R1())
    good = csr_for(key)
    with pytest.raises(CAError, match="outside this CA's trust domain"):
        ca.issue_workload("spiffe://other.domain/ns/shop/sa/reviews", good)
    with pytest.raises(CAError, match="not a SPIFFE workload identity"):
        ca.issue_workload("spiffe://cluster.local/reviews", good)
    with pytest.raises(CAError, match="invalid namespace"):
        ca.issue_workload(("Shop_", "reviews"), good)
    with pytest.raises(CAError, match="too small"):
        ca.issue_workload(("shop", "reviews"), rsa.generate_private_key(public_exponent=65537, key_size=1024)
                          .public_key())
    with pytest.raises(CAError, match="unsupported EC curve"):
        ca.issue_workload(("shop", "reviews"), ec.generate_private_key(ec.SECP521R1()).public_key())
    with pytest.raises(CAError, match="neither a PEM CSR nor a PEM public key"):
        ca.issue_workload(("shop", "reviews"), "hello")
    # A CSR whose signature does not match its key: no proof of possession.
    other = csr_for(ec.generate_private_key(ec.SECP256R1()))
    tampered = x509.load_pem_x509_csr(good.encode())
    forged = _swap_csr_key(tampered, x509.load_pem_x509_csr(other.encode()))
    with pytest.raises(CAError, match="proof of possession"):
        ca.issue_workload(("shop", "reviews"), forged)
    with pytest.raises(CAError, match="ttl must be positive"):
        ca.issue_workload(("shop", "reviews"), good, dt.timedelta(0))


def _swap_csr_key(a: x509.CertificateSigningRequest, b: x509.CertificateSigningRequest) -> bytes:
    """A's DER with B's public key: its signature no longer verifies."""
    der_a = a.public_bytes(serialization.Encoding.DER)
    spki_a = a.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    spki_b = b.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert len(spki_a) == len(spki_b) and spki_a in der_a
    import base64

    der = der_a.replace(spki_a, spki_b)
    body = base64.encodebytes(der).decode().replace("\n", "")
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return ("-----BEGIN CERTIFICATE REQUEST-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE REQUEST-----\n").encode()


def test_leaves_never_outlive_the_ca(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path, clock=clock(), root_ttl=dt.timedelta(days=1))
    late = NOW + dt.timedelta(hours=23)
    ca = CertificateAuthority.load_or_create(tmp_path, clock=clock(late))
    leaf, *_ = certs(ca.issue_workload(("shop", "a"), ec.generate_private_key(ec.SECP256R1()).public_key(),
                                       dt.timedelta(days=30)))
    assert leaf.not_valid_after_utc == ca.not_after
    with pytest.raises(CAError, match="expired"):
        CertificateAuthority.load_or_create(tmp_path, clock=clock(NOW + dt.timedelta(days=2)))


# --------------------------------------------------------------------------- refusing bad directories


def test_refuses_a_world_readable_key(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path)
    (tmp_path / "ca-key.pem").chmod(0o644)
    with pytest.raises(CAError, match="chmod 600"):
        CertificateAuthority.load_or_create(tmp_path)


def test_refuses_half_a_root(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path)
    (tmp_path / "root-cert.pem").unlink()
    with pytest.raises(CAError, match=r"without root-cert\.pem"):
        CertificateAuthority.load_or_create(tmp_path)


def test_refuses_a_key_of_another_root(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    CertificateAuthority.load_or_create(a)
    CertificateAuthority.load_or_create(b)
    (a / "ca-key.pem").write_bytes((b / "ca-key.pem").read_bytes())
    with pytest.raises(CAError, match="does not match"):
        CertificateAuthority.load_or_create(a)


def test_refuses_a_bad_trust_domain(tmp_path: Path) -> None:
    with pytest.raises(CAError, match="trust domain"):
        CertificateAuthority.load_or_create(tmp_path, "Not A Domain")


# --------------------------------------------------------------------------- plug-in CA


def _ca_cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]
             | None, days: int = 365) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name = issuer[0].subject if issuer else name
    signer = issuer[1] if issuer else key
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name).public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW + dt.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                      content_commitment=False, key_encipherment=False, data_encipherment=False,
                                      key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if issuer:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()), critical=False)
    return b.sign(signer, hashes.SHA256())


def _pem(*cs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in cs)


def _write_plugin(d: Path, signing_key: ec.EllipticCurvePrivateKey, signing: x509.Certificate,
                  chain: list[x509.Certificate], root: x509.Certificate) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "ca-cert.pem").write_bytes(_pem(signing))
    (d / "ca-key.pem").write_bytes(signing_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (d / "ca-key.pem").chmod(0o600)
    (d / "root-cert.pem").write_bytes(_pem(root))
    (d / "cert-chain.pem").write_bytes(_pem(signing, *chain))


def test_plugin_ca_with_two_intermediates(tmp_path: Path) -> None:
    root_key, mid_key, sign_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = _ca_cert("Corp Root", root_key, None, days=3650)
    mid = _ca_cert("Corp Intermediate", mid_key, (root, root_key))
    signing = _ca_cert("Meshline cluster-1", sign_key, (mid, mid_key))
    _write_plugin(tmp_path, sign_key, signing, [mid, root], root)
    ca = CertificateAuthority.load_or_create(tmp_path, clock=clock())
    assert ca.plugged_in
    assert ca.trust_bundle() == _pem(root).decode()
    chain = ca.issue_workload(("shop", "reviews"), ec.generate_private_key(ec.SECP256R1()).public_key())
    leaf, *rest = certs(chain)
    assert rest == [signing, mid]  # the root is never in the chain
    assert leaf.issuer == signing.subject
    verify_client(ca, chain, NOW)
    server_chain, _ = ca.issue_server_cert(["meshline.meshline-system.svc"])
    verified = verify_server(ca, server_chain, "meshline.meshline-system.svc", NOW)
    assert verified[-1] == root
    assert not (tmp_path / "root-cert.pem").read_bytes().count(b"BEGIN") > 1  # nothing was rewritten


def test_plugin_ca_must_chain_to_its_root(tmp_path: Path) -> None:
    root_key, other_key, sign_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = _ca_cert("Corp Root", root_key, None)
    other_root = _ca_cert("Other Root", other_key, None)
    signing = _ca_cert("Meshline", sign_key, (other_root, other_key))
    _write_plugin(tmp_path, sign_key, signing, [], root)
    with pytest.raises(CAError, match=r"does not chain to root-cert\.pem"):
        CertificateAuthority.load_or_create(tmp_path, clock=clock())


def test_plugin_ca_needs_its_key_and_root(tmp_path: Path) -> None:
    root_key, sign_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
    root = _ca_cert("Corp Root", root_key, None)
    signing = _ca_cert("Meshline", sign_key, (root, root_key))
    _write_plugin(tmp_path, sign_key, signing, [root], root)
    (tmp_path / "root-cert.pem").unlink()
    with pytest.raises(CAError, match=r"lacks root-cert\.pem"):
        CertificateAuthority.load_or_create(tmp_path, clock=clock())
    _write_plugin(tmp_path, root_key, signing, [root], root)  # the wrong key
    with pytest.raises(CAError, match="does not match"):
        CertificateAuthority.load_or_create(tmp_path, clock=clock())


def test_plugin_signing_certificate_must_be_a_ca(tmp_path: Path) -> None:
    root_key, sign_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
    root = _ca_cert("Corp Root", root_key, None)
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf")]))
            .issuer_name(root.subject).public_key(sign_key.public_key()).serial_number(1)
            .not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(root_key, hashes.SHA256()))
    _write_plugin(tmp_path, sign_key, leaf, [], root)
    with pytest.raises(CAError, match="not a CA"):
        CertificateAuthority.load_or_create(tmp_path, clock=clock())


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare(1)")
def test_plugin_ca_from_a_read_only_mount(tmp_path: Path) -> None:
    """Like a Kubernetes Secret volume: read-only, key mode 0644. Loaded in a private mount
    namespace so nothing leaks onto the host."""
    root_key, sign_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
    root = _ca_cert("Corp Root", root_key, None)
    signing = _ca_cert("Meshline", sign_key, (root, root_key))
    src, dst = tmp_path / "secret", tmp_path / "mounted"
    _write_plugin(src, sign_key, signing, [root], root)
    (src / "ca-key.pem").chmod(0o644)
    dst.mkdir()
    code = ("import sys; from pathlib import Path; from controlplane.ca import CertificateAuthority; "
            "ca = CertificateAuthority.load_or_create(Path(sys.argv[1])); "
            "print(ca.plugged_in, len(ca.issue_server_cert(['a.b.svc'])[0]) > 0)")
    script = (f"mount --bind {src} {dst} && mount -o remount,ro,bind {dst} && "
              f"{sys.executable} -c \"{code}\" {dst}")
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=60, cwd=Path(__file__).parent.parent)
    if proc.returncode != 0 and "mount" in proc.stderr and "permission denied" in proc.stderr.lower():
        pytest.skip(f"cannot mount here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True"]
    assert not (src / ".ca.lock").exists()
