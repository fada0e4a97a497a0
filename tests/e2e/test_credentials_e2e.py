"""Credentials live exactly as long as they are valid, with real Envoys over TLS (port
15012-style, `--xds-tls`) against `meshline serve --ca-dir`: a passive relay between Envoy
and the control plane sees neither the token nor a private key (and does see the token on
the plaintext port: the relay works); an expired token ends the stream and no key follows;
a token file rotated on disk keeps the proxy authenticated across reconnects and a
control-plane restart, and its certificates keep rotating, with no Envoy restart; a
replaced token key revokes the open stream."""

from __future__ import annotations

import datetime as dt
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from controlplane.ca import tokens
from controlplane.ca.identity import Identity
from controlplane.localrun import free_port, start_envoy, stop, wait_http
from tests.test_identity_envoy import envoy_certs, tls_listener

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]
ID = Identity("shop", "cart")


class Relay:
    """A byte relay on loopback that records everything crossing it in both directions."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.seen = bytearray()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                a, _ = self.sock.accept()
            except OSError:
                return
            b = socket.create_connection(("127.0.0.1", self.target))
            for src, dst in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                with self.lock:
                    self.seen += data
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


class Serve:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ca_dir = tmp / "ca"
        self.xds, self.status, self.tls = free_port(), free_port(), free_port()
        (tmp / "mesh").mkdir(exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.envoys: list[subprocess.Popen[bytes]] = []
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "controlplane.cli", "serve", "--config-dir", str(self.tmp / "mesh"),
             "--ca-dir", str(self.ca_dir), "--xds-address", f"127.0.0.1:{self.xds}",
             "--status-address", f"127.0.0.1:{self.status}", "--ca-address", f"127.0.0.1:{self.tls}",
             "--workload-cert-ttl", "6", "--credential-check-seconds", "1", "--log-level", "debug"],
            cwd=REPO, stdout=open(self.tmp / "serve.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_http(f"http://127.0.0.1:{self.status}/readyz", proc=self.proc, timeout=30)

    def stop(self) -> None:
        stop(self.proc)

    def proxies(self) -> dict[str, Any]:
        return {p["id"]: p for p in httpx.get(f"http://127.0.0.1:{self.status}/v1/proxies", timeout=2).json()}

    def envoy(self, node: str, port: int, token_file: Path, *, tls: bool = True, ttl: str = "1h") -> int:
        args = ["--ca-dir", str(self.ca_dir), "--token-out", str(token_file), "--token-ttl", ttl]
        if tls:
            args.append("--xds-tls")
        out = subprocess.run(
            [sys.executable, "-m", "controlplane.cli", "bootstrap", "--node-id", node, "--namespace", "shop",
             "--service-account", "cart", "--xds-address", f"127.0.0.1:{port}", *args],
            cwd=REPO, check=True, capture_output=True, text=True).stdout
        doc = yaml.safe_load(out)
        admin = free_port()
        doc["admin"]["address"]["socket_address"]["port_value"] = admin
        doc["static_resources"]["listeners"] = [tls_listener(free_port())]  # references the SDS secrets
        self.envoys.append(start_envoy(yaml.safe_dump(doc), self.tmp, node, log_level="info"))
        wait_http(f"http://127.0.0.1:{admin}/ready", ok=(200, 503), proc=self.envoys[-1])
        return admin

    def close(self) -> None:
        for e in self.envoys:
            stop(e)
        self.stop()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    s = Serve(tmp_path)
    try:
        yield s
    finally:
        s.close()


def until(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            v = check()
            if v:
                return v
        except (httpx.HTTPError, KeyError, IndexError, ValueError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def serials(admin: int) -> set[str]:
    return {str(c["serial_number"]) for c in envoy_certs(admin)
            if any("spiffe://" in (s.get("uri") or "") for s in c.get("subject_alt_names", []))}


def mint(serve: Serve, path: Path, ttl: dt.timedelta) -> None:
    tokens.write_token_file(serve.ca_dir, ID, ttl, path=path)


def test_a_passive_relay_sees_no_token_and_no_key(serve: Serve, tmp_path: Path) -> None:
    tls_relay, plain_relay = Relay(serve.tls), Relay(serve.xds)
    try:
        admin = serve.envoy("over-tls", tls_relay.port, tmp_path / "tls.token")
        until("a certificate over TLS", lambda: serials(admin))
        assert serve.proxies()["over-tls"]["identity"] == {"namespace": "shop", "service_account": "cart"}
        token = (tmp_path / "tls.token").read_text().encode()
        with tls_relay.lock:
            wire = bytes(tls_relay.seen)
        assert len(wire) > 10_000  # config and certificates did cross it
        assert wire[:2] == b"\x16\x03"  # a TLS handshake, then only ciphertext
        assert token not in wire and token.split(b".")[1] not in wire
        assert b"PRIVATE KEY" not in wire and b"BEGIN CERTIFICATE" not in wire
        # Control: the same relay in front of the plaintext (loopback development) port sees the
        # key in clear (the token goes HPACK-compressed there, so it is not compared).
        admin2 = serve.envoy("plain", plain_relay.port, tmp_path / "plain.token", tls=False)
        until("a certificate over plaintext", lambda: serials(admin2))
        with plain_relay.lock:
            plain = bytes(plain_relay.seen)
        assert b"PRIVATE KEY" in plain
    finally:
        tls_relay.close()
        plain_relay.close()


def test_an_expired_token_ends_the_stream_and_a_rotated_file_resumes_without_restart(serve: Serve,
                                                                                    tmp_path: Path) -> None:
    token = tmp_path / "cart.token"
    # A token that expires in 4 s: once it has, the stream is ended, the reconnect (same file)
    # is refused, and no certificate reaches Envoy while it stays expired.
    admin = serve.envoy("cart", serve.tls, token, ttl="4")
    until("a certificate", lambda: serials(admin))
    until("the expired stream to end", lambda: "cart" not in serve.proxies(), timeout=30)
    held = serials(admin)
    time.sleep(7)  # longer than the workload certificate's half life: no rotation reaches Envoy
    assert "cart" not in serve.proxies() and serials(admin) == held
    # The file is rotated on disk (as the kubelet does): Envoy reconnects with it, no restart.
    mint(serve, token, dt.timedelta(hours=1))
    until("reconnected with the new token", lambda: serve.proxies()["cart"]["identity"] is not None, timeout=40)
    until("a new certificate", lambda: serials(admin) - held, timeout=20)
    # A control-plane restart: the same Envoy comes back authenticated, rotation goes on.
    serve.stop()
    serve.start()
    until("back after the restart", lambda: serve.proxies()["cart"]["identity"] is not None, timeout=40)
    before = serials(admin)
    until("rotation after the restart", lambda: serials(admin) - before, timeout=20)


def test_a_replaced_token_key_revokes_the_open_stream(serve: Serve, tmp_path: Path) -> None:
    admin = serve.envoy("cart", serve.tls, tmp_path / "cart.token")
    until("a certificate", lambda: serials(admin))
    key = tokens.token_key_path(serve.ca_dir)
    key.write_text("ab" * 32 + "\n")  # a new key: every token minted with the old one is revoked
    key.chmod(0o600)
    until("the revoked stream to end", lambda: "cart" not in serve.proxies(), timeout=30)
