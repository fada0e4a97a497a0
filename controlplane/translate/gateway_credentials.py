"""Certificates of gateway proxies: the Secrets their servers' TLS names, served over SDS to
an authenticated gateway proxy by the runtime's identity planner (`controlplane.identityplan`).
Pure, no I/O (the material comes in the Mesh's credentials).

- An Istio Gateway server's `credentialName` is a Secret of the gateway proxy's own namespace
  (Istio's rule), named `kubernetes://<name>` (CA: `kubernetes://<name>-cacert`, or
  `caCertCredentialName`).
- A Gateway API listener's certificateRef is a Secret of the namespace it names (the
  Gateway's, or another one a ReferenceGrant permits: checked in
  `controlplane.model.gwgateways`, which serves no listener whose reference is refused),
  named `kubernetes-gateway://<namespace>/<name>`, so the two never name one secret.
- Only a proxy proven to be a pod the Gateway selects (`gateway_authorized`) receives real
  material; every other gateway proxy, and every name without a usable Secret, receives
  stand-ins that prove nothing (`controlplane.translate.secrets.withheld_*`), which also
  replace whatever Envoy held (fail closed).
"""

from __future__ import annotations

from controlplane.model.gateway_merge import selected_gateways
from controlplane.model.ir import Gateway, ProxyMeta
from controlplane.model.mesh import Mesh
from controlplane.model.validate_tls import credential_ca
from controlplane.translate.plan import SECRET, ResourceSpec
from controlplane.translate.secrets import (
    Credential,
    credential_ca_sds_name,
    credential_ca_secret,
    credential_sds_name,
    credential_secret,
    withheld_ca_secret,
    withheld_credential_secret,
)


def gateway_authorized(mesh: Mesh, meta: ProxyMeta, namespace: str, service_account: str) -> tuple[Gateway, ...]:
    """The Gateways of `meta` whose credentials the proxy may hold: those whose selector the
    labels of its pod (`meta.workload` in the mesh) include, when the proxy's authenticated
    identity (`namespace`, `service_account`) is that pod's; none otherwise (it then receives
    no gateway Secret). A Gateway with no selector selects every pod (as Istio); a Gateway API
    Gateway only pods of its own namespace."""
    pod = mesh.workload(namespace, meta.workload)
    if pod is None or pod.service_account != service_account:
        return ()
    have = dict(pod.labels)
    # A Gateway API Gateway's Secrets go only to a pod of the Gateway's own namespace, whatever
    # the pod's labels say (its certificateRefs name Secrets of fixed namespaces).
    return tuple(gw for gw in selected_gateways(mesh, meta) if all(have.get(k) == v for k, v in gw.selector)
                 and (not gw.own_namespace_only or namespace == gw.namespace))


GATEWAY_CREDENTIAL_PREFIX = "kubernetes-gateway://"
"""SDS names of Gateway API certificateRefs: `kubernetes-gateway://<namespace>/<name>` (the
Secret's own namespace, which need not be the proxy's), apart from Istio's `kubernetes://<name>`
(the proxy's namespace), so the two never name one secret."""


def server_credential_sds(namespace: str | None, name: str) -> str:
    """The SDS name of a server's certificate: `credentialName` (namespace None: the gateway
    proxy's namespace, as Istio) or a Gateway API certificateRef (its Secret's namespace)."""
    return credential_sds_name(name) if namespace is None else f"{GATEWAY_CREDENTIAL_PREFIX}{namespace}/{name}"


def server_ca_sds(namespace: str | None, name: str) -> str:
    return credential_ca_sds_name(name) if namespace is None else f"{GATEWAY_CREDENTIAL_PREFIX}{namespace}/{name}-cacert"


