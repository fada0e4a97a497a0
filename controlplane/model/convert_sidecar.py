"""Sidecar spec (Istio's public v1 schema, egress scoping only) -> IR. Pure, no I/O.

Accepted as `networking.meshline.io/v1` or Istio's `networking.istio.io/v1`, `v1beta1`
or `v1alpha3`. What a Sidecar does in Meshline: its `egress[].hosts` limit which services
the selected sidecars receive (clusters, endpoints, virtual hosts, listeners); see
`controlplane.model.scope`.

Errors (each naming its field path): unknown fields; a `workloadSelector` without labels;
an empty Sidecar; an egress listener without hosts; a host not of the form
`namespace/dnsName` (namespace `.`, `*`, `~` or a namespace name; dnsName `*`,
`*.suffix` or a host name; `~` only as `~/*`); a bad port number, protocol or name; two
egress listeners on one port, or a catch-all listener (no port) that is not the only one
and the last.

`outboundTrafficPolicy.mode`: REGISTRY_ONLY makes the selected sidecars (with intercept
capture) refuse destinations outside their scope, as Istio does (unknown TCP destinations go
to a cluster without endpoints, unknown HTTP hosts get 502); the registry includes
ServiceEntry hosts, so an entry the egress scope imports is admitted. ALLOW_ANY is the default. Its
`egressProxy` is warned about and ignored (unknown destinations then pass through).

Accepted with a warning and ignored (not supported yet): `ingress`,
`inboundConnectionPool`, and `bind`/`captureMode` of an egress listener (and a port's
`targetPort`). A host name that is not fully qualified only ever
matches a service of that exact name, so it is warned about too.

An egress listener's `port.name` is a label (as in Istio: it changes no Envoy config);
`port.protocol` is checked against the services imported on that port
(`validate_istio`): Meshline keeps each service port's own protocol, so a different one is
warned about.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from controlplane.model.convert_base import (
    Ctx,
    check_fields,
    child,
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
from controlplane.model.ir import EgressHost, Labels, Sidecar, SidecarEgress

_UNSUPPORTED = "is not supported yet; ignored"
SPEC_FIELDS = ("workloadSelector", "egress", "outboundTrafficPolicy")
SPEC_IGNORED = {
    "ingress": f"ingress {_UNSUPPORTED} (inbound listeners follow the workload's Services)",
    "inboundConnectionPool": f"inboundConnectionPool {_UNSUPPORTED}",
}
OUTBOUND_MODES = ("ALLOW_ANY", "REGISTRY_ONLY")
EGRESS_FIELDS = ("hosts", "port")
EGRESS_IGNORED = {
    "bind": f"bind {_UNSUPPORTED}",
    "captureMode": f"captureMode {_UNSUPPORTED}",
}
PORT_FIELDS = ("number", "protocol", "name")
PORT_IGNORED = {"targetPort": f"targetPort {_UNSUPPORTED}"}
PROTOCOLS = ("HTTP", "HTTPS", "HTTP2", "GRPC", "GRPC-WEB", "TCP", "TLS", "MONGO", "MYSQL", "REDIS", "UDP")
"""Istio's port protocols (case-insensitive). Meshline scopes by port number and keeps each
service port's own protocol; a listener protocol that differs is warned about (validation)."""
NAMESPACE_WILDCARDS = (".", "*", "~")


def egress_host_problem(text: str) -> str | None:
    """Why `text` is not an Istio Sidecar egress host (`namespace/dnsName`), or None."""
    ns, sep, host = text.partition("/")
    if not sep:
        return f"{text!r} is not of the form namespace/dnsName (e.g. './*', 'istio-system/*')"
    if ns not in NAMESPACE_WILDCARDS and not is_dns_label(ns):
        return f"{text!r}: namespace {ns!r} is not '.', '*', '~' or a namespace name"
    if ns == "~" and host != "*":
        return f"{text!r}: '~' (no namespace) imports nothing; write '~/*'"
    if host == "*":
        return None
    if "/" in host:
        return f"{text!r} is not of the form namespace/dnsName (one '/' only)"
    name = host[2:] if host.startswith("*.") else host
    if "*" in name:
        return f"{text!r}: a wildcard is only allowed as '*' or as a '*.' prefix (e.g. '*/*.example.com')"
    problem = host_problem(name)
    return None if problem is None else f"{text!r}: {problem}"


def _hosts(ctx: Ctx, m: Mapping[str, Any], path: str) -> tuple[EgressHost, ...]:
    p = join(path, "hosts")
    given = m.get("hosts")
    items = get_str_list(ctx, m, "hosts", path)
    if given is None or (isinstance(given, list | tuple) and not given):
        ctx.error(p, "at least one host is required (e.g. './*')")
        return ()
    out: list[EgressHost] = []
    for i, text in enumerate(items):
        problem = egress_host_problem(text)
        if problem is not None:
            ctx.error(index(p, i), problem)
            continue
        ns, _, host = text.partition("/")
        host = host.rstrip(".").lower()
        if host != "*" and not host.startswith("*.") and "." not in host:
            ctx.warn(index(p, i), f"{text!r} is not fully qualified: it matches only a service whose host name is "
                     f"exactly {host!r} (write e.g. '{ns}/{host}.<namespace>.svc.cluster.local')")
        entry = EgressHost(ns, host)
        if entry not in out:
            out.append(entry)
    return tuple(out)


