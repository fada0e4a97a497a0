"""`meshline serve`: starts sources, the rebuild loop, the xDS and status servers, and
stops them cleanly on SIGINT/SIGTERM. Does network and file I/O."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import ipaddress
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import grpc
import uvicorn

from controlplane.bootstrap import split_address
from controlplane.gcpolicy import GcPolicy
from controlplane.metrics import Metrics
from controlplane.runtime import Runtime, Settings, node_proxy_identity
from controlplane.sources.base import Source
from controlplane.sources.directory import DirectorySource
from controlplane.sources.meshconfig_file import watch_mesh_config
from controlplane.status.app import create_app
from controlplane.xds.server import start_grpc

if TYPE_CHECKING:
    from controlplane.ca.service import IdentityService


class WorkerInfo(Protocol):
    """What `serve --workers N` tells one worker process (controlplane.workers, which runs
    `run` in each; this module never imports it: the layers go workers -> serve)."""

    def grpc_options(self) -> list[tuple[str, Any]]: ...

    def status_bind(self, host: str, port: int) -> dict[str, Any]: ...

    def wrap_status(self, app: Any) -> Any: ...

log = logging.getLogger(__name__)


def build_identity(settings: Settings, ca_dir: Path, api_client: Any = None) -> IdentityService:
    """The CA and workload identities (loaded, or created in directory mode). Kubernetes
    mode verifies service-account tokens with TokenReview through `api_client`, and the root
    comes from the Secret (see `start_identity_tasks`)."""
    from controlplane.ca.authn import TokenReviewer
    from controlplane.ca.service import IdentityService, IdentitySettings

    reviewer = TokenReviewer(api_client) if settings.kubernetes and api_client is not None else None
    identity = IdentityService(IdentitySettings(
        ca_dir=ca_dir, trust_domain=settings.trust_domain,
        workload_ttl=dt.timedelta(seconds=settings.workload_cert_ttl_s),
        create=not settings.kubernetes,
        bootstrap_tokens=not settings.kubernetes or settings.ca_dir is not None,
        propagation_timeout=dt.timedelta(seconds=settings.bundle_propagation_s),
    ), reviewer)
    identity.start()
    return identity


def start_identity_tasks(runtime: Runtime, settings: Settings, api_client: Any) -> list[asyncio.Task[None]]:
    identity = runtime.identity
    assert identity is not None
    tasks = [asyncio.create_task(identity.watch(), name="ca-watch")]
    if not settings.kubernetes:
        tasks.append(asyncio.create_task(renew_token_files(identity.ca_dir), name="token-renewal"))
    if settings.kubernetes and api_client is not None:
        from controlplane.ca.kuberoot import SECRET_NAME, RootSecretSync

        namespace = os.environ.get("POD_NAMESPACE") or settings.leader_namespace
        sync = RootSecretSync(api_client, identity.ca_dir, lambda: runtime.leader is True, namespace=namespace,
                              name=SECRET_NAME, trust_domain=settings.trust_domain)
        tasks.append(asyncio.create_task(sync.run(identity.reload), name="ca-root-secret"))
    return tasks


async def renew_token_files(ca_dir: Path, period_s: float = 30.0) -> None:
    """Directory mode: keep the token files `meshline bootstrap --ca-dir` wrote fresh (each
    is re-minted at half life), so proxies stay authenticated with no operator: Envoy reads
    the file at every stream."""
    from controlplane.ca import CAError, tokens

    while True:
        try:
            renewed = await asyncio.to_thread(tokens.renew_token_files, ca_dir)
            if renewed:
                log.info("renewed %d proxy token file(s) in %s", len(renewed), ca_dir / tokens.TOKENS_DIR)
        except (OSError, CAError) as exc:
            log.warning("cannot renew token files in %s: %s", ca_dir, exc)
        await asyncio.sleep(period_s)


async def start_ca_server(runtime: Runtime, settings: Settings) -> tuple[Callable[[], Awaitable[None]], int] | None:
    """Port 15012: the xDS services and the CSR API over TLS. Returns (stop, port), or None
    when the port is taken and `ca_address_required` is off."""
    from controlplane.ca.csr import CertificateService
    from controlplane.ca.tlsfront import TlsFront

    identity = runtime.identity
    assert identity is not None and settings.ca_address is not None
    front = TlsFront(settings.ca_address, identity, settings.ca_dns_names)
    internal: grpc.aio.Server | None = None
    try:
        internal, _ = await start_grpc(front.backend_address,
                                       [*runtime.xds.handlers(secure=True), *CertificateService(identity).handlers(),
                                        *node_agent_handlers(runtime)],
                                       limits=runtime.xds.limits)
        port = await front.start()
    except OSError as exc:
        if internal is not None:
            await internal.stop(0)
        await front.close()
        if settings.ca_address_required:
            raise
        log.warning("cannot serve TLS xDS and the CSR API on %s (%s); continuing without them",
                    settings.ca_address, exc)
        return None

    async def stop() -> None:
        await front.close()
        if internal is not None:
            await internal.stop(1.0)

    return stop, port


def webhook_address(settings: Settings) -> str | None:
    """Webhooks run when an address is given, or by default (0.0.0.0:15017) with --kubernetes;
    `off` disables them."""
    addr = settings.webhook_address
    if addr == "off":
        return None
    if addr is None and settings.kubernetes:
        return "0.0.0.0:15017"
    return addr


async def run_webhooks(runtime: Runtime, settings: Settings, address: str) -> None:
    """Serve /inject and /validate over HTTPS with a certificate from Meshline's CA (once the
    CA is available: in Kubernetes mode the root comes from the leader's Secret)."""
    from webhook.config import WebhookConfig
    from webhook.inject import namespace_in_mesh
    from webhook.server import default_dns_names, serve_webhooks

    identity = runtime.identity
    assert identity is not None
    while identity.ca is None:
        await asyncio.sleep(0.5)
    namespace = os.environ.get("POD_NAMESPACE") or settings.leader_namespace

    def in_mesh(ns: str) -> bool | None:
        n = runtime.mesh().namespaces.get(ns)
        return namespace_in_mesh(dict(n.labels) if n is not None else None)

    xds = os.environ.get("MESHLINE_XDS_SERVICE_ADDRESS") or f"meshline.{namespace}.svc:15012"  # TLS
    log.info("webhooks (/inject, /validate) on https://%s", address)
    await serve_webhooks(address, identity.ca, (*default_dns_names("meshline", namespace), "localhost"),
                         WebhookConfig(xds_address=xds), namespace_in_mesh=in_mesh)


