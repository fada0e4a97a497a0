"""PeerAuthentication and AuthorizationPolicy specs -> IR. Pure, no I/O.

Both follow Istio's public v1 schema (`security.meshline.io/v1`, or Istio's
`security.istio.io/v1` / `v1beta1`). Unknown fields are errors naming their path; so are
values Istio's own validation rejects: a bad mTLS mode, port-level mTLS without a workload
selector, an invalid CIDR or port, a `when` key Meshline does not know, an empty source or
operation, a wildcard anywhere but at the start or end of a value.

`action: CUSTOM` (external authorization) needs `provider.name`, an extension provider of
the mesh config (`--mesh-config`, Istio's MeshConfig `extensionProviders`, see
`controlplane.model.meshconfig`). The IR keeps the provider's name with action DENY: where
the provider is usable, sidecars send the requests the rules match to its authorizer (Envoy's
ext_authz, before DENY and ALLOW policies, as Istio); where it is not (unknown name, service
not in the mesh, a TCP port with an HTTP provider, a workload with policies of two
providers), the rules deny, the way Istio fails closed ("will generate deny configs for the
specified rules"). An unknown provider is reported by the cross-object checks.

Accepted with a warning:
- `targetRef`/`targetRefs` (they attach a policy to a gateway or waypoint, not to
  sidecars): the policy is ignored;

Request (JWT) principals and `request.auth.principal` / `.audiences` / `.presenter` /
`.claims[NAME]` (nested: `.claims[a][b]`) conditions match the token a RequestAuthentication
of the workload validated (`controlplane.translate.jwt`); a request without one has no request
principal or claims. Where no RequestAuthentication applies, `requestPrincipals` (and
`values` of such a condition) never match and `notRequestPrincipals` (and `notValues`) always
do: an ALLOW rule that needs a JWT allows nothing (Istio's behaviour for a request without a
token).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from controlplane.model.convert_base import (
    Ctx,
    check_fields,
    child,
    get_labels,
    get_list,
    get_str,
    get_str_list,
    index,
    is_dns_label,
    is_header_name,
    item_map,
    join,
)
from controlplane.model.ir import (
    MTLS_MODES,
    AuthorizationPolicy,
    AuthzAction,
    AuthzCondition,
    AuthzOperation,
    AuthzRule,
    AuthzSource,
    Labels,
    MtlsMode,
    PeerAuthentication,
)

PA_SPEC_FIELDS = ("selector", "mtls", "portLevelMtls")
AP_SPEC_FIELDS = ("selector", "action", "rules", "targetRef", "targetRefs", "provider")
TARGET_REF_FIELDS = ("group", "kind", "name", "namespace")
TARGET_KINDS = {"Gateway": ("gateway.networking.k8s.io",), "Service": ("", "core")}
ACTIONS = ("ALLOW", "DENY", "AUDIT", "CUSTOM")
SOURCE_FIELDS = (
    "principals",
    "notPrincipals",
    "requestPrincipals",
    "notRequestPrincipals",
    "namespaces",
    "notNamespaces",
    "serviceAccounts",
    "notServiceAccounts",
    "ipBlocks",
    "notIpBlocks",
    "remoteIpBlocks",
    "notRemoteIpBlocks",
    "trustDomains",
    "notTrustDomains",
)
OPERATION_FIELDS = ("hosts", "notHosts", "ports", "notPorts", "methods", "notMethods", "paths", "notPaths")
CONDITION_KEYS = (
    "request.headers[NAME]",
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "destination.port",
    "destination.ip",
    "connection.sni",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "request.auth.claims[NAME]",
)
"""The `when` keys Meshline enforces."""
HTTP_ONLY_CONDITIONS = ("request.headers[",)
_HEADER_KEY = re.compile(r"request\.headers\[(.*)\]")
_SA_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
_CLAIM_KEY = re.compile(r"request\.auth\.claims((?:\[[^\[\]]+\])+)")


# --------------------------------------------------------------------------- shared


def _selector(ctx: Ctx, spec: Mapping[str, Any]) -> Labels:
    sel = child(ctx, spec, "selector", "spec")
    if sel is None:
        return ()
    check_fields(ctx, sel, "spec.selector", ("matchLabels",))
    return get_labels(ctx, sel, "matchLabels", "spec.selector")


def _spec(ctx: Ctx) -> Mapping[str, Any] | None:
    spec = child(ctx, ctx.raw.body, "spec", "")
    if spec is None and ctx.raw.body.get("spec") is None:
        ctx.error("spec", "is required")
    return spec


def wildcard_problem(value: str) -> str | None:
    """Why `value` is not an Istio match string (exact, `prefix*`, `*suffix` or `*`)."""
    if not value:
        return "must not be empty"
    if value == "*":
        return None
    inner = value[1:] if value.startswith("*") else value
    inner = inner[:-1] if inner.endswith("*") and not value.startswith("*") else inner
    if "*" in inner:
        return f"{value!r}: '*' is only allowed alone, at the start or at the end"
    return None


def _patterns(ctx: Ctx, m: Mapping[str, Any], key: str, path: str) -> tuple[str, ...]:
    out: list[str] = []
    p = join(path, key)
    for i, v in enumerate(get_str_list(ctx, m, key, path)):
        problem = wildcard_problem(v)
        if problem is not None:
            ctx.error(index(p, i), problem)
            continue
        out.append(v)
    return tuple(out)


def cidr(value: str) -> str | None:
    """`value` (an IP address or CIDR block) as a normalised CIDR, or None if invalid."""
    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError:
        return None


_T = TypeVar("_T")


def _parsed_list(ctx: Ctx, m: Mapping[str, Any], key: str, path: str, parse: Callable[[str], _T | None],
                 problem: str) -> tuple[_T, ...]:
    """The string list `key`, each item parsed; an item that does not parse is an error
    (`problem` completes "'<item>' ...") and is left out."""
    out: list[_T] = []
    p = join(path, key)
    for i, v in enumerate(get_str_list(ctx, m, key, path)):
        parsed = parse(v)
        if parsed is None:
            ctx.error(index(p, i), f"{v!r} {problem}")
            continue
        out.append(parsed)
    return tuple(out)


def _cidrs(ctx: Ctx, m: Mapping[str, Any], key: str, path: str) -> tuple[str, ...]:
    return _parsed_list(ctx, m, key, path, cidr, "is not an IP address or CIDR block (e.g. 10.0.0.0/8)")


def port_number(value: str) -> int | None:
    if not value.isdigit():
        return None
    n = int(value)
    return n if 1 <= n <= 65535 else None


def _ports(ctx: Ctx, m: Mapping[str, Any], key: str, path: str) -> tuple[int, ...]:
    return _parsed_list(ctx, m, key, path, port_number, "is not a port number between 1 and 65535")


# --------------------------------------------------------------------------- PeerAuthentication


def _mode(ctx: Ctx, m: Mapping[str, Any], path: str) -> MtlsMode:
    text = get_str(ctx, m, "mode", path)
    if text is None:
        return "UNSET"
    for mode in MTLS_MODES:
        if text == mode:
            return mode
    ctx.error(join(path, "mode"), f"unknown mTLS mode {text!r} (expected one of {', '.join(MTLS_MODES)})")
    return "UNSET"


def convert_peer_authentication(ctx: Ctx, namespace: str, name: str) -> PeerAuthentication | None:
    spec = _spec(ctx)
    if spec is None:
        return None
    check_fields(ctx, spec, "spec", PA_SPEC_FIELDS)
    selector = _selector(ctx, spec)
    mode: MtlsMode = "UNSET"
    mtls = child(ctx, spec, "mtls", "spec")
    if mtls is not None:
        check_fields(ctx, mtls, "spec.mtls", ("mode",))
        mode = _mode(ctx, mtls, "spec.mtls")
    port_level: dict[int, MtlsMode] = {}
    levels = child(ctx, spec, "portLevelMtls", "spec")
    if levels is not None:
        if levels and not selector:
            ctx.error("spec.portLevelMtls", "port-level mTLS needs a workload selector (spec.selector.matchLabels)")
        for key, value in levels.items():
            p = join("spec.portLevelMtls", str(key))
            entry = item_map(ctx, value, p)
            if entry is None:
                continue
            check_fields(ctx, entry, p, ("mode",))
            port_mode = _mode(ctx, entry, p)
            port = port_number(str(key)) if isinstance(key, str | int) and not isinstance(key, bool) else None
            if port is None:
                ctx.error(p, f"{key!r} is not a port number between 1 and 65535")
                continue
            if port in port_level:
                ctx.error(p, f"port {port} is listed twice")
                continue
            port_level[port] = port_mode
    return PeerAuthentication(
        ref=ctx.raw.ref,
        namespace=namespace,
        name=name,
        selector=selector,
        mode=mode,
        port_level=tuple(sorted(port_level.items())),
    )


# --------------------------------------------------------------------------- AuthorizationPolicy


def _service_accounts(ctx: Ctx, m: Mapping[str, Any], key: str, path: str, namespace: str) -> tuple[str, ...]:
    out: list[str] = []
    p = join(path, key)
    for i, v in enumerate(get_str_list(ctx, m, key, path)):
        ns, _, sa = v.rpartition("/")
        ns = ns or namespace
        if not is_dns_label(ns) or len(sa) > 253 or _SA_NAME.fullmatch(sa) is None:
            ctx.error(index(p, i), f"{v!r} is not a service account (`namespace/name`, or `name` in this namespace)")
            continue
        out.append(f"{ns}/{sa}")
    return tuple(out)


def _source(ctx: Ctx, m: Mapping[str, Any], path: str, namespace: str) -> AuthzSource | None:
    sm = child(ctx, m, "source", path)
    p = join(path, "source")
    if sm is None:
        if m.get("source") is None:
            ctx.error(p, "is required")
        return None
    check_fields(ctx, sm, p, SOURCE_FIELDS)
    if not any(sm.get(k) for k in SOURCE_FIELDS):
        ctx.error(p, "must set at least one field (omit `from` to match every source)")
    return AuthzSource(
        principals=_patterns(ctx, sm, "principals", p),
        not_principals=_patterns(ctx, sm, "notPrincipals", p),
        request_principals=_patterns(ctx, sm, "requestPrincipals", p),
        not_request_principals=_patterns(ctx, sm, "notRequestPrincipals", p),
        namespaces=_patterns(ctx, sm, "namespaces", p),
        not_namespaces=_patterns(ctx, sm, "notNamespaces", p),
        service_accounts=_service_accounts(ctx, sm, "serviceAccounts", p, namespace),
        not_service_accounts=_service_accounts(ctx, sm, "notServiceAccounts", p, namespace),
        ip_blocks=_cidrs(ctx, sm, "ipBlocks", p),
        not_ip_blocks=_cidrs(ctx, sm, "notIpBlocks", p),
        remote_ip_blocks=_cidrs(ctx, sm, "remoteIpBlocks", p),
        not_remote_ip_blocks=_cidrs(ctx, sm, "notRemoteIpBlocks", p),
        trust_domains=_trust_domains(ctx, sm, "trustDomains", p),
        not_trust_domains=_trust_domains(ctx, sm, "notTrustDomains", p),
    )


def _trust_domains(ctx: Ctx, m: Mapping[str, Any], key: str, path: str) -> tuple[str, ...]:
    """Trust domains (Istio: exact, `abc*` prefix, `*abc` suffix or `*` presence) of the peer
    certificate's SPIFFE ID `spiffe://<trust domain>/...`."""
    out: list[str] = []
    for i, v in enumerate(_patterns(ctx, m, key, path)):
        if (not v.strip("*") and v != "*") or "/" in v or any(c.isspace() for c in v):
            ctx.error(index(join(path, key), i), f"{v!r} is not a trust domain (a name such as cluster.local, "
                                                 "with `*` at its start or end)")
            continue
        out.append(v)
    return tuple(out)


