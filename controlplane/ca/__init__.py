"""Meshline's certificate authority: a self-signed or plugged-in signing CA that issues the
webhook's serving certificate and workload (SPIFFE) certificates. See `controlplane.ca.core`."""

from controlplane.ca.core import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    CERT_CHAIN_FILE,
    ROOT_CERT_FILE,
    CertificateAuthority,
)
from controlplane.ca.spiffe import CAError, SpiffeId

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "CERT_CHAIN_FILE",
    "ROOT_CERT_FILE",
    "CAError",
    "CertificateAuthority",
    "SpiffeId",
]