async def patch_ca_bundles(runtime: Runtime, api: Any, period_s: float = 30.0) -> None:
    """Leader only: keep the webhook configurations' caBundle equal to the trust bundle."""
    from webhook.server import patch_webhook_ca_bundles

    identity = runtime.identity
    assert identity is not None
    last: tuple[str, int] | None = None
    while True:
        if runtime.leader and identity.bundle:
            try:
                result = await asyncio.to_thread(patch_webhook_ca_bundles, api, None, identity.bundle)
                if last != (identity.bundle, identity.generation):
                    log.info("webhook caBundle: %s", ", ".join(f"{k} {v}" for k, v in sorted(result.items())))
                last = (identity.bundle, identity.generation)
            except Exception as exc:
                log.warning("cannot patch the webhook caBundle: %s", exc)
        await asyncio.sleep(period_s if last is not None else 2.0)


async def sync_bundle_configmaps(runtime: Runtime, api: Any, period_s: float = 30.0) -> None:
    """Leader only: ConfigMap `meshline-ca-root` (the trust bundle proxies verify 15012 with)
    in every namespace of the mesh, kept equal to the current bundle (root rotations too)."""
    from controlplane.ca.bundlemap import sync_bundle_configmaps as sync

    identity = runtime.identity
    assert identity is not None
    last: tuple[str, frozenset[str]] | None = None
    while True:
        if runtime.leader and identity.bundle:
            namespaces = frozenset(runtime.mesh().namespaces) | {runtime.settings.leader_namespace}
            if last != (identity.bundle, namespaces):
                try:
                    result = await asyncio.to_thread(sync, api, namespaces, identity.bundle)
                    changed = {k: v for k, v in result.items() if v != "unchanged"}
                    if changed:
                        log.info("trust-bundle ConfigMaps: %s", ", ".join(f"{k} {v}" for k, v in sorted(changed.items())))
                    if not any(v.startswith("error") for v in result.values()):
                        last = (identity.bundle, namespaces)
                except Exception as exc:
                    log.warning("cannot write the trust-bundle ConfigMaps: %s", exc)
        await asyncio.sleep(period_s if last is not None else 2.0)


