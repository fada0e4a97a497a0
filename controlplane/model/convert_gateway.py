"""Istio `Gateway` spec (networking.istio.io v1 schema) -> IR `Gateway`. Pure, no I/O.

Accepted as `networking.meshline.io/v1` or Istio's `networking.istio.io/v1`, `v1beta1` or
`v1alpha3`. A Gateway configures the proxies started with `meshline bootstrap --mode gateway
--gateway NS/NAME` whose workload labels include `spec.selector` (see
`controlplane.translate.gateway`). Every field is translated, warned about or refused:

- `selector`; `servers[].port.number`, `.protocol` (HTTP, HTTP2, GRPC, HTTPS, TCP, TLS;
  MONGO and the rest are served as TCP, with a warning), `.name`; `servers[].hosts`
  (`namespace/host` or `host`: `*`, `*.suffix` or a name; `.` is the Gateway's namespace);
  `servers[].bind` (an IP address the listener binds instead of 0.0.0.0); `servers[].name`.
- `servers[].tls`: `httpsRedirect`; `mode` SIMPLE, MUTUAL, OPTIONAL_MUTUAL, PASSTHROUGH (routed
  by the bound VirtualServices' `tls` routes, by SNI);
  ISTIO_MUTUAL and AUTO_PASSTHROUGH are refused (east-west multi-cluster gateways are not
  supported); `credentialName` (a Secret of the gateway proxy's namespace, over SDS, only to
  an authenticated proxy of the Gateway), or `serverCertificate`/`privateKey`/
  `caCertificates`/`caCrl` files on the proxy; `subjectAltNames`, `verifyCertificateSpki`,
  `verifyCertificateHash` (client certificates, MUTUAL); `minProtocolVersion`,
  `maxProtocolVersion`, `cipherSuites`.
- Warned and ignored: `servers[].port.targetPort` and `servers[].defaultEndpoint` (sidecar
  ingress only in Istio), `tls.credentialNames` and `tls.tlsCertificates` (several
  certificates per server: use one `credentialName`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from controlplane.model.convert_base import (
    Ctx,
    check_fields,
    child,
    get_bool,
    get_labels,
    get_list,
    get_port,
    get_str,
    get_str_list,
    host_problem,
    index,
    is_dns_label,
    item_map,
    join,
)
from controlplane.model.ir import Gateway, GatewayServer, ServerTLS, ServerTLSMode

SPEC_FIELDS = ("selector", "servers")
SERVER_FIELDS = ("port", "hosts", "tls", "bind", "name")
SERVER_IGNORED = {"defaultEndpoint": "defaultEndpoint applies to sidecar ingress in Istio; ignored on gateways"}
PORT_FIELDS = ("number", "protocol", "name")
PORT_IGNORED = {"targetPort": "targetPort is not supported on gateways; ignored"}
TLS_FIELDS = ("httpsRedirect", "mode", "serverCertificate", "privateKey", "caCertificates", "caCrl",
              "credentialName", "subjectAltNames", "verifyCertificateSpki", "verifyCertificateHash",
              "minProtocolVersion", "maxProtocolVersion", "cipherSuites", "insecureSkipVerify", "caCertCredentialName")
TLS_IGNORED = {
    "credentialNames": "several credentials per server are not supported; ignored (use credentialName)",
    "tlsCertificates": "several certificates per server are not supported; ignored (use credentialName)",
}
HTTP_PROTOCOLS = ("HTTP", "HTTP2", "GRPC")
TLS_PROTOCOLS = ("HTTPS", "TLS")
PROTOCOLS = (*HTTP_PROTOCOLS, *TLS_PROTOCOLS, "TCP", "MONGO", "REDIS", "MYSQL", "GRPC-WEB")
MODES: tuple[ServerTLSMode, ...] = ("SIMPLE", "MUTUAL", "OPTIONAL_MUTUAL", "PASSTHROUGH")
REFUSED_MODES = ("ISTIO_MUTUAL", "AUTO_PASSTHROUGH")
TLS_VERSIONS = ("TLS_AUTO", "TLSV1_0", "TLSV1_1", "TLSV1_2", "TLSV1_3")


def convert_gateway(ctx: Ctx, namespace: str, name: str) -> Gateway | None:
    check_fields(ctx, ctx.raw.body, "", ("apiVersion", "kind", "metadata", "spec", "status"))
    spec = child(ctx, ctx.raw.body, "spec", "")
    if spec is None:
        if ctx.raw.body.get("spec") is None:
            ctx.error("spec", "is required")
        return None
    check_fields(ctx, spec, "spec", SPEC_FIELDS)
    selector = get_labels(ctx, spec, "selector", "spec")
    servers: list[tuple[int, GatewayServer]] = []
    items = get_list(ctx, spec, "servers", "spec")
    if not items:
        ctx.error("spec.servers", "at least one server is required")
    for i, item in enumerate(items):
        srv = _server(ctx, item, index("spec.servers", i), namespace)
        if srv is not None:
            servers.append((i, srv))
    _check_ports(ctx, servers)
    servers = _unique_matches(ctx, servers)
    return Gateway(ctx.raw.ref, namespace, name, selector, tuple(s for _, s in servers))


def _check_ports(ctx: Ctx, servers: list[tuple[int, GatewayServer]]) -> None:
    """Servers sharing a port must agree on its protocol family (one listener per port)."""
    seen: dict[tuple[str | None, int], tuple[int, GatewayServer, str]] = {}
    names: set[str] = set()
    for i, s in servers:
        family = "http" if s.protocol in HTTP_PROTOCOLS else "tls" if s.protocol in TLS_PROTOCOLS else "tcp"
        prev = seen.setdefault((s.bind, s.port), (i, s, family))
        if prev[2] != family:
            ctx.error(index("spec.servers", i) + ".port.protocol",
                      f"port {s.port} is already {prev[1].protocol} (servers[{prev[0]}]); one port "
                      f"serves one protocol family")
        if s.name:
            if s.name in names:
                ctx.error(index("spec.servers", i) + ".name", f"duplicate server name {s.name!r}")
            names.add(s.name)


def _unique_matches(ctx: Ctx, servers: list[tuple[int, GatewayServer]]) -> list[tuple[int, GatewayServer]]:
    """Servers of one port that are told apart by SNI (TLS) must not claim the same name, and a
    port takes one TCP server: a later server that would repeat an earlier one's match is
    ignored with a warning (Envoy refuses a listener with two equal filter chain matches)."""
    kept: list[tuple[int, GatewayServer]] = []
    claimed: dict[tuple[str | None, int], dict[str, int]] = {}
    for i, s in servers:
        if s.protocol in HTTP_PROTOCOLS:
            kept.append((i, s))
            continue
        names = {h for _, h in s.hosts}
        sni = {"*"} if "*" in names or s.protocol not in TLS_PROTOCOLS else names
        seen = claimed.setdefault((s.bind, s.port), {})
        clash = sorted(n for n in sni if n in seen)
        if clash:
            ctx.warn(index("spec.servers", i) + ".hosts",
                     f"{', '.join(clash)} on port {s.port} is already served by servers[{seen[clash[0]]}]; "
                     "this server is ignored")
            continue
        seen.update({n: i for n in sni})
        kept.append((i, s))
    return kept


def _server(ctx: Ctx, value: object, path: str, namespace: str) -> GatewayServer | None:
    m = item_map(ctx, value, path)
    if m is None:
        return None
    errors = ctx.error_count()
    check_fields(ctx, m, path, SERVER_FIELDS, SERVER_IGNORED)
    port_map = child(ctx, m, "port", path)
    if port_map is None:
        ctx.error(join(path, "port"), "is required")
        return None
    pp = join(path, "port")
    check_fields(ctx, port_map, pp, PORT_FIELDS, PORT_IGNORED)
    number = get_port(ctx, port_map, "number", pp, required=True)
    protocol = (get_str(ctx, port_map, "protocol", pp, required=True) or "").upper()
    if protocol and protocol not in PROTOCOLS:
        ctx.error(join(pp, "protocol"), f"{protocol!r} is not one of {', '.join(PROTOCOLS)}")
    elif protocol and protocol not in (*HTTP_PROTOCOLS, *TLS_PROTOCOLS, "TCP"):
        ctx.warn(join(pp, "protocol"), f"{protocol} is served as plain TCP (no protocol-specific filter)")
    hosts = _hosts(ctx, m, path, namespace)
    bind = get_str(ctx, m, "bind", path)
    if bind:
        try:
            bind = str(ipaddress.ip_address(bind))
        except ValueError:
            ctx.error(join(path, "bind"), f"{bind!r} is not an IP address (Unix sockets are not supported)")
    tls = _tls(ctx, m, path, protocol)
    if protocol in TLS_PROTOCOLS and m.get("tls") is None:
        ctx.error(join(path, "tls"), f"is required for protocol {protocol}")
    if protocol == "TLS" and tls is not None and tls.mode not in ("PASSTHROUGH",) and not ctx.failed:
        ctx.warn(join(path, "tls.mode"), "a TLS server that terminates TLS forwards plain TCP (VirtualService "
                                         "tcp routes)")
    if protocol in HTTP_PROTOCOLS and tls is not None and not tls.https_redirect:
        ctx.warn(join(path, "tls"), f"ignored on a {protocol} server except httpsRedirect (use protocol HTTPS)")
    if number is None or ctx.error_count() != errors:
        return None
    return GatewayServer(port=number, protocol=protocol, port_name=get_str(ctx, port_map, "name", pp) or "",
                         hosts=hosts, tls=tls, bind=bind or None, name=get_str(ctx, m, "name", path) or "")


def _hosts(ctx: Ctx, m: Mapping[str, Any], path: str, namespace: str) -> tuple[tuple[str, str], ...]:
    p = join(path, "hosts")
    names = get_str_list(ctx, m, "hosts", path)
    if not names:
        ctx.error(p, "at least one host is required")
    out: list[tuple[str, str]] = []
    for i, text in enumerate(names):
        ns, sep, host = text.partition("/")
        if not sep:
            ns, host = "*", text
        if ns == ".":
            ns = namespace
        host = host.strip().rstrip(".").lower()
        if ns != "*" and not is_dns_label(ns):
            ctx.error(index(p, i), f"{text!r}: namespace {ns!r} is not '.', '*' or a namespace name")
            continue
        problem = None if host == "*" else host_problem(host[2:] if host.startswith("*.") else host)
        if problem is not None or ("*" in host and not host.startswith("*.") and host != "*"):
            ctx.error(index(p, i), problem or f"{text!r}: a wildcard is only allowed as the first label")
            continue
        if (ns, host) not in out:
            out.append((ns, host))
    return tuple(out)


def _tls(ctx: Ctx, m: Mapping[str, Any], path: str, protocol: str) -> ServerTLS | None:
    t = child(ctx, m, "tls", path)
    if t is None:
        return None
    p = join(path, "tls")
    check_fields(ctx, t, p, TLS_FIELDS, TLS_IGNORED)
    redirect = bool(get_bool(ctx, t, "httpsRedirect", p))
    skip = bool(get_bool(ctx, t, "insecureSkipVerify", p))
    mode_text = (get_str(ctx, t, "mode", p) or "").upper()
    mode: ServerTLSMode = "SIMPLE"
    if mode_text in REFUSED_MODES:
        ctx.error(join(p, "mode"), f"{mode_text} is not supported (multi-cluster east-west gateways)")
        return None
    elif mode_text and mode_text not in MODES:
        ctx.error(join(p, "mode"), f"{mode_text!r} is not one of {', '.join((*MODES, *REFUSED_MODES))}")
    elif mode_text:
        mode = next(m for m in MODES if m == mode_text)
    elif protocol in TLS_PROTOCOLS:
        ctx.error(join(p, "mode"), f"is required for protocol {protocol}")
    cred = get_str(ctx, t, "credentialName", p)
    files = {k: get_str(ctx, t, k, p) for k in ("serverCertificate", "privateKey", "caCertificates", "caCrl")}
    for k, v in files.items():
        if v is not None and not v.startswith("/"):
            ctx.error(join(p, k), f"must be an absolute file path on the gateway proxy, got {v!r}")
    if cred is not None and not is_dns_label(cred.replace(".", "-")):
        ctx.error(join(p, "credentialName"), f"{cred!r} is not a Secret name")
    ca_cred = get_str(ctx, t, "caCertCredentialName", p)
    if ca_cred is not None and not is_dns_label(ca_cred.replace(".", "-")):
        ctx.error(join(p, "caCertCredentialName"), f"{ca_cred!r} is not a Secret name")
    if ca_cred and files["caCertificates"]:
        ctx.error(join(p, "caCertCredentialName"), "set caCertCredentialName or caCertificates, not both")
    terminates = protocol in TLS_PROTOCOLS and mode != "PASSTHROUGH"
    if terminates and not cred and not (files["serverCertificate"] and files["privateKey"]):
        ctx.error(p, f"mode {mode} needs credentialName, or serverCertificate and privateKey")
    if cred:
        for k, v in files.items():
            if v is not None:
                ctx.warn(join(p, k), "ignored: credentialName is set (its Secret holds the certificates)")
    if terminates and mode in ("MUTUAL", "OPTIONAL_MUTUAL") and not cred and not files["caCertificates"] \
            and not ca_cred:
        ctx.error(join(p, "caCertificates"), f"is required for mode {mode} (or credentialName with a CA)")
    if mode == "PASSTHROUGH" and (cred or files["serverCertificate"]):
        ctx.warn(p, "certificates are not used in PASSTHROUGH mode (the backend terminates TLS)")
    client_checks = [k for k in ("subjectAltNames", "verifyCertificateSpki", "verifyCertificateHash") if t.get(k)]
    for k in [*client_checks, *(["insecureSkipVerify"] if skip else []), *(["caCertCredentialName"] if ca_cred else [])]:
        if mode not in ("MUTUAL", "OPTIONAL_MUTUAL"):
            ctx.warn(join(p, k), f"only checks client certificates (MUTUAL, OPTIONAL_MUTUAL); ignored in mode {mode}")
    if protocol not in (*TLS_PROTOCOLS, *HTTP_PROTOCOLS) and (mode_text or redirect):
        ctx.warn(p, f"ignored on a {protocol or 'TCP'} server (use protocol TLS or HTTPS)")
    versions: dict[str, str | None] = {}
    for k in ("minProtocolVersion", "maxProtocolVersion"):
        v = get_str(ctx, t, k, p)
        if v is not None and v.upper() not in TLS_VERSIONS:
            ctx.error(join(p, k), f"{v!r} is not one of {', '.join(TLS_VERSIONS)}")
            v = None
        versions[k] = v.upper() if v and v.upper() != "TLS_AUTO" else None
    return ServerTLS(
        mode=mode,
        https_redirect=redirect,
        credential_name=cred or None,
        server_certificate=files["serverCertificate"],
        private_key=files["privateKey"],
        ca_certificates=files["caCertificates"],
        ca_crl=files["caCrl"],
        subject_alt_names=get_str_list(ctx, t, "subjectAltNames", p),
        verify_certificate_spki=get_str_list(ctx, t, "verifyCertificateSpki", p),
        verify_certificate_hash=get_str_list(ctx, t, "verifyCertificateHash", p),
        min_protocol_version=versions["minProtocolVersion"],
        max_protocol_version=versions["maxProtocolVersion"],
        cipher_suites=get_str_list(ctx, t, "cipherSuites", p),
        insecure_skip_verify=skip and mode in ("MUTUAL", "OPTIONAL_MUTUAL"),
        ca_cert_credential_name=ca_cred or None if mode in ("MUTUAL", "OPTIONAL_MUTUAL") else None,
    )
