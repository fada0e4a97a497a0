"""Gateway API routes attached to a Service (GAMMA) through a real Envoy sidecar driven by
`meshline serve` (directory mode, delta xDS): an 80/20 split seen in the responses, filters,
an invalid backend answered 500, the route status in `GET /v1/routes`, the VirtualService
for the same host overridden (and warned) and back in force once the route is gone; a
GRPCRoute routing gRPC calls by method.
The waypoint half is in tests/e2e/test_ambient_e2e.py."""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.e2e.conftest import HTTP_PORT, NS, MeshEnv, eventually
from tests.meshgen import Backend, service_yaml

pytestmark = pytest.mark.e2e

ROUTE = f"""apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: hdr-split, namespace: {NS}, generation: 4}}
spec:
  parentRefs: [{{group: "", kind: Service, name: hdr, port: {HTTP_PORT}}}]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /split}}}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {{set: [{{name: x-gamma, value: "yes"}}]}}
    backendRefs:
    - {{name: api, port: {HTTP_PORT}, weight: 80}}
    - {{name: legacy, port: {HTTP_PORT}, weight: 20}}
  - matches: [{{path: {{type: PathPrefix, value: /rewrite}}}}]
    filters:
    - type: URLRewrite
      urlRewrite: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: /}}}}
    backendRefs: [{{name: api, port: {HTTP_PORT}}}]
  - matches: [{{path: {{type: Exact, value: /broken}}}}]
    backendRefs: [{{name: nosuch, port: {HTTP_PORT}}}]
"""


@pytest.fixture(scope="module")
def gamma() -> Iterator[MeshEnv]:
    with tempfile.TemporaryDirectory(prefix="meshline-gamma-") as d:
        env = MeshEnv("delta", Path(d))
        try:
            env.start()
            yield env
        finally:
            env.close()


def _json(r: Any) -> dict[str, Any]:
    return dict(r.json())


def test_http_route_on_a_service_splits_80_20_through_the_sidecar(gamma: MeshEnv) -> None:
    # Before: the VirtualService `hdr` routes to hdr and sets x-added.
    assert _json(gamma.get("hdr"))["backend"] == "hdr"
    gamma.write("30-gamma.yaml", ROUTE)
    eventually(lambda: _json(gamma.get("hdr", "/split/a"))["backend"] in ("api", "legacy"))
    n = 200
    seen = [_json(gamma.get("hdr", f"/split/{i}")) for i in range(n)]
    counts = Counter(s["backend"] for s in seen)
    assert set(counts) == {"api", "legacy"}, counts
    # 80/20 over 200 requests: std-dev ~5.7 requests; +-30 is more than 5 sigma.
    assert abs(counts["api"] - 0.8 * n) <= 30, counts
    assert all(s["headers"].get("x-gamma") == "yes" for s in seen)
    assert all("x-added" not in s["headers"] for s in seen)  # the VirtualService no longer applies
    # Path-segment prefix: /splitter is not under /split (no rule matches: 404).
    assert gamma.get("hdr", "/splitter").status_code == 404
    r = _json(gamma.get("hdr", "/rewrite/abc"))
    assert (r["backend"], r["path"]) == ("api", "/abc")
    assert gamma.get("hdr", "/broken").status_code == 500


def test_route_status_and_the_overridden_virtual_service_are_reported(gamma: MeshEnv) -> None:
    def route() -> dict[str, Any]:
        routes = gamma.client.get(f"{gamma.status_url}/v1/routes").json()
        return next(r for r in routes if r["name"] == "hdr-split")

    parents = eventually(lambda: route()["parents"])
    (entry,) = parents
    assert entry["controllerName"] == "meshline.io/mesh-controller"
    assert entry["parentRef"] == {"group": "", "kind": "Service", "name": "hdr", "port": HTTP_PORT}
    conds = {c["type"]: c for c in entry["conditions"]}
    assert (conds["Accepted"]["status"], conds["Accepted"]["reason"]) == ("True", "Accepted")
    assert (conds["ResolvedRefs"]["status"], conds["ResolvedRefs"]["reason"]) == ("False", "BackendNotFound")
    assert "nosuch" in conds["ResolvedRefs"]["message"] and conds["Accepted"]["observedGeneration"] == 4
    assert route()["location"].endswith("30-gamma.yaml:1")
    errors = gamma.errors()
    assert any(e["kind"] == "VirtualService" and e["name"] == "hdr" and "HTTPRoute shop/hdr-split" in e["message"]
               for e in errors), errors
    assert any(e["kind"] == "HTTPRoute" and "BackendNotFound" in e["message"] and e["file"].endswith("30-gamma.yaml")
               for e in errors), errors