def build_runtime(settings: Settings, identity: IdentityService | None = None) -> Runtime:
    sources: list[Source] = []
    metrics = Metrics()
    if settings.config_dirs:
        sources.append(DirectorySource(list(settings.config_dirs), rescan_s=settings.rescan_s))
    if settings.node_agents:
        from controlplane.nodeagent.registry import NodeAgentRegistry

        sources.append(NodeAgentRegistry(authorize=_node_agent_authorizer(identity, settings.system_namespace)))
    if settings.kubernetes:
        from controlplane.sources.kubernetes import KubernetesSource  # imports the kubernetes client

        sources.append(KubernetesSource(
            namespaces=settings.watch_namespaces, kubeconfig=settings.kubeconfig, istio_api=settings.istio_api,
            on_restart=lambda label: metrics.watch_restarts.labels(label).inc(),
        ))
    policy = GcPolicy()
    policy.install()
    return Runtime(settings, sources, metrics, identity, policy)


def start_leader_work(runtime: Runtime, settings: Settings) -> list[asyncio.Task[None]]:
    """Leader election and the singleton work only the leader does (CRD status write-back)."""
    from controlplane.crdstatus import StatusWriter
    from controlplane.gwstatus import RouteStatusWriter
    from controlplane.leader import ElectionConfig, LeaderElector
    from controlplane.sources.kubernetes import ORIGIN, make_api_client

    api = make_api_client(settings.kubeconfig)
    identity = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
    namespace = os.environ.get("POD_NAMESPACE") or settings.leader_namespace
    store = runtime.store
    writer = StatusWriter(api, lambda: (store.objects(ORIGIN), store.issues_by_key(), store.quarantined()),
                          is_leader=lambda: elector.is_leader,
                          on_write=lambda n: runtime.metrics.status_writes.inc(n))
    routes = RouteStatusWriter(api, lambda: (store.objects(ORIGIN), store.mesh().route_status, store.issues_by_key(),
                                             store.mesh().gateway_status),
                               is_leader=lambda: elector.is_leader,
                               on_write=lambda n: runtime.metrics.status_writes.inc(n))

    def on_change(leader: bool) -> None:
        runtime.leader = leader
        if leader:
            writer.forget()
            writer.poke()
            routes.forget()
            routes.poke()

    lease = settings.leader_lease_seconds
    elector = LeaderElector(api, ElectionConfig(namespace=namespace, name="meshline-leader", identity=identity,
                                                lease_duration_s=lease, renew_deadline_s=lease * 2 / 3,
                                                retry_period_s=max(0.2, lease / 7.5)), on_change=on_change)
    runtime.after_rebuild.append(writer.poke)
    runtime.after_rebuild.append(routes.poke)
    return [asyncio.create_task(elector.run(), name="leader-election"),
            asyncio.create_task(writer.run(), name="crd-status"),
            asyncio.create_task(routes.run(), name="gateway-route-status")]


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # another host name: it may resolve to anything


