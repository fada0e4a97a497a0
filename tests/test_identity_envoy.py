"""Real Envoys against `meshline serve --ca-dir` (a subprocess on free ports), with
bootstraps from `meshline bootstrap --ca-dir`: the token path (stream accepted, identity in
/v1/proxies), a proxy without a token (config, no identity), xDS over TLS on the CA port,
and an Envoy that references the SDS secrets from a static listener: it ACKs them
(secrets SYNCED), and its admin /certs shows the SPIFFE certificate, rotated before it
expires. The serve log (debug) never shows a key or a token."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from controlplane.localrun import free_port, start_envoy, stop, wait_http

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(120)


class Serve:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ca_dir = tmp / "ca"
        self.xds = free_port()
        self.status = free_port()
        self.ca_port = free_port()
        (tmp / "mesh").mkdir()
        self.log = tmp / "serve.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "controlplane.cli", "serve", "--config-dir", str(tmp / "mesh"),
             "--ca-dir", str(self.ca_dir), "--xds-address", f"127.0.0.1:{self.xds}",
             "--status-address", f"127.0.0.1:{self.status}", "--ca-address", f"127.0.0.1:{self.ca_port}",
             "--workload-cert-ttl", "6", "--debounce-ms", "20", "--log-level", "debug"],
            cwd=REPO, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        self.envoys: list[subprocess.Popen[bytes]] = []

    def proxies(self) -> dict[str, Any]:
        return {p["id"]: p for p in httpx.get(f"http://127.0.0.1:{self.status}/v1/proxies", timeout=2).json()}

    def bootstrap(self, node: str, *args: str, address: str | None = None) -> dict[str, Any]:
        out = subprocess.run(
            [sys.executable, "-m", "controlplane.cli", "bootstrap", "--node-id", node, "--namespace", "shop",
             "--service-account", "cart", "--xds-address", address or f"127.0.0.1:{self.xds}", *args],
            cwd=REPO, check=True, capture_output=True, text=True).stdout
        doc = yaml.safe_load(out)
        assert isinstance(doc, dict)
        return doc

    def envoy(self, name: str, doc: dict[str, Any]) -> int:
        admin = free_port()
        doc["admin"]["address"]["socket_address"]["port_value"] = admin
        self.envoys.append(start_envoy(yaml.safe_dump(doc), self.tmp, name, log_level="info"))
        wait_http(f"http://127.0.0.1:{admin}/ready", ok=(200, 503), proc=self.envoys[-1])
        return admin

    def close(self) -> None:
        for e in self.envoys:
            stop(e)
        stop(self.proc)

    def wait(self, what: str, pred: Callable[[], bool], timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if pred():
                    return
            except (httpx.HTTPError, KeyError):
                pass
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited:\n{self.log.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.log.read_text()[-4000:]}")
            time.sleep(0.1)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    s = Serve(tmp_path)
    try:
        wait_http(f"http://127.0.0.1:{s.status}/readyz", proc=s.proc)
        yield s
    finally:
        s.close()


def tls_listener(port: int) -> dict[str, Any]:
    """A static listener whose TLS context takes the proxy's certificate and the trust bundle
    over SDS (ADS): makes Envoy subscribe to `default` and `ROOTCA`."""
    sds = {"ads": {}, "resource_api_version": "V3"}
    return {
        "name": "mtls-probe",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{
            "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "require_client_certificate": True,
                "common_tls_context": {
                    "tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": sds}],
                    "validation_context_sds_secret_config": {"name": "ROOTCA", "sds_config": sds},
                }}},
            "filters": [{"name": "envoy.filters.network.echo", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.echo.v3.Echo"}}],
        }],
    }


def envoy_certs(admin: int) -> list[dict[str, Any]]:
    certs = httpx.get(f"http://127.0.0.1:{admin}/certs", timeout=2).json().get("certificates", [])
    return [c for entry in certs for c in entry.get("cert_chain", [])]


def test_envoy_identities_tokens_tls_and_sds(serve: Serve) -> None:
    # 1. Token path: the stream is accepted and bound to the token's identity.
    serve.envoy("with-token", serve.bootstrap("cart-token", "--ca-dir", str(serve.ca_dir)))
    # 2. No token: configuration, no identity.
    serve.envoy("no-token", serve.bootstrap("cart-anon"))
    # 3. xDS over TLS on the CA port, verifying the control plane's certificate.
    serve.envoy("over-tls", serve.bootstrap("cart-tls", "--ca-dir", str(serve.ca_dir), "--xds-tls",
                                            address=f"127.0.0.1:{serve.ca_port}"))
    # 4. An Envoy whose static listener references the secrets.
    doc = serve.bootstrap("cart-sds", "--ca-dir", str(serve.ca_dir))
    doc["static_resources"]["listeners"] = [tls_listener(free_port())]
    sds_admin = serve.envoy("sds", doc)

    cart = {"namespace": "shop", "service_account": "cart"}
    serve.wait("the four proxies", lambda: len(serve.proxies()) == 4)
    serve.wait("identities", lambda: {k: v["identity"] for k, v in serve.proxies().items()} == {
        "cart-token": cart, "cart-anon": None, "cart-tls": cart, "cart-sds": cart})
    assert serve.proxies()["cart-tls"]["peer"].startswith("unix:")  # came through the TLS front

    # Envoy ACKed the Secrets, and serves with the SPIFFE certificate.
    serve.wait("secrets SYNCED", lambda: serve.proxies()["cart-sds"]["types"]["secrets"]["state"] == "SYNCED")
    assert serve.proxies()["cart-sds"]["types"]["secrets"]["subscribed"] == ["ROOTCA", "default"]
    serve.wait("the certificate in Envoy", lambda: any(
        san.get("uri") == "spiffe://cluster.local/ns/shop/sa/cart"
        for c in envoy_certs(sds_admin) for san in c.get("subject_alt_names", [])))

    # Rotation (lifetime 6 s): new certificates reach Envoy before the old ones expire.
    def current() -> tuple[str, float]:
        (leaf,) = [c for c in envoy_certs(sds_admin) if any(s.get("uri") for s in c.get("subject_alt_names", []))]
        return leaf["serial_number"], _epoch(leaf["expiration_time"])

    seen = [current()]
    deadline = time.monotonic() + 20
    while len(seen) < 3:
        serial, expires = current()
        if serial != seen[-1][0]:
            assert time.time() < seen[-1][1], "the new certificate arrived after the old one expired"
            seen.append((serial, expires))
        assert time.monotonic() < deadline, f"only {len(seen) - 1} rotation(s) reached Envoy"
        time.sleep(0.1)

    log = serve.log.read_text()
    assert "without certificates" in log and "cart-anon" in log
    secret_bits = [ln for path in ("ca-key.pem",) for ln in (serve.ca_dir / path).read_text().splitlines()
                   if ln and not ln.startswith("-----")]
    token_key = (serve.ca_dir / "token-key").read_text().strip()
    assert "PRIVATE KEY" not in log and token_key not in log and "mlt1." not in log
    for bit in secret_bits:
        assert bit not in log


def _epoch(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
