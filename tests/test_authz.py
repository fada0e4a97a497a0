"""AuthorizationPolicy semantics as the generated Envoy RBAC filters enforce them.

The RBAC configurations built by `controlplane.translate.rbac` are evaluated here by a small
model of Envoy's RBAC matching (the matchers Meshline uses), against requests described as
data, so each test states a policy and what happens to a request: DENY before ALLOW, an
ALLOW policy without rules denies everything, no ALLOW policy allows everything, AUDIT
changes nothing, L7 rules on a TCP port fail closed (and say so in validation).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

import pytest
import re2
import yaml
from envoy.config.rbac.v3 import rbac_pb2
from envoy.type.matcher.v3 import string_pb2

from controlplane.model.convert import convert
from controlplane.model.ir import AuthorizationPolicy
from controlplane.model.raw import RawObject
from controlplane.model.store import MeshStore
from controlplane.sources.base import Replace
from controlplane.sources.yamlload import parse_documents
from controlplane.translate.rbac import http_rbac_filters, network_rbac_filters, rbac_rules


@dataclass(frozen=True)
class Request:
    """What Envoy knows about a request (or, with tcp=True, a TCP connection)."""

    principal: str | None = "spiffe://cluster.local/ns/shop/sa/client"  # None: plaintext
    source_ip: str = "10.0.0.5"
    remote_ip: str | None = None  # the original client (X-Forwarded-For); default: source_ip
    port: int = 8080
    dest_ip: str = "10.0.1.1"
    sni: str = ""
    method: str = "GET"
    path: str = "/"
    headers: dict[str, str] = field(default_factory=dict)
    authority: str = "web"


def _string(m: string_pb2.StringMatcher, value: str | None) -> bool:
    if value is None:
        return False
    kind = m.WhichOneof("match_pattern")
    v, target = (value.lower(), getattr(m, kind).lower()) if m.ignore_case and kind != "safe_regex" else (
        value, getattr(m, kind) if kind != "safe_regex" else m.safe_regex.regex)
    if kind == "exact":
        return v == target
    if kind == "prefix":
        return v.startswith(target)
    if kind == "suffix":
        return v.endswith(target)
    if kind == "contains":
        return target in v
    assert kind == "safe_regex"
    return re2.fullmatch(target, value) is not None


def _cidr(r: Any, ip: str) -> bool:
    return ipaddress.ip_address(ip) in ipaddress.ip_network(f"{r.address_prefix}/{r.prefix_len.value}")


def _header(h: Any, req: Request) -> bool:
    values = {":method": req.method, ":authority": req.authority, ":path": req.path, **req.headers}
    value = values.get(h.name)
    if h.HasField("present_match"):
        return value is not None
    return _string(h.string_match, value)


def permission(p: rbac_pb2.Permission, req: Request) -> bool:
    kind = p.WhichOneof("rule")
    if kind == "any":
        return True
    if kind == "and_rules":
        return all(permission(r, req) for r in p.and_rules.rules)
    if kind == "or_rules":
        return any(permission(r, req) for r in p.or_rules.rules)
    if kind == "not_rule":
        return not permission(p.not_rule, req)
    if kind == "destination_port":
        return req.port == p.destination_port
    if kind == "destination_ip":
        return _cidr(p.destination_ip, req.dest_ip)
    if kind == "requested_server_name":
        return _string(p.requested_server_name, req.sni)
    if kind == "header":
        return _header(p.header, req)
    if kind == "url_path":
        return _string(p.url_path.path, req.path.split("?")[0])
    raise AssertionError(f"unexpected permission {kind}")


def principal(p: rbac_pb2.Principal, req: Request) -> bool:
    kind = p.WhichOneof("identifier")
    if kind == "any":
        return True
    if kind == "and_ids":
        return all(principal(i, req) for i in p.and_ids.ids)
    if kind == "or_ids":
        return any(principal(i, req) for i in p.or_ids.ids)
    if kind == "not_id":
        return not principal(p.not_id, req)
    if kind == "authenticated":
        return req.principal is not None and _string(p.authenticated.principal_name, req.principal)
    if kind == "direct_remote_ip":
        return _cidr(p.direct_remote_ip, req.source_ip)
    if kind == "remote_ip":
        return _cidr(p.remote_ip, req.remote_ip or req.source_ip)
    if kind == "header":
        return _header(p.header, req)
    raise AssertionError(f"unexpected principal {kind}")


def matches(rules: rbac_pb2.RBAC, req: Request) -> list[str]:
    return sorted(
        name for name, pol in rules.policies.items()
        if any(permission(p, req) for p in pol.permissions) and any(principal(i, req) for i in pol.principals)
    )


def allowed(policies: list[AuthorizationPolicy], req: Request, *, tcp: bool = False) -> bool:
    """Envoy's decision through the RBAC filters Meshline builds, in order."""
    for action, rules in rbac_rules(policies, "cluster.local", tcp=tcp):
        hit = bool(matches(rules, req))
        if action == "DENY" and hit:
            return False
        if action == "ALLOW" and not hit:
            return False
    return True


