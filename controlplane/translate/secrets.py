"""SDS resources: the two `Secret`s a proxy with an authenticated identity receives over
ADS, and the SDS references listeners and clusters use to point at them. Pure functions,
no I/O.

- `default`: `tls_certificate` — the proxy's workload certificate chain (SPIFFE URI SAN
  only) and its private key. Sent only to proxies authenticated as that identity.
- `ROOTCA`: `validation_context.trusted_ca` — the mesh's trust bundle (every root that is
  trusted, two of them while a root rotation overlaps).
- node proxies instead hold one certificate per identity of the ambient pods on their
  node, each named by its SPIFFE URI (`plan_named_secrets`).

Other translators reference them with `workload_sds()` / `root_sds()` (SDS over ADS), or
take the whole `common_tls_context(...)`.

DestinationRule `credentialName` (TLS origination, `apply_origination`): clusters reference
`kubernetes://<name>` (client certificate) and `kubernetes://<name>-cacert` (CA), served
over ADS to authenticated sidecars from the Secret of that name in the sidecar's own
namespace (`plan_proxy_credentials`). A name with no usable Secret there gets stand-ins that
make every connection fail, because Envoy keeps a secret whose removal it is told of.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from envoy.config.core.v3 import config_source_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from controlplane.model.ir import ClientTLS
from controlplane.model.mesh import Mesh, visible_to
from controlplane.model.validate_tls import credential_ca, credential_paths
from controlplane.translate.plan import SECRET, ResourceSpec

WORKLOAD_SECRET = "default"
ROOT_SECRET = "ROOTCA"
SECRET_NAMES = frozenset({WORKLOAD_SECRET, ROOT_SECRET})


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """A workload's certificate chain (leaf first) and private key, PEM. The key is kept
    out of `repr`, so it never reaches a log line through a plan or a spec."""

    chain_pem: str
    key_pem: str = field(repr=False)


def workload_secret(material: TlsMaterial, name: str = WORKLOAD_SECRET) -> secret_pb2.Secret:
    s = secret_pb2.Secret(name=name)
    s.tls_certificate.certificate_chain.inline_bytes = material.chain_pem.encode()
    s.tls_certificate.private_key.inline_bytes = material.key_pem.encode()
    return s


def root_secret(bundle_pem: str) -> secret_pb2.Secret:
    s = secret_pb2.Secret(name=ROOT_SECRET)
    s.validation_context.trusted_ca.inline_bytes = bundle_pem.encode()
    return s


def plan_secrets(material: TlsMaterial, bundle_pem: str) -> list[ResourceSpec]:
    """The two Secret resources of one authenticated proxy."""
    return [
        ResourceSpec(SECRET, ROOT_SECRET, root_secret, (bundle_pem,)),
        ResourceSpec(SECRET, WORKLOAD_SECRET, workload_secret, (material,)),
    ]


def plan_named_secrets(named: Sequence[tuple[str, TlsMaterial]], bundle_pem: str) -> list[ResourceSpec]:
    """A node proxy's secrets: the trust bundle and one certificate per identity it serves,
    each named after that identity's SPIFFE URI."""
    return [
        ResourceSpec(SECRET, ROOT_SECRET, root_secret, (bundle_pem,)),
        *(ResourceSpec(SECRET, name, workload_secret, (material, name)) for name, material in named),
    ]


# --------------------------------------------------------------------------- references


def ads_config_source() -> config_source_pb2.ConfigSource:
    src = config_source_pb2.ConfigSource(resource_api_version=config_source_pb2.V3)
    src.ads.SetInParent()
    return src


def workload_sds() -> secret_pb2.SdsSecretConfig:
    """`SdsSecretConfig` for the proxy's own certificate (`default`), fetched over ADS."""
    return secret_pb2.SdsSecretConfig(name=WORKLOAD_SECRET, sds_config=ads_config_source())


def root_sds() -> secret_pb2.SdsSecretConfig:
    """`SdsSecretConfig` for the trust bundle (`ROOTCA`), fetched over ADS."""
    return secret_pb2.SdsSecretConfig(name=ROOT_SECRET, sds_config=ads_config_source())