def status_access_error(address: str, token_file: Path | None) -> str | None:
    """Why the status API may not be served as configured (None: it may). Beyond loopback
    it needs a bearer token (`--status-token-file`); a token file given must hold a token:
    an empty one would make an empty bearer the credential."""
    try:
        host, _port = split_address(address)
    except ValueError as exc:
        return f"--status-address: {exc}"
    if token_file is not None:
        try:
            token = token_file.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            return f"--status-token-file {token_file}: cannot read the token: {exc}"
        if not token.strip():
            return f"--status-token-file {token_file}: the file is empty; write a token into it (e.g. 32 random bytes)"
        return None
    if not _loopback(host):
        return (f"--status-address {address} is reachable beyond loopback: the status API there needs "
                f"--status-token-file (clients send `Authorization: Bearer <token>`), or bind it to 127.0.0.1")
    return None


async def run(settings: Settings, started: asyncio.Event | None = None, worker: WorkerInfo | None = None) -> None:
    """`worker`: this process is one of `serve --workers N` (see controlplane/workers.py).
    Exits (SystemExit with the reason) when the status API would be served unprotected."""
    refused = status_access_error(settings.status_address, settings.status_token_file)
    if refused is not None:
        raise SystemExit(f"meshline serve: {refused}")
    identity = None
    api_client = None
    ca_tmp: str | None = None
    if settings.ca_enabled:
        ca_dir = settings.ca_dir
        if ca_dir is None:  # Kubernetes mode: the root lives in a Secret; keep no copy after exit
            ca_tmp = tempfile.mkdtemp(prefix="meshline-ca-")
            ca_dir = Path(ca_tmp)
        if settings.kubernetes:
            from controlplane.sources.kubernetes import make_api_client

            api_client = make_api_client(settings.kubeconfig)
        identity = build_identity(settings, ca_dir, api_client)
    try:
        await _run(settings, identity, api_client, started, worker)
    finally:
        if ca_tmp is not None:
            shutil.rmtree(ca_tmp, ignore_errors=True)




def _node_agent_authorizer(identity: IdentityService | None, root_namespace: str) -> Any:
    """Node agents must prove the node proxy's identity (`<root ns>/meshline-node-proxy`)
    with a credential bound to a node; without a CA there is nothing to check against."""
    if identity is None:
        return None

    async def authorize(metadata: Any, node: str) -> str | None:
        auth = await identity.authenticator.authenticate(metadata)
        if auth.identity is None:
            return f"node agent not authenticated: {auth.reason}"
        if auth.identity != node_proxy_identity(root_namespace):
            return f"{auth.identity} is not the node proxy's identity {node_proxy_identity(root_namespace)}"
        if auth.node is None:
            return "the credential is not bound to a node"
        if auth.node != node:
            return f"the credential is for node {auth.node}, not {node}"
        return None

    return authorize


def node_agent_handlers(runtime: Runtime) -> list[grpc.GenericRpcHandler]:
    """The NodeAgent.Report API of the runtime's node-agent registry (`--node-agents`), if any."""
    from controlplane.nodeagent.registry import NodeAgentRegistry

    return [h for s in runtime.sources if isinstance(s, NodeAgentRegistry) for h in s.handlers()]


