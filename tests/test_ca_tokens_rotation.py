"""Identity building blocks a user meets through the CLI: bootstrap tokens (mint, verify,
forgery, expiry), `meshline bootstrap --ca-dir/--token-file/--xds-tls` output (accepted by
`envoy --mode validate`), `meshline ca rotate-root/finish-rotation/roots/token`, and the
per-identity certificate cache with its half-life rotation."""

from __future__ import annotations

import datetime as dt
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from cryptography import x509

from controlplane.ca import CAError, CertificateAuthority, tokens
from controlplane.ca.identity import Identity, bind_identity, identity_of, parse_duration
from controlplane.ca.workload import WorkloadIssuer
from controlplane.cli import main
from controlplane.localrun import envoy_binary
from controlplane.model.ir import ProxyMeta

REPO = Path(__file__).resolve().parent.parent
NOW = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)


# --------------------------------------------------------------------------- tokens


def test_token_key_is_private_and_stable(tmp_path: Path) -> None:
    k1 = tokens.load_or_create_token_key(tmp_path / "ca")
    assert stat.S_IMODE((tmp_path / "ca" / "token-key").stat().st_mode) == 0o600
    assert tokens.load_or_create_token_key(tmp_path / "ca") == k1 and len(k1) == 32
    (tmp_path / "ca" / "token-key").chmod(0o644)
    with pytest.raises(CAError, match="chmod 600"):
        tokens.load_or_create_token_key(tmp_path / "ca")


def test_token_round_trip_and_refusals(tmp_path: Path) -> None:
    key = tokens.load_or_create_token_key(tmp_path / "ca")
    tok = tokens.mint(key, Identity("shop", "cart"), dt.timedelta(hours=1), NOW)
    ident, exp = tokens.verify(key, tok, NOW + dt.timedelta(minutes=59))
    assert ident == Identity("shop", "cart") and exp == NOW + dt.timedelta(hours=1)
    with pytest.raises(CAError, match="expired") as expired:
        tokens.verify(key, tok, NOW + dt.timedelta(hours=1))
    with pytest.raises(CAError, match="signature") as forged:
        tokens.verify(b"x" * 32, tok, NOW)
    for err in (expired.value, forged.value):  # refusals never repeat the token
        assert tok.split(".")[1] not in str(err) and tok.split(".")[2] not in str(err)
    head, _payload, mac = tok.split(".")
    other = tokens.mint(key, Identity("shop", "admin"), dt.timedelta(hours=1), NOW).split(".")[1]
    with pytest.raises(CAError, match="signature"):  # a payload swapped in under the old MAC
        tokens.verify(key, f"{head}.{other}.{mac}", NOW)
    for bad in ("", "mlt1", "mlt1.a.b.c", "x.y.z"):
        with pytest.raises(CAError):
            tokens.verify(key, bad, NOW)