# --------------------------------------------------------------------------- origination (DestinationRule tls)

CREDENTIAL_SDS_PREFIX = "kubernetes://"


def credential_sds_name(credential: str) -> str:
    """The SDS name of a DestinationRule `credentialName`'s client certificate, as Istio names
    it: `kubernetes://<name>` (the Secret of that name in the proxy's own namespace)."""
    return f"{CREDENTIAL_SDS_PREFIX}{credential}"


def credential_ca_sds_name(credential: str) -> str:
    """The SDS name of the CA that verifies the server for a `credentialName`:
    `kubernetes://<name>-cacert`."""
    return f"{CREDENTIAL_SDS_PREFIX}{credential}-cacert"


def _sans(matchers: RepeatedCompositeFieldContainer[common_pb2.SubjectAltNameMatcher], sans: Sequence[str]) -> None:
    for san in sans:
        kind = common_pb2.SubjectAltNameMatcher.URI if "://" in san else common_pb2.SubjectAltNameMatcher.DNS
        matchers.append(common_pb2.SubjectAltNameMatcher(san_type=kind, matcher=string_pb2.StringMatcher(exact=san)))


def apply_origination(common: tls_pb2.CommonTlsContext, origin: ClientTLS | None, sans: Sequence[str],
                      system_ca: str) -> None:
    """TLS origination as a DestinationRule's `tls` asks (SIMPLE or MUTUAL), as Istio does it:
    MUTUAL presents the client certificate (`clientCertificate`/`privateKey` files, read by
    Envoy on the proxy's host, or `credentialName` over SDS); the server is verified against
    `caCertificates` (else the secret's CA for `credentialName`, else the system CA bundle
    `system_ca`), `caCrl`, and `sans` (URI SANs for `spiffe://...`, DNS names otherwise),
    unless `insecureSkipVerify`."""
    mutual = origin is not None and origin.mode == "MUTUAL"
    skip = origin is not None and origin.insecure_skip_verify
    if origin is not None and origin.credential_name:
        name = origin.credential_name
        if mutual:
            common.tls_certificate_sds_secret_configs.append(
                secret_pb2.SdsSecretConfig(name=credential_sds_name(name), sds_config=ads_config_source()))
        if not skip:
            combined = common.combined_validation_context
            combined.default_validation_context.SetInParent()  # required by Envoy, even with no SANs
            combined.validation_context_sds_secret_config.CopyFrom(
                secret_pb2.SdsSecretConfig(name=credential_ca_sds_name(name), sds_config=ads_config_source()))
            _sans(combined.default_validation_context.match_typed_subject_alt_names, sans)
        return
    if mutual and origin is not None and origin.client_certificate and origin.private_key:
        cert = common.tls_certificates.add()
        cert.certificate_chain.filename = origin.client_certificate
        cert.private_key.filename = origin.private_key
    if skip:
        return
    validation = common.validation_context
    validation.trusted_ca.filename = (origin.ca_certificates if origin is not None else None) or system_ca
    if origin is not None and origin.ca_crl:
        validation.crl.filename = origin.ca_crl
    _sans(validation.match_typed_subject_alt_names, sans)


@dataclass(frozen=True, slots=True)
class Credential:
    """A `credentialName` Secret's TLS material, PEM: client certificate chain and key (either
    may be empty for a CA-only Secret), CA bundle and CRL (may be empty). The key stays out of
    `repr`."""

    cert_pem: str
    key_pem: str = field(repr=False)
    ca_pem: str = ""
    crl_pem: str = ""


def credential_secret(name: str, cred: Credential, sds_name: str | None = None) -> secret_pb2.Secret:
    """A credential's certificate and key, named `sds_name` (default: `kubernetes://<name>`,
    `credential_sds_name`; a gateway's certificateRef has a name of its own)."""
    s = secret_pb2.Secret(name=credential_sds_name(name) if sds_name is None else sds_name)
    s.tls_certificate.certificate_chain.inline_bytes = cred.cert_pem.encode()
    s.tls_certificate.private_key.inline_bytes = cred.key_pem.encode()
    return s