def _operation(ctx: Ctx, m: Mapping[str, Any], path: str) -> AuthzOperation | None:
    om = child(ctx, m, "operation", path)
    p = join(path, "operation")
    if om is None:
        if m.get("operation") is None:
            ctx.error(p, "is required")
        return None
    check_fields(ctx, om, p, OPERATION_FIELDS)
    if not any(om.get(k) for k in OPERATION_FIELDS):
        ctx.error(p, "must set at least one field (omit `to` to match every operation)")
    return AuthzOperation(
        hosts=_patterns(ctx, om, "hosts", p),
        not_hosts=_patterns(ctx, om, "notHosts", p),
        ports=_ports(ctx, om, "ports", p),
        not_ports=_ports(ctx, om, "notPorts", p),
        methods=_patterns(ctx, om, "methods", p),
        not_methods=_patterns(ctx, om, "notMethods", p),
        paths=_patterns(ctx, om, "paths", p),
        not_paths=_patterns(ctx, om, "notPaths", p),
    )


def _condition_values(ctx: Ctx, key: str, cm: Mapping[str, Any], field: str, p: str) -> tuple[str, ...]:
    if key in ("source.ip", "remote.ip", "destination.ip"):
        return _cidrs(ctx, cm, field, p)
    if key == "destination.port":
        return tuple(str(n) for n in _ports(ctx, cm, field, p))
    return _patterns(ctx, cm, field, p)


