"""CUSTOM AuthorizationPolicies -> Envoy's ext_authz filters, the way Istio builds them. Pure, no I/O.

A workload whose CUSTOM policies all name one usable extension provider
(`controlplane.model.meshconfig`) gets, before its AUDIT/DENY/ALLOW RBAC filters:

1. an RBAC filter in shadow mode (it never denies): one DENY-action shadow policy
   `istio-ext-authz-ns[<ns>]-policy[<name>]-rule[<i>]` per rule of those policies, with the
   shadow stat prefix `istio_ext_authz_`. When one matches, Envoy sets the dynamic metadata
   `envoy.filters.http.rbac: {istio_ext_authz_shadow_effective_policy_id: <policy>}`;
2. the ext_authz filter, enabled only when that metadata starts with `istio-ext-authz`
   (`filter_enabled_metadata`): requests no CUSTOM rule matches never reach the authorizer.

The authorizer is the provider's service, called through its outbound cluster
(`outbound|<port>||<host>`, which sidecar translation adds when the proxy's scope lacks it).
On TCP chains (the network RBAC and ext_authz filters) only an envoyExtAuthzGrpc provider can
be asked, as in Istio. Everything else fails closed: the CUSTOM policies stay DENY policies
with the same rules (an unknown or unresolvable provider, an HTTP provider on a TCP chain, a
workload with CUSTOM policies of two providers, which Istio refuses too).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from envoy.config.core.v3 import base_pb2, config_source_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2 as http_ext_authz_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.ext_authz.v3 import ext_authz_pb2 as network_ext_authz_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from envoy.type.matcher.v3 import metadata_pb2, string_pb2
from google.protobuf.message import Message

from controlplane.model.ir import AuthorizationPolicy, Hostname, Service
from controlplane.model.meshconfig import ExtAuthzProvider, MeshConfig, usable_provider
from controlplane.translate.names import duration_ms, outbound_cluster_name
from controlplane.translate.rbac import (
    HTTP_RBAC_FILTER,
    NETWORK_RBAC_FILTER,
    http_rbac_filters,
    network_rbac_filters,
    policy_name,
    rule_policy,
    string_matcher,
)

HTTP_EXT_AUTHZ_FILTER = "envoy.filters.http.ext_authz"
NETWORK_EXT_AUTHZ_FILTER = "envoy.filters.network.ext_authz"
SHADOW_POLICY_PREFIX = "istio-ext-authz"
SHADOW_STAT_PREFIX = "istio_ext_authz_"
SHADOW_POLICY_KEY = f"{SHADOW_STAT_PREFIX}shadow_effective_policy_id"


@dataclass(frozen=True, slots=True)
class ExtAuthzTarget:
    """A usable provider and where Envoy reaches its authorizer."""

    provider: ExtAuthzProvider
    cluster: str
    host: str


def custom_target(policies: Sequence[AuthorizationPolicy], config: MeshConfig,
                  services: Mapping[Hostname, Service]) -> ExtAuthzTarget | None:
    """The authorizer the CUSTOM policies among `policies` use; None (they deny) when there
    are none, when they name more than one provider, or when the provider is unusable."""
    names = {ap.provider for ap in policies if ap.provider is not None}
    if len(names) != 1:
        return None
    got = usable_provider(next(iter(names)), config, services)
    if isinstance(got, str):
        return None
    provider, svc, sp = got
    return ExtAuthzTarget(provider, outbound_cluster_name(sp.port, svc.hostname), svc.hostname)


def authorizer_targets(policies: Sequence[AuthorizationPolicy], config: MeshConfig,
                       services: Mapping[Hostname, Service]) -> list[tuple[Hostname, int]]:
    """(service host, port) of every usable provider some CUSTOM policy names, sorted."""
    out: set[tuple[Hostname, int]] = set()
    for name in {ap.provider for ap in policies if ap.provider is not None}:
        got = usable_provider(name, config, services)
        if not isinstance(got, str):
            out.add((got[1].hostname, got[2].port))
    return sorted(out)


def _split(policies: Sequence[AuthorizationPolicy], target: ExtAuthzTarget | None, tcp: bool
           ) -> tuple[list[AuthorizationPolicy], list[AuthorizationPolicy]]:
    """(CUSTOM policies sent to the authorizer, the rest: CUSTOM ones among them deny)."""
    if target is None or (tcp and target.provider.protocol != "grpc"):
        return [], list(policies)
    custom = [ap for ap in policies if ap.provider == target.provider.name]
    return custom, [ap for ap in policies if ap.provider != target.provider.name]


def _shadow_rules(custom: Sequence[AuthorizationPolicy], trust_domain: str, tcp: bool,
                  issuers: Sequence[str] = ()) -> rbac_pb2.RBAC:
    rules = rbac_pb2.RBAC(action=rbac_pb2.RBAC.DENY)
    for ap in custom:
        for i, rule in enumerate(ap.rules):
            rules.policies[f"{SHADOW_POLICY_PREFIX}-{policy_name(ap, i)}"].CopyFrom(
                rule_policy(rule, trust_domain, tcp, issuers))
    return rules


def _enabled_when(m: metadata_pb2.MetadataMatcher, rbac_filter: str) -> None:
    m.filter = rbac_filter
    m.path.add(key=SHADOW_POLICY_KEY)
    m.value.string_match.prefix = SHADOW_POLICY_PREFIX


def _patterns(out: string_pb2.ListStringMatcher, headers: Sequence[str]) -> None:
    for h in headers:
        out.patterns.append(string_matcher(h, ignore_case=True))


def http_ext_authz(target: ExtAuthzTarget) -> http_ext_authz_pb2.ExtAuthz:
    """The HTTP ext_authz filter for `target`, enabled by the shadow RBAC filter's metadata."""
    p = target.provider
    cfg = http_ext_authz_pb2.ExtAuthz(transport_api_version=config_source_pb2.V3, failure_mode_allow=p.fail_open,
                                      clear_route_cache=p.clear_route_cache)
    if p.status_on_error is not None:
        cfg.status_on_error.code = p.status_on_error  # type: ignore[assignment,unused-ignore]
    if p.request_body is not None:
        body = cfg.with_request_body
        body.max_request_bytes = p.request_body.max_request_bytes
        body.allow_partial_message = p.request_body.allow_partial_message
        body.pack_as_bytes = p.request_body.pack_as_bytes
    if p.protocol == "grpc":
        cfg.grpc_service.envoy_grpc.cluster_name = target.cluster
        cfg.grpc_service.envoy_grpc.authority = target.host
        cfg.grpc_service.timeout.CopyFrom(duration_ms(p.timeout_ms))
    else:
        svc = cfg.http_service
        svc.server_uri.uri = f"http://{target.host}:{p.port}"
        svc.server_uri.cluster = target.cluster
        svc.server_uri.timeout.CopyFrom(duration_ms(p.timeout_ms))
        svc.path_prefix = p.path_prefix
        if p.include_request_headers:
            _patterns(cfg.allowed_headers, p.include_request_headers)
        for k, v in p.include_additional_headers:
            svc.authorization_request.headers_to_add.append(base_pb2.HeaderValue(key=k, value=v))
        resp = svc.authorization_response
        if p.headers_to_upstream_on_allow:
            _patterns(resp.allowed_upstream_headers, p.headers_to_upstream_on_allow)
        if p.headers_to_downstream_on_deny:
            _patterns(resp.allowed_client_headers, p.headers_to_downstream_on_deny)
        if p.headers_to_downstream_on_allow:
            _patterns(resp.allowed_client_headers_on_success, p.headers_to_downstream_on_allow)
    _enabled_when(cfg.filter_enabled_metadata, HTTP_RBAC_FILTER)
    return cfg