class StatusThread:
    """The status API (uvicorn) on its own thread and event loop, so that xDS load on the
    main loop (request parsing, pushes to thousands of streams) cannot starve /healthz,
    /readyz and /metrics. Its endpoints already ran outside the main loop (FastAPI runs
    `def` endpoints in a worker thread) and only read what the main loop publishes."""

    def __init__(self, config: uvicorn.Config) -> None:
        self.server = uvicorn.Server(config)
        self.server.capture_signals = contextlib.nullcontext  # the composition root owns signals
        self.done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, name="meshline-status", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self.server.serve())
        except BaseException as exc:  # e.g. SystemExit: uvicorn cannot bind the address
            self.done.set_exception(exc)
        else:
            self.done.set_result(None)

    def start(self) -> None:
        self.done.set_running_or_notify_cancel()  # (a running future cannot be cancelled by `wait()`'s caller)
        self._thread.start()

    async def wait(self) -> None:
        """Until the server stops (raises what stopped it, as `serve()` in this loop would)."""
        await asyncio.wrap_future(self.done)

    def should_exit(self) -> None:
        self.server.should_exit = True

    async def join(self, timeout: float) -> None:
        self.should_exit()
        await asyncio.to_thread(self._thread.join, timeout)


async def _run(settings: Settings, identity: IdentityService | None, api_client: Any,
               started: asyncio.Event | None, worker: WorkerInfo | None = None) -> None:
    runtime = build_runtime(settings, identity)
    # Node-agent reports carry credentials: on the plaintext port only for loopback development.
    plaintext_agents = node_agent_handlers(runtime) if runtime.xds.plaintext_identities else []
    grpc_server, port = await start_grpc(settings.xds_address,
                                         [*runtime.xds.handlers(), *plaintext_agents],
                                         worker.grpc_options() if worker is not None else None,
                                         limits=runtime.xds.limits)
    ca_server = None
    if identity is not None and settings.ca_address:
        try:
            ca_server = await start_ca_server(runtime, settings)
        except BaseException:
            await grpc_server.stop(0)
            raise
    host, sport = split_address(settings.status_address)
    app: Any = create_app(runtime, settings.status_token_file)
    bind: dict[str, Any] = {"host": host, "port": sport}
    if worker is not None:
        app, bind = worker.wrap_status(app), worker.status_bind(host, sport)
    status = StatusThread(uvicorn.Config(app, **bind, log_level="warning", lifespan="off"))
    status.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    tasks = [
        asyncio.create_task(runtime.run_sources(), name="sources"),
        asyncio.create_task(runtime.rebuild_loop(), name="rebuild"),
        *([asyncio.create_task(watch_mesh_config(settings.mesh_config, runtime.apply_mesh_config), name="mesh-config")]
          if settings.mesh_config is not None else []),
        asyncio.create_task(status.wait(), name="status"),
    ]
    if runtime.gc_policy is not None:
        tasks.append(asyncio.create_task(runtime.gc_maintenance_loop(), name="gc"))
    if settings.kubernetes:
        tasks.extend(start_leader_work(runtime, settings))
    if identity is not None:
        tasks.extend(start_identity_tasks(runtime, settings, api_client))
        hook_addr = webhook_address(settings)
        if hook_addr is not None:
            tasks.append(asyncio.create_task(run_webhooks(runtime, settings, hook_addr), name="webhooks"))
            if settings.kubernetes and api_client is not None:
                tasks.append(asyncio.create_task(patch_ca_bundles(runtime, api_client), name="ca-bundle"))
        if settings.kubernetes and api_client is not None:
            tasks.append(asyncio.create_task(sync_bundle_configmaps(runtime, api_client), name="ca-configmaps"))
        tasks.append(asyncio.create_task(runtime.xds.credential_watch(settings.credential_check_s),
                                         name="credential-watch"))
    log.info("meshline serving xDS on %s (port %d), status on %s", settings.xds_address, port,
             settings.status_address)
    if ca_server is not None:
        log.info("TLS xDS and the CSR API on %s (port %d); CA directory %s", settings.ca_address, ca_server[1],
                 identity.ca_dir if identity is not None else "-")
    if started is not None:
        started.set()
    try:
        waiter = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is not waiter and t.exception() is not None:
                log.error("task %s failed: %s", t.get_name(), t.exception())
    finally:
        status.should_exit()
        await grpc_server.stop(1.0)
        if ca_server is not None:
            await ca_server[0]()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await status.join(5.0)
        log.info("meshline stopped")