def _condition(ctx: Ctx, item: object, p: str) -> AuthzCondition | None:
    cm = item_map(ctx, item, p)
    if cm is None:
        return None
    check_fields(ctx, cm, p, ("key", "values", "notValues"))
    key = get_str(ctx, cm, "key", p, required=True)
    if not cm.get("values") and not cm.get("notValues"):
        ctx.error(p, "set values or notValues (or both)")
    if key is None:
        get_str_list(ctx, cm, "values", p)
        get_str_list(ctx, cm, "notValues", p)
        return None
    header = _HEADER_KEY.fullmatch(key)
    if header is not None:
        if not header.group(1) or not is_header_name(header.group(1)):
            ctx.error(join(p, "key"), f"{key!r}: {header.group(1)!r} is not a valid header name")
            return None
        key = f"request.headers[{header.group(1).lower()}]"
    elif key.startswith("request.auth.claims"):
        if _CLAIM_KEY.fullmatch(key) is None:
            ctx.error(join(p, "key"), f"{key!r}: expected request.auth.claims[NAME] (nested: "
                                      "request.auth.claims[NAME][NAME])")
            return None
    elif key not in CONDITION_KEYS:
        ctx.error(join(p, "key"), f"unknown or unsupported key {key!r} (supported: {', '.join(CONDITION_KEYS)})")
        return None
    values = _condition_values(ctx, key, cm, "values", p)
    not_values = _condition_values(ctx, key, cm, "notValues", p)
    return AuthzCondition(key, values, not_values)


