"""Gateway API `Gateway` and `GatewayClass` -> IR (`controlplane.model.gwapi`). Pure, no I/O.

Only Gateways of a GatewayClass whose controllerName is `meshline.io/gateway-controller`
are served (`controlplane.model.gwgateways`): their HTTP, HTTPS (TLS Terminate), TLS
(Passthrough) and TCP listeners become servers of the gateway proxy (`meshline bootstrap
--mode gateway`).
Fields Meshline does not implement are named in warnings.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from controlplane.model.convert_base import (
    Ctx,
    as_map,
    check_fields,
    child,
    get_list,
    get_port,
    get_str,
    index,
    is_dns_label,
    item_map,
    join,
)
from controlplane.model.gwapi import GATEWAY_GROUP, ApiGateway, GatewayClass, Listener

# --------------------------------------------------------------------------- Gateway, GatewayClass


_LISTENER_FIELDS = ("name", "hostname", "port", "protocol", "tls", "allowedRoutes")
_PROTOCOLS = ("HTTP", "HTTPS", "TLS", "TCP", "UDP")


def _generation(ctx: Ctx) -> int | None:
    meta = as_map(ctx, ctx.raw.body.get("metadata"), "metadata") or {}
    gen = meta.get("generation")
    return gen if isinstance(gen, int) and not isinstance(gen, bool) else None


def convert_gateway(ctx: Ctx, spec: Mapping[str, Any], namespace: str, name: str) -> ApiGateway | None:
    check_fields(ctx, spec, "spec", ("gatewayClassName", "listeners"), {
        "addresses": "addresses are not supported; ignored (the gateway proxy listens on every address of its "
                     "pod; expose it with a Service)",
        "infrastructure": "infrastructure is not supported; ignored (Meshline deploys nothing: run the proxy with "
                          "`meshline bootstrap --mode gateway`)",
        "backendTLS": "backendTLS is not supported; ignored (the gateway's client certificate to backends is its "
                      "mesh identity)",
        "allowedListeners": "allowedListeners (ListenerSets) is not supported; ignored"})
    class_name = get_str(ctx, spec, "gatewayClassName", "spec", required=True)
    listeners: list[Listener] = []
    names: set[str] = set()
    items = get_list(ctx, spec, "listeners", "spec")
    if not items:
        ctx.error("spec.listeners", "at least one listener is required")
    for i, item in enumerate(items):
        lst = _listener(ctx, item, index("spec.listeners", i), namespace)
        if lst is None:
            continue
        if lst.name in names:
            ctx.error(join(index("spec.listeners", i), "name"), f"duplicate listener name {lst.name!r}")
            continue
        names.add(lst.name)
        listeners.append(lst)
    if class_name is None:
        return None
    return ApiGateway(ctx.raw.ref, namespace, name, class_name, tuple(listeners), _generation(ctx))


def _listener(ctx: Ctx, value: object, path: str, namespace: str) -> Listener | None:
    m = item_map(ctx, value, path)
    if m is None:
        return None
    errors = ctx.error_count()
    check_fields(ctx, m, path, _LISTENER_FIELDS)
    name = get_str(ctx, m, "name", path, required=True)
    hostname = get_str(ctx, m, "hostname", path)
    port = get_port(ctx, m, "port", path, required=True)
    protocol = get_str(ctx, m, "protocol", path, required=True)
    if name is not None and not is_dns_label(name):
        ctx.error(join(path, "name"), f"{name!r} is not a valid listener name (a DNS label)")
    if hostname is not None:
        bare = hostname[2:] if hostname.startswith("*.") else hostname
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*", bare):
            ctx.error(join(path, "hostname"), f"{hostname!r} is not a valid hostname (a DNS name, optionally *.)")
    if protocol is not None and protocol not in _PROTOCOLS and "/" not in protocol:
        ctx.error(join(path, "protocol"), f"unsupported protocol {protocol!r} (expected {', '.join(_PROTOCOLS)} "
                  "or a domain-prefixed protocol)")
    tls_mode: str | None = None
    refs: list[tuple[str, str, str, str]] = []
    tm = child(ctx, m, "tls", path)
    if tm is not None:
        tp = join(path, "tls")
        check_fields(ctx, tm, tp, ("mode", "certificateRefs"), {
            "frontendValidation": "frontendValidation (client certificates) is not supported; ignored: clients "
                                  "are not asked for a certificate",
            "options": "tls options are not supported; ignored"})
        tls_mode = get_str(ctx, tm, "mode", tp) or "Terminate"
        if tls_mode not in ("Terminate", "Passthrough"):
            ctx.error(join(tp, "mode"), f"must be Terminate or Passthrough, got {tls_mode!r}")
        for i, item in enumerate(get_list(ctx, tm, "certificateRefs", tp)):
            rp = index(join(tp, "certificateRefs"), i)
            rm = item_map(ctx, item, rp)
            if rm is None:
                continue
            check_fields(ctx, rm, rp, ("group", "kind", "name", "namespace"))
            rname = get_str(ctx, rm, "name", rp, required=True)
            if rname is not None:
                refs.append((get_str(ctx, rm, "group", rp) or "", get_str(ctx, rm, "kind", rp) or "Secret",
                             get_str(ctx, rm, "namespace", rp) or namespace, rname))
    if protocol == "HTTPS" and tls_mode != "Passthrough" and not refs and ctx.error_count() == errors:
        ctx.error(join(path, "tls.certificateRefs"), "an HTTPS listener that terminates TLS needs a certificateRef")
    if protocol == "TLS" and tm is None:
        ctx.error(join(path, "tls"), "a TLS listener needs tls (mode Passthrough, with TLSRoutes)")
    if tls_mode == "Passthrough" and refs:
        ctx.warn(join(path, "tls.certificateRefs"), "ignored with mode Passthrough: the backends present their own "
                 "certificates")
    allowed, kinds = "Same", []
    selector: tuple[tuple[str, str], ...] = ()
    am = child(ctx, m, "allowedRoutes", path)
    if am is not None:
        ap = join(path, "allowedRoutes")
        check_fields(ctx, am, ap, ("namespaces", "kinds"))
        nm = child(ctx, am, "namespaces", ap)
        if nm is not None:
            np_ = join(ap, "namespaces")
            check_fields(ctx, nm, np_, ("from", "selector"))
            allowed = get_str(ctx, nm, "from", np_) or "Same"
            if allowed not in ("Same", "All", "Selector"):
                ctx.error(join(np_, "from"), f"must be Same, All or Selector, got {allowed!r}")
            sm = child(ctx, nm, "selector", np_)
            if sm is not None:
                sp = join(np_, "selector")
                check_fields(ctx, sm, sp, ("matchLabels",), {
                    "matchExpressions": "matchExpressions are not supported: no namespace matches this selector"})
                selector = tuple(sorted((str(k), str(v)) for k, v in (as_map(ctx, sm.get("matchLabels"),
                                                                            join(sp, "matchLabels")) or {}).items()))
                if sm.get("matchExpressions"):
                    selector = (("meshline.io/unsupported-match-expressions", "true"),)
            elif allowed == "Selector":
                ctx.error(join(np_, "selector"), "is required when from is Selector")
        for i, item in enumerate(get_list(ctx, am, "kinds", ap)):
            kp = index(join(ap, "kinds"), i)
            km = item_map(ctx, item, kp)
            if km is None:
                continue
            check_fields(ctx, km, kp, ("group", "kind"))
            kind = get_str(ctx, km, "kind", kp, required=True)
            group = get_str(ctx, km, "group", kp)
            if kind is not None and group in (None, GATEWAY_GROUP):
                kinds.append(kind)
    if ctx.error_count() != errors or name is None or port is None or protocol is None:
        return None
    return Listener(name, port, protocol, hostname, tls_mode, tuple(refs), allowed, selector, tuple(kinds))


def convert_gateway_class(ctx: Ctx, spec: Mapping[str, Any], name: str) -> GatewayClass | None:
    check_fields(ctx, spec, "spec", ("controllerName", "description"), {
        "parametersRef": "parametersRef is not supported; ignored"})
    controller = get_str(ctx, spec, "controllerName", "spec", required=True)
    if controller is None:
        return None
    return GatewayClass(ctx.raw.ref, name, controller, _generation(ctx))