def _port(ctx: Ctx, m: Mapping[str, Any], path: str) -> tuple[int | None, str | None, str | None]:
    pm = child(ctx, m, "port", path)
    if pm is None:
        return None, None, None
    p = join(path, "port")
    check_fields(ctx, pm, p, PORT_FIELDS, PORT_IGNORED)
    number = get_port(ctx, pm, "number", p, required=True)
    protocol = get_str(ctx, pm, "protocol", p)
    if protocol is not None:
        if protocol.upper() not in PROTOCOLS:
            ctx.error(join(p, "protocol"), f"unknown protocol {protocol!r} (expected one of {', '.join(PROTOCOLS)})")
            protocol = None
        else:
            protocol = protocol.upper()
    name = get_str(ctx, pm, "name", p)
    if name is not None and not is_dns_label(name):
        ctx.error(join(p, "name"), f"{name!r} is not a valid port name (lower-case letters, digits and '-')")
        name = None
    return number, protocol, name


def _egress(ctx: Ctx, spec: Mapping[str, Any]) -> tuple[SidecarEgress, ...]:
    out: list[SidecarEgress] = []
    ports: dict[int, int] = {}
    catch_all: list[int] = []
    items = get_list(ctx, spec, "egress", "spec")
    for i, item in enumerate(items):
        p = index("spec.egress", i)
        m = item_map(ctx, item, p)
        if m is None:
            continue
        check_fields(ctx, m, p, EGRESS_FIELDS, EGRESS_IGNORED)
        hosts = _hosts(ctx, m, p)
        number, protocol, name = _port(ctx, m, p)
        if m.get("port") is None:
            catch_all.append(i)
        elif number is not None:
            if number in ports:
                ctx.error(join(p, "port.number"), f"port {number} is already used by spec.egress[{ports[number]}]; "
                          "egress ports must be unique")
            ports.setdefault(number, i)
        out.append(SidecarEgress(hosts, number, protocol, name))
    if len(catch_all) > 1:
        ctx.error(index("spec.egress", catch_all[1]), "only one egress listener may omit the port (the catch-all); "
                  f"spec.egress[{catch_all[0]}] already does")
    elif catch_all and catch_all[0] != len(items) - 1:
        ctx.error(index("spec.egress", catch_all[0]), "the egress listener without a port (the catch-all) must be "
                  "the last one")
    return tuple(out)


def _selector(ctx: Ctx, spec: Mapping[str, Any]) -> Labels:
    sel = child(ctx, spec, "workloadSelector", "spec")
    if sel is None:
        return ()
    check_fields(ctx, sel, "spec.workloadSelector", ("labels",))
    labels = get_labels(ctx, sel, "labels", "spec.workloadSelector")
    if not sel.get("labels"):
        ctx.error("spec.workloadSelector.labels", "must name at least one label (omit workloadSelector to apply "
                  "the Sidecar to the whole namespace)")
    return labels


def convert_sidecar(ctx: Ctx, namespace: str, name: str) -> Sidecar | None:
    spec = child(ctx, ctx.raw.body, "spec", "")
    if spec is None:
        if ctx.raw.body.get("spec") is None:
            ctx.error("spec", "is required")
        return None
    check_fields(ctx, spec, "spec", SPEC_FIELDS, SPEC_IGNORED)
    if not any(spec.get(k) is not None for k in (*SPEC_FIELDS, *SPEC_IGNORED)):
        ctx.error("spec", "empty Sidecar: set egress (and optionally workloadSelector)")
        return None
    selector = _selector(ctx, spec)
    egress = _egress(ctx, spec)
    registry_only = _outbound_policy(ctx, spec)
    if not egress and not ctx.failed:
        ctx.warn("spec.egress", "no egress: these sidecars inherit the egress of the namespace or mesh default "
                 "Sidecar (all services when there is none)")
        if registry_only:
            ctx.warn("spec.outboundTrafficPolicy", "applies only together with egress (the Sidecar whose egress "
                     "scopes a proxy also decides its outbound traffic policy); ignored here")
    return Sidecar(ctx.raw.ref, namespace, name, selector, egress, registry_only)


def _outbound_policy(ctx: Ctx, spec: Mapping[str, Any]) -> bool:
    """`outboundTrafficPolicy`: True for REGISTRY_ONLY."""
    p = "spec.outboundTrafficPolicy"
    om = child(ctx, spec, "outboundTrafficPolicy", "spec")
    if om is None:
        return False
    check_fields(ctx, om, p, ("mode",), {"egressProxy": f"egressProxy {_UNSUPPORTED} (with ALLOW_ANY, unknown "
                                                        "destinations pass through directly)"})
    mode = get_str(ctx, om, "mode", p) or "ALLOW_ANY"
    if mode not in OUTBOUND_MODES:
        ctx.error(join(p, "mode"), f"unknown mode {mode!r} (expected one of {', '.join(OUTBOUND_MODES)})")
        return False
    if mode == "REGISTRY_ONLY" and om.get("egressProxy") is not None:
        ctx.error(join(p, "egressProxy"), "is only valid with mode ALLOW_ANY")
    return mode == "REGISTRY_ONLY"
