"""The node agent (`meshline node-agent`, one per node beside the node proxy): finds the
network namespace of each ambient pod on its node, makes it reachable by path, applies the
in-pod ambient capture rules there and reports pod -> netns path to the control plane
(`NodeAgent.Report`, see protos/meshline/nodeagent/v1). Does I/O: reads /proc, runs
mount/umount and iptables (through nsenter), lists pods, calls the control plane.

One pass (`NodeAgent.sync`, blocking; run in a thread):

1. the pods: `--pods-file` (re-read each pass) or the Kubernetes API (pods with
   `spec.nodeName=NODE` whose label `meshline.io/dataplane-mode`, else their namespace's,
   is `ambient`; hostNetwork pods never);
2. `discover`: every process's /proc/<pid>/ns/net grouped by netns inode (the agent's own,
   i.e. the host's, skipped), the addresses of each netns read from
   /proc/<pid>/net/fib_trie (IPv4) and if_inet6 (IPv6); a pod is in the netns that holds
   one of its IPs;
3. `/proc/<pid>/ns/net` bind-mounted onto `<netns-dir>/<namespace>_<name>`, so the path
   outlives the process (kept when it already is that netns; replaced when the pod got a
   new netns); the ambient capture rules applied once per newly found netns;
4. pods gone (or no longer found): their ambient rules removed, their path unmounted and
   deleted.

The report always holds the node's full set (only pods whose capture is in place), sent
after every pass, i.e. every --interval seconds.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import socket
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml

from controlplane.iptables import Iptables, IptablesError, apply_ambient, cleanup_ambient, in_netns
from controlplane.nodeagent.registry import SERVICE, PodNetns

log = logging.getLogger(__name__)

DEFAULT_NETNS_DIR = Path("/var/run/meshline/netns")
DATAPLANE_MODE_LABEL = "meshline.io/dataplane-mode"
_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")

CommandRunner = Callable[[Sequence[str]], None]
"""Runs argv (mount, umount); raises AgentError on failure."""


class AgentError(Exception):
    """A pass or a report failed; the message says what and why."""


# --------------------------------------------------------------------------- pods


@dataclass(frozen=True, slots=True)
class PodRef:
    """A pod the agent looks for: identity and the IPs Kubernetes (or the pods file) gives."""

    namespace: str
    name: str
    ips: tuple[str, ...]

    def __post_init__(self) -> None:
        for what, value in (("namespace", self.namespace), ("name", self.name)):
            if not _NAME.fullmatch(value) or len(value) > 253:
                raise ValueError(f"pod {what} {value!r} is not a Kubernetes name")
        for ip in self.ips:
            ipaddress.ip_address(ip)  # ValueError names the bad address

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def file_name(self) -> str:
        """`<namespace>_<name>` (unambiguous: Kubernetes names never hold `_`)."""
        return f"{self.namespace}_{self.name}"


def load_pods_file(path: Path) -> list[PodRef]:
    """A YAML or JSON list of `{namespace, name, ips: [...]}`. Raises AgentError."""
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise AgentError(f"cannot read the pods file {path}: {exc}") from None
    if not isinstance(doc, list):
        raise AgentError(f"{path}: expected a list of {{namespace, name, ips}}")
    out = []
    for i, item in enumerate(doc):
        try:
            if not isinstance(item, Mapping):
                raise ValueError("not a mapping")
            ips = item.get("ips") or []
            if not isinstance(ips, list):
                raise ValueError("ips: not a list")
            out.append(PodRef(str(item.get("namespace", "")), str(item.get("name", "")),
                              tuple(str(ipaddress.ip_address(str(ip))) for ip in ips)))
        except ValueError as exc:
            raise AgentError(f"{path}: item {i}: {exc}") from None
    return out


def ambient_pods(pods: Iterable[Mapping[str, Any]], namespace_labels: Mapping[str, Mapping[str, str]]) -> list[PodRef]:
    """The ambient pods among Kubernetes pod objects (as JSON dicts): the pod's own
    dataplane-mode label wins over its namespace's; hostNetwork pods, finished pods and
    pods without an IP are left out. Pure."""
    out = []
    for pod in pods:
        meta, spec, status = (pod.get(k) or {} for k in ("metadata", "spec", "status"))
        ns, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
        mode = (meta.get("labels") or {}).get(DATAPLANE_MODE_LABEL)
        if mode is None:
            mode = namespace_labels.get(ns, {}).get(DATAPLANE_MODE_LABEL)
        if mode != "ambient" or spec.get("hostNetwork") or status.get("phase") in ("Succeeded", "Failed"):
            continue
        ips = [str(p.get("ip")) for p in status.get("podIPs") or [] if p.get("ip")] or (
            [str(status["podIP"])] if status.get("podIP") else [])
        try:
            out.append(PodRef(ns, name, tuple(ips)))
        except ValueError as exc:
            log.warning("pod %s/%s skipped: %s", ns, name, exc)
    return [p for p in out if p.ips]


def kubernetes_pod_lister(node: str, kubeconfig: Path | None) -> Callable[[], list[PodRef]]:
    """Lists this node's ambient pods from the API server (blocking, official client)."""
    from kubernetes import client

    from controlplane.sources.kubernetes import make_api_client

    api = make_api_client(kubeconfig, pool_size=2)
    core = client.CoreV1Api(api)

    def list_pods() -> list[PodRef]:
        try:
            pods = core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={node}", _request_timeout=30)
            nss = core.list_namespace(label_selector=DATAPLANE_MODE_LABEL, _request_timeout=30)
        except Exception as exc:  # the client raises ApiException, urllib3 and OS errors alike
            raise AgentError(f"cannot list pods of node {node}: {exc}") from None
        labels = {n.metadata.name: dict(n.metadata.labels or {}) for n in nss.items}
        return ambient_pods(api.sanitize_for_serialization(pods.items), labels)

    return list_pods