def credential_ca_secret(name: str, ca_pem: str, crl_pem: str, system_ca: str,
                         sds_name: str | None = None) -> secret_pb2.Secret:
    """The CA half of a credential: its CA bundle, else the system CA bundle (file on the proxy);
    named `sds_name` (default: `kubernetes://<name>-cacert`, `credential_ca_sds_name`)."""
    s = secret_pb2.Secret(name=credential_ca_sds_name(name) if sds_name is None else sds_name)
    if ca_pem:
        s.validation_context.trusted_ca.inline_bytes = ca_pem.encode()
    else:
        s.validation_context.trusted_ca.filename = system_ca
    if crl_pem:
        s.validation_context.crl.inline_bytes = crl_pem.encode()
    return s


# A CA certificate whose private key was destroyed when it was made (2026-12-03): no server
# certificate chains to it, so a validation context trusting only it refuses every server.
TRUSTS_NOTHING_CA = """-----BEGIN CERTIFICATE-----
MIIByjCCAW+gAwIBAgIBATAKBggqhkjOPQQDAjBZMREwDwYDVQQKDAhNZXNobGlu
ZTFEMEIGA1UEAww7TWVzaGxpbmUgdHJ1c3RzIG5vdGhpbmcgKGNyZWRlbnRpYWwg
bWlzc2luZzsga2V5IGRlc3Ryb3llZCkwIBcNMjYwMTAxMDAwMDAwWhgPMjEyNjAx
MDEwMDAwMDBaMFkxETAPBgNVBAoMCE1lc2hsaW5lMUQwQgYDVQQDDDtNZXNobGlu
ZSB0cnVzdHMgbm90aGluZyAoY3JlZGVudGlhbCBtaXNzaW5nOyBrZXkgZGVzdHJv
eWVkKTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABG16RgEYQ13SeHpQHIkI4c9g
ffSJQLXysDEQby9qfK4mOq3ayE24vuSTBbh/ZvJlPYDklqxvqq38lxouYPyuHVCj
JjAkMBIGA1UdEwEB/wQIMAYBAf8CAQAwDgYDVR0PAQH/BAQDAgEGMAoGCCqGSM49
BAMCA0kAMEYCIQCxLDT5vZugOSRTGwIIZQjNywhy55itgRGVPi1Ls140QgIhALVY
YKivTW3Mr7GaT7APJTQAjjsShDrGF2wGTWsZ0BnE
-----END CERTIFICATE-----
"""


def _stand_in_material() -> tuple[str, str]:
    """(certificate, key) PEM of a client certificate that proves nothing: self-signed, its
    key derived from a public constant, so the same bytes come out every time (no randomness,
    nothing secret). Envoy needs a certificate and key it can load to replace the one it holds."""
    import datetime as dt
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    scalar = int.from_bytes(hashlib.sha256(b"meshline: no credential").digest(), "big")
    key = ec.derive_private_key(scalar, ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshline-no-credential")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
            .not_valid_after(dt.datetime(2126, 1, 1, tzinfo=dt.UTC))
            .sign(key, hashes.SHA256(), ecdsa_deterministic=True))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem.decode()


def withheld_credential_secret(name: str, sds_name: str | None = None) -> secret_pb2.Secret:
    """`kubernetes://<name>` (or `sds_name`) for a credential the proxy may not use (its Secret
    is missing, deleted or unusable): a certificate that proves nothing, replacing whatever
    Envoy held. (Envoy ignores the removal of a secret a cluster uses and keeps the old one: a
    deleted Secret must be overwritten, not removed.)"""
    cert, key = _stand_in_material()
    return credential_secret(name, Credential(cert, key), sds_name)


def withheld_ca_secret(name: str, sds_name: str | None = None) -> secret_pb2.Secret:
    """`kubernetes://<name>-cacert` (or `sds_name`) for a credential the proxy may not use: a
    trust anchor no server chains to (`TRUSTS_NOTHING_CA`), so every handshake fails before
    the client sends a certificate. The cluster stays TLS: its connections fail, never in
    plaintext."""
    s = secret_pb2.Secret(name=credential_ca_sds_name(name) if sds_name is None else sds_name)
    s.validation_context.trusted_ca.inline_bytes = TRUSTS_NOTHING_CA.encode()
    return s


