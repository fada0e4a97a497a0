"""The certificate-signing gRPC API (`meshline.ca.v1.CertificateService`, see
protos/meshline/ca/v1/ca.proto): `CreateCertificate(csr, validity_seconds)` for the
caller's own identity only. Served by the TLS server on 15012 (`controlplane.ca.tlsfront`);
does no I/O itself beyond answering RPCs.

Status codes: UNAUTHENTICATED without a valid bearer token; INVALID_ARGUMENT for a CSR
that does not parse, is larger than MAX_CSR_CHARS, whose key is not EC P-256/P-384 or RSA
of 2048-4096 bits (checked before its signature is verified), whose signature does not
verify, or for a negative `validity_seconds`; PERMISSION_DENIED when its subject
alternative names are anything but exactly the caller's SPIFFE URI; UNAVAILABLE before the
CA is ready.

Lifetime: `validity_seconds` 0 asks for the maximum (the workload certificate lifetime);
a larger request is clamped to it, as Istio's CA does, since a client asking for "as long
as allowed" is not an error; a negative one is refused.
"""

from __future__ import annotations

import datetime as dt
import logging

import grpc
from cryptography import x509

from controlplane.ca import CAError
from controlplane.ca.core import check_public_key
from controlplane.ca.gen import ca_pb2
from controlplane.ca.service import IdentityService

log = logging.getLogger(__name__)

SERVICE = "meshline.ca.v1.CertificateService"
MAX_CSR_CHARS = 64 * 1024  # a 4096-bit RSA CSR is under 2 KiB of PEM


def requested_names(csr: x509.CertificateSigningRequest) -> list[str]:
    """Every name the CSR asks for, as `TYPE:value` strings (URI, DNS, IP, email, other)."""
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    out = []
    for gn in san:
        kind = type(gn).__name__.replace("UniformResourceIdentifier", "URI").replace("Name", "") or "name"
        out.append(f"{kind}:{gn.value}")
    return out


class CertificateService:
    def __init__(self, identity: IdentityService, max_validity: dt.timedelta | None = None) -> None:
        self.identity = identity
        self.max_validity = max_validity or identity.settings.workload_ttl

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        return [grpc.method_handlers_generic_handler(SERVICE, {
            "CreateCertificate": grpc.unary_unary_rpc_method_handler(
                self.create_certificate,
                request_deserializer=ca_pb2.CreateCertificateRequest.FromString,
                response_serializer=ca_pb2.CreateCertificateResponse.SerializeToString,
            ),
        })]

    async def create_certificate(self, request: ca_pb2.CreateCertificateRequest, context: grpc.aio.ServicerContext
                                 ) -> ca_pb2.CreateCertificateResponse:
        auth = await self.identity.authenticator.authenticate(context.invocation_metadata())
        if auth.identity is None:
            code = grpc.StatusCode.UNAVAILABLE if auth.unavailable else grpc.StatusCode.UNAUTHENTICATED
            log.warning("CSR from %s refused: %s", context.peer(), auth.reason)
            await context.abort(code, auth.reason)
        ident = auth.identity
        assert ident is not None
        want = ident.spiffe(self.identity.trust_domain).uri
        if len(request.csr) > MAX_CSR_CHARS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"csr is {len(request.csr)} characters long; at most {MAX_CSR_CHARS}")
        try:
            csr = x509.load_pem_x509_csr(request.csr.encode())
            check_public_key(csr.public_key())  # before the signature: no work for an oversized key
        except ValueError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "csr is not a PEM certificate signing request")
        except CAError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"csr: {exc}")
        if not csr.is_signature_valid:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the CSR's signature does not verify")
        names = requested_names(csr)
        if names != [f"URI:{want}"]:
            log.warning("CSR from %s (%s) refused: asks for %s", context.peer(), ident, ", ".join(names) or "no name")
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"the CSR must name exactly {want} (as its only subject alternative name); "
                                f"it names {', '.join(names) or 'nothing'}")
        if request.validity_seconds < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "validity_seconds must not be negative")
        ttl = self.max_validity
        if 0 < request.validity_seconds < self.max_validity.total_seconds():  # larger: clamped
            ttl = dt.timedelta(seconds=request.validity_seconds)
        if not self.identity.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the CA is not ready yet")
        try:
            chain = self.identity.sign_csr(ident, request.csr, ttl)
        except CAError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        log.info("issued a certificate for %s (CSR from %s, %s)", want, context.peer(), ttl)
        return ca_pb2.CreateCertificateResponse(cert_chain=chain)