@pytest.mark.parametrize(("text", "seconds"), [("4", 4), ("4s", 4), ("1.5", 1.5), ("30m", 1800), ("24h", 86400),
                                                ("365d", 365 * 86400), ("250ms", 0.25)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "0", "-1", "1w", "abc", "1h30m"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_identity_travels_with_the_proxy_meta() -> None:
    meta = ProxyMeta(node_id="n", namespace="shop", service_account="admin")
    assert identity_of(meta) is None
    bound = bind_identity(meta, Identity("shop", "cart"))
    assert identity_of(bound) == Identity("shop", "cart") and bound.service_account == "cart"
    with pytest.raises(CAError):
        Identity("Shop", "cart")


# --------------------------------------------------------------------------- workload certificates


def test_workload_certificates_are_cached_and_rotated_at_half_life(tmp_path: Path) -> None:
    now = [NOW]
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", clock=lambda: now[0])
    issuer = WorkloadIssuer(dt.timedelta(hours=24), clock=lambda: now[0])
    a = issuer.get(ca, Identity("shop", "cart"))
    assert issuer.get(ca, Identity("shop", "cart")) is a
    assert a.rotate_at == NOW + dt.timedelta(hours=12) and issuer.next_rotation() == a.rotate_at
    assert "PRIVATE" not in repr(a) and "PRIVATE" not in repr(a.material)
    now[0] = NOW + dt.timedelta(hours=11, minutes=59)
    assert issuer.get(ca, Identity("shop", "cart")) is a
    now[0] = NOW + dt.timedelta(hours=12)
    b = issuer.get(ca, Identity("shop", "cart"))
    assert b is not a and b.material.key_pem != a.material.key_pem
    issuer.retain([])
    assert issuer.next_rotation() is None and not issuer.current()


def test_a_new_signer_reissues(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca")
    issuer = WorkloadIssuer(dt.timedelta(hours=1))
    a = issuer.get(ca, Identity("shop", "cart"))
    from controlplane.ca import rotation

    rotation.rotate_root(tmp_path / "ca")
    ca2 = CertificateAuthority.load_or_create(tmp_path / "ca")
    b = issuer.get(ca2, Identity("shop", "cart"))
    assert b is not a
    leaf = x509.load_pem_x509_certificate(b.material.chain_pem.encode())
    assert leaf.issuer == ca2.signing_certificate.subject
    leaf.verify_directly_issued_by(ca2.signing_certificate)


# --------------------------------------------------------------------------- meshline ca


def test_ca_commands_rotate_and_finish(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    run = CliRunner().invoke
    r = run(main, ["ca", "rotate-root", "--ca-dir", str(d)])
    assert r.exit_code != 0 and "no CA here" in r.output
    CertificateAuthority.load_or_create(d)
    before = (d / "root-cert.pem").read_bytes()
    r = run(main, ["ca", "rotate-root", "--ca-dir", str(d)])
    assert r.exit_code == 0, r.output
    roots = x509.load_pem_x509_certificates((d / "root-cert.pem").read_bytes())
    assert len(roots) == 2 and roots[1] == x509.load_pem_x509_certificate(before)
    assert stat.S_IMODE((d / "ca-key.pem").stat().st_mode) == 0o600
    assert not list(d.glob(".rotate-*"))
    r = run(main, ["ca", "roots", "--ca-dir", str(d)])
    lines = r.output.splitlines()
    assert len(lines) == 2 and lines[0].startswith("*") and lines[1].startswith(" ")
    r = run(main, ["ca", "rotate-root", "--ca-dir", str(d)])
    assert r.exit_code != 0 and "finish-rotation" in r.output
    ca = CertificateAuthority.load_or_create(d)
    assert ca.signing_certificate == roots[0]
    r = run(main, ["ca", "finish-rotation", "--ca-dir", str(d)])
    assert r.exit_code == 0 and "dropped root" in r.output
    assert x509.load_pem_x509_certificates((d / "root-cert.pem").read_bytes()) == [roots[0]]
    r = run(main, ["ca", "finish-rotation", "--ca-dir", str(d)])
    assert "no rotation in progress" in r.output


def test_ca_rotation_refuses_a_plugin_ca(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    d.mkdir()
    (d / "ca-cert.pem").write_text("x")
    r = CliRunner().invoke(main, ["ca", "rotate-root", "--ca-dir", str(d)])
    assert r.exit_code != 0 and "plug-in" in r.output


def test_ca_token_command(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["ca", "token", "--ca-dir", str(tmp_path / "ca"), "--namespace", "shop",
                                  "--service-account", "cart", "--ttl", "1h"])
    assert r.exit_code == 0, r.output
    ident, exp = tokens.verify(tokens.load_or_create_token_key(tmp_path / "ca"), r.output.strip())
    assert ident == Identity("shop", "cart")
    assert dt.timedelta(minutes=59) < exp - dt.datetime.now(dt.UTC) <= dt.timedelta(hours=1)


# --------------------------------------------------------------------------- meshline bootstrap


def bootstrap(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "controlplane.cli", "bootstrap", "--node-id", "cart-1",
                           "--namespace", "shop", "--service-account", "cart", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def grpc_service(doc: dict[str, object]) -> dict[str, object]:
    (svc,) = doc["dynamic_resources"]["ads_config"]["grpc_services"]  # type: ignore[index]
    return svc  # type: ignore[no-any-return]


def test_bootstrap_with_ca_dir_carries_a_token(tmp_path: Path) -> None:
    p = bootstrap("--ca-dir", str(tmp_path / "ca"), "--token-ttl", "2h")
    assert p.returncode == 0, p.stderr
    svc = grpc_service(yaml.safe_load(p.stdout))
    (md,) = svc["initial_metadata"]  # type: ignore[misc]
    assert md["key"] == "authorization" and md["value"].startswith("Bearer mlt1.")
    ident, exp = tokens.verify(tokens.load_or_create_token_key(tmp_path / "ca"), md["value"].split(" ", 1)[1])
    assert ident == Identity("shop", "cart")
    assert exp - dt.datetime.now(dt.UTC) <= dt.timedelta(hours=2)
    cfg = tmp_path / "b.yaml"
    cfg.write_text(p.stdout)
    v = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(cfg)], capture_output=True, text=True,
                       timeout=60)
    assert v.returncode == 0, v.stdout + v.stderr


def test_bootstrap_without_ca_dir_has_no_token() -> None:
    p = bootstrap()
    assert p.returncode == 0
    assert "initial_metadata" not in grpc_service(yaml.safe_load(p.stdout))


def test_bootstrap_with_a_token_file(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln")
    p = bootstrap("--token-file", str(tmp_path / "token"))
    assert p.returncode == 0, p.stderr
    (md,) = grpc_service(yaml.safe_load(p.stdout))["initial_metadata"]  # type: ignore[misc]
    assert md["value"] == "Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"
    p = bootstrap("--token-file", str(tmp_path / "token"), "--ca-dir", str(tmp_path / "ca"))
    assert p.returncode != 0 and "not both" in p.stderr


def test_bootstrap_xds_tls(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path / "ca")
    p = bootstrap("--ca-dir", str(tmp_path / "ca"), "--xds-tls", "--xds-address", "127.0.0.1:15012")
    assert p.returncode == 0, p.stderr
    doc = yaml.safe_load(p.stdout)
    # gRPC's own client over TLS, reading the token file at every stream (never inline).
    assert doc["static_resources"]["clusters"] == []
    (svc,) = doc["dynamic_resources"]["ads_config"]["grpc_services"]
    g = svc["google_grpc"]
    assert g["target_uri"] == "127.0.0.1:15012"
    assert g["channel_credentials"]["ssl_credentials"]["root_certs"]["filename"] == str(
        (tmp_path / "ca" / "root-cert.pem").resolve())
    assert g["channel_args"]["args"]["grpc.ssl_target_name_override"]["string_value"] == "localhost"
    plugin = g["call_credentials"][0]["from_plugin"]["typed_config"]
    token_path = Path(plugin["secret_data"]["filename"])
    assert token_path.parent == (tmp_path / "ca" / "tokens").resolve() and token_path.stat().st_mode & 0o077 == 0
    assert "mlt1." not in p.stdout  # the token is not in the bootstrap
    # Beyond loopback, a token never goes in clear.
    p2 = bootstrap("--ca-dir", str(tmp_path / "ca"), "--xds-address", "10.0.0.1:15010")
    assert p2.returncode != 0 and "--xds-tls" in p2.stderr
    cfg = tmp_path / "b.yaml"
    cfg.write_text(p.stdout)
    v = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(cfg)], capture_output=True, text=True,
                       timeout=60)
    assert v.returncode == 0, v.stdout + v.stderr
    p = bootstrap("--xds-tls")
    assert p.returncode != 0 and "--ca-bundle or --ca-dir" in p.stderr


def test_when_the_ca_cannot_issue_the_current_certificate_stays(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    from controlplane.ca.service import RETRY_S, IdentityService, IdentitySettings

    CertificateAuthority.load_or_create(tmp_path / "ca", root_ttl=dt.timedelta(seconds=2))
    now = [dt.datetime.now(dt.UTC)]  # the service's (and its CA's) clock, moved by the test
    svc = IdentityService(IdentitySettings(tmp_path / "ca", workload_ttl=dt.timedelta(hours=1)),
                          clock=lambda: now[0])
    svc.start()
    first = svc.material(Identity("shop", "cart"))
    assert first is not None
    now[0] += dt.timedelta(seconds=2.1)  # the root (and so the certificate, capped by it) has expired
    assert svc.material(Identity("shop", "cart")) is first
    assert "cannot issue a certificate for shop/cart" in caplog.text
    assert svc.sweep([Identity("shop", "cart")]) == RETRY_S  # retried later, not in a tight loop
