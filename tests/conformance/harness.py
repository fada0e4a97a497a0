"""Conformance harness: `meshline serve` on a directory of Istio YAML, the sample backends
(samples/backend.py, answering with their workload's name) on loopback addresses, and real
Envoy sidecars in bind capture, as the e2e tests run them (tests/e2e/conftest.py,
tests/e2e/test_mtls_e2e.py). Does process and network I/O.

Address plan (kept apart from tests/e2e and `make run`, which use 127.0.0.x):
  127.0.3.x   the outbound address of each client sidecar (bind capture: its listener for
              service port P binds 127.0.3.x:P and routes by Host)
  127.0.4.x   pod IPs: where a plain workload's app listens, or where an injected
              workload's sidecar takes inbound traffic
  127.0.5.x   the apps behind injected sidecars (annotation meshline.io/app-address)
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from controlplane.localrun import free_port, start_envoy, stop, wait_http
from tests.e2e.conftest import eventually

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CONVERGE = 60.0  # seconds: a generous deadline for config to reach Envoy (holds at 10x slowdown)


@dataclass
class Workload:
    """One pod. Its app answers with `name` (HTTP JSON `backend`, or a TCP greeting line)."""

    name: str
    app: str
    ip: str
    labels: dict[str, str] = field(default_factory=dict)
    namespace: str = "default"
    sa: str = "default"
    injected: bool = False  # a Meshline sidecar takes its inbound traffic at `ip`, app at `app_ip`
    app_ip: str | None = None
    serves: bool = True  # False for clients (sleep): no app to start
    tcp_ports: tuple[int, ...] = ()  # ports served by a TCP echo backend instead of HTTP
    ready: bool = True  # its EndpointSlice condition (False: Kubernetes saw its readiness probe fail)

    @property
    def app_address(self) -> str:
        return self.app_ip if self.injected and self.app_ip else self.ip


@dataclass
class Service:
    name: str
    ports: list[tuple[str, int]]  # (port name, number): Istio's protocol selection by name
    namespace: str = "default"
    cluster_ip: str | None = None  # spec.clusterIP (None: not set)


def mesh_yaml(namespaces: dict[str, dict[str, str]], services: Sequence[Service],
              workloads: Sequence[Workload]) -> str:
    """Namespaces, Services selecting `app: <name>`, their EndpointSlices and the Pods, as a
    cluster would hold them (Pods of injected workloads carry the injector's annotations)."""
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": labels}}
        for ns, labels in namespaces.items()]
    for svc in services:
        docs.append({"apiVersion": "v1", "kind": "Service",
                     "metadata": {"name": svc.name, "namespace": svc.namespace, "labels": {"app": svc.name}},
                     "spec": {"selector": {"app": svc.name},
                              **({"clusterIP": svc.cluster_ip} if svc.cluster_ip else {}),
                              "ports": [{"name": n, "port": p, "targetPort": p} for n, p in svc.ports]}})
        members = [w for w in workloads if w.app == svc.name and w.namespace == svc.namespace]
        docs.append({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                     "metadata": {"name": f"{svc.name}-1", "namespace": svc.namespace,
                                  "labels": {"kubernetes.io/service-name": svc.name}},
                     "addressType": "IPv4",
                     "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in svc.ports],
                     "endpoints": [{"addresses": [w.ip], "conditions": {"ready": w.ready},
                                    "targetRef": {"kind": "Pod", "name": w.name, "namespace": w.namespace}}
                                   for w in members]})
    for w in workloads:
        ann = {"meshline.io/status": "injected", "meshline.io/app-address": w.app_address} if w.injected else {}
        ports = sorted({p for s in services if s.name == w.app and s.namespace == w.namespace for _, p in s.ports})
        docs.append({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"name": w.name, "namespace": w.namespace,
                                  "labels": {"app": w.app, **w.labels}, "annotations": ann},
                     "spec": {"serviceAccountName": w.sa,
                              "containers": [{"name": "app", "image": "x",
                                              "ports": [{"containerPort": p} for p in ports]}]},
                     "status": {"podIP": w.ip}})
    return yaml.safe_dump_all(docs, sort_keys=False)