def gateway_credentials(mesh: Mesh, meta: ProxyMeta, namespace: str, service_account: str, system_ca: str
                        ) -> list[ResourceSpec]:
    """The certificate Secrets of the Gateways' servers for an authenticated proxy
    (`namespace`, `service_account`): an Istio server's `credentialName` from the gateway
    proxy's own namespace (Istio's rule), a Gateway API listener's certificateRef from the
    namespace it names (the Gateway's, or another one a ReferenceGrant permits: checked in
    `controlplane.model.gwgateways`, which serves no listener whose reference is refused).
    Only a proxy `gateway_authorized` admits gets the real material; any other gateway proxy,
    and any name whose Secret is missing or unusable, gets the fail-closed stand-ins
    (`withheld_credential_secret`: a certificate that proves nothing; `withheld_ca_secret`: a
    CA no client chains to), which also overwrite whatever Envoy held before (Envoy keeps a
    secret whose removal it is told of). A credential without a CA gets the stand-in CA, so a
    MUTUAL server refuses every client rather than trusting a default bundle."""
    gws = selected_gateways(mesh, meta)
    if not gws:
        return []
    allowed = gateway_authorized(mesh, meta, namespace, service_account)
    servers = [s for gw in gws for s in gw.servers]
    # a name is real only when a Gateway the pod is proven to be selected by names it
    real = {(s.tls.credential_namespace, s.tls.credential_name) for gw in allowed for s in gw.servers
            if s.tls is not None}
    real |= {(None, s.tls.ca_cert_credential_name) for gw in allowed for s in gw.servers if s.tls is not None}
    keys = sorted({(s.tls.credential_namespace, s.tls.credential_name) for s in servers
                   if s.tls is not None and s.tls.credential_name}, key=lambda k: (k[0] or "", k[1]))
    out: list[ResourceSpec] = []
    for ns, name in keys:
        secret_ns = ns if ns is not None else namespace
        sds, ca_sds = server_credential_sds(ns, name), server_ca_sds(ns, name)
        cred = mesh.credentials.get((secret_ns, name)) if (ns, name) in real else None
        usable = cred is not None and cred.problem is None and bool(cred.cert_pem and cred.key_pem)
        ca = credential_ca(mesh, secret_ns, name) if usable else None
        if cred is not None and usable:
            out.append(ResourceSpec(SECRET, sds, credential_secret,
                                    (name, Credential(cred.cert_pem, cred.key_pem), sds)))
        else:
            out.append(ResourceSpec(SECRET, sds, withheld_credential_secret, (name, sds)))
        if ca is not None and cred is not None:
            out.append(ResourceSpec(SECRET, ca_sds, credential_ca_secret,
                                    (name, ca.ca_pem, cred.crl_pem, system_ca, ca_sds)))
        else:
            out.append(ResourceSpec(SECRET, ca_sds, withheld_ca_secret, (name, ca_sds)))
    # Gateway API certificateRefs refused now (grant deleted, Secret gone): stand-ins, so a proxy
    # that held the key (a draining listener keeps its secret) has it overwritten.
    for ns, name in sorted({r for gw in gws for r in gw.withheld_credentials} - set(keys)):
        sds, ca_sds = server_credential_sds(ns, name), server_ca_sds(ns, name)
        out.append(ResourceSpec(SECRET, sds, withheld_credential_secret, (name, sds)))
        out.append(ResourceSpec(SECRET, ca_sds, withheld_ca_secret, (name, ca_sds)))
    # caCertCredentialName: a Secret holding only the CA that verifies clients (ca.crt/cacert, or
    # its <name>-cacert Secret), for a server whose credentialName (if any) may have none.
    taken = {name for ns, name in keys if ns is None}
    for name in sorted({s.tls.ca_cert_credential_name for s in servers
                        if s.tls is not None and s.tls.ca_cert_credential_name} - taken):
        ca_sds = server_ca_sds(None, name)
        ca = credential_ca(mesh, namespace, name) if (None, name) in real else None
        if ca is not None and ca.problem is None:
            out.append(ResourceSpec(SECRET, ca_sds, credential_ca_secret,
                                    (name, ca.ca_pem, ca.crl_pem, system_ca, ca_sds)))
        else:
            out.append(ResourceSpec(SECRET, ca_sds, withheld_ca_secret, (name, ca_sds)))
    return out
