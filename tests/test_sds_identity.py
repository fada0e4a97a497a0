"""SDS over ADS with authenticated identities, as a proxy sees it: an in-process control
plane with its CA (free ports) and scripted ADS clients carrying bootstrap tokens. Checks
what each proxy receives (its own SPIFFE certificate and the trust bundle, or nothing),
refusals, what status and logs reveal, and rotation of workload certificates and roots."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification

from controlplane.ca import rotation
from controlplane.ca.core import CLOCK_SKEW
from controlplane.translate.plan import SECRET
from tests.identityharness import (
    ControlPlane,
    ack,
    all_sans,
    secrets_of,
    spiffe_uris,
    subscribe_secrets,
    token_for,
)

TD = "cluster.local"


@pytest.fixture
async def cp(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    c = await ControlPlane(tmp_path).start()
    yield c
    await c.close()


def verify_chain(bundle_certs: list[x509.Certificate], chain: list[x509.Certificate]) -> None:
    store = verification.Store(bundle_certs)
    leaf, *rest = chain
    verification.PolicyBuilder().store(store).build_client_verifier().verify(leaf, rest)


async def expect_stream_error(c: object, code: grpc.StatusCode) -> None:
    r = await asyncio.wait_for(c.responses.get(), 5)  # type: ignore[attr-defined]
    assert isinstance(r, grpc.aio.AioRpcError), f"expected the stream to end with {code}, got {r}"
    assert r.code() == code, r


# --------------------------------------------------------------------------- who gets what


@pytest.mark.parametrize("protocol", ["delta", "sotw"])
async def test_authenticated_proxy_gets_its_own_certificate_and_the_bundle(cp: ControlPlane, protocol: str) -> None:
    c = cp.client("cart-1", "shop", "cart", token=cp.token("shop", "cart"), protocol=protocol)
    _r, got = await subscribe_secrets(c)
    assert set(got) == {"default", "ROOTCA"}
    chain = got["default"].certs
    leaf = chain[0]
    # Only the SPIFFE URI SAN of its own identity; subject empty; EC P-256.
    assert [type(n) for n in all_sans(leaf)] == [x509.UniformResourceIdentifier]
    assert spiffe_uris(leaf) == [f"spiffe://{TD}/ns/shop/sa/cart"]
    assert leaf.subject == x509.Name([])
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey) and leaf.public_key().curve.name == "secp256r1"
    # Lifetime as configured (one hour here; issued now, backdated by the clock-skew allowance).
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc - CLOCK_SKEW
    assert abs(lifetime - dt.timedelta(hours=1)) < dt.timedelta(seconds=5)
    # The private key is the certificate's, and the chain verifies against the bundle it got.
    key = serialization.load_pem_private_key(got["default"].key_pem, None)
    assert key.public_key().public_numbers() == leaf.public_key().public_numbers()  # type: ignore[union-attr]
    verify_chain(got["ROOTCA"].certs, chain)
    assert got["ROOTCA"].secret.validation_context.trusted_ca.inline_bytes.decode() == cp.bundle
    await c.close()


async def test_proxies_of_one_identity_share_a_certificate_others_get_their_own(cp: ControlPlane) -> None:
    a1 = cp.client("cart-1", "shop", "cart", token=cp.token("shop", "cart"))
    a2 = cp.client("cart-2", "shop", "cart", token=cp.token("shop", "cart"))
    b = cp.client("pay-1", "shop", "payments", token=cp.token("shop", "payments"))
    got = [(await subscribe_secrets(c))[1] for c in (a1, a2, b)]
    assert got[0]["default"].certs[0] == got[1]["default"].certs[0]
    assert got[0]["default"].key_pem == got[1]["default"].key_pem
    assert spiffe_uris(got[2]["default"].certs[0]) == [f"spiffe://{TD}/ns/shop/sa/payments"]
    assert got[2]["default"].key_pem != got[0]["default"].key_pem
    for c in (a1, a2, b):
        await c.close()


async def test_token_for_another_service_account_gets_the_tokens_identity(cp: ControlPlane) -> None:
    # Node metadata claims sa "admin"; the token proves "cart": the proxy is "cart".
    c = cp.client("sneaky-1", "shop", "admin", token=cp.token("shop", "cart"))
    _r, got = await subscribe_secrets(c)
    assert spiffe_uris(got["default"].certs[0]) == [f"spiffe://{TD}/ns/shop/sa/cart"]
    async with cp.status() as s:
        (view,) = (await s.get("/v1/proxies")).json()
    assert view["identity"] == {"namespace": "shop", "service_account": "cart"}
    assert view["service_account"] == "cart"
    await c.close()


async def test_token_for_another_namespace_is_refused(cp: ControlPlane, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    c = cp.client("intruder-1", "shop", "cart", token=cp.token("billing", "cart"))
    c.send_delta(SECRET, subscribe=["default", "ROOTCA"])
    await expect_stream_error(c, grpc.StatusCode.PERMISSION_DENIED)
    assert "intruder-1" in caplog.text and "refused" in caplog.text
    assert not cp.rt.xds.connections
    await c.close()


@pytest.mark.parametrize("case", ["none", "forged", "expired", "garbage", "jwt"])
async def test_no_valid_token_means_config_but_no_secrets(cp: ControlPlane, tmp_path: Path, case: str,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    token = {
        "none": None,
        "forged": token_for(tmp_path / "other-ca", "shop", "cart"),  # signed with another key
        "expired": cp.token("shop", "cart", ttl=dt.timedelta(seconds=1),
                            now=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)),
        "garbage": "mlt1.not-a-token",
        "jwt": "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln",  # no TokenReview outside Kubernetes mode
    }[case]
    c = cp.client("cart-1", "shop", "cart", token=token)
    c.send_delta(SECRET, subscribe=["default", "ROOTCA"])
    r = await c.recv()
    assert not r.resources and sorted(r.removed_resources) == ["ROOTCA", "default"]
    await c.expect_nothing(0.3)
    conn = next(iter(cp.rt.xds.connections.values()))
    assert conn.identity is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "without certificates" in r.getMessage()]
    assert len(warnings) == 1 and "cart-1" in warnings[0].getMessage()
    if token is not None:
        assert token not in caplog.text and token.split(".")[-1] not in caplog.text
    await c.close()


async def test_other_secret_names_get_nothing_and_are_logged(cp: ControlPlane,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    c = cp.client("cart-1", "shop", "cart", token=cp.token("shop", "cart"))
    c.send_delta(SECRET, subscribe=["default", f"spiffe://{TD}/ns/shop/sa/payments", "kubernetes://payments-cert"])
    r = await c.recv()
    assert sorted(secrets_of(r)) == ["default"]
    assert sorted(r.removed_resources) == ["kubernetes://payments-cert", f"spiffe://{TD}/ns/shop/sa/payments"]
    assert spiffe_uris(secrets_of(r)["default"].certs[0]) == [f"spiffe://{TD}/ns/shop/sa/cart"]
    logged = caplog.text
    assert "payments-cert" in logged and f"spiffe://{TD}/ns/shop/sa/payments" in logged and "cart-1" in logged
    await c.close()


# --------------------------------------------------------------------------- never revealed


async def test_keys_and_tokens_never_reach_status_or_logs(cp: ControlPlane,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    token = cp.token("shop", "cart")
    c = cp.client("cart-1", "shop", "cart", token=token)
    _r, got = await subscribe_secrets(c)
    await asyncio.sleep(0.1)
    workload_key = got["default"].key_pem.decode()
    ca_key = (cp.ca_dir / "ca-key.pem").read_text()
    token_key = (cp.ca_dir / "token-key").read_text().strip()

    def secret_bits(text: str) -> list[str]:  # the base64 body lines of a PEM
        return [ln for ln in text.splitlines() if ln and not ln.startswith("-----")]

    forbidden = [*secret_bits(workload_key), *secret_bits(ca_key), token_key, token, token.split(".")[-1]]
    async with cp.status() as s:
        bodies = []
        for path in ("/v1/proxies", "/v1/proxies/cart-1", "/v1/mesh", "/metrics",
                     *(f"/v1/proxies/cart-1/config?type={t}"
                       for t in ("secrets", "clusters", "listeners", "routes", "endpoints"))):
            resp = await s.get(path)
            assert resp.status_code == 200, path
            bodies.append(resp.text)
        dump = (await s.get("/v1/proxies/cart-1/config?type=secrets")).json()
    by_name = {r["name"]: r["config"] for r in dump["resources"]}
    assert by_name["default"]["tls_certificate"]["private_key"] == "[redacted]"
    assert by_name["default"]["tls_certificate"]["certificate_chain"][0]["uri_sans"] == [
        f"spiffe://{TD}/ns/shop/sa/cart"]
    assert len(by_name["ROOTCA"]["validation_context"]["trusted_ca"]) == 1
    for text in [*bodies, caplog.text]:
        assert "PRIVATE KEY" not in text
        for bit in forbidden:
            assert bit not in text
    await c.close()


# --------------------------------------------------------------------------- rotation


async def test_workload_certificates_rotate_at_half_life(tmp_path: Path) -> None:
    cp = await ControlPlane(tmp_path, ttl_s=4).start()
    try:
        c = cp.client("cart-1", "shop", "cart", token=cp.token("shop", "cart"))
        _r, got = await subscribe_secrets(c)
        current = got["default"]
        serials = [current.certs[0].serial_number]
        while len(serials) < 3:
            r = await c.recv(timeout=5)
            await ack(c, r)
            fresh = secrets_of(r)
            if "default" not in fresh:
                continue
            new = fresh["default"]
            # A new certificate (and key) arrives before the one in use expires, from about half life on.
            assert new.at < current.certs[0].not_valid_after_utc
            assert new.at >= current.certs[0].not_valid_after_utc - dt.timedelta(seconds=2.5)
            assert new.certs[0].serial_number not in serials and new.key_pem != current.key_pem
            assert spiffe_uris(new.certs[0]) == [f"spiffe://{TD}/ns/shop/sa/cart"]
            serials.append(new.certs[0].serial_number)
            current = new
        await c.close()
    finally:
        await cp.close()


async def test_root_rotation_overlaps_then_finishes(cp: ControlPlane) -> None:
    c = cp.client("cart-1", "shop", "cart", token=cp.token("shop", "cart"))
    _r, got = await subscribe_secrets(c)
    (old_root,) = got["ROOTCA"].certs
    verify_chain([old_root], got["default"].certs)

    rotation.rotate_root(cp.ca_dir)
    seen: list[dict[str, object]] = []
    new_cert = None
    while new_cert is None:
        r = await c.recv(timeout=10)
        await ack(c, r)
        fresh = secrets_of(r)
        seen.append(dict(fresh))
        if "default" in fresh:
            new_cert = fresh["default"]
    # The two-root bundle came first, alone; then the certificate from the new root.
    first = secrets_of_first = seen[0]
    assert list(secrets_of_first) == ["ROOTCA"]
    bundle = first["ROOTCA"].certs  # type: ignore[attr-defined]
    assert len(bundle) == 2 and old_root in bundle
    (new_root,) = [b for b in bundle if b != old_root]
    verify_chain([new_root], new_cert.certs)
    with pytest.raises(verification.VerificationError):
        verify_chain([old_root], new_cert.certs)
    assert spiffe_uris(new_cert.certs[0]) == [f"spiffe://{TD}/ns/shop/sa/cart"]

    rotation.finish_rotation(cp.ca_dir)
    r = await c.recv(timeout=10)
    await ack(c, r)
    fresh = secrets_of(r)
    assert list(fresh) == ["ROOTCA"] and fresh["ROOTCA"].certs == [new_root]
    await c.expect_nothing(0.5)  # certificates from the new root stay
    await c.close()


async def test_a_proxy_that_does_not_ack_delays_the_new_signer_until_the_timeout(tmp_path: Path) -> None:
    cp = await ControlPlane(tmp_path, propagation_s=1.0).start()
    try:
        quiet = cp.client("quiet-1", "shop", "quiet", token=cp.token("shop", "quiet"))
        await subscribe_secrets(quiet)
        rotation.rotate_root(cp.ca_dir)
        r = await quiet.recv(timeout=5)  # the bundle; never ACKed
        assert list(secrets_of(r)) == ["ROOTCA"]
        started = asyncio.get_running_loop().time()
        r2 = await quiet.recv(timeout=5)
        assert "default" in secrets_of(r2)
        assert asyncio.get_running_loop().time() - started >= 0.7
        await quiet.close()
    finally:
        await cp.close()
