"""A real Kubernetes API server for tests: etcd + kube-apiserver built from the Go module
proxy and run by `scripts/kube/kube.sh` (cached binaries, a state directory per test
session, free ports). Does I/O: processes, HTTP to the API server and to etcd.

    kube = RealKube(tmp_dir); kube.up()
    kube.apply(service("reviews"))              # create or update through the API
    kube.stop_apiserver(); kube.up()             # an API-server restart (etcd keeps the data)
    kube.compact()                               # etcd compaction: older resourceVersions -> 410

No kubelet and no controller-manager run: Pods get their status (phase, IP) through the
`status` subresource (`set_pod_ip`), ServiceAccounts are created by `namespace()` as the
ServiceAccount admission plugin needs them, and a deleted Namespace is finalized by
`delete_namespace` (the namespace controller's job).
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from controlplane.localrun import free_port
from controlplane.sources.kubernetes import make_api_client

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "kube" / "kube.sh"
CANNOT_BUILD = 3  # kube.sh's exit status for "no Go here"


def _bindable(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _free_pair(avoid: int) -> int:
    """A free port P with P + 1 free too (and neither `avoid`)."""
    for _ in range(100):
        p = free_port()
        if p + 1 < 65536 and avoid not in (p, p + 1) and _bindable(p + 1):
            return p
    raise RuntimeError("no two adjacent free ports")


def cached_binaries() -> Path | None:
    """The directory holding the built binaries, or None when not built yet."""
    out = subprocess.run(["bash", str(SCRIPT), "bin-dir"], capture_output=True, text=True, check=True)
    d = Path(out.stdout.strip())
    return d if all((d / b).exists() for b in ("kube-apiserver", "etcd", "kubectl")) else None


def ensure_built(echo: Callable[[str], None] = print) -> str | None:
    """Build the binaries when missing (minutes, once per machine and version). Returns
    None when they are there, else the reason they cannot be (for a skip message)."""
    if cached_binaries() is not None:
        return None
    if shutil.which("go") is None:
        return "no Go toolchain on PATH: cannot build kube-apiserver/etcd (scripts/kube/kube.sh build)"
    echo("kube: building kube-apiserver and etcd from the Go module proxy (once per machine; minutes)...")
    t0 = time.monotonic()
    p = subprocess.run(["bash", str(SCRIPT), "build"], capture_output=True, text=True)
    if p.returncode == CANNOT_BUILD:
        return p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "cannot build here"
    if p.returncode != 0:
        tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-15:])
        return f"scripts/kube/kube.sh build failed (exit {p.returncode}):\n{tail}"
    echo(f"kube: built in {time.monotonic() - t0:.0f} s")
    return None


class RealKube:
    """One etcd + kube-apiserver pair under `state` (see the module docstring)."""

    def __init__(self, state: Path, *, extra_args: str = "") -> None:
        self.state = state
        self.api_port = free_port()
        self.etcd_port = _free_pair(avoid=self.api_port)  # etcd's peer port is etcd_port + 1
        self.extra_args = extra_args
        self._api: Any = None
        self.http = httpx.Client(timeout=10)

    # ------------------------------------------------------------------ processes
    def env(self) -> dict[str, str]:
        return {**os.environ, "MESHLINE_KUBE_DIR": str(self.state), "MESHLINE_KUBE_PORT": str(self.api_port),
                "MESHLINE_ETCD_PORT": str(self.etcd_port), "MESHLINE_KUBE_APISERVER_ARGS": self.extra_args}

    def _script(self, *args: str, timeout: float = 180) -> str:
        p = subprocess.run(["bash", str(SCRIPT), *args], env=self.env(), capture_output=True, text=True,
                           timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"kube.sh {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
        return p.stderr

    def up(self) -> float:
        """Start whatever is not running and wait for /readyz; returns the seconds taken."""
        t0 = time.monotonic()
        self._script("up")
        return time.monotonic() - t0

    def down(self) -> None:
        if self._api is not None:
            self._api.close()
            self._api = None
        self.http.close()
        self._script("down")

    def pid(self, name: str) -> int | None:
        f = self.state / f"{name}.pid"
        try:
            pid = int(f.read_text())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def stop_apiserver(self, sig: int = signal.SIGTERM) -> None:
        """Stop kube-apiserver (etcd keeps running); `up()` starts it again."""
        pid = self.pid("kube-apiserver")
        if pid is not None and sig != signal.SIGTERM:
            os.kill(pid, sig)
            with contextlib.suppress(ChildProcessError, OSError):
                for _ in range(100):
                    os.kill(pid, 0)
                    time.sleep(0.05)
        self._script("stop-apiserver")

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        """The kubectl built alongside the API server, with the admin kubeconfig."""
        bins = cached_binaries()
        assert bins is not None and (bins / "kubectl").exists(), "kubectl is built with the API server"
        p = subprocess.run([str(bins / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args], input=input,
                           capture_output=True, text=True, timeout=60)
        if check and p.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
        return p

    def kubectl_apply(self, *docs: dict[str, Any]) -> str:
        """`kubectl apply -f -` of `docs` (client-side apply, as a user types it)."""
        return self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs)).stdout

    @property
    def kubeconfig(self) -> Path:
        return self.state / "kubeconfig"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def api(self) -> Any:
        """An official-client ApiClient with the admin token (system:masters)."""
        if self._api is None:
            self._api = make_api_client(self.kubeconfig)
        return self._api

    # ------------------------------------------------------------------ etcd (v3 JSON gateway)
    def etcd(self, op: str, body: dict[str, Any]) -> dict[str, Any]:
        r = self.http.post(f"http://127.0.0.1:{self.etcd_port}/v3/{op}", json=body)
        r.raise_for_status()
        return dict(r.json())

    @staticmethod
    def _b64(s: str) -> str:
        return base64.b64encode(s.encode()).decode()

    def etcd_revision(self) -> int:
        return int(self.etcd("kv/range", {"key": self._b64("/registry/health"), "count_only": True})
                   ["header"]["revision"])

    def etcd_keys(self, prefix: str) -> list[str]:
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        doc = self.etcd("kv/range", {"key": self._b64(prefix), "range_end": self._b64(end), "keys_only": True})
        return [base64.b64decode(kv["key"]).decode() for kv in doc.get("kvs") or []]

    def etcd_delete(self, key: str) -> int:
        """Delete a key behind the API server's back (as if the event were lost)."""
        return int(self.etcd("kv/deleterange", {"key": self._b64(key)}).get("deleted") or 0)

    def compact(self, revision: int | None = None) -> int:
        """Compact etcd's history up to `revision` (default: now): a watch from an older
        resourceVersion then gets 410 Gone."""
        rev = revision or self.etcd_revision()
        self.etcd("kv/compaction", {"revision": str(rev), "physical": True})
        return rev

    # ------------------------------------------------------------------ objects through the API
    def dynamic(self) -> Any:
        from kubernetes.dynamic import DynamicClient

        return DynamicClient(self.api)

    def resource(self, api_version: str, kind: str) -> Any:
        from kubernetes.dynamic.exceptions import ResourceNotFoundError

        dyn = self.dynamic()
        try:
            return dyn.resources.get(api_version=api_version, kind=kind)
        except ResourceNotFoundError:
            dyn.resources.invalidate_cache()
            return dyn.resources.get(api_version=api_version, kind=kind)

    def apply(self, body: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply (create or update), as `kubectl apply --server-side` does."""
        res = self.resource(body["apiVersion"], body["kind"])
        meta = body["metadata"]
        ns = meta.get("namespace") if res.namespaced else None
        if res.namespaced and ns is None:
            ns = "default"
        out = res.server_side_apply(body=body, name=meta["name"], namespace=ns, field_manager="meshline-tests",
                                    force_conflicts=True)
        return dict(out.to_dict())

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        res = self.resource(body["apiVersion"], body["kind"])
        ns = body["metadata"].get("namespace", "default") if res.namespaced else None
        return dict(res.create(body=body, namespace=ns).to_dict())

    def get(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        res = self.resource(api_version, kind)
        try:
            return dict(res.get(name=name, namespace=namespace if res.namespaced else None).to_dict())
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def patch(self, api_version: str, kind: str, name: str, patch: dict[str, Any], namespace: str | None = None,
              subresource: str | None = None) -> dict[str, Any]:
        res = self.resource(api_version, kind)
        if subresource:
            res = res.subresources[subresource]
        return dict(res.patch(body=patch, name=name, namespace=namespace if res.namespaced else None,
                              content_type="application/merge-patch+json").to_dict())

    def delete(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> None:
        res = self.resource(api_version, kind)
        res.delete(name=name, namespace=namespace if res.namespaced else None)

    def namespace(self, name: str, labels: dict[str, str] | None = None,
                  service_accounts: tuple[str, ...] = ()) -> None:
        """A Namespace plus its `default` ServiceAccount (and `service_accounts`): with no
        controller-manager, nobody else creates them, and Pods need them to be admitted."""
        self.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}})
        for sa in ("default", *service_accounts):
            self.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": name}})

    def delete_namespace(self, name: str) -> None:
        """Delete a Namespace and finalize it (the namespace controller's part: without a
        controller-manager it would stay Terminating)."""
        core = k8s.CoreV1Api(self.api)
        with contextlib.suppress(ApiException):
            core.delete_namespace(name)
        ns = core.read_namespace(name)
        ns.spec.finalizers = []
        with contextlib.suppress(ApiException):
            core.replace_namespace_finalize(name, ns)

    def pod(self, body: dict[str, Any], ip: str) -> dict[str, Any]:
        """Create a Pod (its ServiceAccount first) and give it a Running status with `ip`,
        as a kubelet would."""
        meta = body["metadata"]
        ns = meta.get("namespace", "default")
        sa = body.get("spec", {}).get("serviceAccountName")
        if sa:
            self.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": ns}})
        body = {k: v for k, v in body.items() if k != "status"}
        self.apply(body)
        return self.set_pod_ip(meta["name"], ns, ip)

    def set_pod_ip(self, name: str, namespace: str, ip: str) -> dict[str, Any]:
        return self.patch("v1", "Pod", name, {"status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True"}]}}, namespace, subresource="status")

    def install_crds(self) -> list[str]:
        """Create (or update) every CRD of manifests/crds and wait until each is Established."""
        names = []
        for path in sorted((ROOT / "manifests" / "crds").glob("*.yaml")):
            for doc in yaml.safe_load_all(path.read_text()):
                if doc and doc.get("kind") == "CustomResourceDefinition":
                    self.apply(doc)
                    names.append(doc["metadata"]["name"])
        ext = k8s.ApiextensionsV1Api(self.api)
        deadline = time.monotonic() + 30
        for name in names:
            while True:
                conds = ext.read_custom_resource_definition(name).status.conditions or []
                if any(c.type == "Established" and c.status == "True" for c in conds):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"CRD {name} not Established")
                time.sleep(0.1)
        return names

    def token(self, namespace: str, service_account: str, audiences: list[str],
              seconds: int = 3600, pod: str | None = None) -> str:
        """A projected service-account token from the TokenRequest API (bound to `pod`
        when given), as the kubelet would mount it."""
        spec: dict[str, Any] = {"audiences": audiences, "expirationSeconds": seconds}
        if pod is not None:
            uid = k8s.CoreV1Api(self.api).read_namespaced_pod(pod, namespace).metadata.uid
            spec["boundObjectRef"] = {"kind": "Pod", "apiVersion": "v1", "name": pod, "uid": uid}
        tr = k8s.CoreV1Api(self.api).create_namespaced_service_account_token(
            service_account, namespace, {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                                         "spec": spec})
        return str(tr.status.token)

    def kubeconfig_for_token(self, path: Path, token: str) -> Path:
        """A kubeconfig for this server authenticating with `token` (e.g. a ServiceAccount's)."""
        doc = yaml.safe_load(self.kubeconfig.read_text())
        doc["users"] = [{"name": "sa", "user": {"token": token}}]
        doc["contexts"][0]["context"]["user"] = "sa"
        path.write_text(yaml.safe_dump(doc))
        path.chmod(0o600)
        return path


def eventually(check: Callable[[], Any], timeout: float = 60.0, interval: float = 0.05) -> Any:
    """Retry `check` until it returns truthy without raising (an assertion, a missing key, an
    HTTP or API error); return its value."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            v = check()
            if v:
                return v
        except (AssertionError, KeyError, httpx.HTTPError, ApiException) as exc:
            last = exc
        time.sleep(interval)
    if last is not None:
        raise last
    raise AssertionError("condition not met in time")
