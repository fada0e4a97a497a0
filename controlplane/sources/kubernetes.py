"""Kubernetes source: live list/watch of a cluster's mesh objects. Does network I/O.

Watches v1 Namespaces, Services and Pods, discovery.k8s.io/v1 EndpointSlices and the
networking.meshline.io/v1 VirtualServices, DestinationRules and Sidecars (plus Istio's
networking.istio.io/v1 ones with `istio_api=True`). Each resource (per namespace when
`namespaces` is given) runs one `Informer` in a daemon thread with the official blocking
client; batches cross into asyncio with `loop.call_soon_threadsafe`.

Events carry origin "k8s". `Synced` follows only after *every* informer completed its
first list, so a proxy never gets a partial cluster. When Meshline's and Istio's group
both define the same (kind, namespace, name), Meshline's object is the one reported; the
other takes over if it is deleted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from urllib3.util.retry import Retry

from controlplane.model.raw import ObjectKey, RawObject
from controlplane.sources.base import Delete, Sink, SourceEvent, Synced, Upsert
from controlplane.sources.kube_informer import (
    MESH_GROUPS,
    UNSUPPORTED_PRIORITY,
    Backoff,
    Batch,
    Informer,
    Put,
    Removed,
    Resource,
    Stopped,
    WatchOptions,
    discover,
    plan_resources,
    resources,
)

__all__ = ["ORIGIN", "Backoff", "KubernetesSource", "WatchOptions", "make_api_client"]

log = logging.getLogger(__name__)
ORIGIN = "k8s"


def make_api_client(kubeconfig: str | os.PathLike[str] | None = None, pool_size: int = 16) -> Any:
    """An official-client `ApiClient` from `kubeconfig`, else $KUBECONFIG, else the
    in-cluster service account. Raises `kubernetes.config.ConfigException` when none works."""
    from kubernetes import client, config

    path = str(kubeconfig) if kubeconfig else os.environ.get("KUBECONFIG") or None
    cfg = client.Configuration()
    if path:
        config.load_kube_config(config_file=path, client_configuration=cfg, persist_config=False)
    else:
        config.load_incluster_config(client_configuration=cfg)
    cfg.connection_pool_maxsize = max(int(cfg.connection_pool_maxsize or 0), pool_size)
    # Connection errors go straight to the informers' own backoff; one retry is left for a
    # kept-alive connection the server closed.
    cfg.retries = Retry(total=1, connect=0, backoff_factor=0)
    return client.ApiClient(cfg)


class _View:
    """Merges informer deltas into source events, resolving one key reported by two API
    groups (lowest priority number wins)."""

    def __init__(self) -> None:
        self._objs: dict[ObjectKey, dict[int, RawObject]] = {}

    def apply(self, batch: Batch) -> list[SourceEvent]:
        out: list[SourceEvent] = []
        prio = batch.priority
        for d in batch.deltas:
            if isinstance(d, Put):
                key = d.obj.key
                slot = self._objs.setdefault(key, {})
                before = slot[min(slot)] if slot else None
                slot[prio] = d.obj
                after = slot[min(slot)]
                if after is not before:
                    out.append(Upsert(ORIGIN, after))
            elif isinstance(d, Removed):
                slot = self._objs.get(d.key, {})
                if prio not in slot:
                    continue
                before = slot[min(slot)]
                del slot[prio]
                if not slot:
                    del self._objs[d.key]
                    out.append(Delete(ORIGIN, d.key))
                elif slot[min(slot)] is not before:
                    out.append(Upsert(ORIGIN, slot[min(slot)]))
        return out

    def keys(self) -> set[ObjectKey]:
        return set(self._objs)


class KubernetesSource:
    """The Source protocol over a Kubernetes API server (see the module docstring).

    `namespaces`: None watches every namespace; otherwise namespaced kinds are listed and
    watched per namespace and only those Namespace objects are reported.
    `on_restart(label)` is called each time a watch restarts after an error (label
    `kubernetes/<Kind>`), e.g. to count `Metrics.watch_restarts`.
    `api_client`: an already configured `kubernetes.client.ApiClient` (else one is built
    from `kubeconfig` / $KUBECONFIG / in-cluster config when `run` starts)."""

    def __init__(self, *, namespaces: Sequence[str] | None = None, kubeconfig: str | os.PathLike[str] | None = None,
                 istio_api: bool | None = None, on_restart: Callable[[str], None] | None = None,
                 options: WatchOptions | None = None, api_client: Any = None, name: str = "kubernetes") -> None:
        self.name = name
        self.namespaces = tuple(sorted(set(namespaces))) if namespaces is not None else None
        self.kubeconfig = kubeconfig
        self.istio_api = istio_api
        self.on_restart = on_restart
        self.options = options or WatchOptions()
        self.api_client = api_client
        self.informers: list[Informer] = []
        self.discovered: list[Resource] | None = None  # None: not asked yet (or discovery failed)
        self.unsupported: list[Resource] = []  # served mesh kinds watched only to report their objects

    def resources(self) -> tuple[Resource, ...]:
        if self.discovered is None:
            return resources(self.istio_api)
        return plan_resources(self.discovered, self.istio_api)[0]

    def discover(self, api: Any) -> None:
        """Ask the API server which kinds of Istio's and the Gateway API's groups it serves:
        Istio's translated kinds are watched when served (as with `istio_api`), the others
        so that each object gets a warning that its kind is not supported."""
        try:
            self.discovered = discover(api)
        except Exception as exc:  # discovery is best effort: the configured kinds still work
            log.warning("API discovery of %s failed (%s): watching only the configured kinds",
                        ", ".join(MESH_GROUPS), exc)
            self.discovered = None
            return
        _, use_istio, self.unsupported = plan_resources(self.discovered, self.istio_api)
        if use_istio and self.istio_api is None:
            log.info("Istio's networking.istio.io/security.istio.io kinds are served: watching them (as --istio-api)")
        if self.unsupported:
            log.info("served kinds Meshline does not support (each object is reported): %s",
                     ", ".join(f"{r.kind}.{r.group}" for r in self.unsupported))

    def _plan(self) -> list[tuple[Resource, str | None]]:
        plan: list[tuple[Resource, str | None]] = []
        for res in self.resources():
            if res.namespaced and self.namespaces is not None:
                plan.extend((res, ns) for ns in self.namespaces)
            else:
                plan.append((res, None))
        return plan

    def _keep(self, res: Resource) -> Callable[[RawObject], bool] | None:
        if res.namespaced or self.namespaces is None or res.kind != "Namespace":
            return None  # other cluster-scoped kinds (GatewayClass) are not namespace-filtered
        allowed = frozenset(self.namespaces)
        return lambda raw: raw.name in allowed

    async def run(self, sink: Sink) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Batch] = asyncio.Queue()
        plan = self._plan()
        api = self.api_client
        own_client = api is None
        if api is None:
            api = await asyncio.to_thread(make_api_client, self.kubeconfig, len(plan) + 4 + 16)
        await asyncio.to_thread(self.discover, api)
        plan = self._plan()

        def emit(batch: Batch) -> None:  # called from informer threads
            try:
                loop.call_soon_threadsafe(queue.put_nowait, batch)
            except RuntimeError as exc:  # the loop is closed: nobody is listening any more
                raise Stopped() from exc

        self.informers = [
            Informer(i, api, res, ns, emit, self.on_restart, self.options, self._keep(res))
            for i, (res, ns) in enumerate(plan)
        ]
        threads = [threading.Thread(target=inf.run, name=f"k8s-{inf.res.plural}-{inf.namespace or 'all'}",
                                    daemon=True) for inf in self.informers]
        for t in threads:
            t.start()
        log.info("watching Kubernetes: %s%s", ", ".join(sorted({r.label.split("/", 1)[1] for r, _ in plan})),
                 f" in namespaces {', '.join(self.namespaces)}" if self.namespaces is not None else "")
        view = _View()
        # Kinds watched only to report them (maybe not readable: RBAC) never hold back Synced.
        unsynced = {inf.ident for inf in self.informers if inf.res.priority < UNSUPPORTED_PRIORITY}
        try:
            while True:
                batches = [await queue.get()]
                while not queue.empty():
                    batches.append(queue.get_nowait())
                events: list[SourceEvent] = []
                for b in batches:
                    events.extend(view.apply(b))
                    if b.listed and b.informer in unsynced:
                        unsynced.discard(b.informer)
                        if not unsynced:
                            events.append(Synced(self.name))
                            log.info("Kubernetes source synced: %d objects", len(view.keys()))
                if events:
                    await sink(events)
        finally:
            for inf in self.informers:
                inf.stop()
            await asyncio.to_thread(_join, threads, 5.0)
            if own_client:
                await asyncio.to_thread(api.close)


def _join(threads: list[threading.Thread], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            log.warning("informer thread %s did not stop within %.0fs", t.name, timeout)
