"""AuthorizationPolicy -> Envoy RBAC filters for a sidecar's inbound traffic. Pure, no I/O.

Istio's evaluation, one RBAC filter per action in this order: AUDIT (action LOG: marks
matching requests for the access log, allows everything), DENY (deny what any DENY policy
matches), ALLOW (present as soon as one ALLOW policy applies: deny what no ALLOW policy
matches; with no rule at all it denies everything). Each rule of each policy becomes one
Envoy policy named `ns[<ns>]-policy[<name>]-rule[<i>]`:

- sources (`from`) are ORed, the fields of a source ANDed, the values of a field ORed;
  `not*` fields negate; likewise operations (`to`); `when` conditions are all ANDed;
- principals `td/ns/x/sa/y` match the peer certificate's URI SAN `spiffe://td/ns/x/sa/y`
  (`cluster.local` means the mesh's own trust domain); `*` is any authenticated peer, and
  `abc*` / `*abc` are prefix / suffix matches; namespaces and service accounts match the
  SPIFFE URI's `/ns/<ns>/sa/<sa>` part, trust domains its `spiffe://<td>/` part (same
  wildcards). Plaintext peers have no principal;
- paths match the URL path without the query (`/a/*` prefix, `*/b` suffix, exact
  otherwise), methods the `:method` header, hosts the `:authority` header
  (case-insensitively, with or without a port), ports the destination port;
- request principals and `request.auth.*` conditions match the JWT the proxy's JWT filter
  validated (`controlplane.translate.jwt`; `issuers`: the issuers it validates, none: no
  request has a request principal).

On a TCP chain (the network RBAC filter) HTTP-only attributes cannot be evaluated; as in
Istio it fails closed: an ALLOW rule using them never matches, while in DENY and AUDIT rules
they count as matching (so the rest of the rule decides).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from envoy.config.core.v3 import address_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from envoy.type.matcher.v3 import string_pb2

from controlplane.model.convert_base import regex_problem
from controlplane.model.ir import (
    DEFAULT_TRUST_DOMAIN,
    AuthorizationPolicy,
    AuthzAction,
    AuthzRule,
    AuthzSource,
)
from controlplane.model.policy import http_only_attributes, is_http_only_key
from controlplane.translate.jwt import claim, claim_path, request_principal

HTTP_RBAC_FILTER = "envoy.filters.http.rbac"
NETWORK_RBAC_FILTER = "envoy.filters.network.rbac"
ACTION_ORDER: tuple[tuple[AuthzAction, rbac_pb2.RBAC.Action.ValueType], ...] = (
    ("AUDIT", rbac_pb2.RBAC.LOG),
    ("DENY", rbac_pb2.RBAC.DENY),
    ("ALLOW", rbac_pb2.RBAC.ALLOW),
)
_NS_PART = "[^/]+"
_REGEX_SPECIAL = frozenset("\\.^$|?*+()[]{}")


def quote(text: str) -> str:
    """`text` as an RE2 literal (only regex metacharacters are escaped)."""
    return "".join(f"\\{c}" if c in _REGEX_SPECIAL else c for c in text)


# --------------------------------------------------------------------------- matchers


def string_matcher(value: str, *, prefix: str = "", ignore_case: bool = False) -> string_pb2.StringMatcher:
    """Istio's match forms: `*` presence, `*abc` suffix, `abc*` prefix, else exact; `prefix`
    is what every matched value starts with (e.g. `spiffe://`), prepended to the pattern."""
    m = string_pb2.StringMatcher(ignore_case=ignore_case)
    if value == "*":
        m.ClearField("ignore_case")
        m.safe_regex.regex = f"{quote(prefix)}.+"
    elif value.startswith("*"):
        m.suffix = value[1:]  # what is matched always starts with `prefix`
    elif value.endswith("*"):
        m.prefix = prefix + value[:-1]
    else:
        m.exact = prefix + value
    return m


_R = TypeVar("_R", rbac_pb2.Principal, rbac_pb2.Permission)
_V = TypeVar("_V", str, int)  # an operation field's values: hosts, methods, paths (str), ports (int)


def _is_any(m: rbac_pb2.Principal | rbac_pb2.Permission) -> bool:
    if isinstance(m, rbac_pb2.Permission):
        return m.WhichOneof("rule") == "any"
    return m.WhichOneof("identifier") == "any"


def _combine(items: Sequence[_R], cls: type[_R], group: str, members: str, all_of: bool) -> _R:
    """OR (`all_of` False) or AND of RBAC principals or permissions, folding `any`: an OR
    with an `any` member is `any`; `any` members of an AND drop out (an empty AND is `any`)."""
    if all_of:
        items = [i for i in items if not _is_any(i)]
        if not items:
            return cls(any=True)
    elif any(_is_any(i) for i in items):
        return cls(any=True)
    if len(items) == 1:
        return items[0]
    out = cls()
    getattr(getattr(out, group), members).extend(items)
    return out


def _one_of_principals(ids: Sequence[rbac_pb2.Principal]) -> rbac_pb2.Principal:
    return _combine(ids, rbac_pb2.Principal, "or_ids", "ids", all_of=False)


def _all_of_principals(ids: Sequence[rbac_pb2.Principal]) -> rbac_pb2.Principal:
    return _combine(ids, rbac_pb2.Principal, "and_ids", "ids", all_of=True)


def _not_principal(inner: rbac_pb2.Principal) -> rbac_pb2.Principal:
    p = rbac_pb2.Principal()
    p.not_id.CopyFrom(inner)
    return p


def _never_principal() -> rbac_pb2.Principal:
    return _not_principal(rbac_pb2.Principal(any=True))


def _one_of_permissions(rules: Sequence[rbac_pb2.Permission]) -> rbac_pb2.Permission:
    return _combine(rules, rbac_pb2.Permission, "or_rules", "rules", all_of=False)


def _all_of_permissions(rules: Sequence[rbac_pb2.Permission]) -> rbac_pb2.Permission:
    return _combine(rules, rbac_pb2.Permission, "and_rules", "rules", all_of=True)


def _not_permission(inner: rbac_pb2.Permission) -> rbac_pb2.Permission:
    p = rbac_pb2.Permission()
    p.not_rule.CopyFrom(inner)
    return p


def _authenticated(m: string_pb2.StringMatcher) -> rbac_pb2.Principal:
    p = rbac_pb2.Principal()
    p.authenticated.principal_name.CopyFrom(m)
    return p


def principal_id(value: str, trust_domain: str) -> rbac_pb2.Principal:
    """A `principals` value (`td/ns/x/sa/y`, with Istio wildcards) as a peer identity match."""
    if value.startswith(f"{DEFAULT_TRUST_DOMAIN}/"):
        value = trust_domain + value[len(DEFAULT_TRUST_DOMAIN):]
    return _authenticated(string_matcher(value, prefix="spiffe://"))


def _name_regex(value: str) -> str:
    """A namespace or service-account pattern as a regex for one URI path segment."""
    if value == "*":
        return _NS_PART
    if value.startswith("*"):
        return f"[^/]*{quote(value[1:])}"
    if value.endswith("*"):
        return f"{quote(value[:-1])}[^/]*"
    return quote(value)


def _identity_regex(ns: str, sa: str) -> string_pb2.StringMatcher:
    strict = f"spiffe://{_NS_PART}/ns/{ns}/sa/{sa}"
    m = string_pb2.StringMatcher()
    # Envoy rejects regexes over RE2's program-size limit: long names get the shorter form.
    m.safe_regex.regex = strict if regex_problem(strict) is None else f".*/ns/{ns}/sa/{sa}"
    return m


def namespace_id(value: str) -> rbac_pb2.Principal:
    return _authenticated(_identity_regex(_name_regex(value), _NS_PART))


def trust_domain_id(value: str, trust_domain: str) -> rbac_pb2.Principal:
    """A `trustDomains` value (Istio's wildcards) as a match on the trust domain of the peer's
    SPIFFE ID (`cluster.local` means the mesh's own trust domain, as in principals)."""
    if value == DEFAULT_TRUST_DOMAIN:
        value = trust_domain
    if value.startswith("*") and value != "*":
        pattern = f"[^/]*{quote(value[1:])}"
    elif value.endswith("*"):
        pattern = f"{quote(value[:-1])}[^/]*"
    else:
        return _authenticated(string_matcher(f"{value}/*", prefix="spiffe://"))
    m = string_pb2.StringMatcher()
    m.safe_regex.regex = f"spiffe://{pattern}/.*"
    return _authenticated(m)


def service_account_id(value: str, trust_domain: str) -> rbac_pb2.Principal:
    ns, _, sa = value.partition("/")
    return _authenticated(string_matcher(f"{trust_domain}/ns/{ns}/sa/{sa}", prefix="spiffe://"))


def _cidr(value: str) -> address_pb2.CidrRange:
    address, _, length = value.partition("/")
    r = address_pb2.CidrRange(address_prefix=address)
    r.prefix_len.value = int(length)
    return r


def _direct_ip(value: str) -> rbac_pb2.Principal:
    p = rbac_pb2.Principal()
    p.direct_remote_ip.CopyFrom(_cidr(value))
    return p


def _remote_ip(value: str) -> rbac_pb2.Principal:
    p = rbac_pb2.Principal()
    p.remote_ip.CopyFrom(_cidr(value))
    return p


def _header(name: str, value: str, *, ignore_case: bool = False) -> rc.HeaderMatcher:
    h = rc.HeaderMatcher(name=name)
    if value == "*":
        h.present_match = True
    else:
        h.string_match.CopyFrom(string_matcher(value, ignore_case=ignore_case))
    return h


def _header_permission(h: rc.HeaderMatcher) -> rbac_pb2.Permission:
    p = rbac_pb2.Permission()
    p.header.CopyFrom(h)
    return p


def _host_permissions(value: str) -> list[rbac_pb2.Permission]:
    """`:authority` matches for one host, with or without a `:port`."""
    out = [_header_permission(_header(":authority", value, ignore_case=True))]
    if value == "*" or value.endswith("*") or ":" in value:
        return out
    with_port = rc.HeaderMatcher(name=":authority")
    if value.startswith("*"):
        with_port.string_match.contains = f"{value[1:]}:"
    else:
        with_port.string_match.prefix = f"{value}:"
    with_port.string_match.ignore_case = True
    out.append(_header_permission(with_port))
    return out


def _path_permission(value: str) -> rbac_pb2.Permission:
    if value == "*":
        return rbac_pb2.Permission(any=True)
    p = rbac_pb2.Permission()
    p.url_path.path.CopyFrom(string_matcher(value))
    return p


def _port_permission(port: int) -> rbac_pb2.Permission:
    return rbac_pb2.Permission(destination_port=port)


def _destination_ip(value: str) -> rbac_pb2.Permission:
    p = rbac_pb2.Permission()
    p.destination_ip.CopyFrom(_cidr(value))
    return p


def _sni(value: str) -> rbac_pb2.Permission:
    p = rbac_pb2.Permission()
    p.requested_server_name.CopyFrom(string_matcher(value))
    return p


# --------------------------------------------------------------------------- rules


def _principal_field(out: list[rbac_pb2.Principal], values: Sequence[str], negate: bool,
                     make: Callable[[str], rbac_pb2.Principal | list[rbac_pb2.Principal]]) -> None:
    if not values:
        return
    ids: list[rbac_pb2.Principal] = []
    for v in values:
        made = make(v)
        ids += made if isinstance(made, list) else [made]
    either = _one_of_principals(ids)
    out.append(_not_principal(either) if negate else either)


def _permission_field(out: list[rbac_pb2.Permission], values: Sequence[_V], negate: bool,
                      make: Callable[[_V], rbac_pb2.Permission | list[rbac_pb2.Permission]]) -> None:
    if not values:
        return
    rules: list[rbac_pb2.Permission] = []
    for v in values:
        made = make(v)
        rules += made if isinstance(made, list) else [made]
    either = _one_of_permissions(rules)
    out.append(_not_permission(either) if negate else either)


def _source(src: AuthzSource, td: str, tcp: bool, issuers: Sequence[str] = ()) -> rbac_pb2.Principal:
    parts: list[rbac_pb2.Principal] = []
    _principal_field(parts, src.principals, False, lambda v: principal_id(v, td))
    _principal_field(parts, src.not_principals, True, lambda v: principal_id(v, td))
    _principal_field(parts, src.namespaces, False, namespace_id)
    _principal_field(parts, src.not_namespaces, True, namespace_id)
    _principal_field(parts, src.service_accounts, False, lambda v: service_account_id(v, td))
    _principal_field(parts, src.not_service_accounts, True, lambda v: service_account_id(v, td))
    _principal_field(parts, src.ip_blocks, False, _direct_ip)
    _principal_field(parts, src.not_ip_blocks, True, _direct_ip)
    _principal_field(parts, src.remote_ip_blocks, False, _remote_ip)
    _principal_field(parts, src.not_remote_ip_blocks, True, _remote_ip)
    _principal_field(parts, src.trust_domains, False, lambda v: trust_domain_id(v, td))
    _principal_field(parts, src.not_trust_domains, True, lambda v: trust_domain_id(v, td))
    if not tcp:  # (on TCP they are HTTP-only attributes)
        _principal_field(parts, src.request_principals, False, lambda v: request_principal(v, issuers))
        _principal_field(parts, src.not_request_principals, True, lambda v: request_principal(v, issuers))
    return _all_of_principals(parts)


def rule_policy(rule: AuthzRule, td: str, tcp: bool, issuers: Sequence[str] = ()) -> rbac_pb2.Policy:
    """One Envoy policy for `rule`, the one place an AuthorizationPolicy rule becomes Envoy
    RBAC (the RBAC filters here and the CUSTOM shadow rules of `translate.extauthz` use it).
    With `tcp`, HTTP-only attributes are left out (they count as matching); the caller drops
    ALLOW rules that have any."""
    principals: list[rbac_pb2.Principal] = []
    permissions: list[rbac_pb2.Permission] = []
    if rule.sources:
        principals.append(_one_of_principals([_source(s, td, tcp, issuers) for s in rule.sources]))
    if rule.operations:
        ops: list[rbac_pb2.Permission] = []
        for op in rule.operations:
            parts: list[rbac_pb2.Permission] = []
            if not tcp:
                _permission_field(parts, op.hosts, False, _host_permissions)
                _permission_field(parts, op.not_hosts, True, _host_permissions)
                _permission_field(parts, op.methods, False,
                                  lambda v: _header_permission(_header(":method", v)))
                _permission_field(parts, op.not_methods, True,
                                  lambda v: _header_permission(_header(":method", v)))
                _permission_field(parts, op.paths, False, _path_permission)
                _permission_field(parts, op.not_paths, True, _path_permission)
            _permission_field(parts, op.ports, False, _port_permission)
            _permission_field(parts, op.not_ports, True, _port_permission)
            ops.append(_all_of_permissions(parts))
        permissions.append(_one_of_permissions(ops))
    for cond in rule.conditions:
        key = cond.key
        if tcp and is_http_only_key(key):
            continue
        if key.startswith("request.headers["):
            name = key[len("request.headers["):-1]

            def header_id(v: str, name: str = name) -> rbac_pb2.Principal:
                p = rbac_pb2.Principal()
                p.header.CopyFrom(_header(name, v))
                return p

            _principal_field(principals, cond.values, False, header_id)
            _principal_field(principals, cond.not_values, True, header_id)
        elif key == "request.auth.principal":
            _principal_field(principals, cond.values, False, lambda v: request_principal(v, issuers))
            _principal_field(principals, cond.not_values, True, lambda v: request_principal(v, issuers))
        elif key.startswith("request.auth."):
            path = claim_path(key)

            def claim_id(v: str, path: tuple[str, ...] = path) -> rbac_pb2.Principal:
                return claim(path, None if v == "*" else string_matcher(v), issuers)

            _principal_field(principals, cond.values, False, claim_id)
            _principal_field(principals, cond.not_values, True, claim_id)
        elif key == "source.ip":
            _principal_field(principals, cond.values, False, _direct_ip)
            _principal_field(principals, cond.not_values, True, _direct_ip)
        elif key == "remote.ip":
            _principal_field(principals, cond.values, False, _remote_ip)
            _principal_field(principals, cond.not_values, True, _remote_ip)
        elif key == "source.namespace":
            _principal_field(principals, cond.values, False, namespace_id)
            _principal_field(principals, cond.not_values, True, namespace_id)
        elif key == "source.principal":
            _principal_field(principals, cond.values, False, lambda v: principal_id(v, td))
            _principal_field(principals, cond.not_values, True, lambda v: principal_id(v, td))
        elif key == "destination.port":
            _permission_field(permissions, [int(v) for v in cond.values], False, _port_permission)
            _permission_field(permissions, [int(v) for v in cond.not_values], True, _port_permission)
        elif key == "destination.ip":
            _permission_field(permissions, cond.values, False, _destination_ip)
            _permission_field(permissions, cond.not_values, True, _destination_ip)
        elif key == "connection.sni":
            _permission_field(permissions, cond.values, False, _sni)
            _permission_field(permissions, cond.not_values, True, _sni)
    policy = rbac_pb2.Policy()
    policy.permissions.append(_all_of_permissions(permissions))
    policy.principals.append(_all_of_principals(principals))
    return policy


def policy_name(ap: AuthorizationPolicy, index: int) -> str:
    return f"ns[{ap.namespace}]-policy[{ap.name}]-rule[{index}]"


def rbac_rules(policies: Sequence[AuthorizationPolicy], trust_domain: str, *, tcp: bool,
               issuers: Sequence[str] = ()) -> list[tuple[AuthzAction, rbac_pb2.RBAC]]:
    """The RBAC configurations to enforce, in evaluation order. DENY and AUDIT appear only
    when they have a rule; ALLOW as soon as one ALLOW policy applies (an ALLOW RBAC without
    policies denies everything)."""
    out: list[tuple[AuthzAction, rbac_pb2.RBAC]] = []
    for action, envoy_action in ACTION_ORDER:
        applying = [ap for ap in policies if ap.action == action]
        if not applying:
            continue
        rules = rbac_pb2.RBAC(action=envoy_action)
        for ap in applying:
            for i, rule in enumerate(ap.rules):
                if tcp and action == "ALLOW" and http_only_attributes(rule):
                    continue  # fails closed: this rule allows nothing on TCP
                rules.policies[policy_name(ap, i)].CopyFrom(rule_policy(rule, trust_domain, tcp, issuers))
        if action != "ALLOW" and not rules.policies:
            continue
        out.append((action, rules))
    return out


def http_rbac_filters(policies: Sequence[AuthorizationPolicy], trust_domain: str, issuers: Sequence[str] = ()
                      ) -> list[tuple[str, http_rbac_pb2.RBAC]]:
    """(filter name, config) of the HTTP RBAC filters, in order (`issuers`: of the JWTs the
    proxy validates)."""
    out = []
    for _, rules in rbac_rules(policies, trust_domain, tcp=False, issuers=issuers):
        cfg = http_rbac_pb2.RBAC()
        cfg.rules.CopyFrom(rules)
        out.append((HTTP_RBAC_FILTER, cfg))
    return out


def network_rbac_filters(policies: Sequence[AuthorizationPolicy], trust_domain: str, stat_prefix: str
                         ) -> list[tuple[str, network_rbac_pb2.RBAC]]:
    """(filter name, config) of the network RBAC filters for a TCP chain, in order."""
    out = []
    for action, rules in rbac_rules(policies, trust_domain, tcp=True):
        cfg = network_rbac_pb2.RBAC(stat_prefix=f"{stat_prefix}.{action.lower()}.")
        cfg.rules.CopyFrom(rules)
        out.append((NETWORK_RBAC_FILTER, cfg))
    return out