def plan_credential_secrets(creds: Sequence[tuple[str, Credential]], system_ca: str,
                            withheld: Sequence[str] = ()) -> list[ResourceSpec]:
    """The Secret resources of the `credentialName`s a proxy's clusters may reference, each
    given with the credential found for it; `withheld`: names with no usable credential, sent
    as stand-ins that make every connection fail (`withheld_credential_secret`,
    `withheld_ca_secret`), never plaintext and never the last credential Envoy held. A
    CA-only credential gets the stand-in certificate (MUTUAL fails, SIMPLE never asks for it)."""
    out: list[ResourceSpec] = []
    for name, cred in creds:
        if cred.cert_pem and cred.key_pem:
            out.append(ResourceSpec(SECRET, credential_sds_name(name), credential_secret, (name, cred)))
        else:
            out.append(ResourceSpec(SECRET, credential_sds_name(name), withheld_credential_secret, (name,)))
        out.append(ResourceSpec(SECRET, credential_ca_sds_name(name), credential_ca_secret,
                                (name, cred.ca_pem, cred.crl_pem, system_ca)))
    for name in withheld:
        out.append(ResourceSpec(SECRET, credential_sds_name(name), withheld_credential_secret, (name,)))
        out.append(ResourceSpec(SECRET, credential_ca_sds_name(name), withheld_ca_secret, (name,)))
    return out


def plan_proxy_credentials(mesh: Mesh, namespace: str, system_ca: str) -> list[ResourceSpec]:
    """The credential Secrets a sidecar in `namespace` receives: those of its own namespace
    (Istio's rule for credentialName on sidecars) that some DestinationRule names and whose
    material is usable (`controlplane.model.validate_tls`); a name without one (no Secret, a
    deleted or unusable one: reported there) gets the fail-closed stand-ins. A Secret of
    another namespace is never sent. Only for authenticated proxies, like every secret.
    Only rules exported to `namespace` count: a rule hidden from it never reaches its
    clusters, so its sidecars need no Secret of that name."""
    names = sorted({tls.credential_name for dr in mesh.destination_rules
                    if visible_to(dr.export_to, dr.namespace, namespace)
                    for _, tls in credential_paths(dr) if tls.credential_name})
    creds: list[tuple[str, Credential]] = []
    withheld: list[str] = []
    for name in names:
        cred = mesh.credentials.get((namespace, name))
        ca = credential_ca(mesh, namespace, name)
        if (cred is not None and cred.problem is not None) or (cred is None and ca is None):
            withheld.append(name)
            continue
        cert, key = (cred.cert_pem, cred.key_pem) if cred is not None else ("", "")
        creds.append((name, Credential(cert, key, ca.ca_pem if ca else "", cred.crl_pem if cred else "")))
    return plan_credential_secrets(creds, system_ca, withheld)


def common_tls_context(peer_spiffe_ids: Sequence[str] = (),
                       alpn: Sequence[str] = ()) -> tls_pb2.CommonTlsContext:
    """A `CommonTlsContext` presenting the workload certificate and validating the peer
    against the trust bundle; with `peer_spiffe_ids`, the peer's URI SAN must be one of
    them (exact match)."""
    ctx = tls_pb2.CommonTlsContext(alpn_protocols=list(alpn))
    ctx.tls_certificate_sds_secret_configs.append(workload_sds())
    if peer_spiffe_ids:
        combined = ctx.combined_validation_context
        combined.validation_context_sds_secret_config.CopyFrom(root_sds())
        for uri in peer_spiffe_ids:
            combined.default_validation_context.match_typed_subject_alt_names.append(
                common_pb2.SubjectAltNameMatcher(san_type=common_pb2.SubjectAltNameMatcher.URI,
                                                 matcher=string_pb2.StringMatcher(exact=uri)))
    else:
        ctx.validation_context_sds_secret_config.CopyFrom(root_sds())
    return ctx
