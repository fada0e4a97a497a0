"""`meshline serve`: starts sources, the rebuild loop, the xDS and status servers, and
stops them cleanly on SIGINT/SIGTERM. Does network and file I/O."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

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
