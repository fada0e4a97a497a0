"""Cross-object checks of Istio Gateways and the VirtualServices bound to them. Pure, no I/O.

Warnings (the object still serves; what is wrong is named):
- a VirtualService `gateways` entry (or a match's) naming a Gateway that does not exist;
- a VirtualService bound to a Gateway none of whose servers' hosts admit any of its hosts;
- a Gateway whose selector picks no Pod of the mesh (no proxy can be given its credentials);
- a server `credentialName` with no usable TLS Secret in the namespace of a Pod the Gateway
  selects (its handshakes fail there, with stand-in certificates: never plaintext);
- two VirtualServices bound to one Gateway claiming the same host of a server (the first by
  namespace and name serves it);
- a MUTUAL server whose credential has no CA (`ca.crt`, or a `<name>-cacert` Secret): client
  certificates cannot be verified, so every handshake fails.
"""

from __future__ import annotations

from collections.abc import Iterator

from controlplane.model.gateways import MESH, bound_view, server_vs_hosts
from controlplane.model.ir import Gateway, GatewayServer, Issue, VirtualService, Workload, labels_match
from controlplane.model.mesh import Mesh
from controlplane.model.validate_tls import credential_ca


def check_gateways(mesh: Mesh) -> tuple[Issue, ...]:
    issues: list[Issue] = []
    for vs in mesh.gateway_virtual_services:
        issues.extend(_bindings(mesh, vs))
    for gw in mesh.gateways.values():
        issues.extend(_gateway(mesh, gw))
        issues.extend(_shared_hosts(mesh, gw))
    return tuple(issues)


def _shared_hosts(mesh: Mesh, gw: Gateway) -> Iterator[Issue]:
    """Two VirtualServices bound to one Gateway that claim the same host on a server: the first
    by namespace and name serves it (translate.gateway), the other is told."""
    for srv in gw.servers:
        owner: dict[str, VirtualService] = {}
        for vs in (v for v in (bound_view(x, gw.key) for x in mesh.gateway_virtual_services) if v is not None):
            if not _has_routes_for(srv, vs):
                continue  # e.g. a VirtualService of tcp routes only takes no host of an HTTPS server
            for host in server_vs_hosts(srv, vs):
                first = owner.setdefault(host, vs)
                if first is not vs:
                    yield Issue(vs.ref, "spec.hosts", f"host {host} on Gateway {gw.key} port {srv.port} is served by "
                                                      f"VirtualService {first.namespace}/{first.name} (the first by "
                                                      "namespace and name); this one's routes for it are not used",
                                "warning")


def _has_routes_for(srv: GatewayServer, vs: VirtualService) -> bool:
    """Whether `vs` has routes of the kind `srv` applies (translate.gateway): tls routes on a
    PASSTHROUGH server, http routes on HTTP/HTTP2/GRPC/HTTPS ones, tcp routes on the others."""
    if srv.tls is not None and srv.tls.mode == "PASSTHROUGH":
        return bool(vs.tls)
    if srv.protocol in ("HTTP", "HTTP2", "GRPC", "HTTPS"):
        return bool(vs.http)
    return bool(vs.tcp)


def _bindings(mesh: Mesh, vs: VirtualService) -> Iterator[Issue]:
    for i, key in enumerate(vs.gateways):
        if key == MESH:
            continue
        gw = mesh.gateways.get(key)
        if gw is None:
            yield Issue(vs.ref, f"spec.gateways[{i}]", f"Gateway {key} does not exist: no gateway applies this "
                                                       "VirtualService", "warning")
        elif not any(server_vs_hosts(s, vs) for s in gw.servers):
            yield Issue(vs.ref, "spec.hosts", f"no server of Gateway {key} serves any of these hosts (server hosts: "
                                              f"{', '.join(sorted({f'{n}/{h}' for s in gw.servers for n, h in s.hosts}))})",
                        "warning")
    named = {g for r in vs.http for m in r.matches for g in m.gateways}
    named |= {g for r in vs.tcp for m in r.matches for g in m.gateways}
    for key in sorted(named - {MESH} - set(vs.gateways)):
        if key not in mesh.gateways:
            yield Issue(vs.ref, "spec.http", f"a match names Gateway {key}, which does not exist", "warning")


def _selected(mesh: Mesh, gw: Gateway) -> list[Workload]:
    return [w for _, w in sorted(mesh.workloads.items()) if gw.selector and labels_match(gw.selector, w.labels)]


def _gateway(mesh: Mesh, gw: Gateway) -> Iterator[Issue]:
    pods = _selected(mesh, gw)
    if not pods:
        yield Issue(gw.ref, "spec.selector", "selects no Pod of the mesh: no gateway proxy receives this Gateway's "
                                             "certificates", "warning")
    namespaces = sorted({p.namespace for p in pods})
    for i, srv in enumerate(gw.servers):
        tls = srv.tls
        if tls is not None and tls.ca_cert_credential_name:
            for ns in namespaces:
                ca_name = tls.ca_cert_credential_name
                ca = credential_ca(mesh, ns, ca_name)
                if ca is None or ca.problem is not None:
                    yield Issue(gw.ref, f"spec.servers[{i}].tls.caCertCredentialName",
                                f"no usable CA in Secret {ns}/{ca_name} (ca.crt or cacert) or {ns}/{ca_name}-cacert "
                                "(the namespace of the gateway Pods): every client certificate is refused there "
                                "(fail closed)", "warning")
        if tls is None or not tls.credential_name or tls.mode == "PASSTHROUGH":
            continue
        name = tls.credential_name
        # a Gateway API certificateRef names its Secret's namespace; credentialName: the pods'
        for ns in [tls.credential_namespace] if tls.credential_namespace else namespaces:
            cred = mesh.credentials.get((ns, name))
            path = f"spec.servers[{i}].tls.credentialName"
            if cred is None or not (cred.cert_pem and cred.key_pem):
                yield Issue(gw.ref, path, f"no TLS Secret {ns}/{name} with a certificate and key (the namespace of "
                                          "the gateway Pods): this server's handshakes fail there (fail closed)", "warning")
            elif cred.problem is not None:
                yield Issue(gw.ref, path, f"Secret {ns}/{name} is unusable: {cred.problem}", "warning")
            elif tls.mode in ("MUTUAL", "OPTIONAL_MUTUAL") and credential_ca(mesh, ns, name) is None \
                    and not tls.ca_cert_credential_name:
                yield Issue(gw.ref, path, f"mode {tls.mode} needs a CA to verify clients: Secret {ns}/{name} has no "
                                          f"ca.crt and there is no {name}-cacert Secret", "warning")
