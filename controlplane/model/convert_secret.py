"""Secret -> IR `TlsCredential` (DestinationRule `credentialName`). Pure, no I/O.

Only Secrets with TLS keys become credentials, as Istio reads them: `tls.crt`/`tls.key`
(and `ca.crt`, `ca.crl`) of a kubernetes.io/tls Secret, or `cert`/`key`/`cacert`/`crl` of a
generic one; `data` is base64, `stringData` plain. Other Secrets are not Meshline's business
and convert to None without a word. The material is checked (PEM that parses, a key that
belongs to the certificate); a problem is kept on the credential (`problem`) and warned on
the Secret, and the credential is then never sent to a proxy. Messages never quote the key.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

from controlplane.model.convert_base import Ctx
from controlplane.model.ir import TlsCredential

_KEYS = {
    "cert": ("tls.crt", "cert"),
    "key": ("tls.key", "key"),
    "ca": ("ca.crt", "cacert"),
    "crl": ("ca.crl", "crl"),
}


TLS_DATA_KEYS = frozenset(k for names in _KEYS.values() for k in names)
"""Every Secret data key Meshline reads; a Secret with none of them is not a TLS credential."""


def has_tls_keys(body: Mapping[str, Any]) -> bool:
    """Whether a Secret (its API body) holds a certificate, key or CA under a key Meshline reads."""
    return any(isinstance(body.get(f), Mapping) and not TLS_DATA_KEYS.isdisjoint(body[f])
               for f in ("data", "stringData"))


def _material(ctx: Ctx, body: Mapping[str, Any]) -> dict[str, str] | None:
    data = body.get("data") if isinstance(body.get("data"), Mapping) else {}
    plain = body.get("stringData") if isinstance(body.get("stringData"), Mapping) else {}
    assert isinstance(data, Mapping) and isinstance(plain, Mapping)
    out: dict[str, str] = {}
    for role, names in _KEYS.items():
        for key in names:
            if key in plain and isinstance(plain[key], str):
                out[role] = plain[key]
                break
            if key in data and isinstance(data[key], str):
                try:
                    out[role] = base64.b64decode(data[key], validate=True).decode()
                except (binascii.Error, UnicodeDecodeError):
                    ctx.warn(f"data.{key}", "is not base64-encoded PEM text; this credential is not used")
                    out[role] = ""
                    out["bad"] = f"data.{key} is not base64-encoded PEM text"
                break
    return out if set(out) & {"cert", "key", "ca"} else None


def _check(m: Mapping[str, str]) -> str | None:
    """Why the material cannot be used, or None."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    if m.get("bad"):
        return m["bad"]
    cert, key, ca = m.get("cert", ""), m.get("key", ""), m.get("ca", "")
    if bool(cert) != bool(key):
        return "has a certificate without a key, or a key without a certificate"
    try:
        if ca:
            x509.load_pem_x509_certificates(ca.encode())
        if cert:
            leaf = x509.load_pem_x509_certificates(cert.encode())[0]
            private = serialization.load_pem_private_key(key.encode(), password=None)
            pub = serialization.PublicFormat.SubjectPublicKeyInfo
            enc = serialization.Encoding.DER
            if private.public_key().public_bytes(enc, pub) != leaf.public_key().public_bytes(enc, pub):
                return "its private key does not belong to its certificate"
    except (ValueError, TypeError, IndexError) as exc:
        return f"its PEM material does not parse ({type(exc).__name__})"
    return None


def convert_secret(ctx: Ctx, namespace: str, name: str) -> TlsCredential | None:
    m = _material(ctx, ctx.raw.body)
    if m is None:
        return None
    problem = _check(m)
    if problem is not None and not m.get("bad"):
        ctx.warn("data", f"{problem}; this credential is not used")
    return TlsCredential(ctx.raw.ref, namespace, name, m.get("cert", ""), m.get("key", ""), m.get("ca", ""),
                         m.get("crl", ""), problem)
