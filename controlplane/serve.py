"""`meshline serve`: starts sources, the rebuild loop, the xDS and status servers, and
stops them cleanly on SIGINT/SIGTERM. Does network and file I/O."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket

import uvicorn

from controlplane.bootstrap import split_address
from controlplane.metrics import Metrics
from controlplane.runtime import Runtime, Settings
from controlplane.sources.base import Source
from controlplane.sources.directory import DirectorySource
from controlplane.status.app import create_app
from controlplane.xds.server import start_grpc

log = logging.getLogger(__name__)


def build_runtime(settings: Settings) -> Runtime:
    sources: list[Source] = []
    metrics = Metrics()
    if settings.config_dirs:
        sources.append(DirectorySource(list(settings.config_dirs)))
    if settings.kubernetes:
        from controlplane.sources.kubernetes import KubernetesSource  # imports the kubernetes client

        sources.append(KubernetesSource(
            namespaces=settings.watch_namespaces, kubeconfig=settings.kubeconfig, istio_api=settings.istio_api,
            on_restart=lambda label: metrics.watch_restarts.labels(label).inc(),
        ))
    return Runtime(settings, sources, metrics)


def start_leader_work(runtime: Runtime, settings: Settings) -> list[asyncio.Task[None]]:
    """Leader election and the singleton work only the leader does (CRD status write-back)."""
    from controlplane.crdstatus import StatusWriter
    from controlplane.leader import ElectionConfig, LeaderElector
    from controlplane.sources.kubernetes import ORIGIN, make_api_client

    api = make_api_client(settings.kubeconfig)
    identity = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
    namespace = os.environ.get("POD_NAMESPACE") or settings.leader_namespace
    store = runtime.store
    writer = StatusWriter(api, lambda: (store.objects(ORIGIN), store.issues_by_key(), store.quarantined()),
                          is_leader=lambda: elector.is_leader,
                          on_write=lambda n: runtime.metrics.status_writes.inc(n))

    def on_change(leader: bool) -> None:
        runtime.leader = leader
        if leader:
            writer.forget()
            writer.poke()

    lease = settings.leader_lease_seconds
    elector = LeaderElector(api, ElectionConfig(namespace=namespace, name="meshline-leader", identity=identity,
                                                lease_duration_s=lease, renew_deadline_s=lease * 2 / 3,
                                                retry_period_s=max(0.2, lease / 7.5)), on_change=on_change)
    runtime.after_rebuild.append(writer.poke)
    return [asyncio.create_task(elector.run(), name="leader-election"),
            asyncio.create_task(writer.run(), name="crd-status")]


async def run(settings: Settings, started: asyncio.Event | None = None) -> None:
    runtime = build_runtime(settings)
    grpc_server, port = await start_grpc(settings.xds_address, runtime.xds.handlers())
    host, sport = split_address(settings.status_address)
    config = uvicorn.Config(create_app(runtime, settings.status_token_file), host=host, port=sport, log_level="warning", lifespan="off")
    status = uvicorn.Server(config)
    status.install_signal_handlers = lambda: None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    tasks = [
        asyncio.create_task(runtime.run_sources(), name="sources"),
        asyncio.create_task(runtime.rebuild_loop(), name="rebuild"),
        asyncio.create_task(status.serve(), name="status"),
    ]
    if settings.kubernetes:
        tasks.extend(start_leader_work(runtime, settings))
    log.info("meshline serving xDS on %s (port %d), status on %s", settings.xds_address, port,
             settings.status_address)
    if started is not None:
        started.set()
    try:
        waiter = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is not waiter and t.exception() is not None:
                log.error("task %s failed: %s", t.get_name(), t.exception())
    finally:
        status.should_exit = True
        await grpc_server.stop(1.0)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        log.info("meshline stopped")
