"""istiod on the benchmark's simulated proxies (issue 20), for bench/suite.py. Does process,
file and network I/O (except the pure builders `mesh_objects` / `endpoint_slice`).

istiod (`pilot-discovery` of `istio.io/istio`, built by istiod/build.sh from the Go module
proxy into ~/.cache/meshline/peers/, with Istio's CRDs of the same version beside it) runs
against the real API server of scripts/kube/kube.sh (etcd + kube-apiserver, cached
binaries, a state directory of its own on free ports) holding the bench mesh as objects:
Namespace `bench`, S Services and S EndpointSlices, the same as bench/meshfiles.py writes
for Meshline (created once per S through the API; etcd keeps them while the API server is
stopped between cases). istiod gets a kubeconfig, `--clusterID Kubernetes`, its
self-signed CA (the default), plaintext xDS on a free port instead of 15010, every other
port free too and its log in the case's directory. The simulated clients are
bench/simclients.py as Istio sidecars (istiod_clients.py: node ids and metadata, istiod's
extra clusters/listeners in "holds everything"). A change is a PUT of one EndpointSlice
to the API server, timed from the request (Meshline's from its file write; both then pass a
watch and a debounce: istiod's PILOT_DEBOUNCE_AFTER, 100 ms by default, as Meshline's).
CPU and RSS are istiod's process only: the API server's and etcd's are not counted.
istiod runs with its defaults except the ports, a 20 s keepalive timeout and no limit on
the rate of new xDS streams (see `IstiodCase.start_server`); MESHLINE_ISTIOD_ARGS adds flags.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness as R
import httpx
import yaml
from meshfiles import NAMESPACE, default_addresses, endpoint_slice_yaml, service_name, service_yaml

from peers import compare
from peers.istiod_clients import CLUSTER_ID, expected_counts_problem

HERE = Path(__file__).resolve().parent / "istiod"
CLIENTS = Path(__file__).resolve().parent / "istiod_clients.py"
KUBE_SH = R.ROOT / "scripts" / "kube" / "kube.sh"
NAME = "istiod"
ISTIO_NAMESPACE = "istio-system"


async def build(timeout: float = 3600.0) -> Path:
    """pilot-discovery's path (built on first use, then cached); BenchError saying why not."""
    binary = await R.run_build_script(NAME, HERE / "build.sh", timeout)
    if not (binary.parent / "crd-all.gen.yaml").is_file():
        raise R.BenchError(f"{NAME}: no crd-all.gen.yaml next to {binary}")
    return binary


# --------------------------------------------------------------------------- objects
def _collection(obj: dict[str, Any]) -> str:
    """The API path of the collection an object is created in."""
    kind, ns = obj["kind"], obj["metadata"].get("namespace")
    plural = {"Namespace": "namespaces", "Service": "services", "EndpointSlice": "endpointslices"}[kind]
    group = "/api/v1" if obj["apiVersion"] == "v1" else f"/apis/{obj['apiVersion']}"
    return f"{group}/namespaces/{ns}/{plural}" if ns else f"{group}/{plural}"


def endpoint_slice(s: int, addresses: list[str]) -> dict[str, Any]:
    """Service `s`'s EndpointSlice with `addresses` (the object bench/meshfiles.py writes)."""
    doc: dict[str, Any] = yaml.safe_load(endpoint_slice_yaml(s, addresses))
    return doc


def mesh_objects(services: int, endpoints: int) -> list[dict[str, Any]]:
    """The bench mesh as API objects, namespaces first: `istio-system` (istiod's), `bench`,
    then each Service followed by its EndpointSlice (the same objects as meshfiles.write_mesh)."""
    out: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ISTIO_NAMESPACE}},
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
    ]
    for s in range(services):
        out.append(yaml.safe_load(service_yaml(s)))
        out.append(endpoint_slice(s, default_addresses(s, endpoints)))
    return out


def slice_url(s: int) -> str:
    return f"/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices/{service_name(s)}-1"


