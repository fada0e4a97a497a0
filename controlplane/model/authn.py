"""RequestAuthentication (JWT) as IR values, and which ones apply to a workload or a
waypoint, the way Istio selects them. Pure data, no I/O.

Selection is AuthorizationPolicy's: every RequestAuthentication in the workload's namespace
whose selector matches its labels (no selector: all of them), plus every such one in the
root namespace; those with `targetRefs` apply to the waypoint (kind Gateway) or to the
services (kind Service) they name, not to sidecars. All the applying rules' jwtRules are
accepted (a request's token must satisfy one of them, or be absent).
"""

from __future__ import annotations

from collections.abc import Iterator

from controlplane.model.ir import (
    Hostname,
    Issue,
    JwtRule,
    Labels,
    RequestAuthentication,
    labels_match,
)
from controlplane.model.mesh import Mesh


def request_authentications_for(mesh: Mesh, namespace: str, labels: Labels) -> tuple[RequestAuthentication, ...]:
    """The RequestAuthentications that apply to a workload's sidecar, sorted by (namespace, name)."""
    return tuple(
        ra for ra in mesh.request_authentications
        if not ra.target_refs and ra.namespace in (namespace, mesh.root_namespace)
        and labels_match(ra.selector, labels)
    )


def waypoint_request_authentications(mesh: Mesh, namespace: str, waypoint: str, services: tuple[str, ...]
                                     ) -> tuple[RequestAuthentication, ...]:
    """Those a waypoint applies for `services` (names in `namespace`): attached to the
    waypoint itself (kind Gateway) or to one of the services."""
    wanted = {("Gateway", waypoint), *(("Service", s) for s in services)}
    return tuple(ra for ra in mesh.request_authentications
                 if ra.namespace == namespace and wanted & set(ra.target_refs))


def jwt_rules(ras: tuple[RequestAuthentication, ...]) -> tuple[JwtRule, ...]:
    """Every jwtRule of `ras`, in order, each distinct rule once."""
    return tuple(dict.fromkeys(r for ra in ras for r in ra.rules))


def issuers(rules: tuple[JwtRule, ...]) -> tuple[str, ...]:
    """The issuers whose tokens a proxy with `rules` validates, sorted, each once."""
    return tuple(sorted({r.issuer for r in rules}))


def check_request_authentications(mesh: Mesh) -> Iterator[Issue]:
    """Cross-object warnings: a jwksUri whose host is a ServiceEntry host Envoy cannot find by
    DNS (resolution STATIC or NONE): Envoy fetches keys by the URI's DNS name, not through the
    ServiceEntry's endpoints."""
    for ra in mesh.request_authentications:
        for i, rule in enumerate(ra.rules):
            uri = rule.jwks_uri
            svc = mesh.services.get(Hostname(uri.host)) if uri is not None else None
            if uri is None or svc is None or svc.entry is None or svc.entry.resolution not in ("STATIC", "NONE"):
                continue
            yield Issue(ra.ref, f"spec.jwtRules[{i}].jwksUri",
                        f"Envoy fetches the keys from {uri.host} found by DNS; the endpoints of the ServiceEntry for "
                        f"that host (resolution {svc.entry.resolution}) are not used", "warning")


def check_jwt_conditions(mesh: Mesh) -> Iterator[Issue]:
    """Cross-object warnings: an AuthorizationPolicy using request principals or
    `request.auth.*` where no RequestAuthentication could apply (none in its namespace or
    the root namespace; for a targetRefs policy, none attached to the same targets): no
    request there carries a validated token, so those attributes never match."""
    for ap in mesh.authorization_policies:
        uses = [f"spec.rules[{i}]" for i, r in enumerate(ap.rules)
                if any(s.request_principals or s.not_request_principals for s in r.sources)
                or any(c.key.startswith("request.auth.") for c in r.conditions)]
        if not uses:
            continue
        if ap.target_refs:
            found = any(ra.namespace == ap.namespace and set(ra.target_refs) & set(ap.target_refs)
                        for ra in mesh.request_authentications)
            where = "attached to the same targets"
        else:
            found = any(not ra.target_refs and ra.namespace in (ap.namespace, mesh.root_namespace)
                        for ra in mesh.request_authentications)
            where = f"in namespace {ap.namespace} or {mesh.root_namespace}"
        if not found:
            yield Issue(ap.ref, uses[0], f"uses request principals or request.auth attributes, but no "
                        f"RequestAuthentication is {where}: no request carries a validated JWT, so they never "
                        "match (notRequestPrincipals and notValues always do)", "warning")