def policies(text: str) -> list[AuthorizationPolicy]:
    out = []
    for doc in yaml.safe_load_all(text):
        doc.setdefault("apiVersion", "security.meshline.io/v1")
        doc.setdefault("kind", "AuthorizationPolicy")
        meta = doc.setdefault("metadata", {})
        meta.setdefault("namespace", "shop")
        value, issues = convert(RawObject("AuthorizationPolicy", doc["apiVersion"], meta["namespace"], meta["name"], doc))
        assert isinstance(value, AuthorizationPolicy), [i.format() for i in issues]
        out.append(value)
    return out


# --------------------------------------------------------------------------- evaluation order


def test_no_allow_policy_allows_everything() -> None:
    assert allowed([], Request())
    deny = policies("metadata: {name: d}\nspec: {action: DENY, rules: [{to: [{operation: {paths: [/x]}}]}]}")
    assert allowed(deny, Request(path="/y")) and not allowed(deny, Request(path="/x"))


def test_an_allow_policy_without_rules_denies_everything() -> None:
    nothing = policies("metadata: {name: allow-nothing}\nspec: {}")
    assert not allowed(nothing, Request())
    assert not allowed(nothing, Request(), tcp=True)
    everything = policies("metadata: {name: allow-all}\nspec: {rules: [{}]}")
    assert allowed(everything, Request()) and allowed(everything, Request(principal=None), tcp=True)


def test_deny_is_evaluated_before_allow() -> None:
    both = policies("""
metadata: {name: allow-all}
spec: {rules: [{}]}
---
metadata: {name: no-delete}
spec: {action: DENY, rules: [{to: [{operation: {methods: [DELETE]}}]}]}
""")
    assert allowed(both, Request(method="GET"))
    assert not allowed(both, Request(method="DELETE"))
    names = [a for a, _ in rbac_rules(both, "cluster.local", tcp=False)]
    assert names == ["DENY", "ALLOW"]


def test_once_an_allow_exists_what_no_allow_matches_is_denied() -> None:
    ps = policies("""
metadata: {name: a}
spec: {rules: [{to: [{operation: {paths: ["/a/*"]}}]}]}
---
metadata: {name: b}
spec: {rules: [{to: [{operation: {paths: ["/b"]}}]}]}
""")
    assert allowed(ps, Request(path="/a/1")) and allowed(ps, Request(path="/b?q=1"))
    assert not allowed(ps, Request(path="/c"))


def test_audit_logs_without_deciding() -> None:
    audit = policies("metadata: {name: audit}\nspec: {action: AUDIT, rules: [{to: [{operation: {methods: [POST]}}]}]}")
    ((action, rules),) = rbac_rules(audit, "cluster.local", tcp=False)
    assert action == "AUDIT" and rules.action == rbac_pb2.RBAC.LOG
    assert matches(rules, Request(method="POST")) and allowed(audit, Request(method="POST"))
    deny_nothing = policies("metadata: {name: d}\nspec: {action: DENY}")
    assert rbac_rules(deny_nothing, "cluster.local", tcp=False) == []  # a DENY without rules is a no-op


