"""`meshline serve --workers 2`: two processes share the xDS port (SO_REUSEPORT), every
stream is served whichever worker accepts it, the status API on worker 0 reports the
proxies of both (with the worker's pid), a crashed worker is restarted, and SIGTERM to
the supervisor stops every worker. Runs real processes over loopback."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil
import pytest
import yaml

from tests.xdsharness import CLUSTER, AdsClient, names_of

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_mesh(root: Path) -> None:
    docs: list[dict[str, Any]] = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}]
    for name in ("reviews", "ratings"):
        docs.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
                     "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 9080}]}})
        docs.append({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                     "metadata": {"name": f"{name}-1", "namespace": "default",
                                  "labels": {"kubernetes.io/service-name": name}},
                     "addressType": "IPv4", "ports": [{"name": "http", "port": 9080}],
                     "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": True}}]})
    (root / "mesh.yaml").write_text(yaml.safe_dump_all(docs))


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, int]]:
    (tmp_path / "mesh").mkdir()
    write_mesh(tmp_path / "mesh")
    xds, status = free_port(), free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "controlplane.cli", "serve", "--config-dir", str(tmp_path / "mesh"), "--no-ca",
         "--xds-address", f"127.0.0.1:{xds}", "--status-address", f"127.0.0.1:{status}", "--workers", "2"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{status}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "not ready:\n" + (tmp_path / "serve.log").read_text()
            time.sleep(0.1)
        yield proc, xds, status
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for child in _workers(proc.pid):
            child.kill()
        log.close()


def _workers(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []


async def _connect(xds: int, count: int) -> list[AdsClient]:
    clients = []
    for i in range(count):
        # One connection per client (no shared subchannel), like separate Envoys.
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{xds}", options=[("grpc.use_local_subchannel_pool", 1)])
        c = AdsClient("", "delta" if i % 2 else "sotw", f"proxy-{i:02d}", {}, channel=channel)
        if c.protocol == "sotw":
            c.send(CLUSTER)
        else:
            c.send_delta(CLUSTER)
        clients.append(c)
    return clients


async def test_workers_share_the_port_and_report_every_proxy(
        served: tuple[subprocess.Popen[bytes], int, int]) -> None:
    proc, xds, status = served
    base = f"http://127.0.0.1:{status}"
    worker_pids = {p.pid for p in _workers(proc.pid)}
    assert len(worker_pids) == 2

    clients = await _connect(xds, CLIENTS)
    try:
        for c in clients:  # every stream is served, whichever worker accepted it
            resp = await c.recv(timeout=15)
            assert sorted(names_of(resp)) == ["outbound|9080||ratings.default.svc.cluster.local",
                                              "outbound|9080||reviews.default.svc.cluster.local"]
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            proxies = (await http.get("/v1/proxies")).json()
            assert sorted(p["id"] for p in proxies) == [f"proxy-{i:02d}" for i in range(CLIENTS)]
            landed = {p["worker_pid"] for p in proxies}
            assert landed == worker_pids, f"connections landed on {landed}, workers are {worker_pids}"
            assert {p["worker"] for p in proxies} == {0, 1}

            mesh = (await http.get("/v1/mesh")).json()
            assert mesh["proxies"]["total"] == CLIENTS
            assert {w["pid"] for w in mesh["workers"]} == worker_pids
            assert sum(w["proxies"] for w in mesh["workers"]) == CLIENTS
            assert mesh["answered_by"]["index"] == 0

            one = (await http.get("/v1/proxies/proxy-07")).json()
            assert one["id"] == "proxy-07" and one["worker_pid"] in worker_pids
            metrics = (await http.get("/metrics")).text
            assert 'worker="0"' in metrics and 'worker="1"' in metrics
    finally:
        for c in clients:
            await c.close()

    # A crashed worker is replaced; the supervisor keeps running.
    victim = max(worker_pids)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 20
    async with httpx.AsyncClient(base_url=base, timeout=5) as http:
        while True:
            pids = {p.pid for p in _workers(proc.pid)}
            if len(pids) == 2 and victim not in pids:
                try:
                    if (await http.get("/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
            assert time.monotonic() < deadline, f"worker {victim} was not replaced (workers now {pids})"
            await asyncio.sleep(0.1)
    assert proc.poll() is None

    # SIGTERM to the supervisor stops every worker, then the supervisor.
    workers = _workers(proc.pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    _gone, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive, f"workers still running: {[p.pid for p in alive]}"