def network_ext_authz(target: ExtAuthzTarget, stat_prefix: str) -> network_ext_authz_pb2.ExtAuthz:
    """The network ext_authz filter (gRPC providers only), enabled like the HTTP one."""
    p = target.provider
    cfg = network_ext_authz_pb2.ExtAuthz(stat_prefix=stat_prefix, failure_mode_allow=p.fail_open,
                                         transport_api_version=config_source_pb2.V3)
    cfg.grpc_service.envoy_grpc.cluster_name = target.cluster
    cfg.grpc_service.envoy_grpc.authority = target.host
    cfg.grpc_service.timeout.CopyFrom(duration_ms(p.timeout_ms))
    _enabled_when(cfg.filter_enabled_metadata, NETWORK_RBAC_FILTER)
    return cfg


def http_authz_filters(policies: Sequence[AuthorizationPolicy], trust_domain: str,
                       target: ExtAuthzTarget | None = None, issuers: Sequence[str] = ()) -> list[tuple[str, Message]]:
    """(filter name, config) of every authorization filter of an HTTP chain, in order: the
    CUSTOM shadow RBAC and ext_authz filters (with a usable `target`), then AUDIT, DENY, ALLOW.
    `issuers`: of the JWTs the proxy validates (`controlplane.translate.jwt`)."""
    custom, rest = _split(policies, target, tcp=False)
    out: list[tuple[str, Message]] = []
    if custom and target is not None and any(ap.rules for ap in custom):
        shadow = http_rbac_pb2.RBAC(shadow_rules_stat_prefix=SHADOW_STAT_PREFIX)
        shadow.shadow_rules.CopyFrom(_shadow_rules(custom, trust_domain, tcp=False, issuers=issuers))
        out += [(HTTP_RBAC_FILTER, shadow), (HTTP_EXT_AUTHZ_FILTER, http_ext_authz(target))]
    return out + list(http_rbac_filters(rest, trust_domain, issuers))


def network_authz_filters(policies: Sequence[AuthorizationPolicy], trust_domain: str, stat_prefix: str,
                          target: ExtAuthzTarget | None = None) -> list[tuple[str, Message]]:
    """The same for a TCP chain: a gRPC provider's network ext_authz filter, or none (then
    CUSTOM rules deny, as in Istio for an HTTP provider on TCP)."""
    custom, rest = _split(policies, target, tcp=True)
    out: list[tuple[str, Message]] = []
    if custom and target is not None and any(ap.rules for ap in custom):
        shadow = network_rbac_pb2.RBAC(stat_prefix=f"{stat_prefix}.custom.", shadow_rules_stat_prefix=SHADOW_STAT_PREFIX)
        shadow.shadow_rules.CopyFrom(_shadow_rules(custom, trust_domain, tcp=True))
        out += [(NETWORK_RBAC_FILTER, shadow), (NETWORK_EXT_AUTHZ_FILTER, network_ext_authz(target, f"{stat_prefix}."))]
    return out + list(network_rbac_filters(rest, trust_domain, stat_prefix))

