"""Hostile JWTs against a real Envoy sidecar (issue 18, h8 review).

The set-up of `test_jwt_accesslog_e2e` (loopback JWKS server, tokens signed here with
`cryptography`), with a RequestAuthentication Istio users write to lock an API down: the
issuer's rule names an audience and copies claims to headers, and a second issuer's
`jwksUri` points at a port nothing listens on. Each test is one thing a hostile client
tries; Istio's documented answer is the expectation: a token no rule validates is refused
with 401, whatever the policy, and a header the JWT filter writes never comes from the
client.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

import tests.e2e.test_jwt_accesslog_e2e as base
from controlplane.localrun import free_port
from tests.e2e.conftest import eventually, started

pytestmark = pytest.mark.e2e
NS, ISSUER, ES_ISSUER = base.NS, base.ISSUER, base.ES_ISSUER
DOWN_ISSUER = "https://down.test"  # its jwksUri: a loopback port nothing listens on
AUDIENCE = "meshline-api"
BASE_MESH = base.mesh_yaml


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mesh_yaml(port: int, jwks_port: int, keys: base.Keys) -> str:
    """The server of the base test, with audiences, claim headers and an unreachable JWKS."""
    docs = list(yaml.safe_load_all(BASE_MESH(port, jwks_port, keys)))
    down_port = free_port()
    for d in docs:
        if d["kind"] == "RequestAuthentication":
            d["spec"]["jwtRules"] = [
                {"issuer": ISSUER, "audiences": [AUDIENCE], "jwksUri": f"http://{base.JWKS_IP}:{jwks_port}/jwks.json",
                 "outputPayloadToHeader": "x-jwt-payload",
                 "outputClaimToHeaders": [{"header": "x-jwt-sub", "claim": "sub"}]},
                {"issuer": DOWN_ISSUER, "jwksUri": f"http://127.0.0.1:{down_port}/jwks.json"},
                {"issuer": ES_ISSUER, "jwks": json.dumps(keys.ec_jwks())},
            ]
        if d["kind"] == "Telemetry":
            d["spec"] = {"accessLogging": [{"providers": [{"name": "envoy"}]}]}
    return yaml.safe_dump_all(docs, sort_keys=False)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[base.Env]:
    mp = pytest.MonkeyPatch()
    mp.setattr(base, "mesh_yaml", mesh_yaml)
    try:
        yield from started(base.Env(tmp_path_factory.mktemp("jwt-attacks")))
    finally:
        mp.undo()


def unsigned(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}.{_b64(signature)}"


def claims(iss: str = ISSUER, sub: str = "admin", **more: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": iss, "sub": sub, "aud": AUDIENCE, "iat": now, "exp": now + 600, **more}


def test_a_token_for_the_audience_is_accepted(env: base.Env) -> None:
    ok = env.keys.token(aud=AUDIENCE)
    r = eventually(lambda: (resp := env.get("/secure", ok)).status_code == 200 and resp, timeout=30)
    assert r.json()["headers"].get("x-jwt-sub") == "alice"


def test_a_token_for_another_audience_or_none_is_refused(env: base.Env) -> None:
    """Envoy's JWT filter (Istio's data plane too) answers a valid token for another audience
    with 403 and says why, even where the policy admits anyone."""
    for token in (env.keys.token(aud="someone-else"), env.keys.token(aud=["someone-else", "x"]),
                  env.keys.token()):  # the last one has no aud claim at all
        r = env.get("/public", token)
        assert r.status_code == 403 and "Audiences in Jwt are not allowed" in r.text, (r.status_code, r.text)


def test_alg_none_and_algorithm_confusion_are_refused(env: base.Env) -> None:
    none_token = unsigned({"alg": "none", "typ": "JWT", "kid": "rsa-1"}, claims())
    assert env.get("/public", none_token).status_code == 401
    assert env.get("/secure", none_token).status_code == 401
    # HS256 "signed" with the published RSA key as the HMAC secret (key confusion).
    secret = json.dumps(env.keys.rsa_jwks()["keys"][0]).encode()
    head = {"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}
    signing_input = f"{_b64(json.dumps(head).encode())}.{_b64(json.dumps(claims()).encode())}"
    forged = f"{signing_input}.{_b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"
    assert env.get("/secure", forged).status_code == 401
    # A valid token whose payload was swapped (signature of another payload).
    good = env.keys.token(aud=AUDIENCE, sub="alice").split(".")
    swapped = ".".join([good[0], _b64(json.dumps(claims(sub="admin")).encode()), good[2]])
    assert env.get("/secure", swapped).status_code == 401


def test_a_token_whose_keys_cannot_be_fetched_is_refused(env: base.Env) -> None:
    down = env.keys.token(iss=DOWN_ISSUER, aud=AUDIENCE)
    assert env.get("/public", down).status_code == 401
    assert env.get("/secure", down).status_code == 401
    # ... and the other issuers still work.
    assert env.get("/secure", env.keys.token(aud=AUDIENCE)).status_code == 200


def test_a_bad_token_in_the_default_query_parameter_is_refused(env: base.Env) -> None:
    """Without fromHeaders/fromParams Istio reads the Authorization header and `access_token`."""
    bad = env.keys.token(aud=AUDIENCE, signer=env.keys.other)
    assert env.get(f"/public?access_token={bad}").status_code == 401
    good = env.keys.token(aud=AUDIENCE)
    assert env.get(f"/secure?access_token={good}").status_code == 200


def test_claim_headers_cannot_be_supplied_by_the_client(env: base.Env) -> None:
    """`outputClaimToHeaders` / `outputPayloadToHeader` headers reach the app only from a
    validated token: a client without a token must not set them itself (Istio removes them)."""
    forged_payload = _b64(json.dumps(claims(sub="admin")).encode())
    r = env.get("/public", **{"x-jwt-sub": "admin", "x-jwt-payload": forged_payload})
    assert r.status_code == 200
    seen = r.json()["headers"]
    assert seen.get("x-jwt-sub") != "admin", seen
    assert seen.get("x-jwt-payload") != forged_payload, seen
    # With a valid token the filter's own values replace the client's.
    r = env.get("/secure", env.keys.token(aud=AUDIENCE, sub="alice"), **{"x-jwt-sub": "admin"})
    assert r.status_code == 200 and r.json()["headers"].get("x-jwt-sub") == "alice"
