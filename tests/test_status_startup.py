"""`meshline serve` refuses to serve the status API unprotected (issue 14, item 8): beyond
loopback it needs `--status-token-file`, and a token file must hold a token (an empty one
would make the empty bearer the credential). Runs `meshline serve` as a subprocess, as an
operator would; does process and network I/O."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from controlplane.localrun import free_port, stop, wait_http
from controlplane.serve import status_access_error

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent


def serve(*args: str, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "controlplane.cli", "serve", "--no-ca", "--ca-address", "off",
         "--config-dir", str(ROOT / "samples" / "bookinfo"), *args],
        cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)


def refused(proc: subprocess.Popen[bytes], log: Path) -> str:
    """The exit message of a `serve` that must refuse to start."""
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        stop(proc)
        raise AssertionError(f"serve started anyway:\n{log.read_text()[-2000:]}") from None
    assert proc.returncode == 1, log.read_text()
    return log.read_text()


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]"])
@pytest.mark.parametrize("workers", [1, 2])
def test_status_beyond_loopback_without_a_token_file_refuses_to_start(tmp_path: Path, host: str,
                                                                      workers: int) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    out = refused(serve("--status-address", f"{host}:{port}", "--xds-address", f"127.0.0.1:{free_port()}",
                        "--workers", str(workers), log=log), log)
    assert f"--status-address {host}:{port} is reachable beyond loopback" in out
    assert "--status-token-file" in out
    assert "Traceback" not in out
    assert not listening(port)


@pytest.mark.parametrize("content", ["", "\n", "  \t\n \n"], ids=["empty", "newline", "whitespace"])
def test_empty_token_file_refuses_to_start(tmp_path: Path, content: str) -> None:
    token = tmp_path / "token"
    token.write_text(content)
    port = free_port()
    log = tmp_path / "serve.log"
    out = refused(serve("--status-address", f"127.0.0.1:{port}", "--status-token-file", str(token),
                        "--xds-address", f"127.0.0.1:{free_port()}", log=log), log)
    assert f"--status-token-file {token}: the file is empty" in out
    assert "Traceback" not in out
    assert not listening(port)


def test_status_beyond_loopback_with_a_token_requires_it(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    port = free_port()
    log = tmp_path / "serve.log"
    proc = serve("--status-address", f"0.0.0.0:{port}", "--status-token-file", str(token),
                 "--xds-address", f"127.0.0.1:{free_port()}", log=log)
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", proc=proc)  # probes need no token
        base = f"http://127.0.0.1:{port}/v1/proxies"
        assert httpx.get(base, timeout=2).status_code == 401
        assert httpx.get(base, headers={"authorization": "Bearer"}, timeout=2).status_code == 401
        assert httpx.get(base, headers={"authorization": "Bearer wrong"}, timeout=2).status_code == 401
        assert httpx.get(base, headers={"authorization": "Bearer s3cret-token"}, timeout=2).status_code == 200
    finally:
        stop(proc)


@pytest.mark.parametrize("address", ["127.0.0.1:15014", "127.0.0.9:15014", "localhost:15014", "[::1]:15014"])
def test_loopback_needs_no_token(address: str) -> None:
    assert status_access_error(address, None) is None


@pytest.mark.parametrize("address", ["0.0.0.0:15014", "[::]:15014", "10.0.0.5:15014", "meshline.example:15014"])
def test_anything_else_needs_a_token(address: str, tmp_path: Path) -> None:
    problem = status_access_error(address, None)
    assert problem is not None and "--status-token-file" in problem
    token = tmp_path / "token"
    token.write_text("t0ken")
    assert status_access_error(address, token) is None