# --------------------------------------------------------------------------- attributes


def test_principals_namespaces_and_service_accounts() -> None:
    ps = policies("""
metadata: {name: p}
spec:
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/client, "*/sa/admin", "cluster.local/ns/ops/*"]}}]
  - from: [{source: {namespaces: ["prod-*"], notNamespaces: [prod-test]}}]
  - from: [{source: {serviceAccounts: [batch, billing/cron]}}]
""")
    ok = [
        "spiffe://cluster.local/ns/shop/sa/client",
        "spiffe://cluster.local/ns/any/sa/admin",
        "spiffe://cluster.local/ns/ops/sa/x",
        "spiffe://cluster.local/ns/prod-eu/sa/web",
        "spiffe://cluster.local/ns/shop/sa/batch",
        "spiffe://cluster.local/ns/billing/sa/cron",
    ]
    bad = [
        "spiffe://cluster.local/ns/shop/sa/other",
        "spiffe://cluster.local/ns/prod-test/sa/web",
        "spiffe://cluster.local/ns/production/sa/web",
        "spiffe://cluster.local/ns/other/sa/batch",
    ]
    assert all(allowed(ps, Request(principal=p)) for p in ok)
    assert not any(allowed(ps, Request(principal=p)) for p in bad)
    assert not allowed(ps, Request(principal=None))  # plaintext peers have no identity


def test_any_authenticated_peer_and_the_local_trust_domain() -> None:
    ps = policies("metadata: {name: p}\nspec: {rules: [{from: [{source: {principals: ['*']}}]}]}")
    assert allowed(ps, Request()) and not allowed(ps, Request(principal=None))
    # `cluster.local` in a policy means the mesh's own trust domain.
    local = policies("metadata: {name: p}\nspec: {rules: [{from: [{source: {principals: [cluster.local/ns/a/sa/b]}}]}]}")
    ((_, rules),) = rbac_rules(local, "example.org", tcp=False)
    assert matches(rules, Request(principal="spiffe://example.org/ns/a/sa/b"))
    assert not matches(rules, Request(principal="spiffe://cluster.local/ns/a/sa/b"))


def test_paths_methods_hosts_and_ports() -> None:
    ps = policies("""
metadata: {name: p}
spec:
  rules:
  - to:
    - operation:
        paths: ["/api/*", "*/health", /exact]
        notPaths: [/api/private]
        methods: [GET]
        hosts: [web, "*.shop.svc.cluster.local"]
        ports: ["8080"]
""")
    good = Request(path="/api/items?x=1", authority="WEB:8080")
    assert allowed(ps, good)
    assert allowed(ps, Request(path="/x/health", authority="web.shop.svc.cluster.local"))
    assert allowed(ps, Request(path="/exact", authority="web.shop.svc.cluster.local:8080"))
    assert not allowed(ps, Request(path="/exact/more"))
    assert not allowed(ps, Request(path="/api/private"))
    assert not allowed(ps, Request(path="/api/items", method="POST"))
    assert not allowed(ps, Request(path="/api/items", authority="evil"))
    assert not allowed(ps, Request(path="/api/items", port=9090))


