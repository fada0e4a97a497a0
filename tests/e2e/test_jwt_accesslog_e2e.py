"""RequestAuthentication and Telemetry access logging through a real Envoy sidecar (issue 18).

A JWKS server on loopback (Python http.server) publishes an RSA key; tokens are signed here
with `cryptography` (RS256 against that key, which Envoy fetches through the jwksUri; ES256
against an inline `jwks`). The server's sidecar (bind capture) validates them, and its
AuthorizationPolicy needs a request principal on /secure and a `groups` claim on /group.
Its Telemetry writes every request as JSON (a mesh-config `envoyFileAccessLog` provider with
labels) to a file, and failing ones (a CEL filter) in Istio's default text format to Envoy's
stdout (the built-in `envoy` provider)."""

from __future__ import annotations

import base64
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from controlplane.localrun import free_port, stop
from tests.e2e.conftest import eventually, start_server_sidecar, started

pytestmark = pytest.mark.e2e
NS = "jw"
SERVER_IP, SERVER_APP, SERVER_OUT = "127.0.0.191", "127.0.1.191", "127.0.0.192"
JWKS_IP = "127.0.0.193"
ISSUER, ES_ISSUER = "https://issuer.test", "es-issuer"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _int(n: int, size: int | None = None) -> str:
    return _b64(n.to_bytes(size or (n.bit_length() + 7) // 8, "big"))


class Keys:
    def __init__(self) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.other = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # not published

    def rsa_jwks(self) -> dict[str, Any]:
        n = self.rsa.public_key().public_numbers()
        return {"keys": [{"kty": "RSA", "kid": "rsa-1", "alg": "RS256", "use": "sig", "n": _int(n.n), "e": _int(n.e)}]}

    def ec_jwks(self) -> dict[str, Any]:
        n = self.ec.public_key().public_numbers()
        return {"keys": [{"kty": "EC", "kid": "ec-1", "alg": "ES256", "crv": "P-256",
                          "x": _int(n.x, 32), "y": _int(n.y, 32)}]}

    def token(self, iss: str = ISSUER, sub: str = "alice", alg: str = "RS256", signer: Any = None,
              **claims: Any) -> str:
        now = int(time.time())
        header = {"alg": alg, "typ": "JWT", "kid": "rsa-1" if alg == "RS256" else "ec-1"}
        payload = {"iss": iss, "sub": sub, "iat": now, "exp": now + 600, **claims}
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}".encode()
        if alg == "RS256":
            sig = (signer or self.rsa).sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        else:
            r, s = decode_dss_signature(self.ec.sign(signing_input, ec.ECDSA(hashes.SHA256())))
            sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return f"{signing_input.decode()}.{_b64(sig)}"


class JwksServer:
    def __init__(self, port: int, jwks: dict[str, Any]) -> None:
        body = json.dumps(jwks).encode()
        self.fetches = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                return

            def do_GET(self) -> None:
                outer.fetches += 1
                self.send_response(200 if self.path == "/jwks.json" else 404)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer((JWKS_IP, port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def mesh_yaml(port: int, jwks_port: int, keys: Keys) -> str:
    server = {"matchLabels": {"app": "server"}}
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
        {"apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
         "metadata": {"name": "jwt", "namespace": NS},
         "spec": {"selector": server, "jwtRules": [
             {"issuer": ISSUER, "jwksUri": f"http://{JWKS_IP}:{jwks_port}/jwks.json",
              "outputPayloadToHeader": "x-jwt-payload",
              "outputClaimToHeaders": [{"header": "x-jwt-sub", "claim": "sub"}],
              "spaceDelimitedClaims": ["roles"]},
             {"issuer": ES_ISSUER, "jwks": json.dumps(keys.ec_jwks())}]}},
        {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
         "metadata": {"name": "access", "namespace": NS},
         "spec": {"selector": server, "action": "ALLOW", "rules": [
             {"to": [{"operation": {"paths": ["/public*"]}}]},
             {"from": [{"source": {"requestPrincipals": ["*"]}}], "to": [{"operation": {"paths": ["/secure*"]}}]},
             {"to": [{"operation": {"paths": ["/group*"]}}],
              "when": [{"key": "request.auth.claims[groups]", "values": ["admins"]}]},
             {"from": [{"source": {"requestPrincipals": [f"{ES_ISSUER}/bob"]}}],
              "to": [{"operation": {"paths": ["/bob*"]}}]},
             {"to": [{"operation": {"paths": ["/scope*"]}}],
              "when": [{"key": "request.auth.claims[scope]", "values": ["write"]}]},
             {"to": [{"operation": {"paths": ["/roles*"]}}],
              "when": [{"key": "request.auth.claims[roles]", "values": ["editor"]}]},
         ]}},
        {"apiVersion": "telemetry.istio.io/v1", "kind": "Telemetry",
         "metadata": {"name": "logs", "namespace": NS},
         "spec": {"accessLogging": [
             {"providers": [{"name": "json-file"}]},
             {"match": {"mode": "SERVER"}, "providers": [{"name": "envoy"}],
              "filter": {"expression": "response.code >= 400"}},
         ]}},
    ]
    return yaml.safe_dump_all(docs, sort_keys=False)


class Env:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.port, self.jwks_port = free_port(), free_port()
        self.xds, self.status, self.admin = free_port(), free_port(), free_port()
        self.config = work / "config"
        self.config.mkdir()
        self.access_log = work / "access.json.log"
        self.mesh_config = work / "mesh-config.yaml"
        self.keys = Keys()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.envoy: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(timeout=10)
        self.jwks = JwksServer(self.jwks_port, self.keys.rsa_jwks())

    def start(self) -> None:
        (self.config / "mesh.yaml").write_text(mesh_yaml(self.port, self.jwks_port, self.keys))
        self.mesh_config.write_text(yaml.safe_dump({"extensionProviders": [{"name": "json-file", "envoyFileAccessLog": {
            "path": str(self.access_log),
            "logFormat": {"labels": {"method": "%REQ(:METHOD)%", "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
                                     "code": "%RESPONSE_CODE%", "details": "%RESPONSE_CODE_DETAILS%"}}}}]}))
        self.envoy = start_server_sidecar(self.work, self.procs, ns=NS, app=SERVER_APP, port=self.port,
                                          outbound=SERVER_OUT, xds=self.xds, status=self.status, admin=self.admin)
        eventually(lambda: self.get("/public").status_code == 200, timeout=60)

    def get(self, path: str, token: str | None = None, **headers: str) -> httpx.Response:
        """Straight to the server sidecar's inbound listener (plaintext), as a client would."""
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        return self.http.get(f"http://{SERVER_IP}:{self.port}{path}", headers={"host": f"server.{NS}", **headers})

    def json_log(self) -> list[dict[str, Any]]:
        if not self.access_log.exists():
            return []
        return [json.loads(line) for line in self.access_log.read_text().splitlines() if line.strip()]

    def envoy_stdout(self) -> str:
        return (self.work / "server-0.log").read_text(errors="replace")

    def close(self) -> None:
        self.http.close()
        self.jwks.close()
        stop(self.envoy)
        for p in reversed(self.procs):
            stop(p)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    yield from started(Env(tmp_path_factory.mktemp("jwt")))


def test_a_valid_token_is_accepted_and_its_claims_reach_the_app(env: Env) -> None:
    token = env.keys.token(sub="alice")
    r = eventually(lambda: (resp := env.get("/secure", token)).status_code == 200 and resp, timeout=30)
    headers = r.json()["headers"]
    assert headers.get("x-jwt-sub") == "alice"  # outputClaimToHeaders
    payload = json.loads(base64.urlsafe_b64decode(headers["x-jwt-payload"] + "=="))  # outputPayloadToHeader
    assert payload["iss"] == ISSUER and payload["sub"] == "alice"
    assert "authorization" not in headers  # forwardOriginalToken false: the token is removed
    assert env.jwks.fetches >= 1  # Envoy fetched the keys from the jwksUri


def test_invalid_tokens_are_refused_with_401(env: Env) -> None:
    assert env.get("/secure", env.keys.token()).status_code == 200
    wrong_issuer = env.get("/public", env.keys.token(iss="https://evil.test"))
    assert wrong_issuer.status_code == 401, wrong_issuer.text  # even where no policy needs a token
    bad_signature = env.get("/secure", env.keys.token(signer=env.keys.other))
    assert bad_signature.status_code == 401
    expired = env.get("/secure", env.keys.token(exp=int(time.time()) - 3600))
    assert expired.status_code == 401


def test_no_token_is_allowed_unless_a_policy_needs_a_request_principal(env: Env) -> None:
    assert env.get("/public").status_code == 200
    r = env.get("/secure")
    assert r.status_code == 403 and "RBAC: access denied" in r.text


def test_claim_based_allow(env: Env) -> None:
    assert env.get("/group", env.keys.token(groups=["users", "admins"])).status_code == 200
    assert env.get("/group", env.keys.token(groups="admins")).status_code == 200
    assert env.get("/group", env.keys.token(groups=["users"])).status_code == 403
    assert env.get("/group").status_code == 403


def test_scope_is_a_space_separated_list(env: Env) -> None:
    assert env.get("/scope", env.keys.token(scope="read write")).status_code == 200
    assert env.get("/scope", env.keys.token(scope="read")).status_code == 403
    assert env.get("/scope", env.keys.token(scope="rewrite")).status_code == 403


def test_space_delimited_claims_are_matched_word_by_word(env: Env) -> None:
    # Istio 1.31 spaceDelimitedClaims: [roles] (issue 16): "these claims will be split on
    # whitespace and each individual value will be available for matching"
    assert env.get("/roles", env.keys.token(roles="viewer editor")).status_code == 200
    assert env.get("/roles", env.keys.token(roles="viewer")).status_code == 403
    assert env.get("/roles", env.keys.token(roles="editors")).status_code == 403


def test_inline_jwks_es256_and_an_exact_request_principal(env: Env) -> None:
    bob = env.keys.token(iss=ES_ISSUER, sub="bob", alg="ES256")
    assert env.get("/secure", bob).status_code == 200
    assert env.get("/bob", bob).status_code == 200
    carol = env.keys.token(iss=ES_ISSUER, sub="carol", alg="ES256")
    assert env.get("/bob", carol).status_code == 403
    assert env.get("/bob", env.keys.token(iss=ISSUER, sub="bob")).status_code == 403  # other issuer's bob


def test_access_logs_in_the_chosen_formats(env: Env) -> None:
    marker = f"/public/log-{time.time_ns()}"
    denied = f"/secure/log-{time.time_ns()}"
    assert env.get(marker).status_code == 200
    assert env.get(denied).status_code == 403
    # Every request, as JSON with the provider's labels, in the provider's file.
    lines = eventually(lambda: [e for e in env.json_log() if e.get("path") in (marker, denied)]
                       if len([e for e in env.json_log() if e.get("path") in (marker, denied)]) == 2 else None,
                       timeout=30)
    by_path = {e["path"]: e for e in lines}
    assert by_path[marker]["code"] == 200 and by_path[marker]["method"] == "GET"
    assert by_path[denied]["code"] == 403 and by_path[denied]["details"] == "rbac_access_denied_matched_policy[none]"
    # Failing requests only (CEL filter), in Istio's default text format, on Envoy's stdout.
    line = eventually(lambda: next((ln for ln in env.envoy_stdout().splitlines() if denied in ln), None), timeout=30)
    assert f'"GET {denied} HTTP/1.1" 403 - rbac_access_denied_matched_policy[none]' in line, line
    assert f'"server.{NS}"' in line
    assert marker not in env.envoy_stdout()


def test_a_telemetry_envoy_refuses_is_withheld_and_logging_goes_on(env: Env) -> None:
    """A CEL expression Envoy cannot parse: pre-flight (Meshline's own Envoy) rejects the
    listener, the Telemetry is withheld with Envoy's message, and the sidecar keeps its config."""
    bad = env.config / "bad-telemetry.yaml"
    bad.write_text(yaml.safe_dump({
        "apiVersion": "telemetry.istio.io/v1", "kind": "Telemetry", "metadata": {"name": "bad", "namespace": NS},
        "spec": {"selector": {"matchLabels": {"app": "server"}},
                 "accessLogging": [{"providers": [{"name": "json-file"}], "filter": {"expression": "response.code >="}}]}}))
    try:
        errs = eventually(lambda: [e for e in httpx.get(f"http://127.0.0.1:{env.status}/v1/config/errors").json()
                                   if e["object"] == f"Telemetry/{NS}/bad" and e["withheld"]], timeout=60)
        assert "filter expression" in errs[0]["message"], errs
        marker = f"/public/after-{time.time_ns()}"
        assert env.get(marker).status_code == 200
        eventually(lambda: any(e.get("path") == marker for e in env.json_log()), timeout=30)
        stats = httpx.get(f"http://127.0.0.1:{env.admin}/stats?filter=lds.update_rejected").text
        assert "listener_manager.lds.update_rejected: 0" in stats, stats  # Envoy never saw it
    finally:
        bad.unlink()


def test_outbound_requests_log_on_the_client_side_only_where_the_mode_says(env: Env) -> None:
    """Through the sidecar's outbound listener (the service has no endpoints: Envoy answers 503
    itself): the JSON provider (mode CLIENT_AND_SERVER) logs it; the text provider, which logs
    failures but SERVER side only, does not."""
    marker = f"/public/outbound-{time.time_ns()}"
    r = env.http.get(f"http://{SERVER_OUT}:{env.port}{marker}", headers={"host": f"server.{NS}"})
    assert r.status_code == 503, r.text
    (line,) = eventually(lambda: [e for e in env.json_log() if e.get("path") == marker], timeout=30)
    assert line["code"] == 503 and line["details"] == "no_healthy_upstream"
    denied = f"/secure/inbound-{time.time_ns()}"
    assert env.get(denied).status_code == 403  # a SERVER-side failure: the text provider logs it
    eventually(lambda: denied in env.envoy_stdout(), timeout=30)
    assert marker not in env.envoy_stdout()