def backend_specs(services: Sequence[Service], workloads: Sequence[Workload]) -> list[str]:
    """samples/backend.py arguments: each serving workload on each port its Services declare."""
    specs = []
    for w in workloads:
        if not w.serves:
            continue
        ports = sorted({p for s in services if s.name == w.app and s.namespace == w.namespace for _, p in s.ports})
        for p in ports:
            specs.append(f"{w.name}={w.app_address}:{p}" + ("/tcp" if p in w.tcp_ports else ""))
    return specs


@dataclass
class Sidecar:
    workload: Workload
    outbound: str
    admin: int
    proc: subprocess.Popen[bytes]


class Mesh:
    """One control plane, its backends and sidecars for one task directory."""

    def __init__(self, work: Path, *, root_namespace: str | None = None) -> None:
        self.work = work
        self.config = work / "config"
        self.config.mkdir()
        self.ca_dir = work / "ca"
        self.root_namespace = root_namespace
        self.xds, self.status = free_port(), free_port()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.sidecars: dict[str, Sidecar] = {}
        self.client = httpx.Client(timeout=30.0)

    # ------------------------------------------------------------------ lifecycle
    def start(self, files: dict[str, str], backends: Iterable[str] = (),
              extra: Iterable[list[str]] = ()) -> None:
        for name, text in files.items():
            (self.config / name).write_text(text)
        specs = list(backends)
        if specs:
            self._spawn([sys.executable, str(ROOT / "samples" / "backend.py"), *specs], ready=True)
        for argv in extra:
            self._spawn(argv, ready=True)
        log = open(self.work / "meshline.log", "wb")
        args = [sys.executable, "-m", "controlplane.cli", "serve", "--config-dir", str(self.config),
                "--ca-dir", str(self.ca_dir), "--ca-address", f"127.0.0.1:{free_port()}",
                "--xds-address", f"127.0.0.1:{self.xds}", "--status-address", f"127.0.0.1:{self.status}"]
        if self.root_namespace:
            args += ["--root-namespace", self.root_namespace]
        self.procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True, cwd=ROOT))
        try:
            wait_http(f"{self.status_url}/readyz", proc=self.procs[-1], timeout=60)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}\n{self.log()}") from None

    def log(self, tail: int = 4000) -> str:
        """The end of meshline's log (for failure messages)."""
        return (self.work / "meshline.log").read_text(errors="replace")[-tail:]

    def _spawn(self, argv: list[str], ready: bool) -> None:
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, start_new_session=True, cwd=ROOT)
        self.procs.append(p)
        if ready:
            assert p.stdout is not None and p.stdout.readline().strip() == b"ready", argv

    def sidecar(self, wl: Workload, outbound: str) -> Sidecar:
        """A sidecar for `wl` with its SPIFFE identity (ns/sa) from Meshline's CA; its outbound
        listeners bind `outbound`, its inbound ones (when `wl.injected`) the pod IP."""
        admin = free_port()
        out = subprocess.run(
            [sys.executable, "-m", "controlplane.cli", "bootstrap", "--node-id", f"{wl.name}.{wl.namespace}",
             "--namespace", wl.namespace, "--workload", wl.name, "--service-account", wl.sa,
             "--labels", ",".join(f"{k}={v}" for k, v in {"app": wl.app, **wl.labels}.items()),
             "--capture", "bind", "--outbound-address", outbound, "--ca-dir", str(self.ca_dir),
             "--xds-address", f"127.0.0.1:{self.xds}", "--admin-address", f"127.0.0.1:{admin}"],
            capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert out.returncode == 0, out.stderr
        proc = start_envoy(out.stdout, self.work, f"{wl.name}.{wl.namespace}", log_level="info")
        wait_http(f"http://127.0.0.1:{admin}/ready", proc=proc, timeout=60)
        sc = Sidecar(wl, outbound, admin, proc)
        self.sidecars[f"{wl.name}.{wl.namespace}"] = sc
        return sc

    def start_sidecars(self, pairs: Sequence[tuple[Workload, str]]) -> list[Sidecar]:
        """Several sidecars started side by side: (workload, outbound address) each."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(pairs)) as pool:
            return list(pool.map(lambda p: self.sidecar(*p), pairs))

    def close(self) -> None:
        self.client.close()
        for sc in self.sidecars.values():
            stop(sc.proc)
        for p in reversed(self.procs):
            stop(p)

    # ------------------------------------------------------------------ config
    @property
    def status_url(self) -> str:
        return f"http://127.0.0.1:{self.status}"

    def apply(self, name: str, text: str) -> None:
        """Like `kubectl apply -f`: the file replaces the previous one of that name, atomically."""
        tmp = self.config / f".{name}.tmp"
        tmp.write_text(text)
        tmp.rename(self.config / name)

    def remove(self, name: str) -> None:
        (self.config / name).unlink()

    def kubectl_apply(self, text: str) -> list[str]:
        """`kubectl apply -f`: each object of the multi-document YAML replaces the object of the
        same kind, namespace and name (one file per object). Returns the files written."""
        written = []
        for doc in text.split("\n---\n"):
            obj = yaml.safe_load(doc)
            if not obj:
                continue
            meta = obj.get("metadata") or {}
            name = f"obj-{obj['kind']}-{meta.get('namespace', 'default')}-{meta['name']}.yaml"
            self.apply(name, doc.strip() + "\n")
            written.append(name)
        return written

    def kubectl_delete(self, text: str) -> None:
        """`kubectl delete -f`: the objects named in the YAML go away."""
        for doc in text.split("\n---\n"):
            obj = yaml.safe_load(doc)
            if obj:
                meta = obj.get("metadata") or {}
                self.remove(f"obj-{obj['kind']}-{meta.get('namespace', 'default')}-{meta['name']}.yaml")

    def errors(self) -> list[dict[str, Any]]:
        """Errors (not warnings) Meshline reports for the config."""
        return [e for e in self.client.get(f"{self.status_url}/v1/config/errors").json()
                if e.get("severity", "error") == "error"]

    # ------------------------------------------------------------------ traffic
    def http(self, sc: Sidecar, port: int, host: str, path: str = "/", headers: dict[str, str] | None = None,
             method: str = "GET", client: httpx.Client | None = None) -> httpx.Response:
        """What the app of `sc`'s workload sees when it calls http://<host>:<port><path>."""
        c = client or self.client
        return c.request(method, f"http://{sc.outbound}:{port}{path}", headers={"host": host, **(headers or {})})

    def count(self, app_address: str, port: int) -> int:
        """Requests the backend at that address has served (read directly, not through Envoy)."""
        return int(self.client.get(f"http://{app_address}:{port}/__requests").json()["count"])

    def stat(self, sc: Sidecar, name: str) -> int:
        """One counter from the sidecar's Envoy admin (the independent witness)."""
        text = self.client.get(f"http://127.0.0.1:{sc.admin}/stats", params={"filter": f"^{name}$"}).text
        for line in text.splitlines():
            k, _, v = line.partition(": ")
            if k == name:
                return int(v)
        return 0


def tcp_exchange(host: str, port: int, payload: bytes = b"hello\n", timeout: float = 10.0) -> str | None:
    """Connect, send `payload`, and return the backend's greeting (its name) once the echo of
    `payload` came back; None when the connection is refused, reset or closed first (the
    doc's "connection rejected")."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(payload)
            data = b""
            while payload.strip() not in data:
                chunk = s.recv(4096)
                if not chunk:
                    return None
                data += chunk
            return data.split(b"\n")[0].decode()
    except OSError:
        return None


def converge(check: Callable[[], Any], timeout: float = CONVERGE) -> Any:
    """Poll until `check` holds (config propagation is eventually consistent, as in Istio)."""
    return eventually(check, timeout=timeout, interval=0.1)


def sample(n: int, fn: Callable[[], str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _ in range(n):
        k = fn()
        counts[k] = counts.get(k, 0) + 1
    return counts


def read(task_dir: Path, name: str) -> str:
    return (task_dir / name).read_text()


def wait_all(check: Callable[[], bool], n: int = 20) -> bool:
    """`check` held `n` times in a row (a rule is in effect, not just seen once)."""
    return all(check() for _ in range(n))


def elapsed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.monotonic()
    r = fn()
    return r, time.monotonic() - t0


# ---------------------------------------------------------------------------- Bookinfo
BOOKINFO_PORT = 9080
CLIENT_OUTBOUND = "127.0.3.1"


def bookinfo(ns: str = "default") -> tuple[list[Service], list[Workload]]:
    """Istio's Bookinfo sample (samples/bookinfo/platform/kube/bookinfo.yaml): its Services on
    port 9080 (`http`), its versioned Pods and service accounts, plus a `sleep` client pod."""
    services = [Service(s, [("http", BOOKINFO_PORT)], ns) for s in ("productpage", "details", "reviews", "ratings")]
    wl = [
        Workload("productpage-v1", "productpage", "127.0.4.41", {"version": "v1"}, ns, "bookinfo-productpage"),
        Workload("details-v1", "details", "127.0.4.31", {"version": "v1"}, ns, "bookinfo-details"),
        Workload("reviews-v1", "reviews", "127.0.4.11", {"version": "v1"}, ns, "bookinfo-reviews"),
        Workload("reviews-v2", "reviews", "127.0.4.12", {"version": "v2"}, ns, "bookinfo-reviews"),
        Workload("reviews-v3", "reviews", "127.0.4.13", {"version": "v3"}, ns, "bookinfo-reviews"),
        Workload("ratings-v1", "ratings", "127.0.4.21", {"version": "v1"}, ns, "bookinfo-ratings"),
        Workload("sleep", "sleep", "127.0.4.99", {}, ns, "sleep", serves=False),
    ]
    return services, wl


INJECTION = {"istio-injection": "enabled"}  # Istio's label: the namespace's pods run sidecars


# ---------------------------------------------------------------------------- httpbin
HTTPBIN_PORT = 8000


def httpbin(versions: Sequence[str] = ("v1",), ns: str = "default") -> tuple[list[Service], list[Workload]]:
    """Istio's httpbin sample (Service port 8000 `http`), one pod per version, plus `sleep`."""
    wl = [Workload(f"httpbin-{v}", "httpbin", f"127.0.4.{51 + i}", {"version": v}, ns, "httpbin")
          for i, v in enumerate(versions)]
    wl.append(Workload("sleep", "sleep", "127.0.4.99", {}, ns, "sleep", serves=False))
    return [Service("httpbin", [("http", HTTPBIN_PORT)], ns)], wl


@dataclass
class EchoClients:
    """`echo` (pods echo-v1 and echo-v2, HTTP on `port`) in `default`, and a `sleep` client
    with its sidecar in each of the namespaces c1 and c2 (all three namespaces injected)."""

    mesh: Mesh
    c1: Sidecar
    c2: Sidecar
    port: int
    n: int

    def pods(self, sc: Sidecar) -> set[str]:
        """The echo pods that answer n requests of this client ("HTTP <code>" for a failure)."""
        def one() -> str:
            r = self.mesh.http(sc, self.port, "echo.default.svc.cluster.local", "/")
            return str(r.json()["backend"]) if r.status_code == 200 else f"HTTP {r.status_code}"
        return set(sample(self.n, one))


def start_echo_clients(mesh: Mesh, port: int, echo_ip: int, client_ip: int,
                       sidecar_ips: tuple[str, str]) -> tuple[Mesh, Sidecar, Sidecar]:
    """Starts `mesh` with EchoClients' workloads: the echo pods at 127.0.4.<echo_ip> and the
    next address, the sleep clients of c1 and c2 at 127.0.4.<client_ip> and the next, their
    sidecars at sidecar_ips. Returns the mesh and the c1 and c2 sidecars."""
    services = [Service("echo", [("http", port)])]
    wls = [Workload(f"echo-{v}", "echo", f"127.0.4.{echo_ip + i}", {"version": v}) for i, v in enumerate(("v1", "v2"))]
    clients = [Workload(f"sleep-{ns}", "sleep", f"127.0.4.{client_ip + i}", {}, ns, "sleep", serves=False)
               for i, ns in enumerate(("c1", "c2"))]
    mesh.start({"00-mesh.yaml": mesh_yaml({"default": INJECTION, "c1": INJECTION, "c2": INJECTION}, services,
                                          [*wls, *clients])}, backend_specs(services, wls))
    c1, c2 = mesh.start_sidecars([(clients[0], sidecar_ips[0]), (clients[1], sidecar_ips[1])])
    return mesh, c1, c2
