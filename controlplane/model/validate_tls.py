"""Cross-object checks of DestinationRule TLS credentials (`credentialName`). Pure, no I/O.

As in Istio, a `credentialName` names a Secret in the namespace of each client proxy using
the rule; Meshline checks the rule's own namespace, where its clients are: a missing Secret,
or one whose material is unusable, is an error naming the rule and field. The rule stays in
force and fails closed: its clusters reference the credential over SDS, and a proxy without a
usable one receives stand-ins that refuse every server (`translate.secrets.withheld_*`), also
when the Secret is deleted after a proxy held it; no plaintext fallback exists.
"""

from __future__ import annotations

from collections.abc import Iterator

from controlplane.model.ambient import runs_sidecar
from controlplane.model.ir import ClientTLS, DestinationRule, Issue, TlsCredential, TrafficPolicy
from controlplane.model.mesh import Mesh


def credential_paths(dr: DestinationRule) -> Iterator[tuple[str, ClientTLS]]:
    """(field path, tls settings) of every tls of `dr` that names a credentialName."""

    def walk(tp: TrafficPolicy | None, path: str) -> Iterator[tuple[str, ClientTLS]]:
        if tp is None:
            return
        if tp.tls is not None and tp.tls.credential_name:
            yield f"{path}.tls.credentialName", tp.tls
        for i, pl in enumerate(tp.port_level):
            if pl.tls is not None and pl.tls.credential_name:
                yield f"{path}.portLevelSettings[{i}].tls.credentialName", pl.tls

    yield from walk(dr.traffic_policy, "spec.trafficPolicy")
    for i, s in enumerate(dr.subsets):
        yield from walk(s.traffic_policy, f"spec.subsets[{i}].trafficPolicy")


def credential_ca(mesh: Mesh, namespace: str, name: str) -> TlsCredential | None:
    """The Secret whose CA verifies servers for credential `name`: the credential itself when
    it has one, else Istio's separate `<name>-cacert` Secret."""
    cred = mesh.credentials.get((namespace, name))
    if cred is not None and cred.ca_pem:
        return cred
    other = mesh.credentials.get((namespace, f"{name}-cacert"))
    return other if other is not None and other.ca_pem and other.problem is None else None


def credential_problem(mesh: Mesh, namespace: str, tls: ClientTLS) -> str | None:
    name = tls.credential_name or ""
    cred = mesh.credentials.get((namespace, name))
    ca = mesh.credentials.get((namespace, f"{name}-cacert"))
    if cred is None and (tls.mode == "MUTUAL" or ca is None):
        return (f"Secret {namespace}/{name} with TLS keys (tls.crt/tls.key or cert/key) was not found: clients "
                f"in {namespace} get no client certificate and their connections fail (no plaintext fallback)")
    if cred is not None and cred.problem is not None:
        return f"Secret {namespace}/{name} is unusable ({cred.problem}): connections fail (no plaintext fallback)"
    if tls.mode == "MUTUAL" and cred is not None and not (cred.cert_pem and cred.key_pem):
        return (f"Secret {namespace}/{name} has no client certificate and key (tls.crt/tls.key or cert/key), "
                "which MUTUAL needs: connections fail (no plaintext fallback)")
    return None


def check_credentials(mesh: Mesh) -> Iterator[Issue]:
    """An error per credentialName whose Secret is missing or unusable in the rule's own
    namespace; a warning per other namespace whose sidecars use the rule (Istio's lookup
    order and `exportTo`) and lack the Secret there, since their connections fail too."""
    clients: list[str] | None = None
    for dr in sorted(mesh.destination_rules, key=lambda d: (d.namespace, d.name)):
        for path, tls in credential_paths(dr):
            problem = credential_problem(mesh, dr.namespace, tls)
            if problem is not None:
                yield Issue(dr.ref, path, problem)
            if clients is None:
                clients = sorted({wl.namespace for wl in mesh.workloads.values() if runs_sidecar(wl)})
            for ns in clients:
                if ns == dr.namespace or mesh.destination_rule(dr.host, ns) is not dr:
                    continue
                elsewhere = credential_problem(mesh, ns, tls)
                if elsewhere is not None:
                    yield Issue(dr.ref, path, f"sidecars in namespace {ns} use this rule, and a credentialName "
                                              f"names a Secret of the client's own namespace: {elsewhere}", "warning")