# --------------------------------------------------------------------------- discovery


@dataclass(frozen=True, slots=True)
class Netns:
    inode: int
    pid: int  # one process in it
    addresses: frozenset[str]


@dataclass(frozen=True, slots=True)
class Found:
    pod: PodRef
    pid: int
    inode: int
    ips: tuple[str, ...]  # the addresses of its netns


def parse_fib_trie(text: str) -> set[str]:
    """The local IPv4 addresses in /proc/<pid>/net/fib_trie (leaves with `/32 host LOCAL`),
    loopback excluded."""
    out: set[str] = set()
    leaf = None
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("|-- "):
            leaf = s[4:].strip()
        elif leaf is not None and s.split() == ["/32", "host", "LOCAL"]:
            out.add(leaf)
    return {a for a in out if not ipaddress.ip_address(a).is_loopback}


def parse_if_inet6(text: str) -> set[str]:
    """Global-scope IPv6 addresses from /proc/<pid>/net/if_inet6."""
    out = set()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 4 and len(fields[0]) == 32 and fields[3] == "00":
            out.add(str(ipaddress.IPv6Address(bytes.fromhex(fields[0]))))
    return out


def netns_addresses(proc_root: Path, pid: int) -> frozenset[str]:
    """The addresses of the network namespace `pid` is in. Raises OSError (process gone)."""
    v4 = parse_fib_trie((proc_root / str(pid) / "net" / "fib_trie").read_text())
    try:
        v6 = parse_if_inet6((proc_root / str(pid) / "net" / "if_inet6").read_text())
    except FileNotFoundError:  # IPv6 disabled
        v6 = set()
    return frozenset(v4 | v6)


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def scan_netns(proc_root: Path = Path("/proc")) -> list[Netns]:
    """Every network namespace some process is in, but the agent's own (the host's)."""
    own = _inode(proc_root / "self" / "ns" / "net")
    pids: dict[int, list[int]] = {}
    for entry in proc_root.iterdir():
        if entry.name.isdigit():
            ino = _inode(entry / "ns" / "net")
            if ino is not None and ino != own:
                pids.setdefault(ino, []).append(int(entry.name))
    out = []
    for ino, members in sorted(pids.items()):
        for pid in sorted(members):
            try:
                out.append(Netns(ino, pid, netns_addresses(proc_root, pid)))
                break
            except OSError:
                continue  # exited meanwhile: try the next process of the netns
    return out