# --------------------------------------------------------------------------- API server
class Kube:
    """scripts/kube/kube.sh's etcd + kube-apiserver under a state directory of our own, on
    free ports, with Istio's CRDs and the bench mesh of S services. `up`/`down` start and
    stop the processes (etcd keeps the objects); `remove` deletes the state."""

    def __init__(self, services: int, crds: Path) -> None:
        self.S, self.crds = services, crds
        self.state = Path(tempfile.mkdtemp(prefix="meshline-bench-kube-"))
        self.api_port = R.free_port()
        self.etcd_port = self._free_pair()
        self.populated = False
        self.dirty: set[int] = set()  # services whose EndpointSlice a case changed
        self.http: httpx.AsyncClient | None = None

    @staticmethod
    def _free_pair() -> int:
        import socket

        for _ in range(100):
            p = R.free_port()
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", p + 1))
                    return p
                except OSError:
                    continue
        raise R.BenchError("no two adjacent free ports for etcd")

    @property
    def kubeconfig(self) -> Path:
        return self.state / "kubeconfig"

    def env(self) -> dict[str, str]:
        return {**os.environ, "MESHLINE_KUBE_DIR": str(self.state), "MESHLINE_KUBE_PORT": str(self.api_port),
                "MESHLINE_ETCD_PORT": str(self.etcd_port)}

    async def _script(self, *args: str, timeout: float = 300.0, stdin: bytes | None = None) -> str:
        proc = await asyncio.create_subprocess_exec(
            "bash", str(KUBE_SH), *args, env=self.env(), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.PIPE if stdin is not None else None)
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise R.BenchError(f"scripts/kube/kube.sh {' '.join(args)} did not finish in {timeout:g} s") from None
        if proc.returncode != 0:
            tail = "\n".join("    " + ln for ln in err.decode(errors="replace").splitlines()[-15:])
            raise R.BenchError(f"scripts/kube/kube.sh {' '.join(args)} failed (exit {proc.returncode}):\n{tail}")
        return out.decode()

    async def up(self) -> None:
        """Start etcd + kube-apiserver; the first time also Istio's CRDs and the mesh."""
        await self._script("up")
        token = (self.state / "admin.token").read_text().strip()
        self.http = httpx.AsyncClient(base_url=f"https://127.0.0.1:{self.api_port}",
                                      verify=str(self.state / "pki" / "ca.crt"),
                                      headers={"Authorization": f"Bearer {token}"}, timeout=30.0)
        if not self.populated:
            t0 = time.monotonic()
            await self._script("kubectl", "apply", "--server-side", "-f", str(self.crds))
            await self._script("kubectl", "wait", "--for=condition=Established", "crd", "--all", "--timeout=120s")
            await self.create_all(mesh_objects(self.S, R.ENDPOINTS))
            self.populated = True
            say(f"API server: Istio CRDs and {self.S} Services + EndpointSlices created in "
                f"{time.monotonic() - t0:.1f} s")

    async def create_all(self, objs: list[dict[str, Any]], concurrency: int = 16) -> None:
        assert self.http is not None
        http = self.http
        ns = [o for o in objs if o["kind"] == "Namespace"]
        rest = [o for o in objs if o["kind"] != "Namespace"]
        gate = asyncio.Semaphore(concurrency)

        async def create(obj: dict[str, Any]) -> None:
            async with gate:
                r = await http.post(_collection(obj), json=obj)
            if r.status_code not in (200, 201, 409):  # (409: already there)
                raise R.BenchError(f"creating {obj['kind']} {obj['metadata']['name']} in the API server: "
                                   f"HTTP {r.status_code} {r.text[:300]}")

        for o in ns:
            await create(o)
        await asyncio.gather(*(create(o) for o in rest))

    async def put_slice(self, s: int, addresses: list[str]) -> None:
        assert self.http is not None
        self.dirty.add(s)
        r = await self.http.put(slice_url(s), json=endpoint_slice(s, addresses))
        if r.status_code != 200:
            raise R.BenchError(f"updating EndpointSlice {service_name(s)}-1: HTTP {r.status_code} {r.text[:300]}")

    async def reset(self) -> None:
        """Put back the default addresses of every EndpointSlice a previous case changed, so
        the next case's changes are changes again (an identical PUT notifies no watcher)."""
        for s in sorted(self.dirty):
            await self.put_slice(s, default_addresses(s, R.ENDPOINTS))
        self.dirty.clear()

    async def down(self) -> None:
        if self.http is not None:
            await self.http.aclose()
            self.http = None
        with contextlib.suppress(R.BenchError):
            await self._script("down")

    async def remove(self) -> None:
        await self.down()
        shutil.rmtree(self.state, ignore_errors=True)