def test_when_conditions() -> None:
    ps = policies("""
metadata: {name: p}
spec:
  rules:
  - when:
    - {key: "request.headers[X-User]", values: [alice, "team-*"], notValues: [team-x]}
    - {key: source.ip, values: [10.0.0.0/8], notValues: [10.9.0.0/16]}
    - {key: source.namespace, values: [shop]}
    - {key: destination.port, values: ["8080"]}
    - {key: destination.ip, values: [10.0.1.0/24]}
    - {key: connection.sni, notValues: ["*.evil"]}
""")
    base = Request(headers={"x-user": "alice"})
    assert allowed(ps, base)
    assert allowed(ps, Request(headers={"x-user": "team-a"}))
    for req in (
        Request(headers={"x-user": "team-x"}),
        Request(headers={}),
        Request(headers={"x-user": "alice"}, source_ip="10.9.0.1"),
        Request(headers={"x-user": "alice"}, principal="spiffe://cluster.local/ns/other/sa/client"),
        Request(headers={"x-user": "alice"}, port=9090),
        Request(headers={"x-user": "alice"}, dest_ip="10.0.2.1"),
        Request(headers={"x-user": "alice"}, sni="a.evil"),
    ):
        assert not allowed(ps, req), req


def test_ip_blocks_and_remote_ip_blocks() -> None:
    ps = policies("""
metadata: {name: p}
spec:
  action: DENY
  rules:
  - from: [{source: {ipBlocks: [192.168.0.0/16], notIpBlocks: [192.168.1.1]}}]
  - from: [{source: {remoteIpBlocks: [203.0.113.0/24]}}]
""")
    assert not allowed(ps, Request(source_ip="192.168.2.2"))
    assert allowed(ps, Request(source_ip="192.168.1.1"))
    assert not allowed(ps, Request(remote_ip="203.0.113.9"))
    assert allowed(ps, Request(source_ip="10.0.0.1"))


def test_jwt_attributes_never_match() -> None:
    ps = policies("""
metadata: {name: p}
spec:
  rules:
  - from: [{source: {requestPrincipals: ["*"]}}]
  - when: [{key: "request.auth.claims[iss]", values: [me]}]
""")
    assert not allowed(ps, Request())
    deny = policies("metadata: {name: d}\nspec: {action: DENY, rules: [{from: [{source: {notRequestPrincipals: ['*']}}]}]}")
    assert not allowed(deny, Request())  # "deny requests without a JWT" denies everything


# --------------------------------------------------------------------------- TCP


def test_l7_rules_on_tcp_fail_closed() -> None:
    allow = policies("""
metadata: {name: p}
spec:
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]
    to: [{operation: {methods: [GET]}}]
  - from: [{source: {namespaces: [ops]}}]
""")
    # HTTP: the first rule works; TCP: it never matches, the L4-only rule still does.
    assert allowed(allow, Request())
    assert not allowed(allow, Request(), tcp=True)
    assert allowed(allow, Request(principal="spiffe://cluster.local/ns/ops/sa/x"), tcp=True)
    deny = policies("""
metadata: {name: d}
spec:
  action: DENY
  rules: [{to: [{operation: {methods: [POST], ports: ["5432"]}}]}]
""")
    # DENY on TCP ignores the methods: everything on port 5432 is denied, other ports are not.
    assert allowed(deny, Request(method="GET", port=5432))
    assert not allowed(deny, Request(port=5432), tcp=True)
    assert allowed(deny, Request(port=6379), tcp=True)


def test_network_and_http_filters() -> None:
    ps = policies("metadata: {name: p}\nspec: {rules: [{to: [{operation: {paths: [/x]}}]}]}")
    ((name, cfg),) = network_rbac_filters(ps, "cluster.local", "inbound_0.0.0.0_5432")
    assert name == "envoy.filters.network.rbac" and cfg.stat_prefix == "inbound_0.0.0.0_5432.allow."
    assert not cfg.rules.policies  # the only rule is L7: nothing is allowed on TCP
    ((hname, hcfg),) = http_rbac_filters(ps, "cluster.local")
    assert hname == "envoy.filters.http.rbac" and list(hcfg.rules.policies) == ["ns[shop]-policy[p]-rule[0]"]


