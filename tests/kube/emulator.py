"""The kmock Kubernetes API emulator on a free port, in a background thread with its own
event loop, behind a `FaultProxy`. Does network I/O. Reusable by any test:

    with kube_emulator(tmp_path) as env:
        base_url, kubeconfig, api = env            # api: a configured official ApiClient
        env.create(service("reviews"))             # through the API, straight to kmock
        env.faults.set_online(False)               # the proxy (what kubeconfig names) goes dark

`base_url` and the kubeconfig point at the fault proxy; `api` (and `env.create/patch/
delete`) talk to kmock directly, so tests can change the cluster while the proxy refuses
connections. The Namespace path bug of kmock 0.8 (every `/api/v1/namespaces[/NAME]`
request answers 500) is patched here, and the mesh CRDs are declared.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import kmock
import yaml
from kmock._internal import parsing
from kubernetes import client as k8s

from controlplane.localrun import free_port
from controlplane.sources.kube_informer import Resource, list_function, resources, to_raw
from tests.kube.faults import FaultProxy
from tests.kube.objects import namespace

T = TypeVar("T")
VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}
ALL_RESOURCES = resources(istio_api=True)


def patch_namespace_paths() -> None:
    """Make kmock parse `/api/<v>/namespaces[/NAME][/status|finalize]` as the cluster-scoped
    `namespaces` resource (kmock 0.8 reads `namespaces` as a namespaced path prefix and
    answers 500). Idempotent; affects this process only."""
    current = parsing.parse_path
    if getattr(current, "_meshline_patched", False):
        return

    def parse_path(path: str) -> parsing.ParsedPath:
        parts = path.strip("/").split("/")
        if len(parts) >= 3 and parts[0] == "api" and parts[2] == "namespaces":
            version = parts[1]
            if len(parts) == 3:
                return parsing.ParsedPath("", version, "namespaces", None, None, None)
            if len(parts) == 4 or (len(parts) == 5 and parts[4] in ("status", "finalize")):
                sub = parts[4] if len(parts) == 5 else None
                return parsing.ParsedPath("", version, "namespaces", None, parts[3], sub)
        return current(path)

    parse_path._meshline_patched = True  # type: ignore[attr-defined]
    parsing.parse_path = parse_path


class LoopThread:
    """An asyncio event loop running in a daemon thread."""

    def __init__(self, name: str = "kmock") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


def write_kubeconfig(path: Path, server: str, namespace: str = "default") -> Path:
    doc = {
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock", "preferences": {},
        "clusters": [{"name": "kmock", "cluster": {"server": server}}],
        "users": [{"name": "tester", "user": {"token": "kmock-token"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "tester", "namespace": namespace}}],
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def resource_for(api_version: str, kind: str) -> Resource:
    for r in ALL_RESOURCES:
        if r.api_version == api_version and r.kind == kind:
            return r
    raise KeyError(f"no resource declared for {api_version} {kind}")


@dataclass
class KubeEnv:
    base_url: str  # the fault proxy: what the kubeconfig names
    kubeconfig: Path
    api: Any  # kubernetes.client.ApiClient straight to kmock (unaffected by faults)
    direct_url: str
    faults: FaultProxy
    emulator: Any  # the kmock.KubernetesEmulator (lives on `loop`)
    loop: LoopThread

    def __iter__(self) -> Iterator[Any]:
        return iter((self.base_url, self.kubeconfig, self.api))

    # ------------------------------------------------------------------ writing through the API
    def create(self, body: dict[str, Any]) -> None:
        res = resource_for(body["apiVersion"], body["kind"])
        meta = body.setdefault("metadata", {})
        if res.namespaced:
            meta.setdefault("namespace", "default")  # kmock needs it in the body for watches
        ns = meta.get("namespace")
        if res.group == "":
            core = k8s.CoreV1Api(self.api)
            if not res.namespaced:
                core.create_namespace(body)
            else:
                getattr(core, f"create_namespaced_{res.kind.lower()}")(ns, body)
        elif res.group == "discovery.k8s.io":
            k8s.DiscoveryV1Api(self.api).create_namespaced_endpoint_slice(ns, body)
        else:
            k8s.CustomObjectsApi(self.api).create_namespaced_custom_object(res.group, res.version, ns, res.plural,
                                                                            body)

    def patch(self, api_version: str, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> None:
        res = resource_for(api_version, kind)
        if res.group == "":
            core = k8s.CoreV1Api(self.api)
            if not res.namespaced:
                core.patch_namespace(name, patch)
            else:
                getattr(core, f"patch_namespaced_{res.kind.lower()}")(name, namespace, patch)
        elif res.group == "discovery.k8s.io":
            k8s.DiscoveryV1Api(self.api).patch_namespaced_endpoint_slice(name, namespace, patch)
        else:
            k8s.CustomObjectsApi(self.api).patch_namespaced_custom_object(res.group, res.version, namespace,
                                                                           res.plural, name, patch)

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        res = resource_for(api_version, kind)
        if res.group == "":
            core = k8s.CoreV1Api(self.api)
            if not res.namespaced:
                core.delete_namespace(name)
            else:
                getattr(core, f"delete_namespaced_{res.kind.lower()}")(name, namespace)
        elif res.group == "discovery.k8s.io":
            k8s.DiscoveryV1Api(self.api).delete_namespaced_endpoint_slice(name, namespace)
        else:
            k8s.CustomObjectsApi(self.api).delete_namespaced_custom_object(res.group, res.version, namespace,
                                                                            res.plural, name)

    def state(self, istio_api: bool = False) -> dict[tuple[str, str, str], dict[str, Any]]:
        """What the API server holds now, for the watched resources, as the source would
        report it: (kind, namespace, name) -> body (Meshline's group wins a shared key)."""
        import json

        out: dict[tuple[str, str, str], dict[str, Any]] = {}
        for res in sorted(resources(istio_api), key=lambda r: -r.priority):
            resp = list_function(self.api, res, None)(_preload_content=False)
            for item in json.loads(resp.data).get("items") or []:
                raw = to_raw(res, item)
                out[raw.key] = dict(raw.body)
        return out


async def _start_kmock(port: int) -> tuple[Any, Any]:
    emulator = kmock.KubernetesEmulator()
    await emulator.__aenter__()
    for r in ALL_RESOURCES:
        key = f"{r.group}/{r.version}/{r.plural}" if r.group else f"{r.version}/{r.plural}"
        emulator.resources[key] = kmock.ResourceInfo(kind=r.kind, namespaced=r.namespaced, verbs=VERBS)
    server = kmock.Server(emulator, host="127.0.0.1", port=port)
    await server.__aenter__()
    return emulator, server


async def _stop_kmock(emulator: Any, server: Any) -> None:
    with contextlib.suppress(Exception):
        await server.__aexit__(None, None, None)
    with contextlib.suppress(Exception):
        await emulator.__aexit__(None, None, None)


def _client(url: str) -> Any:
    cfg = k8s.Configuration()
    cfg.host = url
    return k8s.ApiClient(cfg)


@contextlib.contextmanager
def kube_emulator(workdir: Path | None = None, *, online: bool = True) -> Iterator[KubeEnv]:
    """Start kmock and its fault proxy on free ports. `online=False` starts the proxy
    refusing connections (an API server that is not up yet)."""
    patch_namespace_paths()
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="kmock-")
        workdir = Path(tmp.name)
    lt = LoopThread()
    kport, pport = free_port(), free_port()
    emulator, server = lt.run(_start_kmock(kport))
    direct = f"http://127.0.0.1:{kport}"
    proxy = FaultProxy(lt.loop, direct, "127.0.0.1", pport)
    lt.run(proxy.start(online))
    api = _client(direct)
    kubeconfig = write_kubeconfig(workdir / "kubeconfig.yaml", proxy.url)
    env = KubeEnv(proxy.url, kubeconfig, api, direct, proxy, emulator, lt)
    try:
        yield env
    finally:
        api.close()
        with contextlib.suppress(Exception):
            lt.run(proxy.close(), 10)
        with contextlib.suppress(Exception):
            lt.run(_stop_kmock(emulator, server), 10)
        lt.close()
        if tmp is not None:
            tmp.cleanup()


@contextlib.contextmanager
def emulator_serving(workdir: Path, extra: tuple[Resource, ...]) -> Iterator[KubeEnv]:
    """kube_emulator whose API also serves these namespaced kinds (as a cluster with their CRDs
    installed would), with namespace `default` created."""
    with kube_emulator(workdir) as env:
        for r in extra:
            env.emulator.resources[f"{r.group}/{r.version}/{r.plural}"] = kmock.ResourceInfo(
                kind=r.kind, namespaced=True, verbs=VERBS)
        env.create(namespace("default"))
        yield env


def create_custom(env: KubeEnv, r: Resource, name: str) -> None:
    """An object of kind r named name in `default`, with an empty spec."""
    body: dict[str, Any] = {"apiVersion": f"{r.group}/{r.version}", "kind": r.kind,
                            "metadata": {"name": name, "namespace": "default"}, "spec": {}}
    k8s.CustomObjectsApi(env.api).create_namespaced_custom_object(r.group, r.version, "default", r.plural, body)