def _rule(ctx: Ctx, item: object, p: str, namespace: str) -> AuthzRule | None:
    rm = item_map(ctx, item, p)
    if rm is None:
        return None
    check_fields(ctx, rm, p, ("from", "to", "when"))
    sources = []
    for i, f in enumerate(get_list(ctx, rm, "from", p)):
        fp = index(join(p, "from"), i)
        fm = item_map(ctx, f, fp)
        if fm is None:
            continue
        check_fields(ctx, fm, fp, ("source",))
        src = _source(ctx, fm, fp, namespace)
        if src is not None:
            sources.append(src)
    operations = []
    for i, t in enumerate(get_list(ctx, rm, "to", p)):
        tp = index(join(p, "to"), i)
        tm = item_map(ctx, t, tp)
        if tm is None:
            continue
        check_fields(ctx, tm, tp, ("operation",))
        op = _operation(ctx, tm, tp)
        if op is not None:
            operations.append(op)
    conditions = []
    for i, w in enumerate(get_list(ctx, rm, "when", p)):
        cond = _condition(ctx, w, index(join(p, "when"), i))
        if cond is not None:
            conditions.append(cond)
    return AuthzRule(tuple(sources), tuple(operations), tuple(conditions))


def convert_authorization_policy(ctx: Ctx, namespace: str, name: str) -> AuthorizationPolicy | None:
    spec = _spec(ctx)
    if spec is None:
        return None
    check_fields(ctx, spec, "spec", AP_SPEC_FIELDS)
    selector = _selector(ctx, spec)
    targets = [k for k in ("selector", "targetRef", "targetRefs") if spec.get(k) is not None]
    if len(targets) > 1:
        ctx.error("spec", f"set at most one of selector, targetRef and targetRefs (got {', '.join(targets)})")
    action_text = get_str(ctx, spec, "action", "spec") or "ALLOW"
    if action_text not in ACTIONS:
        ctx.error("spec.action", f"unknown action {action_text!r} (expected one of {', '.join(ACTIONS)})")
    if spec.get("provider") is not None and action_text != "CUSTOM":
        ctx.error("spec.provider", "is only valid with action CUSTOM")
    rules = []
    for i, item in enumerate(get_list(ctx, spec, "rules", "spec")):
        rule = _rule(ctx, item, index("spec.rules", i), namespace)
        if rule is not None:
            rules.append(rule)
    provider: str | None = None
    pm = child(ctx, spec, "provider", "spec")
    if pm is not None:
        check_fields(ctx, pm, "spec.provider", ("name",))
        provider = get_str(ctx, pm, "name", "spec.provider", required=True)
    if action_text == "CUSTOM" and spec.get("provider") is None:
        ctx.error("spec.provider", "is required with action CUSTOM (the name of an extension provider of the "
                  "mesh config)")
    target_refs = _target_refs(ctx, spec, namespace)
    action: AuthzAction = ("DENY" if action_text in ("DENY", "CUSTOM") else "AUDIT" if action_text == "AUDIT"
                           else "ALLOW")
    return AuthorizationPolicy(
        ref=ctx.raw.ref,
        namespace=namespace,
        name=name,
        selector=selector,
        action=action,
        rules=tuple(rules),
        target_refs=target_refs,
        provider=provider if action_text == "CUSTOM" else None,
    )


