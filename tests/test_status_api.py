"""The status REST API in-process: property-based requests from its own OpenAPI document
(schemathesis: no 5xx), bearer-token auth, read-only surface, redacted secrets, and the CLI
table rendered from the API's data (golden)."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest
import schemathesis
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from rich.console import Console

from controlplane.cache.resources import Resource
from controlplane.cli_status import proxy_status_table
from controlplane.model.ir import ProxyMeta, labels_of
from controlplane.runtime import Runtime, Settings
from controlplane.sources.directory import DirectorySource
from controlplane.status.app import create_app
from controlplane.status.dump import dump_resources
from controlplane.translate.plan import SECRET
from controlplane.xds.server import Connection
from controlplane.xds.stream import AdsStream
from tests.clirun import run_cli

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples" / "bookinfo"
GOLDEN = ROOT / "tests" / "golden_cli"


def make_runtime() -> Runtime:
    src = DirectorySource([SAMPLES])
    rt = Runtime(Settings(config_dirs=(SAMPLES,)), [src])
    asyncio.run(rt.sink([*src.initial()]))
    rt._synced.add(src.name)  # as if the source had reported Synced
    meta = ProxyMeta(node_id="sidecar~bookinfo/demo", namespace="bookinfo", workload="demo",
                     labels=labels_of({"app": "demo"}))
    conn = Connection(meta, AdsStream("delta", 1))
    rt.xds.connections[1] = conn
    rt.rebuild_now()
    return rt


@pytest.fixture(scope="module")
def runtime() -> Runtime:
    return make_runtime()


def test_no_server_errors_on_generated_requests(runtime: Runtime) -> None:
    """Every operation in our own OpenAPI document, fed generated parameters: never a 5xx."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(runtime))
    checked = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
        def run(case: schemathesis.Case) -> None:
            response = case.call()
            assert response.status_code < 500, (case.method, case.formatted_path, response.text[:300])

        run()
        checked.append(operation.path)
    assert "/v1/proxies/{proxy_id}/config" in checked and "/v1/services" in checked


def test_api_is_read_only_but_for_the_operators_quarantine_release(runtime: Runtime) -> None:
    app = create_app(runtime)
    writes = {(r.path, m) for r in app.routes for m in getattr(r, "methods", set()) if m not in ("GET", "HEAD")}
    assert writes == {("/v1/quarantine/release", "POST")}
    with TestClient(app) as c:
        assert c.post("/v1/quarantine/release", json={"object": "VirtualService/x/y"}).status_code == 404
        assert c.post("/v1/quarantine/release", json={"object": "nonsense"}).status_code == 400
        assert c.post("/v1/proxies").status_code == 405
        assert c.delete("/v1/proxies/sidecar~bookinfo/demo").status_code in (404, 405)


def test_release_needs_the_token_when_one_is_configured(runtime: Runtime, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token")
    with TestClient(create_app(runtime, token)) as c:
        assert c.post("/v1/quarantine/release", json={"object": "VirtualService/x/y"}).status_code == 401


def test_a_token_file_emptied_while_running_accepts_nobody(runtime: Runtime, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token")
    with TestClient(create_app(runtime, token)) as c:
        token.write_text("  \n")
        assert c.get("/v1/proxies", headers={"authorization": "Bearer "}).status_code == 401
        assert c.get("/v1/proxies").status_code == 401


def test_bearer_token_required_when_configured(runtime: Runtime, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    with TestClient(create_app(runtime, token)) as c:
        assert c.get("/v1/proxies").status_code == 401
        assert c.get("/v1/proxies", headers={"authorization": "Bearer wrong"}).status_code == 401
        ok = c.get("/v1/proxies", headers={"authorization": "Bearer s3cret-token"})
        assert ok.status_code == 200 and ok.json()[0]["id"] == "sidecar~bookinfo/demo"
        # Probes stay open for the kubelet.
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200


def test_views_reflect_the_mesh(runtime: Runtime) -> None:
    with TestClient(create_app(runtime)) as c:
        mesh = c.get("/v1/mesh").json()
        assert mesh["ready"] is True and mesh["objects"]["services"] == 4
        assert mesh["proxies"]["by_mode"] == {"sidecar": 1}
        services = {s["name"]: s for s in c.get("/v1/services").json()}
        assert services["reviews"]["subsets"] == ["v1", "v2", "v3"]
        assert services["reviews"]["endpoints"] == {"ready": 3, "not_ready": 0}
        assert c.get("/v1/config/errors", params={"severity": "error"}).json() == []
        assert "paths" in c.get("/openapi.json").json()


def test_secret_dump_never_contains_the_private_key() -> None:
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshline")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(7).not_valid_before(now).not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("spiffe://cluster.local/ns/a/sa/b")]), critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    s = secret_pb2.Secret(name="default")
    s.tls_certificate.certificate_chain.inline_bytes = cert.public_bytes(serialization.Encoding.PEM)
    s.tls_certificate.private_key.inline_bytes = key_pem
    dumped = dump_resources(SECRET, [Resource(SECRET, "default", s.SerializeToString())])
    text = json.dumps(dumped)
    assert "PRIVATE KEY" not in text and key_pem.decode().splitlines()[1] not in text
    info = dumped[0]["config"]["tls_certificate"]
    assert info["private_key"] == "[redacted]"
    assert info["certificate_chain"][0]["uri_sans"] == ["spiffe://cluster.local/ns/a/sa/b"]


def test_proxy_status_table_golden(request: pytest.FixtureRequest) -> None:
    proxies = json.loads((GOLDEN / "proxies.json").read_text())
    buf = io.StringIO()
    proxy_status_table(proxies, Console(file=buf, width=200, no_color=True, force_terminal=False))
    golden = GOLDEN / "proxy-status.txt"
    if request.config.getoption("--update-golden"):
        golden.write_text(buf.getvalue())
    assert buf.getvalue() == golden.read_text()


def test_analyze_output_golden(request: pytest.FixtureRequest) -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "controlplane.cli", "analyze", "tests/golden_cli/analyze-input.yaml"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 1
    golden = GOLDEN / "analyze.txt"
    if request.config.getoption("--update-golden"):
        golden.write_text(proc.stdout)
    assert proc.stdout == golden.read_text()
    # The JSON form of the same report: one process is enough to test the command as a
    # process (the one above); this runs it in-process (tests/clirun.py).
    as_json = run_cli("analyze", "-o", "json", "tests/golden_cli/analyze-input.yaml", cwd=ROOT)
    assert as_json.returncode == 1
    rows = json.loads(as_json.stdout)
    assert [r["text"] for r in rows] == proc.stdout.splitlines()
