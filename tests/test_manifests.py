"""Kubernetes manifests under manifests/ and samples/k8s/, and the Dockerfile.

- every built-in object validates against the Kubernetes 1.33 OpenAPI schemas shipped
  offline with `kubernetes-validate` (strict: unknown fields are errors);
- every mesh custom resource in the repository (samples, e2e routes, golden inputs)
  validates against our own CRD schemas, and typos, wrong enums and out-of-range
  values are rejected - by the CRD schema and by the converter alike;
- the CRD schemas are structural (what the API server requires) and accept exactly the
  fields the converter reads, at every level;
- every kustomization.yaml lists every file of its directory;
- the control-plane Deployment runs locked down, and RBAC grants no writes on what it
  watches except /status, and no wildcards.
"""

from __future__ import annotations

import base64
import binascii
import copy
import functools
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import re2
import yaml

from controlplane.model import convert as convert_mod
from controlplane.model import (
    convert_authn,
    convert_base,
    convert_dr,
    convert_gateway,
    convert_http,
    convert_security,
    convert_serviceentry,
    convert_sidecar,
    convert_telemetry,
    convert_vs,
)
from controlplane.model.convert import convert
from controlplane.model.ir import MTLS_MODES
from controlplane.model.raw import RawObject

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
SAMPLES_K8S = ROOT / "samples" / "k8s"
K8S_VERSION = "1.33"
"""Kubernetes version whose schemas kubernetes-validate ships (validation needs no network)."""

NAMESPACE = "meshline-system"
MESH_GROUPS = {
    "networking.meshline.io": "networking.meshline.io",
    "networking.istio.io": "networking.meshline.io",
    "security.meshline.io": "security.meshline.io",
    "security.istio.io": "security.meshline.io",
    "telemetry.meshline.io": "telemetry.meshline.io",
    "telemetry.istio.io": "telemetry.meshline.io",
}
"""API group of a mesh resource -> the group of the CRD that validates it."""
WRITE_VERBS = frozenset(
    {"create", "update", "patch", "delete", "deletecollection", "escalate", "bind", "impersonate"}
)


# --------------------------------------------------------------------------- loading


