"""Port 15012 as a client sees it: TLS with the control plane's own certificate (verified
against the CA bundle), the certificate-signing API (`meshline.ca.v1.CertificateService`,
stubs generated from protos/ by the build) and xDS over the same port, where a client
certificate is optional but must chain to the CA when present."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509 import verification
from cryptography.x509.oid import NameOID

from controlplane.ca import CertificateAuthority
from controlplane.ca.gen import ca_pb2, ca_pb2_grpc
from tests.identityharness import ControlPlane, auth, spiffe_uris, subscribe_secrets

TD = "cluster.local"
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


@pytest.fixture
async def cp(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    c = await ControlPlane(tmp_path).start()
    yield c
    await c.close()


def make_csr(*names: x509.GeneralName, key: ec.EllipticCurvePrivateKey | None = None) -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    b = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "workload")]))
    if names:
        b = b.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def uri(ns: str, sa: str) -> x509.UniformResourceIdentifier:
    return x509.UniformResourceIdentifier(f"spiffe://{TD}/ns/{ns}/sa/{sa}")


async def create(cp: ControlPlane, csr: str, token: str | None, validity: int = 0) -> ca_pb2.CreateCertificateResponse:
    async with cp.tls_channel() as ch:
        stub = ca_pb2_grpc.CertificateServiceStub(ch)
        return await stub.CreateCertificate(ca_pb2.CreateCertificateRequest(csr=csr, validity_seconds=validity),
                                            metadata=auth(token) if token else None, timeout=5)


async def test_server_certificate_verifies_against_the_ca_bundle(cp: ControlPlane) -> None:
    ctx = ssl.create_default_context(cadata=cp.bundle)
    ctx.set_alpn_protocols(["h2"])
    _reader, writer = await asyncio.open_connection("127.0.0.1", cp.ca_port, ssl=ctx, server_hostname="localhost")
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
    writer.close()
    cert = x509.load_der_x509_certificate(der)
    dns = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName)
    assert dns == ["meshline.meshline-system.svc", "localhost"]
    store = verification.Store(x509.load_pem_x509_certificates(cp.bundle.encode()))
    verification.PolicyBuilder().store(store).build_server_verifier(verification.DNSName("localhost")).verify(cert, [])


async def test_csr_for_own_identity_returns_a_chain(cp: ControlPlane) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    resp = await create(cp, make_csr(uri("shop", "cart"), key=key), cp.token("shop", "cart"), validity=600)
    leaf, *rest = [x509.load_pem_x509_certificate(p.encode()) for p in resp.cert_chain]
    assert spiffe_uris(leaf) == [f"spiffe://{TD}/ns/shop/sa/cart"]
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()
    assert rest[-1] == x509.load_pem_x509_certificates(cp.bundle.encode())[0]  # the anchoring root, last
    lifetime = leaf.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(seconds=590) < lifetime <= dt.timedelta(seconds=600)
    store = verification.Store(x509.load_pem_x509_certificates(cp.bundle.encode()))
    verification.PolicyBuilder().store(store).build_client_verifier().verify(leaf, rest[:-1])


async def test_csr_validity_is_capped_by_the_workload_lifetime(cp: ControlPlane) -> None:
    resp = await create(cp, make_csr(uri("shop", "cart")), cp.token("shop", "cart"), validity=10 * 86400)
    leaf = x509.load_pem_x509_certificate(resp.cert_chain[0].encode())
    assert leaf.not_valid_after_utc - dt.datetime.now(dt.UTC) <= dt.timedelta(hours=1)


@pytest.mark.parametrize(("names", "code"), [
    ((uri("shop", "payments"),), grpc.StatusCode.PERMISSION_DENIED),  # another identity
    ((uri("billing", "cart"),), grpc.StatusCode.PERMISSION_DENIED),  # another namespace
    ((uri("shop", "cart"), x509.DNSName("cart.shop.svc")), grpc.StatusCode.PERMISSION_DENIED),  # an extra SAN
    ((uri("shop", "cart"), uri("shop", "payments")), grpc.StatusCode.PERMISSION_DENIED),
    ((x509.UniformResourceIdentifier("spiffe://evil.example/ns/shop/sa/cart"),), grpc.StatusCode.PERMISSION_DENIED),
    ((), grpc.StatusCode.PERMISSION_DENIED),  # names nobody
])
async def test_csr_naming_anything_else_is_refused(cp: ControlPlane, names: tuple[x509.GeneralName, ...],
                                                  code: grpc.StatusCode) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create(cp, make_csr(*names), cp.token("shop", "cart"))
    assert err.value.code() == code
    assert f"spiffe://{TD}/ns/shop/sa/cart" in (err.value.details() or "")


async def test_bad_csrs_are_invalid_arguments(cp: ControlPlane) -> None:
    good = make_csr(uri("shop", "cart"))
    body = "".join(good.splitlines()[1:-1])
    tampered = good.replace(body[40:60], body[40:60][::-1]) if body[40:60] != body[40:60][::-1] else good
    for csr in ("not a csr", "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                tampered):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await create(cp, csr, cp.token("shop", "cart"))
        assert err.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED), csr
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create(cp, good, cp.token("shop", "cart"), validity=-5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def key_of(kind: str) -> PrivateKey:
    if kind.startswith("rsa-"):
        return rsa.generate_private_key(65537, int(kind.removeprefix("rsa-")))
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return ec.generate_private_key({"p256": ec.SECP256R1(), "p384": ec.SECP384R1(), "p521": ec.SECP521R1(),
                                    "secp256k1": ec.SECP256K1()}[kind])


def csr_with(key: PrivateKey, *names: x509.GeneralName) -> str:
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).add_extension(
        x509.SubjectAlternativeName(list(names)), critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return b.sign(key, algorithm).public_bytes(serialization.Encoding.PEM).decode()


def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    size = bytes([n]) if n < 0x80 else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + n.to_bytes(
        (n.bit_length() + 7) // 8, "big")
    return bytes([tag]) + size + body


def _der_items(data: bytes) -> list[tuple[int, bytes]]:
    """The (tag, contents) of each DER element in `data` (definite lengths only)."""
    out = []
    i = 0
    while i < len(data):
        tag, n = data[i], data[i + 1]
        i += 2
        if n & 0x80:
            k = n & 0x7F
            n = int.from_bytes(data[i:i + k], "big")
            i += k
        out.append((tag, data[i:i + n]))
        i += n
    return out


def oversized_rsa_csr(bits: int = 8192) -> str:
    """A CSR whose public key is a `bits`-bit RSA key (its signature is by a small key, so
    it does not verify: the key's size must be refused before the signature is checked).
    Generating a real 8192-bit key costs ~13 s of CPU."""
    import secrets

    signed = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).add_extension(
        x509.SubjectAlternativeName([uri("shop", "cart")]), critical=False,
    ).sign(key_of("p256"), hashes.SHA256()).public_bytes(serialization.Encoding.DER)
    ((_, outer),) = _der_items(signed)
    (info_tag, info), *rest = _der_items(outer)
    modulus = secrets.randbits(bits) | (1 << (bits - 1)) | 1
    spki = rsa.RSAPublicNumbers(65537, modulus).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    version, subject, _old_spki, *attributes = _der_items(info)
    new_info = _der(info_tag, b"".join(_der(t, v) for t, v in [version, subject, *_der_items(spki), *attributes]))
    der = _der(0x30, new_info + b"".join(_der(t, v) for t, v in rest))
    csr = x509.load_der_x509_csr(der)
    assert isinstance(csr.public_key(), rsa.RSAPublicKey) and csr.public_key().key_size == bits
    return csr.public_bytes(serialization.Encoding.PEM).decode()


@pytest.mark.parametrize("kind", ["p256", "p384", "rsa-2048", "rsa-4096"])
async def test_csr_keys_within_bounds_are_signed(cp: ControlPlane, kind: str) -> None:
    key = key_of(kind)
    resp = await create(cp, csr_with(key, uri("shop", "cart")), cp.token("shop", "cart"))
    leaf = x509.load_pem_x509_certificate(resp.cert_chain[0].encode())
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()


@pytest.mark.parametrize(("kind", "needle"), [
    ("rsa-8192", "too large"), ("rsa-1024", "too small"), ("p521", "P-256 or P-384"),
    ("secp256k1", "P-256 or P-384"), ("ed25519", "unsupported key type"),
])
async def test_csr_keys_out_of_bounds_are_invalid_arguments(cp: ControlPlane, kind: str, needle: str) -> None:
    csr = oversized_rsa_csr() if kind == "rsa-8192" else csr_with(key_of(kind), uri("shop", "cart"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create(cp, csr, cp.token("shop", "cart"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (err.value.details() or "")


@pytest.mark.parametrize("validity", [2**31, 10**12, 2**63 - 1])
async def test_csr_oversized_validity_is_clamped_to_the_maximum(cp: ControlPlane, validity: int) -> None:
    resp = await create(cp, make_csr(uri("shop", "cart")), cp.token("shop", "cart"), validity=validity)
    leaf = x509.load_pem_x509_certificate(resp.cert_chain[0].encode())
    lifetime = leaf.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(minutes=50) < lifetime <= dt.timedelta(hours=1)  # the harness's workload lifetime


@pytest.mark.parametrize("validity", [-1, -(2**63)])
async def test_csr_negative_validity_is_an_invalid_argument(cp: ControlPlane, validity: int) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create(cp, make_csr(uri("shop", "cart")), cp.token("shop", "cart"), validity=validity)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "validity_seconds" in (err.value.details() or "")


async def test_csr_too_long_is_an_invalid_argument(cp: ControlPlane) -> None:
    padded = make_csr(uri("shop", "cart")) + "\n" * 100_000
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create(cp, padded, cp.token("shop", "cart"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("token", [None, "mlt1.e30.AAAA", "Bearer-less"])
async def test_csr_without_a_valid_token_is_unauthenticated(cp: ControlPlane, token: str | None) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create(cp, make_csr(uri("shop", "cart")), token)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_csr_api_is_not_on_the_plaintext_xds_port(cp: ControlPlane) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{cp.xds_port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ca_pb2_grpc.CertificateServiceStub(ch).CreateCertificate(
                ca_pb2.CreateCertificateRequest(csr=make_csr(uri("shop", "cart"))),
                metadata=auth(cp.token("shop", "cart")), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


# --------------------------------------------------------------------------- xDS on 15012


async def test_xds_over_tls_without_a_client_certificate(cp: ControlPlane) -> None:
    c = cp.client("cart-1", "shop", "cart", token=cp.token("shop", "cart"), channel=cp.tls_channel())
    _r, got = await subscribe_secrets(c)
    assert spiffe_uris(got["default"].certs[0]) == [f"spiffe://{TD}/ns/shop/sa/cart"]
    await c.close()


async def test_xds_over_tls_with_a_client_certificate_from_the_ca(cp: ControlPlane) -> None:
    # A proxy that already holds its workload certificate presents it.
    first = cp.client("cart-1", "shop", "cart", token=cp.token("shop", "cart"))
    _r, got = await subscribe_secrets(first)
    await first.close()
    chain = got["default"].secret.tls_certificate.certificate_chain.inline_bytes
    c = cp.client("cart-1", "shop", "cart", token=cp.token("shop", "cart"),
                  channel=cp.tls_channel(got["default"].key_pem, bytes(chain)))
    _r, again = await subscribe_secrets(c)
    assert "default" in again
    await c.close()


async def test_xds_over_tls_refuses_a_client_certificate_from_another_ca(cp: ControlPlane, tmp_path: Path) -> None:
    rogue = CertificateAuthority.load_or_create(tmp_path / "rogue")
    key = ec.generate_private_key(ec.SECP256R1())
    chain = rogue.issue_workload(("shop", "cart"), key.public_key()).encode()
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    c = cp.client("cart-1", "shop", "cart", token=cp.token("shop", "cart"), channel=cp.tls_channel(key_pem, chain))
    c.send_delta("type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret", subscribe=["default"])
    r = await c.responses.get()
    assert isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.UNAVAILABLE
    assert not cp.rt.xds.connections
    await c.close()


async def test_serving_certificate_follows_a_root_rotation(cp: ControlPlane) -> None:
    from controlplane.ca import rotation

    rotation.rotate_root(cp.ca_dir)
    new_root = x509.load_pem_x509_certificates((cp.ca_dir / "root-cert.pem").read_bytes())[0]
    identity = cp.rt.identity
    assert identity is not None
    for _ in range(200):  # no proxy to wait for: the new signer takes over at once
        if identity.ca is not None and identity.ca.signing_certificate == new_root:
            break
        await asyncio.sleep(0.02)
    resp = await create(cp, make_csr(uri("shop", "cart")), cp.token("shop", "cart"))
    assert x509.load_pem_x509_certificate(resp.cert_chain[-1].encode()) == new_root
    # New handshakes get a serving certificate from the new root.
    ctx = ssl.create_default_context(cadata=new_root.public_bytes(serialization.Encoding.PEM).decode())
    _r, w = await asyncio.open_connection("127.0.0.1", cp.ca_port, ssl=ctx, server_hostname="localhost")
    w.close()