def _target_refs(ctx: Ctx, spec: Mapping[str, Any], namespace: str) -> tuple[tuple[str, str], ...]:
    """`targetRef`/`targetRefs`: waypoints (Gateway) or Services of the policy's namespace."""
    items: list[tuple[str, Any]] = []
    if spec.get("targetRef") is not None:
        items.append(("spec.targetRef", spec.get("targetRef")))
    for i, item in enumerate(get_list(ctx, spec, "targetRefs", "spec")):
        items.append((index("spec.targetRefs", i), item))
    out: list[tuple[str, str]] = []
    for path, item in items:
        m = item_map(ctx, item, path)
        if m is None:
            continue
        check_fields(ctx, m, path, TARGET_REF_FIELDS)
        kind = get_str(ctx, m, "kind", path, required=True) or ""
        name = get_str(ctx, m, "name", path, required=True) or ""
        group = get_str(ctx, m, "group", path) or ""
        ns = get_str(ctx, m, "namespace", path)
        if kind not in TARGET_KINDS:
            ctx.error(join(path, "kind"), f"unsupported target kind {kind!r} (expected Gateway for a waypoint, "
                                          "or Service)")
        elif group not in TARGET_KINDS[kind]:
            ctx.error(join(path, "group"), f"unexpected group {group!r} for kind {kind}")
        if ns is not None and ns != namespace:
            ctx.error(join(path, "namespace"), "must be the policy's own namespace")
        if kind and name:
            out.append((kind, name))
    return tuple(sorted(set(out)))