# libyaml's safe loader where PyYAML has it: the same documents, ~10x faster (~350 files).
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_docs(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [d for d in yaml.load_all(f, Loader=_LOADER) if d]


def yaml_files(*dirs: Path) -> list[Path]:
    return sorted(p for d in dirs for p in d.rglob("*.y*ml") if p.suffix in (".yaml", ".yml"))


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def is_mesh_cr(doc: dict[str, Any]) -> bool:
    group = str(doc.get("apiVersion", "")).partition("/")[0]
    return group in MESH_GROUPS and doc.get("kind") in CRDS_BY_KIND


def manifest_docs() -> list[tuple[str, dict[str, Any]]]:
    """(id, object) for every Kubernetes object under manifests/ and samples/k8s/."""
    out = []
    for path in yaml_files(MANIFESTS, SAMPLES_K8S):
        if path.name == "kustomization.yaml":
            continue
        for doc in load_docs(path):
            out.append((f"{rel(path)}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return out


def crd_docs() -> dict[str, dict[str, Any]]:
    out = {}
    for path in yaml_files(MANIFESTS / "crds"):
        for doc in load_docs(path):
            if doc.get("kind") == "CustomResourceDefinition":
                out[doc["spec"]["names"]["kind"]] = doc
    return out


CRDS_BY_KIND = crd_docs()


def crd_schema(kind: str) -> dict[str, Any]:
    (version,) = CRDS_BY_KIND[kind]["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def mesh_cr_docs() -> list[tuple[str, dict[str, Any]]]:
    """Every VirtualService/DestinationRule/... the repository ships as YAML (a fresh copy)."""
    return copy.deepcopy(_mesh_cr_docs())


@functools.cache
def _mesh_cr_docs() -> list[tuple[str, dict[str, Any]]]:
    # Parsed once per session: the golden cases alone are ~400 files (2.5 s per parse).
    files = [
        *yaml_files(SAMPLES_K8S),
        *sorted((ROOT / "samples" / "bookinfo").glob("*.yaml")),
        ROOT / "tests" / "e2e" / "routes.yaml",
        *sorted((ROOT / "tests" / "golden").glob("*/in/*.yaml")),
    ]
    out = []
    for path in files:
        for doc in load_docs(path):
            if is_mesh_cr(doc):
                out.append((f"{rel(path)}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return out


def only_kind(docs: list[tuple[str, dict[str, Any]]], kind: str) -> list[dict[str, Any]]:
    return [d for _, d in docs if d["kind"] == kind]


# --------------------------------------------------------------------------- OpenAPI -> JSON Schema


def to_json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema (2020-12) that accepts what the API server accepts for an OpenAPI v3
    CRD schema node, with strict field validation (kubectl's default): unknown fields of an
    object with `properties` are errors unless it preserves unknown fields; `nullable`
    admits null; int-or-string admits both; other `x-kubernetes-*` keys are ignored."""
    out: dict[str, Any] = {
        k: v for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"
    }
    if "properties" in node:
        out["properties"] = {name: to_json_schema(child) for name, child in node["properties"].items()}
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = to_json_schema(node["additionalProperties"])
    if isinstance(node.get("items"), dict):
        out["items"] = to_json_schema(node["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in node:
            out[key] = [to_json_schema(s) for s in node[key]]
    if "not" in node:
        out["not"] = to_json_schema(node["not"])
    if node.get("x-kubernetes-int-or-string") and "type" not in node and "anyOf" not in node:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if node.get("nullable"):
        if "type" in out:
            out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    return out


def test_openapi_to_json_schema_follows_the_api_server() -> None:
    node = {
        "type": "object",
        "properties": {
            "a": {"type": "string", "nullable": True, "enum": ["x"]},
            "b": {"x-kubernetes-int-or-string": True},
            "c": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": True,
                "properties": {"d": {"type": "string"}},
            },
            "e": {"type": "object", "additionalProperties": {"type": "integer"}},
        },
    }
    v = jsonschema.Draft202012Validator(to_json_schema(node))
    assert v.is_valid({"a": None, "b": 1, "c": {"d": "x", "anything": 1}, "e": {"k": 1}})
    assert v.is_valid({"a": "x", "b": "50%"})
    assert not v.is_valid({"a": "y"}) and not v.is_valid({"b": 1.5}) and not v.is_valid({"e": {"k": "1"}})
    assert not v.is_valid({"typo": 1})


FORMATS = jsonschema.FormatChecker(formats=())


@FORMATS.checks("int32")
def _int32(value: object) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@FORMATS.checks("int64")
def _int64(value: object) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


@FORMATS.checks("byte", raises=binascii.Error)
def _byte(value: object) -> bool:
    if isinstance(value, str):
        base64.b64decode(value, validate=True)
    return True


@FORMATS.checks("date-time")
def _date_time(value: object) -> bool:
    return (
        not isinstance(value, str)
        or re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", value) is not None
    )


_VALIDATORS: dict[str, jsonschema.protocols.Validator] = {}


def validator(kind: str) -> jsonschema.protocols.Validator:
    if kind not in _VALIDATORS:
        schema = to_json_schema(crd_schema(kind))
        jsonschema.Draft202012Validator.check_schema(schema)
        _VALIDATORS[kind] = jsonschema.Draft202012Validator(schema, format_checker=FORMATS)
    return _VALIDATORS[kind]


def as_meshline(doc: dict[str, Any]) -> dict[str, Any]:
    """`doc` with its apiVersion mapped to the Meshline group of its CRD (Istio aliases)."""
    group = doc["apiVersion"].partition("/")[0]
    return {**doc, "apiVersion": f"{MESH_GROUPS[group]}/v1"}


def schema_errors(doc: dict[str, Any]) -> list[jsonschema.ValidationError]:
    mapped = as_meshline(doc)
    crd = CRDS_BY_KIND[doc["kind"]]
    assert mapped["apiVersion"] == f"{crd['spec']['group']}/v1"
    return sorted(validator(doc["kind"]).iter_errors(mapped), key=lambda e: [str(p) for p in e.absolute_path])


def describe(errors: list[jsonschema.ValidationError]) -> str:
    return "\n".join(f"  {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


def raw(doc: dict[str, Any]) -> RawObject:
    meta = doc.get("metadata") or {}
    return RawObject(
        doc["kind"], doc["apiVersion"], meta.get("namespace") or "default", meta.get("name") or "", doc
    )


def converter_errors(doc: dict[str, Any]) -> list[str]:
    _, issues = convert(raw(doc))
    return [i.format() for i in issues if i.severity == "error"]


# --------------------------------------------------------------------------- (a) Kubernetes schemas


def test_kubernetes_validate_ships_the_version_offline() -> None:
    assert K8S_VERSION in {
        kubernetes_validate.utils.major_minor(v) for v in kubernetes_validate.utils.all_versions()
    }
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"portz": []}}
    with pytest.raises(kubernetes_validate.ValidationError, match="portz"):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


@pytest.mark.parametrize("doc", [pytest.param(d, id=i) for i, d in manifest_docs() if not is_mesh_cr(d)])
def test_manifest_validates_against_kubernetes_schema(doc: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{'.'.join(map(str, e.path))}: {e.message}")


# --------------------------------------------------------------------------- (b) mesh CRs against our CRDs


def test_crds_cover_the_five_mesh_kinds() -> None:
    assert {k: (c["spec"]["group"], c["metadata"]["name"]) for k, c in CRDS_BY_KIND.items()} == {
        "VirtualService": ("networking.meshline.io", "virtualservices.networking.meshline.io"),
        "DestinationRule": ("networking.meshline.io", "destinationrules.networking.meshline.io"),
        "Sidecar": ("networking.meshline.io", "sidecars.networking.meshline.io"),
        "PeerAuthentication": ("security.meshline.io", "peerauthentications.security.meshline.io"),
        "AuthorizationPolicy": ("security.meshline.io", "authorizationpolicies.security.meshline.io"),
        "RequestAuthentication": ("security.meshline.io", "requestauthentications.security.meshline.io"),
        "Telemetry": ("telemetry.meshline.io", "telemetries.telemetry.meshline.io"),
        "ServiceEntry": ("networking.meshline.io", "serviceentries.networking.meshline.io"),
        "WorkloadEntry": ("networking.meshline.io", "workloadentries.networking.meshline.io"),
        "Gateway": ("networking.meshline.io", "gateways.networking.meshline.io"),
    }


def test_repository_ships_mesh_resources_of_every_kind() -> None:
    docs = mesh_cr_docs()
    for kind in ("VirtualService", "DestinationRule", "Sidecar", "PeerAuthentication", "AuthorizationPolicy"):
        assert only_kind(docs, kind), kind
    assert any(d["apiVersion"].startswith("networking.istio.io/") for _, d in docs), "no Istio alias covered"
    assert any(d["apiVersion"].startswith("security.istio.io/") for _, d in docs), "no Istio alias covered"


@pytest.mark.parametrize("doc", [pytest.param(d, id=i) for i, d in mesh_cr_docs()])
def test_mesh_resource_validates_against_crd_schema(doc: dict[str, Any]) -> None:
    errors = schema_errors(doc)
    assert not errors, "rejected by the CRD schema:\n" + describe(errors)


@pytest.mark.parametrize(
    "doc", [pytest.param(d, id=i) for i, d in mesh_cr_docs() if i.startswith("samples/k8s/")]
)
def test_sample_resources_are_valid_for_meshline(doc: dict[str, Any]) -> None:
    assert converter_errors(doc) == []


PEER_AUTHN, AUTHZ, AUTHZ_WAYPOINT = yaml.safe_load_all("""
apiVersion: security.meshline.io/v1
kind: PeerAuthentication
metadata: {name: reviews, namespace: bookinfo}
spec:
  selector: {matchLabels: {app: reviews}}
  mtls: {mode: STRICT}
  portLevelMtls:
    "9080": {mode: PERMISSIVE}
---
apiVersion: security.meshline.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-viewer, namespace: bookinfo}
spec:
  selector: {matchLabels: {app: reviews}}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: [cluster.local/ns/bookinfo/sa/bookinfo-productpage]
        notPrincipals: [cluster.local/ns/bookinfo/sa/evil]
        namespaces: [bookinfo]
        notNamespaces: [kube-system]
        ipBlocks: [10.0.0.0/8]
        notIpBlocks: [10.9.0.0/16]
        requestPrincipals: [issuer/subject]
    to:
    - operation:
        hosts: [reviews]
        notHosts: [evil]
        ports: ["9080"]
        notPorts: ["9090"]
        methods: [GET]
        notMethods: [DELETE]
        paths: [/reviews/*]
        notPaths: [/admin*]
    when:
    - {key: "request.headers[x-user]", values: [jason], notValues: [eve]}
---
apiVersion: security.meshline.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-waypoint, namespace: bookinfo}
spec:
  targetRefs: [{kind: Service, group: "", name: reviews}]
  action: DENY
  rules: [{}]
""")
SECURITY_EXAMPLES = {"PeerAuthentication": PEER_AUTHN, "AuthorizationPolicy": AUTHZ}


@pytest.mark.parametrize("doc", [PEER_AUTHN, AUTHZ, AUTHZ_WAYPOINT], ids=["pa", "authz", "authz-targetrefs"])
def test_security_resources_validate(doc: dict[str, Any]) -> None:
    errors = schema_errors(doc)
    assert not errors, describe(errors)
    istio = {**doc, "apiVersion": "security.istio.io/v1"}
    assert not schema_errors(istio)
    assert converter_errors(doc) == [] and converter_errors(istio) == []


def sample_doc(kind: str, name: str) -> dict[str, Any]:
    for _, doc in mesh_cr_docs():
        if (
            doc["kind"] == kind
            and doc["metadata"]["name"] == name
            and doc["metadata"]["namespace"] == "bookinfo"
        ):
            return copy.deepcopy(doc)
    raise AssertionError(f"no {kind} {name} in the samples")


class _Delete:
    """The marker `mutate` deletes a field for; a stable repr keeps test ids the same in every
    process (pytest-xdist workers must collect identical ids)."""

    def __repr__(self) -> str:
        return "DELETE"


DELETE = _Delete()
_TOKEN = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def tokens(path: str) -> list[str | int]:
    return [int(i) if i else name for name, i in _TOKEN.findall(path)]


def mutate(doc: dict[str, Any], path: str, value: object) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    *parents, last = tokens(path)
    node: Any = out
    for t in parents:
        node = node[t]
    if value is DELETE:
        del node[last]
    elif isinstance(node, list) and last == len(node):
        node.append(value)
    else:
        node[last] = value
    return out


# (kind, path, value): each makes a valid sample invalid; the CRD schema and the
# converter must both reject it.
BAD_NETWORKING = [
    ("VirtualService", "spec.http[1].retries.attemps", 3),
    ("VirtualService", "spec.htp", []),
    ("VirtualService", "spec.hosts", DELETE),
    ("VirtualService", "spec.http[0].match[0].headers.end-user.exakt", "jason"),
    ("VirtualService", "spec.http[0].match[0].uri", {"exact": "/a", "prefix": "/b"}),
    ("VirtualService", "spec.http[1].route[0].weight", -1),
    ("VirtualService", "spec.http[1].route[0].destination.port", {"number": 70000}),
    ("VirtualService", "spec.http[1].route[0].destination.subset", "V1"),
    ("VirtualService", "spec.http[1].timeout", "3 seconds"),
    ("VirtualService", "spec.http[1].retries.retryOn", "5xx,conect-failure"),
    ("VirtualService", "spec.http[1].retries.attempts", -1),
    ("VirtualService", "spec.http[1].fault", {"abort": {"httpStatus": 600}}),
    ("VirtualService", "spec.http[1].fault", {"abort": {"httpStatus": 503, "percentage": {"value": 101}}}),
    ("VirtualService", "spec.http[1].fault", {"abort": {"httpStatus": 503, "grpcStatus": "UNAVAILABLE"}}),
    ("VirtualService", "spec.http[1].mirrorPercentage", {"value": -1}),
    ("VirtualService", "spec.http[2]", {"redirect": {"uri": "/x", "redirectCode": 305}}),
    ("VirtualService", "spec.http[2]", {"directResponse": {"status": 99}}),
    ("VirtualService", "spec.http[2]", {"directResponse": {"body": {"string": "no status"}}}),
    ("VirtualService", "spec.exportTo", ["Not_A_Namespace"]),
    ("VirtualService", "spec.tcp", [{"match": [{"port": 0}], "route": [{"destination": {"host": "db"}}]}]),
    ("DestinationRule", "spec.host", DELETE),
    ("DestinationRule", "spec.trafficPolicy.loadBalancer.simple", "ROUND_ROBBIN"),
    ("DestinationRule", "spec.trafficPolicy.loadBalancer.consistentHash", {"httpHeaderName": "x-user"}),
    ("DestinationRule", "spec.trafficPolicy.tls", {"mode": "STRICT"}),
    ("DestinationRule", "spec.trafficPolicy.outlierDetection.maxEjectionPercent", 101),
    ("DestinationRule", "spec.trafficPolicy.connectionPool.http.http1MaxPendingRequest", 10),
    ("DestinationRule", "spec.trafficPolicy.connectionPool.tcp", {"maxConnections": -5}),
    ("DestinationRule", "spec.trafficPolicy.portLevelSettings", [{"port": {"number": 65536}}]),
    ("DestinationRule", "spec.subsets[0].labelz", {"version": "v1"}),
    ("DestinationRule", "spec.subsets[0].name", "Version_1"),
]
BAD_SECURITY = [
    ("PeerAuthentication", "spec.mtls.mode", "STRICTER"),
    ("PeerAuthentication", "spec.mtls.mod", "STRICT"),
    ("PeerAuthentication", "spec.portLevelMtls.9080.mode", "OFF"),
    ("PeerAuthentication", "spec.selector.labels", {"app": "x"}),
    ("AuthorizationPolicy", "spec.action", "PERMIT"),
    ("AuthorizationPolicy", "spec.rules[0].from[0].source.principal", ["x"]),
    ("AuthorizationPolicy", "spec.rules[0].to[0].operation.path", ["/x"]),
    ("AuthorizationPolicy", "spec.rules[0].when[0].key", DELETE),
    ("AuthorizationPolicy", "spec.rules[0].when[0].value", ["x"]),
    ("AuthorizationPolicy", "spec.targetRefs", [{"kind": "Service", "name": "reviews"}]),
]


def assert_rejected_at(doc: dict[str, Any], path: str) -> None:
    errors = schema_errors(doc)
    assert errors, f"the CRD schema accepts {path}"
    parent = ["spec", *tokens(path)[1:]][:-1]
    assert any(list(e.absolute_path)[: len(parent)] == parent for e in errors), describe(errors)


@pytest.mark.parametrize(
    ("kind", "path", "value"), BAD_NETWORKING, ids=[f"{p}={v!r}"[:60] for _, p, v in BAD_NETWORKING]
)
def test_crd_schema_rejects_what_the_converter_rejects(kind: str, path: str, value: object) -> None:
    base = sample_doc(kind, "reviews")
    assert not schema_errors(base) and not converter_errors(base)
    doc = mutate(base, path, value)
    assert_rejected_at(doc, path)
    assert converter_errors(doc), f"the converter accepts {path}={value!r}"


@pytest.mark.parametrize(
    ("kind", "path", "value"), BAD_SECURITY, ids=[f"{p}={v!r}"[:60] for _, p, v in BAD_SECURITY]
)
def test_security_crd_schema_rejects_typos_and_bad_values(kind: str, path: str, value: object) -> None:
    doc = mutate(SECURITY_EXAMPLES[kind], path, value)
    assert_rejected_at(doc, path)
    assert converter_errors(doc), f"the converter accepts {path}={value!r}"


SIDECAR = yaml.safe_load("""
apiVersion: networking.meshline.io/v1
kind: Sidecar
metadata: {name: reviews, namespace: bookinfo}
spec:
  workloadSelector: {labels: {app: reviews}}
  egress:
  - port: {number: 9080, protocol: HTTP, name: http}
    hosts: [./ratings.bookinfo.svc.cluster.local, "*/*.example.com"]
  - hosts: ["./*", meshline-system/*, "~/*"]
""")
BAD_SIDECAR = [
    ("spec.egres", []),
    ("spec.egress[1].hosts[0]", "reviews"),
    ("spec.egress[1].hosts[0]", "Bookinfo/*"),
    ("spec.egress[1].hosts[0]", "~/reviews.bookinfo.svc.cluster.local"),
    ("spec.egress[1].hosts[0]", "*/foo.*.com"),
    ("spec.egress[1].hosts", []),
    ("spec.egress[1].host", ["./*"]),
    ("spec.egress[0].port.number", 0),
    ("spec.egress[0].port.protocol", "HTTPX"),
    ("spec.egress[0].port.name", "Not_A_Name"),
    ("spec.egress[0].port.nummer", 9080),
    ("spec.workloadSelector.labels", {}),
    ("spec.workloadSelector.matchLabels", {"app": "x"}),
]


def test_sidecar_validates() -> None:
    assert not schema_errors(SIDECAR), describe(schema_errors(SIDECAR))
    for api in ("networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3"):
        istio = {**SIDECAR, "apiVersion": api}
        assert not schema_errors(istio) and converter_errors(istio) == []
    assert converter_errors(SIDECAR) == []


@pytest.mark.parametrize(("path", "value"), BAD_SIDECAR, ids=[f"{p}={v!r}"[:60] for p, v in BAD_SIDECAR])
def test_sidecar_crd_schema_rejects_what_the_converter_rejects(path: str, value: object) -> None:
    doc = mutate(SIDECAR, path, value)
    assert_rejected_at(doc, path)
    assert converter_errors(doc), f"the converter accepts {path}={value!r}"


def test_sidecar_host_pattern_and_protocols_match_the_converter() -> None:
    host = re.compile(schema_at("Sidecar", "spec.egress[0].hosts")["items"]["pattern"])
    for text in ("./*", "*/*", "~/*", "bookinfo/*", "./reviews.bookinfo.svc.cluster.local", "*/*.example.com",
                 "ns-1/api.example.com.", "./reviews"):
        assert host.search(text) and convert_sidecar.egress_host_problem(text) is None, text
    for text in ("reviews", "./", "/x", "~/x", "Ns/*", "./a/b", "*/a.*.com", "*/**", ".//*", "./*.", "./-a"):
        assert not host.search(text) and convert_sidecar.egress_host_problem(text) is not None, text
    protocol = re.compile(schema_at("Sidecar", "spec.egress[0].port.protocol")["pattern"])
    for name in convert_sidecar.PROTOCOLS:
        assert protocol.search(name) and protocol.search(name.lower()), name
    assert not protocol.search("HTTP3")


def schema_at(kind: str, path: str) -> dict[str, Any]:
    node = crd_schema(kind)
    for t in tokens(path):
        node = node["items"] if isinstance(t, int) else node["properties"][t]
    return node


def test_enums_and_patterns_match_the_converter() -> None:
    tp = "spec.trafficPolicy"
    assert set(schema_at("DestinationRule", f"{tp}.loadBalancer.simple")["enum"]) == set(
        convert_dr._LB_SIMPLE
    )
    assert tuple(schema_at("DestinationRule", f"{tp}.tls.mode")["enum"]) == convert_dr._TLS_MODES
    for where in (f"{tp}.portLevelSettings[0]", "spec.subsets[0].trafficPolicy"):
        assert schema_at("DestinationRule", f"{where}.loadBalancer.simple") == schema_at(
            "DestinationRule", f"{tp}.loadBalancer.simple"
        )
    route = "spec.http[0]"
    assert (
        tuple(schema_at("VirtualService", f"{route}.redirect.redirectCode")["enum"])
        == convert_http.REDIRECT_CODES
    )
    retry_on = re.compile(schema_at("VirtualService", f"{route}.retries.retryOn")["pattern"])
    for word in convert_http.RETRY_ON_CONDITIONS:
        assert retry_on.search(word) and retry_on.search(f"503, {word},5xx"), word
    assert not retry_on.search("5xx,gateway-eror")
    duration = re.compile(schema_at("VirtualService", f"{route}.timeout")["pattern"])
    for text in ("0", "1.5s", "100ms", "1m30s", "500us", "2h", ".5s"):
        assert duration.search(text) and isinstance(convert_base.parse_duration_ms(text), int), text
    for text in ("-1s", "1", "1 s", "1sec", "s"):
        assert not duration.search(text) and isinstance(convert_base.parse_duration_ms(text), str), text
    grpc = re.compile(schema_at("VirtualService", f"{route}.fault.abort.grpcStatus")["pattern"])
    assert all(grpc.search(name) for name in convert_http.GRPC_STATUS_CODES)
    assert all(grpc.search(str(code)) for code in convert_http.GRPC_STATUS_CODES.values())
    assert tuple(schema_at("PeerAuthentication", "spec.mtls.mode")["enum"]) == MTLS_MODES
    port_level = schema_at("PeerAuthentication", "spec.portLevelMtls")["additionalProperties"]
    assert port_level["properties"]["mode"] == schema_at("PeerAuthentication", "spec.mtls.mode")
    assert tuple(schema_at("AuthorizationPolicy", "spec.action")["enum"]) == convert_security.ACTIONS


# --------------------------------------------------------------------------- fields: schema == converter


def example_value(schema: dict[str, Any]) -> object:
    """A document with every field of `schema` set (values need not be valid)."""
    if "enum" in schema:
        return schema["enum"][0]
    t = schema.get("type")
    if t == "object":
        if "properties" in schema:
            return {k: example_value(v) for k, v in schema["properties"].items()}
        if isinstance(schema.get("additionalProperties"), dict):
            return {"x-key": example_value(schema["additionalProperties"])}
        return {}
    if t == "array":
        return [example_value(schema["items"])]
    if t in ("integer", "number"):
        return schema.get("minimum", 1)
    if t == "boolean":
        return True
    if schema.get("format") == "byte":
        return "b2s="
    if "pattern" in schema and "ns|us" in schema["pattern"]:
        return "1s"
    return 1 if schema.get("x-kubernetes-int-or-string") else "a"


def object_paths(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every object node with `properties`, as (path with [0] for list items, node)."""
    if schema.get("type") == "array":
        yield from object_paths(schema["items"], f"{path}[0]")
    elif schema.get("type") == "object":
        if "properties" in schema:
            yield path, schema
            for name, child in schema["properties"].items():
                yield from object_paths(child, f"{path}.{name}" if path else name)
        elif isinstance(schema.get("additionalProperties"), dict):
            yield from object_paths(schema["additionalProperties"], f"{path}.x-key")


# Objects the converter does not read field by field: delegates (an error when present).
NOT_READ = {
    "VirtualService": ("spec.http[0].delegate",),
    "DestinationRule": (),
    "Sidecar": (),
    "PeerAuthentication": (),
    "AuthorizationPolicy": (),
    "ServiceEntry": (),
    "WorkloadEntry": (),
    "RequestAuthentication": (),
    "Telemetry": ("spec.tracing", "spec.metrics"),  # accepted with a warning, not read
    "Gateway": (),
}


@pytest.mark.parametrize(
    "kind", ["VirtualService", "DestinationRule", "Sidecar", "PeerAuthentication", "AuthorizationPolicy",
             "ServiceEntry", "WorkloadEntry", "RequestAuthentication", "Telemetry", "Gateway"]
)
def test_crd_fields_are_exactly_the_fields_the_converter_reads(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Builds a document with every field of the CRD schema set, converts it while recording
    every `check_fields` call, and compares the known (and accepted-with-warning) fields at
    each object with the schema's properties there."""
    seen: dict[str, set[str]] = {}
    ignored_at: dict[str, set[str]] = {}
    original = convert_base.check_fields

    def spy(ctx: Any, m: Any, path: str, known: Any, ignored: Any = None) -> None:
        p = re.sub(r"\[\d+\]", "[0]", path)
        seen.setdefault(p, set()).update(known, ignored or ())
        ignored_at.setdefault(p, set()).update(ignored or ())
        original(ctx, m, path, known, ignored)

    for module in (convert_base, convert_http, convert_vs, convert_dr, convert_security, convert_sidecar, convert_mod,
                   convert_authn, convert_telemetry, convert_serviceentry, convert_gateway):
        monkeypatch.setattr(module, "check_fields", spy)

    schema = crd_schema(kind)
    doc = example_value(schema)
    assert isinstance(doc, dict)
    doc.update(
        apiVersion=f"{CRDS_BY_KIND[kind]['spec']['group']}/v1",
        kind=kind,
        metadata={"name": "all-fields", "namespace": "default"},
    )
    doc.pop("status")
    _, issues = convert(raw(doc))
    problems = [i.format() for i in issues if "unknown field" in i.message or "internal error" in i.message]
    assert not problems, "the converter does not know fields the CRD schema has:\n" + "\n".join(problems)

    nodes = dict(object_paths(schema))
    extra = sorted(set(seen) - set(nodes))
    assert not extra, f"the converter reads objects the CRD schema does not have: {extra}"
    mismatched = {
        p: (sorted(set(nodes[p]["properties"]) - known), sorted(known - set(nodes[p]["properties"])))
        for p, known in seen.items()
        if set(nodes[p]["properties"]) != known
    }
    assert not mismatched, f"path: (only in the schema, only in the converter): {mismatched}"

    def skipped(p: str) -> bool:
        p = p.removesuffix("[0]")
        if p in ("metadata", "status") or p.startswith(("status.", *NOT_READ[kind])):
            return True
        parent, _, name = p.rpartition(".")
        return name in ignored_at.get(parent, ()) or (bool(parent) and skipped(parent))

    unread = sorted(p for p in nodes if p not in seen and not skipped(p))
    assert not unread, f"objects in the CRD schema the converter never checks: {unread}"


# --------------------------------------------------------------------------- (c) structural schemas

_JUNCTORS = ("allOf", "anyOf", "oneOf", "not")
_TYPES = {"object", "array", "string", "integer", "number", "boolean"}
_FORBIDDEN_IN_JUNCTORS = ("type", "description", "default", "additionalProperties", "nullable")
_ENUM_TYPES: dict[str, Callable[[object], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
}


def _junctor_problems(node: dict[str, Any], outer: dict[str, Any], path: str) -> Iterator[str]:
    for key in _FORBIDDEN_IN_JUNCTORS:
        if key in node:
            yield f"{path}: {key} inside allOf/anyOf/oneOf/not"
    for key in node:
        if key.startswith("x-kubernetes-"):
            yield f"{path}: {key} inside allOf/anyOf/oneOf/not"
    for name in node.get("required", ()):
        if name not in outer.get("properties", {}):
            yield f"{path}: required {name!r} is not a property of the enclosing object"
    for name in node.get("properties", {}):
        if name not in outer.get("properties", {}):
            yield f"{path}: property {name!r} is not specified outside the junctor"
    for key in _JUNCTORS:
        for i, sub in enumerate([node[key]] if key == "not" and key in node else node.get(key, ())):
            yield from _junctor_problems(sub, outer, f"{path}.{key}[{i}]")


def structural_problems(node: dict[str, Any], path: str = "") -> Iterator[str]:
    """Why `node` is not a structural schema (the API server's rules for CRDs), plus
    sanity checks that catch mistakes the API server would let through."""
    int_or_string = node.get("x-kubernetes-int-or-string") is True
    preserve = node.get("x-kubernetes-preserve-unknown-fields") is True
    t = node.get("type")
    if int_or_string:
        if t is not None:
            yield f"{path}: x-kubernetes-int-or-string with a type"
        if node.get("anyOf") not in (None, [{"type": "integer"}, {"type": "string"}]):
            yield f"{path}: int-or-string anyOf must be [integer, string]"
    elif t is None and not preserve:
        yield f"{path}: no type"
    elif t is not None and t not in _TYPES:
        yield f"{path}: unknown type {t!r}"
    if "properties" in node and "additionalProperties" in node:
        yield f"{path}: both properties and additionalProperties"
    if ("properties" in node or "additionalProperties" in node) and t != "object":
        yield f"{path}: properties on a non-object"
    if t == "array" and not isinstance(node.get("items"), dict):
        yield f"{path}: an array needs a single items schema"
    if "items" in node and t != "array":
        yield f"{path}: items on a non-array"
    for name in node.get("required", ()):
        if name not in node.get("properties", {}):
            yield f"{path}: required {name!r} is not a property"
    if "enum" in node and t in _ENUM_TYPES:
        for value in node["enum"]:
            if not _ENUM_TYPES[t](value):
                yield f"{path}: enum value {value!r} is not a {t}"
    if "pattern" in node:
        try:
            re2.compile(node["pattern"])  # Kubernetes evaluates patterns with Go's RE2 syntax
        except re2.error as exc:
            yield f"{path}: pattern does not compile: {exc}"
    for lo, hi in (("minimum", "maximum"), ("minLength", "maxLength"), ("minItems", "maxItems")):
        if lo in node and hi in node and node[lo] > node[hi]:
            yield f"{path}: {lo} > {hi}"
    if node.get("x-kubernetes-list-type") == "map":
        keys = node.get("x-kubernetes-list-map-keys") or []
        if not keys or any(k not in node.get("items", {}).get("required", ()) for k in keys):
            yield f"{path}: list-type map needs list-map-keys that are required item properties"
    for key in _JUNCTORS:
        if key in node and not int_or_string:
            subs = [node[key]] if key == "not" else node[key]
            for i, sub in enumerate(subs):
                yield from _junctor_problems(sub, node, f"{path}.{key}[{i}]")
    for name, child in node.get("properties", {}).items():
        yield from structural_problems(child, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        yield from structural_problems(node["additionalProperties"], f"{path}.<value>")
    if isinstance(node.get("items"), dict):
        yield from structural_problems(node["items"], f"{path}[]")


def test_structural_checker_catches_problems() -> None:
    bad = {
        "type": "object",
        "properties": {
            "a": {"properties": {"b": {"type": "string"}}},
            "c": {"type": "object", "properties": {}, "additionalProperties": {"type": "string"}},
            "d": {"type": "array"},
            "e": {"type": "string", "enum": ["x", 1]},
            "f": {
                "type": "object",
                "properties": {"g": {"type": "string"}},
                "allOf": [{"not": {"required": ["h"]}}],
            },
            "i": {"type": "object", "properties": {"j": {"type": "string"}}, "oneOf": [{"type": "object"}]},
        },
    }
    problems = "\n".join(structural_problems(bad))
    for expected in (
        ".a: no type",
        ".c: both",
        ".d: an array",
        ".e: enum value 1",
        "'h'",
        ".i.oneOf[0]: type",
    ):
        assert expected in problems


@pytest.mark.parametrize("kind", sorted(CRDS_BY_KIND))
def test_crd_schema_is_structural(kind: str) -> None:
    schema = crd_schema(kind)
    assert list(structural_problems(schema)) == []
    assert schema["properties"]["metadata"] == {"type": "object"}, "metadata must not be constrained"
    spec = schema["properties"]["spec"]
    assert "x-kubernetes-preserve-unknown-fields" not in yaml.safe_dump(spec)


@pytest.mark.parametrize("kind", sorted(CRDS_BY_KIND))
def test_crd_definition(kind: str) -> None:
    crd = CRDS_BY_KIND[kind]
    spec = crd["spec"]
    names = spec["names"]
    assert crd["metadata"]["name"] == f"{names['plural']}.{spec['group']}"
    assert spec["scope"] == "Namespaced"
    assert names["singular"] == kind.lower() and names["listKind"] == f"{kind}List"
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1", True, True)
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Accepted"] == '.status.conditions[?(@.type=="Accepted")].status'
    for path in columns.values():
        if path.startswith(".spec."):
            schema_at(kind, path[1:])  # raises KeyError for a column on a field that does not exist
    conditions = crd_schema(kind)["properties"]["status"]["properties"]["conditions"]["items"]
    assert set(conditions["properties"]) == {
        "type", "status", "reason", "message", "observedGeneration", "lastTransitionTime",
    }  # fmt: skip
    expected_short = {"VirtualService": "vs", "DestinationRule": "dr"}.get(kind)
    if expected_short:
        assert expected_short in names["shortNames"]


def test_status_written_by_the_control_plane_validates() -> None:
    from controlplane.crdstatus import Condition

    doc = sample_doc("VirtualService", "reviews")
    for cond in (Condition("True", "Accepted", "ok", 3), Condition("False", "Invalid", "spec.x: bad", None)):
        doc["status"] = {"conditions": [cond.as_dict("2026-11-27T10:00:00Z")]}
        assert not schema_errors(doc), describe(schema_errors(doc))
    doc["status"] = {"conditions": [{"type": "Accepted", "status": "Maybe"}]}
    assert schema_errors(doc)


# --------------------------------------------------------------------------- (d) kustomizations


def kustomizations() -> list[Path]:
    return sorted(p for d in (MANIFESTS, SAMPLES_K8S) for p in d.rglob("kustomization.yaml"))


def test_there_are_kustomizations() -> None:
    assert {rel(p) for p in kustomizations()} >= {
        "manifests/kustomization.yaml",
        "manifests/crds/kustomization.yaml",
        "samples/k8s/kustomization.yaml",
    }


@pytest.mark.parametrize("path", kustomizations(), ids=rel)
def test_kustomization_lists_every_file(path: Path) -> None:
    (k,) = load_docs(path)
    assert (k["apiVersion"], k["kind"]) == ("kustomize.config.k8s.io/v1beta1", "Kustomization")
    listed = k.get("resources", [])
    assert len(listed) == len(set(listed)), "listed twice"
    here = path.parent
    expected = {p.name for p in here.iterdir() if p.is_file() and p.suffix in (".yaml", ".yml")} - {path.name}
    expected |= {p.name for p in here.iterdir() if p.is_dir() and (p / "kustomization.yaml").exists()}
    assert set(listed) == expected
    leftovers = {p.name for p in here.iterdir() if p.is_file()} - expected - {path.name}
    assert not leftovers, f"files kustomize would not apply: {leftovers}"


@pytest.mark.parametrize("path", [MANIFESTS, SAMPLES_K8S], ids=rel)
def test_kustomize_builds_every_object(path: Path) -> None:
    """`kubectl kustomize` (offline) renders exactly the objects of the directory's files."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    out = subprocess.run(
        [kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60, check=True
    )
    built = {(d["kind"], d["metadata"]["name"]) for d in yaml.load_all(out.stdout, Loader=_LOADER) if d}
    files = [p for p in yaml_files(path) if p.name != "kustomization.yaml"]
    assert built == {(d["kind"], d["metadata"]["name"]) for p in files for d in load_docs(p)}


# --------------------------------------------------------------------------- (e) Deployment, Service, RBAC


_MANIFESTS_ONLY = [(i, d) for i, d in manifest_docs() if i.startswith("manifests/")]


def one_manifest(kind: str, name: str) -> dict[str, Any]:
    found = [d for _, d in _MANIFESTS_ONLY if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


STATUS_TOKEN = "/var/run/secrets/meshline/status/token"
CONTROL_PLANE_PORTS = {"grpc-xds-tls": 15012, "http-status": 15014, "https-webhook": 15017}


def deployment() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    dep = one_manifest("Deployment", "meshline")
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return dep, pod, container


def test_deployment_shape() -> None:
    dep, pod, c = deployment()
    assert dep["metadata"]["namespace"] == NAMESPACE
    assert dep["spec"]["replicas"] == 2
    assert pod["serviceAccountName"] == "meshline"
    assert c["image"] == "meshline:0.1.0"
    assert c["args"] == [
        "serve", "--kubernetes", "--xds-address", "127.0.0.1:15010",
        "--status-address", "0.0.0.0:15014", "--status-token-file", STATUS_TOKEN,
        "--webhook-address", "0.0.0.0:15017",
        "--ca-address", "0.0.0.0:15012", "--node-agents",
    ]  # fmt: skip
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == CONTROL_PLANE_PORTS
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"] if "valueFrom" in e}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
    assert set(c["resources"]["requests"]) == {"cpu", "memory"} and set(c["resources"]["limits"]) >= {
        "memory"
    }
    (term,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert (
        term["podAffinityTerm"]["labelSelector"]["matchLabels"].items()
        <= dep["spec"]["template"]["metadata"]["labels"].items()
    )


def test_deployment_args_are_accepted_by_meshline_serve(tmp_path: Path) -> None:
    from controlplane.cli import main
    from controlplane.serve import status_access_error

    _, _, c = deployment()
    serve = main.get_command(None, c["args"][0])  # type: ignore[arg-type]
    assert serve is not None
    token = tmp_path / "token"  # what the kubelet projects into the pod
    token.write_text("eyJhbGciOi.projected.token")
    args = [str(token) if a == STATUS_TOKEN else a for a in c["args"][1:]]
    ctx = serve.make_context("serve", args)
    assert ctx.params["kubernetes"] is True
    assert ctx.params["status_address"].endswith(":15014")
    assert status_access_error(ctx.params["status_address"], ctx.params["status_token_file"]) is None


def test_status_api_beyond_loopback_requires_a_projected_token() -> None:
    """The status API listens on the pod network, so it needs a bearer token: the token file
    is a projected service-account token of its own audience (good for nothing else,
    rotated by the kubelet, different in every pod)."""
    from controlplane.serve import status_access_error

    _, pod, c = deployment()
    args = c["args"]
    address = args[args.index("--status-address") + 1]
    assert status_access_error(address, None) is not None  # serve would refuse it without a token
    token_file = Path(args[args.index("--status-token-file") + 1])
    assert token_file == Path(STATUS_TOKEN)
    [mount] = [m for m in c["volumeMounts"] if token_file.is_relative_to(m["mountPath"])]
    assert mount.get("readOnly") is True
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    [source] = volume["projected"]["sources"]
    sa_token = source["serviceAccountToken"]
    assert Path(mount["mountPath"]) / sa_token["path"] == token_file
    assert sa_token["audience"] == "meshline-status"  # not the API server's, not the CA's ("meshline")
    assert 600 <= sa_token["expirationSeconds"] <= 86400


def test_deployment_is_locked_down() -> None:
    _, pod, c = deployment()
    psc, csc = pod.get("securityContext", {}), c["securityContext"]

    def effective(key: str) -> object:
        return csc.get(key, psc.get(key))

    assert effective("runAsNonRoot") is True
    assert effective("runAsUser") == 10001
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["allowPrivilegeEscalation"] is False
    assert csc.get("privileged", False) is False
    assert csc["capabilities"]["drop"] == ["ALL"] and not csc["capabilities"].get("add")
    assert effective("seccompProfile") == {"type": "RuntimeDefault"}
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    assert all("hostPath" not in v for v in pod.get("volumes", []))


def probe_port(container: dict[str, Any], probe: dict[str, Any]) -> int:
    port = probe["httpGet"]["port"]
    if isinstance(port, str):
        port = {p["name"]: p["containerPort"] for p in container["ports"]}[port]
    return int(port)


def test_probes_hit_the_status_server() -> None:
    _, _, c = deployment()
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    status_port = int(c["args"][c["args"].index("--status-address") + 1].rpartition(":")[2])
    assert probe_port(c, c["livenessProbe"]) == probe_port(c, c["readinessProbe"]) == status_port == 15014
    assert c["livenessProbe"]["httpGet"].get("scheme", "HTTP") == "HTTP"


def test_probes_need_no_status_token(tmp_path: Path) -> None:
    """The kubelet sends no bearer token: the probe paths answer without one even when the
    status API requires a token."""
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from controlplane.status.app import create_app

    token = tmp_path / "token"
    token.write_text("s3cret\n")
    runtime = SimpleNamespace(ready=True, unsynced_sources=lambda: [])
    _, _, c = deployment()
    with TestClient(create_app(runtime, token)) as client:  # type: ignore[arg-type]
        assert client.get("/v1/proxies").status_code == 401
        for probe in (c["livenessProbe"], c["readinessProbe"]):
            assert client.get(probe["httpGet"]["path"]).status_code == 200


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels + matchExpressions) applied to `labels`."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {"In": key in labels and labels[key] in values, "NotIn": key not in labels or labels[key] not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def test_injection_fails_closed_except_where_the_cluster_must_heal() -> None:
    """An opted-in namespace gets no pod without its sidecar while the webhook is down
    (failurePolicy Fail); kube-system and the control plane's own namespace are never sent
    to it, whatever their labels, so they can always start pods."""
    hook_config = one_manifest("MutatingWebhookConfiguration", "meshline-sidecar-injector")
    hook, istio = hook_config["webhooks"]
    control_plane_ns = deployment()[0]["metadata"]["namespace"]

    def namespace(name: str, **labels: str) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": name, **labels}  # the API server sets the name label

    # Meshline's label, and Istio's `istio-injection: enabled` through the second entry.
    for h, opted_in in ((hook, {"meshline.io/dataplane-mode": "sidecar"}), (istio, {"istio-injection": "enabled"})):
        assert h["failurePolicy"] == "Fail"
        assert h["clientConfig"]["service"]["namespace"] == control_plane_ns == NAMESPACE
        selector = h["namespaceSelector"]
        assert selects(selector, namespace("shop", **opted_in))
        assert not selects(selector, namespace("shop"))
        assert not selects(selector, namespace("shop", **{"meshline.io/dataplane-mode": "ambient"}))
        for name in ("kube-system", control_plane_ns):
            assert not selects(selector, namespace(name, **opted_in)), name


def test_service_and_pdb_select_the_pods() -> None:
    dep, _, c = deployment()
    labels = dep["spec"]["template"]["metadata"]["labels"]
    svc = one_manifest("Service", "meshline")
    assert svc["spec"]["selector"].items() <= labels.items()
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]}
    container_ports = {p["name"]: p["containerPort"] for p in c["ports"]}

    def target(port: int | str) -> int:
        return container_ports[port] if isinstance(port, str) else port

    assert {
        name: port for name, (port, _) in ports.items() if name in CONTROL_PLANE_PORTS
    } == CONTROL_PLANE_PORTS
    assert {name: target(t) for name, (_, t) in ports.items()} == {
        **CONTROL_PLANE_PORTS, "https-webhook-443": 15017,
    }  # fmt: skip
    assert ports["https-webhook-443"][0] == 443
    pdb = one_manifest("PodDisruptionBudget", "meshline")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()


def rbac_roles() -> list[dict[str, Any]]:
    return [d for _, d in _MANIFESTS_ONLY if d["kind"] in ("ClusterRole", "Role")]


def test_rbac_has_no_wildcards_and_no_writes_on_watched_resources() -> None:
    roles = rbac_roles()
    assert roles
    watched: set[tuple[str, str]] = set()
    for role in roles:
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert all("*" not in v for v in rule.get(field, [])), (
                    f"{role['metadata']['name']}: wildcard in {field}"
                )
            assert "nonResourceURLs" not in rule
            if {"list", "watch"} & set(rule["verbs"]):
                watched |= {(g, r) for g in rule["apiGroups"] for r in rule["resources"]}
    for role in roles:
        name = f"{role['kind']}/{role['metadata']['name']}"
        for rule in role["rules"]:
            writes = WRITE_VERBS & set(rule["verbs"])
            if not writes:
                continue
            for g in rule["apiGroups"]:
                for r in rule["resources"]:
                    # The one exception: the CA root Secret, written by name in meshline-system
                    # (Role), while Secrets are watched for credentialName (TLS keys only).
                    exempt = (g, r) == ("", "secrets") and role["kind"] == "Role" and (
                        rule.get("resourceNames") == ["meshline-ca-root"] or set(rule["verbs"]) == {"create"})
                    assert exempt or (g, r) not in watched, f"{name}: {sorted(writes)} on watched {g}/{r}"
                    if r.endswith("/status"):
                        assert (g, r.removesuffix("/status")) in watched
                        assert writes <= {"update", "patch"}
                    elif writes - {"create"}:
                        assert rule.get("resourceNames"), f"{name}: {sorted(writes)} on every {r}"
                    assert "delete" not in writes and "deletecollection" not in writes
            assert not {"escalate", "bind", "impersonate"} & writes


def rules_for(group: str, resource: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [
        (role, rule)
        for role in rbac_roles()
        for rule in role["rules"]
        if group in rule["apiGroups"] and resource in rule["resources"]
    ]


def verbs(group: str, resource: str, *, cluster: bool = True) -> set[str]:
    return {
        v
        for role, rule in rules_for(group, resource)
        if (role["kind"] == "ClusterRole") == cluster
        for v in rule["verbs"]
    }


def test_rbac_grants_what_the_control_plane_needs() -> None:
    for group, resource in (
        ("", "namespaces"),
        ("", "services"),
        ("", "pods"),
        ("discovery.k8s.io", "endpointslices"),
    ):
        assert verbs(group, resource) == {"get", "list", "watch"}
    for crd in CRDS_BY_KIND.values():
        group, plural = crd["spec"]["group"], crd["spec"]["names"]["plural"]
        assert verbs(group, plural) == {"get", "list", "watch"}
        assert {"update", "patch"} <= verbs(group, f"{plural}/status") <= {"get", "update", "patch"}
    assert verbs("authentication.k8s.io", "tokenreviews") == {"create"}
    for resource, name in (
        ("mutatingwebhookconfigurations", "meshline-sidecar-injector"),
        ("validatingwebhookconfigurations", "meshline-validator"),
    ):
        ((_, rule),) = rules_for("admissionregistration.k8s.io", resource)
        assert rule["resourceNames"] == [name] and set(rule["verbs"]) == {"get", "update", "patch"}
    # Secrets: read everywhere for DestinationRule credentialName, never written there.
    assert verbs("", "secrets") == {"get", "list", "watch"}
    for group, resource in (("coordination.k8s.io", "leases"), ("", "secrets")):
        if group == "coordination.k8s.io":
            assert not verbs(group, resource), f"{resource} must be granted in {NAMESPACE} only"
        found = [(role, r) for role, r in rules_for(group, resource) if role["kind"] == "Role"]
        assert found and all(role["metadata"]["namespace"] == NAMESPACE for role, _ in found)
        assert set().union(*(r["verbs"] for _, r in found)) == {"get", "create", "update", "patch"}
        assert all(r.get("resourceNames") for _, r in found if set(r["verbs"]) != {"create"})


NODE_PROXY = "meshline-node-proxy"


def test_rbac_bindings_point_at_the_service_account() -> None:
    roles = {(r["kind"], r["metadata"]["name"]) for r in rbac_roles()}
    bindings = [d for _, d in _MANIFESTS_ONLY if d["kind"] in ("ClusterRoleBinding", "RoleBinding")]
    bound = set()
    for b in bindings:
        ref = (b["roleRef"]["kind"], b["roleRef"]["name"])
        assert ref in roles
        account = NODE_PROXY if ref == ("ClusterRole", NODE_PROXY) else "meshline"  # the node agent's own
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
        if b["kind"] == "RoleBinding":
            assert b["metadata"]["namespace"] == NAMESPACE
        bound.add(ref)
    assert bound == roles
    one_manifest("ServiceAccount", "meshline")
    one_manifest("Namespace", NAMESPACE)


def test_node_proxy_only_reads_pods_and_namespaces() -> None:
    (role,) = [r for r in rbac_roles() if r["metadata"]["name"] == NODE_PROXY]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods", "namespaces"], "verbs": ["get", "list", "watch"]}]
    one_manifest("ServiceAccount", NODE_PROXY)


def test_node_proxy_daemonset(tmp_path: Path) -> None:
    """hostNetwork + hostPID; the agent's arguments are accepted by `meshline node-agent`;
    the netns directory reaches envoy from the agent's bind mounts."""
    from controlplane.cli import main

    ds = one_manifest("DaemonSet", NODE_PROXY)
    pod = ds["spec"]["template"]["spec"]
    assert ds["metadata"]["namespace"] == NAMESPACE and pod["serviceAccountName"] == NODE_PROXY
    assert pod["hostNetwork"] is True and pod["hostPID"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    containers = {c["name"]: c for c in pod["containers"]}
    assert set(containers) == {"envoy", "node-agent"}
    envoy, agent = containers["envoy"], containers["node-agent"]
    assert "meshline bootstrap --mode node" in envoy["args"][0] and "exec envoy" in envoy["args"][0]
    token_dir = {m["name"]: m["mountPath"] for m in agent["volumeMounts"]}["meshline-token"]
    token_at = agent["args"].index("--token-file") + 1
    assert agent["args"][token_at].startswith(token_dir + "/")  # the projected token
    args = list(agent["args"])
    args[token_at] = str(tmp_path / "token")  # the option wants an existing file
    (tmp_path / "token").write_text("t")
    command = main.get_command(None, args[0])  # type: ignore[arg-type]
    assert command is not None
    ctx = command.make_context("node-agent", args[1:])
    assert ctx.params["xds_address"] == "meshline.meshline-system.svc:15012"  # TLS
    assert str(ctx.params["ca_bundle"]).startswith(token_dir + "/")  # the projected trust bundle
    assert ctx.params["node"] == "$(NODE_NAME)"  # expanded by the kubelet from the env below
    for c in (envoy, agent):
        node = [e for e in c["env"] if e["name"] == "NODE_NAME"]
        assert node and node[0]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    volumes = {v["name"]: v for v in pod["volumes"]}
    netns_dir = str(ctx.params["netns_dir"])
    assert volumes["netns"]["hostPath"]["path"] == netns_dir
    mounts = {c["name"]: {m["name"]: m for m in c["volumeMounts"]}["netns"] for c in (envoy, agent)}
    assert mounts["node-agent"]["mountPath"] == mounts["envoy"]["mountPath"] == netns_dir
    assert mounts["node-agent"]["mountPropagation"] == "Bidirectional" and agent["securityContext"]["privileged"]
    assert mounts["envoy"]["mountPropagation"] == "HostToContainer"
    assert set(envoy["securityContext"]["capabilities"]["add"]) == {"NET_ADMIN", "SYS_ADMIN"}
    source, bundle = volumes["meshline-token"]["projected"]["sources"]
    assert source["serviceAccountToken"]["audience"] == "meshline"
    assert bundle["configMap"]["name"] == "meshline-ca-root"  # the trust bundle for 15012


def bootstrap_of(script: str, env: dict[str, str], tmp_path: Path) -> dict[str, Any]:
    """Runs the `meshline bootstrap ... > FILE` command of a container's start script (with
    `env`, and the token file replaced by a temporary one); the Envoy bootstrap it prints."""
    import shlex
    import string

    from click.testing import CliRunner

    from controlplane.cli import main

    text = script.replace("\\\n", " ")
    (line,) = [ln for ln in text.splitlines() if ln.strip().startswith("meshline bootstrap")]
    argv = shlex.split(string.Template(line.partition(" > ")[0]).substitute(env))
    token = tmp_path / "token"
    token.write_text("t0k3n")
    argv[argv.index("--token-file") + 1] = str(token)
    if "--ca-bundle" in argv:  # the projected ConfigMap key
        from controlplane.ca import CertificateAuthority
        CertificateAuthority.load_or_create(tmp_path / "ca")
        argv[argv.index("--ca-bundle") + 1] = str(tmp_path / "ca" / "root-cert.pem")
    r = CliRunner().invoke(main, argv[1:])
    assert r.exit_code == 0, r.output
    doc: dict[str, Any] = yaml.safe_load(r.output)
    return doc


def test_node_proxy_and_waypoint_bootstraps_render(tmp_path: Path) -> None:
    env = {"NODE_NAME": "node-1", "POD_NAME": "p-0", "POD_NAMESPACE": NAMESPACE, "SERVICE_ACCOUNT": "waypoint",
           "MESHLINE_XDS_ADDRESS": "meshline.meshline-system.svc:15012",
           "MESHLINE_TOKEN_FILE": "/var/run/secrets/meshline/tokens/meshline-token",
           "MESHLINE_CA_BUNDLE": "/var/run/secrets/meshline/tokens/root-cert.pem"}
    ds = one_manifest("DaemonSet", NODE_PROXY)
    (envoy,) = [c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == "envoy"]
    node = bootstrap_of(envoy["args"][0], env, tmp_path)
    assert node["node"]["id"] == "node-1" and node["node"]["metadata"]["mode"] == "node"
    for boot in (node,):  # over TLS, the token read from its file at every stream
        g = boot["dynamic_resources"]["ads_config"]["grpc_services"][0]["google_grpc"]
        assert g["target_uri"].endswith(":15012") and "ssl_credentials" in g["channel_credentials"]
    (c,) = one_manifest("Deployment", "waypoint")["spec"]["template"]["spec"]["containers"]
    waypoint = bootstrap_of(c["args"][0], {**env, "POD_NAMESPACE": "default"}, tmp_path)
    assert waypoint["node"]["metadata"]["mode"] == "waypoint"
    for boot, container in ((node, envoy), (waypoint, c)):  # the probes' port is served
        listeners = boot["static_resources"].get("listeners", [])
        ports = {ln["address"]["socket_address"]["port_value"] for ln in listeners}
        assert container["readinessProbe"]["httpGet"]["port"] in ports


def test_waypoint_template() -> None:
    dep, svc = one_manifest("Deployment", "waypoint"), one_manifest("Service", "waypoint")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert labels["meshline.io/waypoint"] == "waypoint"
    assert svc["spec"]["selector"].items() <= labels.items()
    assert [(p["name"], p["port"]) for p in svc["spec"]["ports"]] == [("tunnel", 15008)]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert "meshline bootstrap --mode waypoint" in c["args"][0]
    assert {p["name"]: p["containerPort"] for p in c["ports"]}["tunnel"] == 15008


def test_gateway_template(tmp_path: Path) -> None:
    """The ingress gateway example: `meshline bootstrap --mode gateway` for the Gateway its env
    names, Pods labelled as that Gateway's selector expects, the Service mapping 80/443 to the
    unprivileged 8080/8443 the container serves, the probe's port served by the bootstrap."""
    dep, svc = one_manifest("Deployment", "ingress-gateway"), one_manifest("Service", "ingress-gateway")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert labels["istio"] == "ingressgateway" and svc["spec"]["selector"].items() <= labels.items()
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    boot = bootstrap_of(c["args"][0], {"POD_NAME": "gw-0", "POD_NAMESPACE": "default",
                                       "SERVICE_ACCOUNT": "ingress-gateway", **{k: v for k, v in env.items() if v}},
                        tmp_path)
    md = boot["node"]["metadata"]
    assert md["mode"] == "gateway" and md["gateway"] == env["MESHLINE_GATEWAY"] == "ingress-gateway"
    assert md["labels"] == {"istio": "ingressgateway"}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert {(p["port"], ports[p["targetPort"]]) for p in svc["spec"]["ports"]} == {(80, 8080), (443, 8443)}
    served = {ln["address"]["socket_address"]["port_value"] for ln in boot["static_resources"]["listeners"]}
    assert c["readinessProbe"]["httpGet"]["port"] in served


def test_dockerfile_matches_the_deployment() -> None:
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines[0].startswith("FROM python:3.11-slim")
    assert re.search(r"^RUN .*pip install \.", text, re.M) or "pip install ." in text
    user = [ln for ln in lines if ln.startswith("USER ")][-1]
    assert user.split()[1].split(":")[0] == "10001"
    final_stage = text[text.rindex("\nFROM "):]  # the default target is the control-plane image
    exposed = {int(p) for ln in final_stage.splitlines() if ln.startswith("EXPOSE ") for p in ln.split()[1:]}
    assert exposed == set(CONTROL_PLANE_PORTS.values())
    assert 'ENTRYPOINT ["meshline"]' in lines
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "tests"} <= set(ignored)


# --------------------------------------------------------------------------- samples/k8s


def sample_objects(kind: str) -> list[dict[str, Any]]:
    return [d for i, d in manifest_docs() if i.startswith("samples/k8s/") and d["kind"] == kind]


def test_sample_namespace_uses_sidecars() -> None:
    (ns,) = sample_objects("Namespace")
    assert ns["metadata"]["labels"]["meshline.io/dataplane-mode"] == "sidecar"
    namespaced = [d for i, d in manifest_docs() if i.startswith("samples/k8s/") and d["kind"] != "Namespace"]
    assert {d["metadata"]["namespace"] for d in namespaced} == {ns["metadata"]["name"]}


def test_sample_is_the_bookinfo_mesh() -> None:
    """samples/k8s deploys the mesh of samples/bookinfo: the same Services and routing."""
    bookinfo = [d for p in sorted((ROOT / "samples" / "bookinfo").glob("*.yaml")) for d in load_docs(p)]

    def services(docs: list[dict[str, Any]]) -> dict[str, list[tuple[str, int]]]:
        return {
            d["metadata"]["name"]: sorted((p["name"], p["port"]) for p in d["spec"]["ports"])
            for d in docs
            if d["kind"] == "Service"
        }

    def specs(docs: list[dict[str, Any]]) -> dict[tuple[str, str], Any]:
        return {(d["kind"], d["metadata"]["name"]): d["spec"] for d in docs if is_mesh_cr(d)}

    k8s = [d for i, d in manifest_docs() if i.startswith("samples/k8s/")]
    assert services(k8s) == services(bookinfo)
    assert specs(k8s) == specs(bookinfo)


def test_sample_workloads_back_every_service_and_subset() -> None:
    deployments = sample_objects("Deployment")
    accounts = {sa["metadata"]["name"] for sa in sample_objects("ServiceAccount")}
    pod_labels = []
    for dep in deployments:
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert dep["spec"]["template"]["spec"]["serviceAccountName"] in accounts
        pod_labels.append((labels, dep["spec"]["template"]["spec"]["containers"]))
    services = {s["metadata"]["name"]: s for s in sample_objects("Service")}
    for name, svc in services.items():
        backing = [c for labels, c in pod_labels if svc["spec"]["selector"].items() <= labels.items()]
        assert backing, f"no pods for Service {name}"
        for port in svc["spec"]["ports"]:
            assert port["name"], "Meshline needs named (or appProtocol) ports to detect the protocol"
            for containers in backing:
                assert any(p.get("name") == port["targetPort"] for c in containers for p in c["ports"])
    for dr in sample_objects("DestinationRule"):
        selector = services[dr["spec"]["host"]]["spec"]["selector"]
        for subset in dr["spec"]["subsets"]:
            wanted = {**selector, **subset["labels"]}
            assert any(wanted.items() <= labels.items() for labels, _ in pod_labels), subset["name"]
    for vs in sample_objects("VirtualService"):
        for route in vs["spec"]["http"]:
            for dest in route.get("route", []):
                assert dest["destination"]["host"] in services