def test_long_namespace_names_stay_within_envoys_regex_limit() -> None:
    from controlplane.model.convert_base import regex_problem

    ns = "n" * 63
    ps = policies(f"metadata: {{name: p}}\nspec: {{rules: [{{from: [{{source: {{namespaces: [{ns}]}}}}]}}]}}")
    ((_, rules),) = rbac_rules(ps, "cluster.local", tcp=False)
    regex = rules.policies["ns[shop]-policy[p]-rule[0]"].principals[0].authenticated.principal_name.safe_regex.regex
    assert regex_problem(regex) is None
    assert matches(rules, Request(principal=f"spiffe://cluster.local/ns/{ns}/sa/x"))
    assert not matches(rules, Request(principal="spiffe://cluster.local/ns/other/sa/x"))


# --------------------------------------------------------------------------- validation


TCP_MESH = """
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  selector: {app: db}
  ports: [{name: tcp-pg, port: 5432}, {name: http, port: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: shop, labels: {app: db}}
spec: {containers: [{name: db}]}
status: {podIP: 10.0.0.1}
"""


def store_with(text: str) -> MeshStore:
    objects, errors = parse_documents(text, "mesh.yaml")
    assert not errors
    store = MeshStore()
    store.apply([Replace("test", tuple(objects))])
    return store


@pytest.mark.parametrize(("action", "enforced"), [("ALLOW", "never matching"), ("DENY", "denies every connection"),
                                                  ("AUDIT", "audits every connection")])
def test_validation_warns_about_l7_rules_on_a_tcp_port(action: str, enforced: str) -> None:
    store = store_with(TCP_MESH + f"""---
apiVersion: security.meshline.io/v1
kind: AuthorizationPolicy
metadata: {{name: p, namespace: shop}}
spec:
  action: {action}
  rules:
  - to: [{{operation: {{methods: [GET]}}}}]
  - to: [{{operation: {{methods: [GET], ports: ["8080"]}}}}]
  - from: [{{source: {{namespaces: [shop]}}}}]
""")
    issues = [i for i in store.mesh().issues if i.ref.kind == "AuthorizationPolicy"]
    assert len(issues) == 1, [i.format() for i in issues]  # only rule 0 reaches port 5432
    (issue,) = issues
    assert issue.severity == "warning" and issue.field == "spec.rules[0]"
    assert issue.message.startswith("L7 rules on a TCP port")
    assert "methods" in issue.message and "5432" in issue.message and "shop/db-0" in issue.message
    assert enforced in issue.message


def test_analyze_reports_l7_rules_on_a_tcp_port(tmp_path: Any) -> None:
    from controlplane.analyze import analyze_paths

    (tmp_path / "mesh.yaml").write_text(TCP_MESH + """---
apiVersion: security.meshline.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: shop}
spec:
  rules:
  - to: [{operation: {paths: [/x]}}]
""")
    lines = [i.format() for i in analyze_paths([str(tmp_path)])]
    assert any("AuthorizationPolicy/shop/p: warning: spec.rules[0]: L7 rules on a TCP port" in line for line in lines), lines
    # It points at the rule's line in the file.
    assert any(line.startswith(f"{tmp_path / 'mesh.yaml'}:") and "L7 rules" in line for line in lines), lines


def test_status_api_lists_the_warning(tmp_path: Any) -> None:
    import asyncio

    from fastapi.testclient import TestClient

    from controlplane.runtime import Runtime, Settings
    from controlplane.sources.directory import DirectorySource
    from controlplane.status.app import create_app

    (tmp_path / "mesh.yaml").write_text(TCP_MESH + """---
apiVersion: security.meshline.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: mesh-root}
spec:
  action: DENY
  rules:
  - to: [{operation: {methods: [DELETE]}}]
""")
    src = DirectorySource([tmp_path])
    rt = Runtime(Settings(config_dirs=(tmp_path,), root_namespace="mesh-root"), [src])
    asyncio.run(rt.sink([*src.initial()]))
    with TestClient(create_app(rt)) as c:
        found = [e for e in c.get("/v1/config/errors").json() if e["object"] == "AuthorizationPolicy/mesh-root/p"]
    assert len(found) == 1 and "L7 rules on a TCP port" in found[0]["message"], found
    assert found[0]["severity"] == "warning"
