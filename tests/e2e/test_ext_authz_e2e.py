"""CUSTOM authorization through a real Envoy sidecar and a real (small) HTTP external
authorizer: `meshline serve --mesh-config` with Istio's `envoyExtAuthzHttp` provider, a
CUSTOM AuthorizationPolicy on `/admin*`. The authorizer speaks Envoy's HTTP ext_authz
protocol: it receives the original request's method, path (with the provider's pathPrefix)
and the headers the provider lets through, and answers 200 (allow) or 403 (deny)."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from controlplane.localrun import free_port, stop
from tests.e2e.conftest import eventually, start_server_sidecar, started

pytestmark = pytest.mark.e2e
NS = "xa"
SERVER_IP, SERVER_APP, SERVER_OUT = "127.0.0.181", "127.0.1.181", "127.0.0.182"
AUTHZ_IP = "127.0.0.183"


class Authorizer:
    """Allows a check whose request carries `x-ext-authz: allow`; records every check."""

    def __init__(self, port: int) -> None:
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        seen = self.seen

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # a connection per check: once closed, nothing is pooled

            def log_message(self, format: str, *args: object) -> None:
                return

            def _check(self) -> None:
                headers = {k.lower(): v for k, v in self.headers.items()}
                seen.append((self.command, self.path, headers))
                allowed = headers.get("x-ext-authz") == "allow"
                body = b"allowed\n" if allowed else b"denied by ext-authz\n"
                self.send_response(200 if allowed else 403)
                if allowed:
                    self.send_header("x-user", "alice")  # to the upstream (headersToUpstreamOnAllow)
                else:
                    self.send_header("x-reason", "no allow header")  # to the client (headersToDownstreamOnDeny)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _check

        self.server = ThreadingHTTPServer((AUTHZ_IP, port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def paths(self) -> list[str]:
        return [p for _, p, _ in self.seen]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def mesh_yaml(port: int, authz_port: int) -> str:
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": NS, "labels": {"meshline.io/dataplane-mode": "sidecar"}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "server", "namespace": NS},
         "spec": {"selector": {"app": "server"}, "ports": [{"name": "http", "port": port, "targetPort": port}]}},
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": "server-0", "namespace": NS, "labels": {"app": "server"},
                      "annotations": {"meshline.io/status": "injected", "meshline.io/app-address": SERVER_APP}},
         "spec": {"containers": [{"name": "app", "image": "x", "ports": [{"containerPort": port}]}]},
         "status": {"podIP": SERVER_IP}},
        # The authorizer: a mesh service without a sidecar (plaintext), no selector.
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ext-authz", "namespace": NS},
         "spec": {"ports": [{"name": "http", "port": authz_port, "targetPort": authz_port}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "ext-authz-1", "namespace": NS, "labels": {"kubernetes.io/service-name": "ext-authz"}},
         "addressType": "IPv4", "ports": [{"name": "http", "port": authz_port}],
         "endpoints": [{"addresses": [AUTHZ_IP], "conditions": {"ready": True}}]},
        {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
         "metadata": {"name": "ext-authz", "namespace": NS},
         "spec": {"selector": {"matchLabels": {"app": "server"}}, "action": "CUSTOM",
                  "provider": {"name": "sample-ext-authz-http"},
                  "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]}},
    ]
    return yaml.safe_dump_all(docs, sort_keys=False)


def mesh_config(authz_port: int, name: str = "sample-ext-authz-http") -> str:
    """As in Istio's ext-authz task (the `mesh` key of the istio ConfigMap)."""
    return yaml.safe_dump({"extensionProviders": [{"name": name, "envoyExtAuthzHttp": {
        "service": f"ext-authz.{NS}.svc.cluster.local", "port": authz_port, "pathPrefix": "/check",
        "includeRequestHeadersInCheck": ["x-ext-authz"], "headersToUpstreamOnAllow": ["x-user"],
        "headersToDownstreamOnDeny": ["x-reason"], "timeout": "5s"}}]})


class Env:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.port, self.authz_port = free_port(), free_port()
        self.xds, self.status, self.admin = free_port(), free_port(), free_port()
        self.config = work / "config"
        self.config.mkdir()
        self.mesh_config = work / "mesh-config.yaml"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.envoy: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(timeout=10)
        self.authorizer = Authorizer(self.authz_port)

    def start(self) -> None:
        (self.config / "mesh.yaml").write_text(mesh_yaml(self.port, self.authz_port))
        self.mesh_config.write_text(mesh_config(self.authz_port))
        self.envoy = start_server_sidecar(self.work, self.procs, ns=NS, app=SERVER_APP, port=self.port,
                                          outbound=SERVER_OUT, xds=self.xds, status=self.status, admin=self.admin)
        eventually(lambda: self.get("/public").status_code == 200, timeout=60)

    def get(self, path: str, **headers: str) -> httpx.Response:
        """Straight to the server sidecar's inbound listener (plaintext), as a client would."""
        return self.http.get(f"http://{SERVER_IP}:{self.port}{path}", headers={"host": f"server.{NS}", **headers})

    def close(self) -> None:
        self.http.close()
        self.authorizer.close()
        stop(self.envoy)
        for p in reversed(self.procs):
            stop(p)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    yield from started(Env(tmp_path_factory.mktemp("extauthz")))


def test_matching_requests_ask_the_authorizer(env: Env) -> None:
    ok = env.get("/admin", **{"x-ext-authz": "allow"})
    assert ok.status_code == 200, ok.text
    assert ok.json()["headers"].get("x-user") == "alice"  # the authorizer's header reached the app
    method, path, headers = env.authorizer.seen[-1]
    assert (method, path) == ("GET", "/check/admin") and headers["x-ext-authz"] == "allow"
    denied = env.get("/admin/users")
    assert denied.status_code == 403 and denied.headers.get("x-reason") == "no allow header", denied.headers
    assert env.authorizer.paths()[-1] == "/check/admin/users"


def test_requests_no_custom_rule_matches_never_reach_the_authorizer(env: Env) -> None:
    before = len(env.authorizer.seen)
    for _ in range(3):
        r = env.get("/public")
        assert r.status_code == 200 and r.json()["path"] == "/public"
    assert len(env.authorizer.seen) == before, env.authorizer.paths()[before:]


def test_reloaded_mesh_config_without_the_provider_fails_closed(env: Env) -> None:
    env.mesh_config.write_text(mesh_config(env.authz_port, name="renamed"))
    # The policy's provider is gone: its rules deny (Envoy's RBAC filter answers).
    eventually(lambda: "RBAC" in env.get("/admin", **{"x-ext-authz": "allow"}).text, timeout=60)
    before = len(env.authorizer.seen)
    r = env.get("/admin", **{"x-ext-authz": "allow"})
    assert r.status_code == 403 and "RBAC: access denied" in r.text
    assert env.get("/public").status_code == 200
    assert len(env.authorizer.seen) == before  # and the authorizer is no longer asked
    errors = httpx.get(f"http://127.0.0.1:{env.status}/v1/config/errors").json()
    assert any(e["object"] == f"AuthorizationPolicy/{NS}/ext-authz" and "unknown extension provider" in e["message"]
               for e in errors), errors
    env.mesh_config.write_text(mesh_config(env.authz_port))
    eventually(lambda: env.get("/admin", **{"x-ext-authz": "allow"}).status_code == 200, timeout=60)


def test_unreachable_authorizer_denies_when_not_fail_open(env: Env) -> None:
    env.authorizer.close()
    r = env.get("/admin", **{"x-ext-authz": "allow"})
    assert r.status_code == 403, r.text
    assert env.get("/public").status_code == 200