def discover(pods: Sequence[PodRef], proc_root: Path = Path("/proc")) -> list[Found]:
    """Each pod matched to the netns holding one of its IPs, sorted by namespace/name. A pod
    whose IPs point at two namespaces is skipped with a warning."""
    holders: dict[str, dict[int, Netns]] = {}
    for ns in scan_netns(proc_root):
        for addr in ns.addresses:
            holders.setdefault(addr, {})[ns.inode] = ns
    out = []
    for pod in pods:
        matches = {ino: ns for ip in pod.ips for ino, ns in holders.get(ip, {}).items()}
        if len(matches) > 1:
            log.warning("pod %s/%s: its IPs %s are in %d network namespaces; skipped", pod.namespace, pod.name,
                        ", ".join(pod.ips), len(matches))
        elif matches:
            (ns,) = matches.values()
            out.append(Found(pod, ns.pid, ns.inode, tuple(sorted(ns.addresses))))
    return sorted(out, key=lambda f: f.pod.key)


# --------------------------------------------------------------------------- mounts


def run_command(argv: Sequence[str]) -> None:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AgentError(f"{' '.join(argv)}: {exc}") from None
    if proc.returncode != 0:
        raise AgentError(f"{' '.join(argv)} failed (exit {proc.returncode}): {proc.stderr.strip()}")


def mounted_inode(path: Path) -> int | None:
    """The inode of what is mounted on `path` (None: nothing, or no such file)."""
    try:
        st, parent = os.stat(path), os.stat(path.parent)
    except OSError:
        return None
    return st.st_ino if st.st_dev != parent.st_dev else None


def ensure_mount(path: Path, source: Path, inode: int, run: CommandRunner = run_command) -> bool:
    """Bind-mount `source` (a /proc/<pid>/ns/net) onto `path` unless that netns is already
    there; True when it mounted. Raises AgentError (also when `source` turned out to be
    another netns: the process exited and its pid was reused)."""
    current = mounted_inode(path)
    if current == inode:
        return False
    if current is not None:
        unmount(path, run)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(exist_ok=True)
    run(["mount", "--bind", str(source), str(path)])
    if mounted_inode(path) != inode:
        unmount(path, run)
        raise AgentError(f"{source} is no longer the network namespace {inode} (process gone)")
    return True


def unmount(path: Path, run: CommandRunner = run_command) -> None:
    """Unmount everything stacked on `path`."""
    for _ in range(8):
        if mounted_inode(path) is None:
            return
        run(["umount", str(path)])
    raise AgentError(f"{path} is still mounted")


def release(path: Path, run: CommandRunner = run_command) -> None:
    """Unmount `path` and delete it."""
    unmount(path, run)
    path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- the agent


@dataclass(frozen=True, slots=True)
class AgentConfig:
    node: str
    xds_address: str
    netns_dir: Path = DEFAULT_NETNS_DIR
    interval: float = 5.0
    token_file: Path | None = None
    iptables: bool = True
    iptables_command: str = "iptables"
    all_addresses: bool = False  # report to every address the xds host name resolves to
    proc_root: Path = Path("/proc")
    timeout: float = 10.0


