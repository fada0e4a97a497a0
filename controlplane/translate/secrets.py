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
take the whole `common_tls_context(...)`. Nothing else may name other secrets: a proxy
is never sent any.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from envoy.config.core.v3 import config_source_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2

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


def _ads() -> config_source_pb2.ConfigSource:
    src = config_source_pb2.ConfigSource(resource_api_version=config_source_pb2.V3)
    src.ads.SetInParent()
    return src


def workload_sds() -> secret_pb2.SdsSecretConfig:
    """`SdsSecretConfig` for the proxy's own certificate (`default`), fetched over ADS."""
    return secret_pb2.SdsSecretConfig(name=WORKLOAD_SECRET, sds_config=_ads())


def root_sds() -> secret_pb2.SdsSecretConfig:
    """`SdsSecretConfig` for the trust bundle (`ROOTCA`), fetched over ADS."""
    return secret_pb2.SdsSecretConfig(name=ROOT_SECRET, sds_config=_ads())


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