_kube: dict[int, Kube] = {}  # S -> its API server (one process-wide; see `shutdown`)


async def kube_for(services: int, crds: Path) -> Kube:
    for s in [s for s in _kube if s != services]:
        await _kube.pop(s).remove()
    if services not in _kube:
        _kube[services] = Kube(services, crds)
    return _kube[services]


async def shutdown() -> None:
    """Stop and remove every API server this module started (bench/suite.py calls it last)."""
    for s in list(_kube):
        await _kube.pop(s).remove()


# --------------------------------------------------------------------------- the case
class IstiodCase(R.Case):
    """A Case whose control plane is istiod, fed by a real API server."""

    control_plane = NAME
    client_script = CLIENTS

    def __init__(self, *a: Any, binary: Path, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.binary = binary
        self.kube: Kube | None = None
        if self.args.sync_timeout is None:
            # istiod builds each sidecar's clusters and listeners for that proxy: on this
            # 2-core machine it synced ~5-10 proxies a second (S = 1,000), far slower than
            # the harness's default allows (60 s + S x N / 20,000).
            self.args = argparse.Namespace(**{**vars(self.args), "sync_timeout": 60.0 + self.N * 1.0})

    def unexpected_config(self, counts: dict[str, int]) -> str | None:
        return expected_counts_problem(counts, self.S)

    async def start_server(self) -> None:
        self.kube = await kube_for(self.S, self.binary.parent / "crd-all.gen.yaml")
        await self.kube.up()
        await self.kube.reset()
        ports = {k: R.free_port() for k in ("grpc", "http", "https", "secure", "monitoring", "ctrlz")}
        self.xds_address = f"127.0.0.1:{ports['grpc']}"
        self.status_url = f"http://127.0.0.1:{ports['http']}"
        mesh, networks = self.tmp / "mesh.yaml", self.tmp / "meshNetworks.yaml"
        mesh.write_text("trustDomain: cluster.local\n")  # (otherwise istiod's defaults)
        networks.write_text("networks: {}\n")
        log = self.tmp / "server.log"
        argv = [str(self.binary), "discovery", "--kubeconfig", str(self.kube.kubeconfig), "--clusterID", CLUSTER_ID,
                "--namespace", ISTIO_NAMESPACE, "--meshConfig", str(mesh), "--networksConfig", str(networks),
                "--grpcAddr", self.xds_address, "--httpAddr", f"127.0.0.1:{ports['http']}",
                "--httpsAddr", f"127.0.0.1:{ports['https']}", "--secureGRPCAddr", f"127.0.0.1:{ports['secure']}",
                "--monitoringAddr", f"127.0.0.1:{ports['monitoring']}", "--ctrlz_address", "127.0.0.1",
                "--ctrlz_port", str(ports["ctrlz"]),
                # As Meshline and the go-control-plane peer: a loaded client process may take
                # more than istiod's default 10 s to answer a keepalive PING.
                "--keepaliveTimeout", "20s", "--log_target", str(log),
                # e.g. --log_output_level=grpc:info,ads:debug to see why a stream ended
                *os.environ.get("MESHLINE_ISTIOD_ARGS", "").split()]
        env = {**os.environ, "POD_NAMESPACE": ISTIO_NAMESPACE, "POD_NAME": "istiod-bench", "REVISION": "default",
               # istiod admits new xDS streams at 15 + 5 x cores per second by default (25/s here)
               # and fails a stream that waited 1 s ("request rate limit exceeded", gRPC
               # RESOURCE_EXHAUSTED). istio-agent would reconnect; the simulated clients report
               # the failure instead (as for every control plane), and Meshline has no such limit,
               # so the limit is lifted: istiod's initial sync here is its best case. The value is
               # golang.org/x/time/rate's Inf (math.MaxFloat64), whose limiter grants at once
               # whatever the deadline: with any other value (100,000/s, or "Inf" = +Inf) a
               # stream whose goroutine was not scheduled within istiod's 1 s still failed
               # ("rate: Wait(n=1) would exceed context deadline") at N = 300-1,000 here.
               "PILOT_MAX_REQUESTS_PER_SECOND": "1.7976931348623157e+308"}
        self.server = await self.children.start(NAME, argv, log, stdout=asyncio.subprocess.DEVNULL,
                                                stdin=asyncio.subprocess.DEVNULL, env=env, cwd=self.tmp)
        deadline = time.monotonic() + self.args.ready_timeout
        while True:
            self.check_server()
            with contextlib.suppress(httpx.TransportError):
                if (await self.http.get(f"{self.status_url}/ready")).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise R.BenchError(f"{NAME} not ready (/ready) after {self.args.ready_timeout:g} s; log:\n"
                                   f"{R.log_tail(log)}")
            await asyncio.sleep(0.1)
        self._sampler = asyncio.create_task(self._sample_rss())

    async def metrics(self) -> dict[str, float]:
        return {}  # (Meshline's own gauges: serializations, rebuild time, GC; istiod has others)

    async def gc_settled(self, max_wait: float = 300.0) -> None:
        """Before the idle measurement and the changes: wait until istiod is quiet. (Meshline's
        case waits for its GC settle pass here.) After the initial sync of 1,000 sidecars
        istiod kept pushing for longer than the harness's 15 s settle: the idle measurement
        then read 0.9 cores and the first change overlapped that work (12-03 10:05 run)."""
        t0 = time.monotonic()
        await self.settle(max_wait)
        self.say(f"istiod quiet {time.monotonic() - t0:.1f} s after the initial sync")

    async def apply_change(self, s: int, cluster: str, addrs: list[str]) -> None:
        assert self.kube is not None
        await self.kube.put_slice(s, addrs)

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            if self.kube is not None:
                await self.kube.down()  # (etcd keeps the mesh for the next case)


# --------------------------------------------------------------------------- goals
def goals(res: dict[str, R.Result], sweep: tuple[int, ...],
          floors: dict[str, dict[int, dict[str, Any]]] | None = None) -> list[tuple[str, str, str, bool | None]]:
    """(id, goal, measured, ok): Meshline's CPU per change and peak RSS <= 0.5x istiod's at
    the largest N, delta and SotW (issue 20). `floors` ({mix: {N: bench/floor.py result}},
    same run): the CPU goal's line also says what the bare grpc.aio fan-out costs by itself,
    as a share of istiod's figure, and Meshline's part above it."""
    out: list[tuple[str, str, str, bool | None]] = []
    n = max(sweep)
    for mix in ("delta", "sotw"):
        ml, pr = res.get(compare.key(compare.MESHLINE, mix, n)), res.get(compare.key(NAME, mix, n))
        tag = f"{n} {mix} proxies"
        if not (ml and pr and ml.lat_last and pr.lat_last):
            out.append((f"GI-{mix}", f"vs {NAME}, {tag}", "not measured", None))
            continue
        a, b = compare.cpu_change(ml), compare.cpu_change(pr)
        ratio = a / b if b else math.nan
        floor = ((floors or {}).get(mix) or {}).get(n)
        context = ""
        if floor and floor.get("cpu") and b:
            f = statistics.median(floor["cpu"])
            context = (f"; the bare grpc.aio fan-out alone: {f * 1000:.0f} ms = {f / b:.2f}x, "
                       f"Meshline above it: {(a - f) * 1000:.0f} ms")
        out.append((f"GI1-{mix}", f"control-plane CPU per change <= 0.5x {NAME}'s ({tag})",
                    f"{ratio:.2f}x ({a * 1000:.0f} vs {b * 1000:.0f} ms{context})", a <= 0.5 * b))
        a, b = compare.peak(ml), compare.peak(pr)
        out.append((f"GI2-{mix}", f"control-plane peak RSS <= 0.5x {NAME}'s ({tag})",
                    f"{a / b if b else math.nan:.2f}x ({a / 2**20:.0f} vs {b / 2**20:.0f} MB)", a <= 0.5 * b))
    return out


def say(msg: str) -> None:
    print(f"  [{NAME}] {msg}", file=sys.stderr, flush=True)
