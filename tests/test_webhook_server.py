"""The webhook server over real HTTPS: `serve_webhooks` on a free port with a certificate
from the Meshline CA. The client trusts only the CA's bundle and checks the hostname (the
Service DNS name, sent as SNI), as the API server does with the caBundle. /validate refuses
an invalid VirtualService with the field and the reason; bad input (fuzzed with
hypothesis) never yields a 5xx or a hang; huge and slow bodies are cut off quickly; the
serving certificate is re-issued before it expires."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime as dt
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.ca import CertificateAuthority
from controlplane.localrun import free_port
from webhook.config import WebhookConfig
from webhook.server import WebhookServer, default_dns_names

DNS_NAME = "meshline.meshline-system.svc"


class RunningServer:
    """`WebhookServer.serve()` on its own event loop in a thread."""

    def __init__(self, ca: CertificateAuthority, config: WebhookConfig, cert_ttl: dt.timedelta) -> None:
        self.server = WebhookServer(f"127.0.0.1:{free_port()}", ca, default_dns_names(), config, cert_ttl=cert_ttl)
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        async def main() -> None:
            ev = asyncio.Event()
            self.task = asyncio.create_task(self.server.serve(ev))
            await ev.wait()
            started.set()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

        self.thread = threading.Thread(target=lambda: self.loop.run_until_complete(main()), daemon=True)
        self.thread.start()
        assert started.wait(20), "webhook server did not start"
        self.port = self.server.port

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def running(ca: CertificateAuthority) -> Iterator[RunningServer]:
    cfg = WebhookConfig(sidecar_namespaces=frozenset({"shop"}), body_timeout_seconds=1.0)
    srv = RunningServer(ca, cfg, dt.timedelta(hours=1))
    yield srv
    srv.close()


def trusting(ca: CertificateAuthority) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca.trust_bundle())
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    return ctx


@pytest.fixture(scope="module")
def client(running: RunningServer, ca: CertificateAuthority) -> Iterator[httpx.Client]:
    def sni(request: httpx.Request) -> None:  # connect to 127.0.0.1, verify the Service's DNS name
        request.extensions["sni_hostname"] = DNS_NAME

    with httpx.Client(base_url=f"https://127.0.0.1:{running.port}", verify=trusting(ca), timeout=10.0,
                      event_hooks={"request": [sni]}) as c:
        yield c


def review(obj: Any, *, kind: str = "VirtualService", group: str = "networking.meshline.io",
           operation: str = "CREATE", uid: str = "uid-1", namespace: str = "shop", name: str = "") -> dict[str, Any]:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": uid, "kind": {"group": group, "version": "v1", "kind": kind}, "operation": operation,
        "namespace": namespace, "name": name, "object": obj}}


def vs(spec: dict[str, Any], name: str = "reviews") -> dict[str, Any]:
    return {"apiVersion": "networking.meshline.io/v1", "kind": "VirtualService",
            "metadata": {"name": name, "namespace": "shop"}, "spec": spec}


# --------------------------------------------------------------------------- TLS


def peer_certificate(port: int, ctx: ssl.SSLContext, server_hostname: str) -> x509.Certificate:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
        der = tls.getpeercert(binary_form=True)
        assert tls.version() in ("TLSv1.3", "TLSv1.2")
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_server_certificate_chains_to_the_meshline_ca(running: RunningServer, ca: CertificateAuthority,
                                                       client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    for name in default_dns_names()[:2]:
        cert = peer_certificate(running.port, trusting(ca), name)
    (root,) = x509.load_pem_x509_certificates(ca.trust_bundle().encode())
    assert cert.issuer == root.subject
    cert.verify_directly_issued_by(root)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert DNS_NAME in san.get_values_for_type(x509.DNSName)


def test_wrong_hostname_or_foreign_ca_is_refused(running: RunningServer, ca: CertificateAuthority,
                                                 tmp_path: Path) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match=r"match|mismatch"):
        peer_certificate(running.port, trusting(ca), "evil.example.com")
    other = CertificateAuthority.load_or_create(tmp_path / "other")
    with pytest.raises(ssl.SSLCertVerificationError):
        peer_certificate(running.port, trusting(other), DNS_NAME)


def test_certificate_is_reissued_before_expiry(ca: CertificateAuthority) -> None:
    srv = RunningServer(ca, WebhookConfig(), dt.timedelta(seconds=3))  # re-issued after about 2 s
    try:
        first = peer_certificate(srv.port, trusting(ca), DNS_NAME)
        key_file = srv.server._cert.key_file if srv.server._cert else None
        assert key_file is not None and key_file.stat().st_mode & 0o777 == 0o600
        assert key_file.parent.stat().st_mode & 0o777 == 0o700
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            current = peer_certificate(srv.port, trusting(ca), DNS_NAME)
            if current.serial_number != first.serial_number:
                break
            time.sleep(0.1)
        assert current.serial_number != first.serial_number
        assert current.not_valid_after_utc > first.not_valid_after_utc
    finally:
        srv.close()
    assert not key_file.parent.exists()  # the private directory is removed on exit


# --------------------------------------------------------------------------- /validate and /inject


def test_validate_refuses_an_invalid_virtual_service_with_field_and_reason(client: httpx.Client) -> None:
    bad = vs({"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"}, "weight": -5}],
                                              "timeout": "soon"}]})
    r = client.post("/validate", json=review(bad, name="reviews"))
    assert r.status_code == 200
    resp = r.json()["response"]
    assert resp["uid"] == "uid-1" and resp["allowed"] is False
    assert resp["status"]["code"] == 422 and resp["status"]["reason"] == "Invalid"
    lines = resp["status"]["message"].splitlines()
    assert lines[0] == "VirtualService shop/reviews is invalid:"
    assert "spec.http[0].route[0].weight: must not be negative, got -5" in lines
    assert any(ln.startswith("spec.http[0].timeout: invalid duration 'soon'") for ln in lines)


def test_validate_accepts_with_warnings(client: httpx.Client) -> None:
    split = vs({"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"}, "weight": 30},
                                                          {"destination": {"host": "ratings"}, "weight": 30}]}]})
    resp = client.post("/validate", json=review(split)).json()["response"]
    assert resp["allowed"] is True
    assert resp["warnings"] == ["spec.http[0].route: weights sum to 60, not 100: traffic is split in proportion "
                                "(30, 30 of 60)"]
    dr = {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"generateName": "dr-"},
          "spec": {"host": "reviews", "trafficPolicy": {"loadBalancer": {"simple": "NOPE"}}}}
    resp = client.post("/validate", json=review(dr, kind="DestinationRule", group="networking.istio.io")).json()
    assert resp["response"]["allowed"] is False
    assert "spec.trafficPolicy.loadBalancer.simple: unknown value 'NOPE'" in resp["response"]["status"]["message"]
    # Deleting never needs validation.
    resp = client.post("/validate", json=review(None, operation="DELETE")).json()["response"]
    assert resp["allowed"] is True


def test_stored_invalid_objects_stay_deletable_and_labelable(client: httpx.Client) -> None:
    bad = vs({"hosts": ["reviews"], "http": [{"timeout": "soon", "route": [{"destination": {"host": "reviews"}}]}]})
    relabelled = copy.deepcopy(bad)
    relabelled["metadata"]["labels"] = {"team": "a"}
    req = review(relabelled, operation="UPDATE", name="reviews")
    req["request"]["oldObject"] = bad
    resp = client.post("/validate", json=req).json()["response"]
    assert resp["allowed"] is True
    assert resp["warnings"][0].startswith("this object is invalid and ignored by Meshline: spec.http[0].timeout")
    changed = copy.deepcopy(relabelled)
    changed["spec"]["hosts"] = ["ratings"]
    req["request"]["object"] = changed
    assert client.post("/validate", json=req).json()["response"]["allowed"] is False
    changed["metadata"]["deletionTimestamp"] = "2026-11-27T10:00:00Z"
    assert client.post("/validate", json=req).json()["response"]["allowed"] is True


def test_inject_over_https(client: httpx.Client) -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "shop"},
           "spec": {"containers": [{"name": "app", "image": "x"}]}}
    resp = client.post("/inject", json=review(pod, kind="Pod", group="")).json()["response"]
    assert resp["allowed"] is True and resp["patchType"] == "JSONPatch"


# --------------------------------------------------------------------------- bad input


def test_bad_input_gets_a_clear_4xx_or_denial(client: httpx.Client) -> None:
    for path in ("/inject", "/validate"):
        r = client.post(path, content=b"{not json")
        assert r.status_code == 400 and "not JSON" in r.json()["error"]
        r = client.post(path, json={"apiVersion": "v1", "kind": "Pod"})
        assert r.status_code == 400 and "expected kind AdmissionReview" in r.json()["error"]
        r = client.post(path, json={"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview",
                                    "request": {"uid": "x"}})
        assert r.status_code == 400
        r = client.post(path, json={"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"})
        assert r.status_code == 400 and "no request" in r.json()["error"]
        r = client.post(path, json={"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {}})
        assert r.status_code == 400 and "uid" in r.json()["error"]
        r = client.post(path, content=b"[" * 200_000)  # deeply nested
        assert r.status_code == 400
    resp = client.post("/validate", json=review(None)).json()["response"]
    assert resp["allowed"] is False and resp["status"]["message"] == "request.object is missing"
    resp = client.post("/validate", json=review({"spec": {}})).json()["response"]
    assert resp["allowed"] is False and resp["status"]["message"].endswith("kind: is required")
    resp = client.post("/inject", json=review(None, kind="Pod", group="")).json()["response"]
    assert resp["allowed"] is True and "missing" in resp["warnings"][0]
    assert client.get("/inject").status_code == 405


def test_huge_body_is_refused_quickly(client: httpx.Client) -> None:
    body = b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "x": "' + b"a" * (2 << 20) + b'"}'
    start = time.monotonic()
    r = client.post("/validate", content=body)
    assert r.status_code == 413 and "limit" in r.json()["error"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: cut off while streaming
        for _ in range(64):
            yield b"a" * 65536

    r = client.post("/inject", content=chunks())
    assert r.status_code == 413
    assert time.monotonic() - start < 5


def test_slow_body_times_out(running: RunningServer, ca: CertificateAuthority) -> None:
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", running.port), timeout=60) as raw, \
            trusting(ca).wrap_socket(raw, server_hostname=DNS_NAME) as tls:
        tls.sendall(b"POST /validate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 1000\r\n\r\n{\"apiVersion\"")
        answer = tls.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
    # The server waited its 1 s body timeout (a lower bound: holds on any machine), then
    # answered; "not held forever" is the socket's 60 s timeout above.
    assert time.monotonic() - start >= 1.0


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
_kinds = st.sampled_from(["VirtualService", "DestinationRule", "Pod", "PeerAuthentication", "Service", "", "X"])
_versions = st.sampled_from(["networking.meshline.io/v1", "networking.istio.io/v1beta1", "v1", "nope/v9", ""])


@st.composite
def _objects(draw: st.DrawFn) -> Any:
    if draw(st.booleans()):
        return draw(_json)
    obj: dict[str, Any] = {"apiVersion": draw(_versions), "kind": draw(_kinds)}
    if draw(st.booleans()):
        obj["metadata"] = draw(st.fixed_dictionaries({}, optional={
            "name": st.text(max_size=12) | _json, "namespace": st.text(max_size=12), "annotations": _json,
            "labels": _json, "generateName": st.text(max_size=5)}))
    obj["spec"] = draw(st.fixed_dictionaries({}, optional={
        "hosts": st.lists(st.text(max_size=10), max_size=3) | _json, "http": st.lists(_json, max_size=2) | _json,
        "containers": st.lists(_json, max_size=2) | _json, "host": st.text(max_size=10),
        "initContainers": _json, "volumes": _json, "hostNetwork": _json}))
    return obj


_bodies = st.one_of(
    st.binary(max_size=300),
    _json.map(lambda v: json.dumps(v).encode()),
    st.builds(lambda obj, op, uid, kind: json.dumps(review(obj, operation=op, uid=uid, kind=kind)).encode(),
              _objects(), st.sampled_from(["CREATE", "UPDATE", "DELETE", "CONNECT", "", "x"]),
              st.text(min_size=1, max_size=20), _kinds),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(body=_bodies, path=st.sampled_from(["/inject", "/validate"]))
def test_fuzzed_input_never_yields_a_5xx(client: httpx.Client, body: bytes, path: str) -> None:
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code < 500, r.text
    if r.status_code == 200:
        out = r.json()
        assert (out["apiVersion"], out["kind"]) == ("admission.k8s.io/v1", "AdmissionReview")
        assert out["response"]["uid"] == json.loads(body)["request"]["uid"]
        assert isinstance(out["response"]["allowed"], bool)
        if path == "/inject":
            assert out["response"]["allowed"] is True
        if not out["response"]["allowed"]:
            assert out["response"]["status"]["message"]
    else:
        assert 400 <= r.status_code < 500 and r.json()["error"]