class NodeAgent:
    def __init__(self, config: AgentConfig, list_pods: Callable[[], Sequence[PodRef]],
                 run: CommandRunner = run_command) -> None:
        self.config = config
        self._list_pods = list_pods
        self._run = run
        self._captured: dict[tuple[str, str], int] = {}  # pod -> netns inode its rules went into
        self._current: dict[tuple[str, str], PodNetns] = {}

    # ------------------------------------------------------------------ one pass
    def sync(self) -> tuple[PodNetns, ...]:
        """One discovery pass (blocking): the node's full set of captured ambient pods. Raises
        AgentError when the pods cannot be listed (nothing is torn down then)."""
        found = discover(self._list_pods(), self.config.proc_root)
        out = [p for p in (self._attach(f) for f in found) if p is not None]
        keep = {Path(p.netns_path).name for p in out}
        self._detach_others(keep)
        current = {p.key: p for p in out}
        self._captured = {k: v for k, v in self._captured.items() if k in current}
        for key in sorted(current.keys() - self._current.keys()):
            log.info("found pod %s/%s: netns %s, IPs %s", *key, current[key].netns_path,
                     ", ".join(current[key].ips))
        for key in sorted(self._current.keys() - current.keys()):
            log.info("lost pod %s/%s", *key)
        self._current = current
        return tuple(out)

    def _attach(self, f: Found) -> PodNetns | None:
        path = self.config.netns_dir / f.pod.file_name
        source = self.config.proc_root / str(f.pid) / "ns" / "net"
        try:
            if ensure_mount(path, source, f.inode, self._run):
                self._captured.pop(f.pod.key, None)  # a new netns: its rules are still to be applied
        except (AgentError, OSError) as exc:
            log.error("pod %s/%s: cannot make its netns reachable at %s: %s", *f.pod.key, path, exc)
            return None
        if self.config.iptables and self._captured.get(f.pod.key) != f.inode:
            try:
                apply_ambient(tools=in_netns(str(path), Iptables(self.config.iptables_command)))
            except IptablesError as exc:
                log.error("pod %s/%s: cannot apply the capture rules (retried next pass): %s", *f.pod.key, exc)
                return None
            self._captured[f.pod.key] = f.inode
        return PodNetns(f.pod.namespace, f.pod.name, str(path), f.ips)

    def _detach_others(self, keep: set[str]) -> None:
        try:
            entries = sorted(self.config.netns_dir.iterdir())
        except FileNotFoundError:
            return
        for path in entries:
            if path.name in keep or path.is_dir():
                continue
            if self.config.iptables and mounted_inode(path) is not None:
                try:  # a pod that left the mesh keeps running: give it its direct traffic back
                    cleanup_ambient(in_netns(str(path), Iptables(self.config.iptables_command)))
                except IptablesError as exc:
                    log.warning("%s: cannot remove the capture rules: %s", path, exc)
            try:
                release(path, self._run)
            except (AgentError, OSError) as exc:
                log.error("cannot release %s: %s", path, exc)

    # ------------------------------------------------------------------ reporting
    def request(self, pods: Sequence[PodNetns]) -> Any:
        from controlplane.nodeagent.gen import nodeagent_pb2

        return nodeagent_pb2.ReportRequest(node=self.config.node, pods=[
            nodeagent_pb2.PodNetns(namespace=p.namespace, name=p.name, netns_path=p.netns_path, ips=list(p.ips))
            for p in pods])

    def metadata(self) -> tuple[tuple[str, str], ...]:
        if self.config.token_file is None:
            return ()
        try:
            token = self.config.token_file.read_text().strip()
        except OSError as exc:
            raise AgentError(f"cannot read the token file {self.config.token_file}: {exc}") from None
        return (("authorization", f"Bearer {token}"),)

    async def targets(self) -> list[str]:
        if not self.config.all_addresses:
            return [self.config.xds_address]
        host, _, port = self.config.xds_address.rpartition(":")
        try:
            infos = await asyncio.to_thread(socket.getaddrinfo, host.strip("[]"), int(port), type=socket.SOCK_STREAM)
        except (OSError, ValueError) as exc:
            raise AgentError(f"cannot resolve {self.config.xds_address}: {exc}") from None
        addrs = sorted({str(i[4][0]) for i in infos})
        return [f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in addrs]

    async def report(self, pods: Sequence[PodNetns]) -> int:
        """Send the full set to the control plane (to each of its addresses with
        `all_addresses`); the number of pods accepted. Raises AgentError."""
        from controlplane.nodeagent.gen import nodeagent_pb2

        request, metadata = self.request(pods), self.metadata()
        accepted = 0
        for target in await self.targets():
            async with grpc.aio.insecure_channel(target) as channel:
                call = channel.unary_unary(f"/{SERVICE}/Report",
                                           request_serializer=nodeagent_pb2.ReportRequest.SerializeToString,
                                           response_deserializer=nodeagent_pb2.ReportResponse.FromString)
                try:
                    resp = await call(request, metadata=metadata, timeout=self.config.timeout)
                except grpc.aio.AioRpcError as exc:
                    raise AgentError(f"report to {target} failed: {exc.code().name}: {exc.details()}") from None
            for err in resp.errors:
                log.warning("control plane %s: %s", target, err)
            accepted = int(resp.accepted)
        return accepted

    async def run_once(self) -> int:
        """One pass and its report; the number of pods accepted. Raises AgentError."""
        pods = await asyncio.to_thread(self.sync)
        return await self.report(pods)

    async def run(self) -> None:
        """Pass and report every `interval` seconds until cancelled; failures are logged."""
        while True:
            try:
                await self.run_once()
            except AgentError as exc:
                log.warning("%s", exc)
            except Exception:  # a daemon: one bad pass must not end the agent
                log.exception("node-agent pass failed")
            await asyncio.sleep(self.config.interval)