def test_invalid_route_update_keeps_the_last_good_one_and_removal_restores_the_virtual_service(
        gamma: MeshEnv) -> None:
    gamma.write("30-gamma.yaml", ROUTE.replace("type: PathPrefix, value: /split", "type: Bogus, value: /split"))
    eventually(lambda: any(e["kind"] == "HTTPRoute" and e["severity"] == "error" and "Bogus" in e["message"]
                           for e in gamma.errors()))
    assert _json(gamma.get("hdr", "/split/x"))["backend"] in ("api", "legacy")  # last good version serves
    gamma.remove("30-gamma.yaml")
    eventually(lambda: _json(gamma.get("hdr", "/split/x"))["backend"] == "hdr")
    assert _json(gamma.get("hdr"))["headers"].get("x-added") == "yes"


GRPC_PORT = 19151
GRPC_BACKENDS = {"greeter-a": "127.0.0.151", "greeter-b": "127.0.0.152"}


def _grpc_server(name: str, ip: str) -> grpc.Server:
    """A gRPC server answering every unary method of pkg.Greeter with its own name."""
    def answer(request: bytes, context: grpc.ServicerContext) -> bytes:
        return name.encode()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "pkg.Greeter", {m: grpc.unary_unary_rpc_method_handler(answer) for m in ("Hello", "Bye")}),))
    server.add_insecure_port(f"{ip}:{GRPC_PORT}")
    server.start()
    return server


def test_grpc_route_on_a_service_routes_by_method_through_the_sidecar(gamma: MeshEnv) -> None:
    servers = [_grpc_server(name, ip) for name, ip in GRPC_BACKENDS.items()]
    try:
        docs = [service_yaml("greeter", NS, GRPC_PORT, [Backend(ip, pod=f"greeter-{n}")
                                                         for n, ip in GRPC_BACKENDS.items()], port_name="grpc")]
        docs += [service_yaml(n, NS, GRPC_PORT, [Backend(ip)], port_name="grpc") for n, ip in GRPC_BACKENDS.items()]
        docs.append(f"""apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {{name: greeter, namespace: {NS}}}
spec:
  parentRefs: [{{group: "", kind: Service, name: greeter, port: {GRPC_PORT}}}]
  rules:
  - matches: [{{method: {{service: pkg.Greeter, method: Hello}}}}]
    backendRefs: [{{name: greeter-a, port: {GRPC_PORT}}}]
  - backendRefs: [{{name: greeter-b, port: {GRPC_PORT}}}]
""")
        gamma.write("40-grpc.yaml", "---\n".join(docs))
        with grpc.insecure_channel(f"127.0.0.1:{GRPC_PORT}",
                                   options=[("grpc.default_authority", f"greeter.{NS}:{GRPC_PORT}")]) as ch:
            def call(method: str) -> str:
                return bytes(ch.unary_unary(f"/pkg.Greeter/{method}")(b"", timeout=2)).decode()

            def ready() -> bool:  # the listener for the new port comes up with the config
                try:
                    return call("Hello") == "greeter-a"
                except grpc.RpcError:
                    return False

            eventually(ready)
            assert {call("Hello") for _ in range(10)} == {"greeter-a"}
            assert {call("Bye") for _ in range(10)} == {"greeter-b"}
    finally:
        for s in servers:
            s.stop(0)
        gamma.remove("40-grpc.yaml")
