"""Config dumps for the status API and CLI: Envoy resources as JSON-ready dicts, with
secrets reduced to certificate metadata (private keys never leave). Pure."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from cryptography import x509
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from google.protobuf import json_format
from google.protobuf.message import Message

from controlplane.cache.resources import Resource
from controlplane.translate.plan import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET

MESSAGE_TYPES: dict[str, type[Message]] = {
    CLUSTER: cluster_pb2.Cluster,
    ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
    LISTENER: listener_pb2.Listener,
    ROUTE: route_pb2.RouteConfiguration,
    SECRET: secret_pb2.Secret,
}


def _cert_info(pem: bytes) -> list[dict[str, Any]]:
    out = []
    for cert in x509.load_pem_x509_certificates(pem):
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = san.get_values_for_type(x509.UniformResourceIdentifier)
            dns = san.get_values_for_type(x509.DNSName)
        except x509.ExtensionNotFound:
            uris, dns = [], []
        out.append({
            "subject": cert.subject.rfc4514_string(),
            "issuer": cert.issuer.rfc4514_string(),
            "serial": format(cert.serial_number, "x"),
            "not_before": cert.not_valid_before_utc.isoformat(),
            "not_after": cert.not_valid_after_utc.isoformat(),
            "uri_sans": uris,
            "dns_sans": dns,
        })
    return out


def redact_secret(secret: secret_pb2.Secret) -> dict[str, Any]:
    out: dict[str, Any] = {"name": secret.name}
    if secret.HasField("tls_certificate"):
        chain = secret.tls_certificate.certificate_chain.inline_bytes
        out["tls_certificate"] = {"certificate_chain": _cert_info(chain) if chain else [],
                                  "private_key": "[redacted]"}
    if secret.HasField("validation_context"):
        ca = secret.validation_context.trusted_ca.inline_bytes
        out["validation_context"] = {"trusted_ca": _cert_info(ca) if ca else []}
    return out


def dump_resources(type_url: str, resources: Iterable[Resource]) -> list[dict[str, Any]]:
    cls = MESSAGE_TYPES[type_url]
    out = []
    for r in sorted(resources, key=lambda r: r.name):
        if not r.body:  # known to the proxy from a previous control-plane run, not sent by us
            out.append({"name": r.name, "version": r.version, "sent_by_previous_instance": True})
            continue
        msg = cls.FromString(r.body)
        if isinstance(msg, secret_pb2.Secret):
            body = redact_secret(msg)
        else:
            body = json_format.MessageToDict(msg, preserving_proto_field_name=True)
        out.append({"name": r.name, "version": r.version, "config": body})
    return out
