"""The node agent (`meshline node-agent`, one per node beside the node proxy): finds the
network namespace of each ambient pod on its node, makes it reachable by path, applies the
in-pod ambient capture rules there and reports pod -> netns path to the control plane
(`NodeAgent.Report`, see protos/meshline/nodeagent/v1). Does I/O: reads /proc, runs
mount/umount and iptables (through nsenter), lists pods, calls the control plane.

One pass (`NodeAgent.sync`, blocking; run in a thread):

1. the pods: `--pods-file` (re-read each pass) or the Kubernetes API (pods with
   `spec.nodeName=NODE` whose label `meshline.io/dataplane-mode`, else their namespace's,
   is `ambient`; hostNetwork pods never), each with its UID (`metadata.uid`);
2. `discover` (`controlplane.nodeagent.discovery`): each pod's netns, proven by the pod
   UID in the cgroup of the processes holding it (an IP alone never decides; only a pod
   without a UID, e.g. a `--pods-file` entry without `uid`, is found by IP, and only in a
   netns of no pod); ambiguities are skipped and logged, never guessed;
3. `/proc/<pid>/ns/net` bind-mounted onto `<netns-dir>/<namespace>_<name>`, so the path
   outlives the process (kept when it already is that netns; replaced when the pod got a
   new netns; a symlink found there is removed, never mounted through); the ambient capture
   rules applied once per newly found netns;
4. pods gone (or no longer found): their ambient rules removed, their path unmounted and
   deleted (a symlink is only deleted).

The report always holds the node's full set (only pods whose capture is in place) with
each pod's UID as found, sent after every pass, i.e. every --interval seconds; the
control plane's refusals (see `controlplane.nodeagent.registry`) are logged.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import yaml

from controlplane.iptables import Iptables, IptablesError, apply_ambient, cleanup_ambient, in_netns
from controlplane.netaddr import is_ip, is_loopback
from controlplane.nodeagent import registry
from controlplane.nodeagent.discovery import Found, PodRef, discover
from controlplane.nodeagent.registry import SERVICE, PodNetns

if TYPE_CHECKING:
    from controlplane.nodeagent.gen import nodeagent_pb2

log = logging.getLogger(__name__)

DEFAULT_NETNS_DIR = Path(registry.DEFAULT_NETNS_DIR)
DATAPLANE_MODE_LABEL = "meshline.io/dataplane-mode"

CommandRunner = Callable[[Sequence[str]], None]
"""Runs argv (mount, umount); raises AgentError on failure."""


class AgentError(Exception):
    """A pass or a report failed; the message says what and why."""


# --------------------------------------------------------------------------- pods


def load_pods_file(path: Path) -> list[PodRef]:
    """A YAML or JSON list of `{namespace, name, ips: [...], uid}` (`uid` optional: the
    pod's metadata.uid). Raises AgentError."""
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
                              tuple(str(ipaddress.ip_address(str(ip))) for ip in ips),
                              str(item.get("uid") or "").lower()))
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
            out.append(PodRef(ns, name, tuple(ips), str(meta.get("uid") or "").lower()))
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


# --------------------------------------------------------------------------- mounts


def run_command(argv: Sequence[str]) -> None:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AgentError(f"{' '.join(argv)}: {exc}") from None
    if proc.returncode != 0:
        raise AgentError(f"{' '.join(argv)} failed (exit {proc.returncode}): {proc.stderr.strip()}")


def mounted_inode(path: Path) -> int | None:
    """The inode of what is mounted on `path` (None: nothing, no such file, or a symlink:
    never followed)."""
    try:
        st, parent = os.lstat(path), os.stat(path.parent)
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
    if path.is_symlink():  # not ours: `mount` would follow it and cover its target
        path.unlink()
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
    ca_bundle: Path | None = None  # TLS to the control plane (port 15012), verified against this bundle
    server_name: str | None = None  # the DNS name the control plane's certificate must carry


class NodeAgent:
    def __init__(self, config: AgentConfig, list_pods: Callable[[], Sequence[PodRef]],
                 run: CommandRunner = run_command) -> None:
        self.config = config
        self._list_pods = list_pods
        self._run = run
        self._captured: dict[tuple[str, str], int] = {}  # pod -> netns inode its rules went into
        self._current: dict[tuple[str, str], PodNetns] = {}
        self._problems: set[str] = set()  # the last pass's discovery problems (logged when new)
        self._refused: set[str] = set()  # the control plane's last refusals (logged when new)

    # ------------------------------------------------------------------ one pass
    def sync(self) -> tuple[PodNetns, ...]:
        """One discovery pass (blocking): the node's full set of captured ambient pods. Raises
        AgentError when the pods cannot be listed (nothing is torn down then)."""
        problems: list[str] = []
        found = discover(self._list_pods(), self.config.proc_root, problems)
        for message in problems:
            if message not in self._problems:
                log.warning("%s", message)
        self._problems = set(problems)
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
        return PodNetns(f.pod.namespace, f.pod.name, str(path), f.ips, f.uid)

    def _detach_others(self, keep: set[str]) -> None:
        try:
            entries = sorted(self.config.netns_dir.iterdir())
        except FileNotFoundError:
            return
        for path in entries:
            if path.is_symlink():  # not ours: never unmount through it
                if path.name not in keep:
                    path.unlink(missing_ok=True)
                continue
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
    def request(self, pods: Sequence[PodNetns]) -> nodeagent_pb2.ReportRequest:
        from controlplane.nodeagent.gen import nodeagent_pb2

        return nodeagent_pb2.ReportRequest(node=self.config.node, pods=[
            nodeagent_pb2.PodNetns(namespace=p.namespace, name=p.name, netns_path=p.netns_path, ips=list(p.ips),
                                   uid=p.uid)
            for p in pods])

    def metadata(self) -> tuple[tuple[str, str], ...]:
        if self.config.token_file is None:
            return ()
        try:
            token = self.config.token_file.read_text().strip()
        except OSError as exc:
            raise AgentError(f"cannot read the token file {self.config.token_file}: {exc}") from None
        return (("authorization", f"Bearer {token}"),)

    def _channel(self, target: str) -> grpc.aio.Channel:
        """TLS (the bundle re-read each report, so a root rotation is followed) or, only to a
        loopback address, plaintext: the token never crosses a network in clear."""
        cfg = self.config
        if cfg.ca_bundle is not None:
            try:
                roots = cfg.ca_bundle.read_bytes()
            except OSError as exc:
                raise AgentError(f"cannot read the trust bundle {cfg.ca_bundle}: {exc}") from None
            host = target.rpartition(":")[0].strip("[]")
            name = cfg.server_name or ("localhost" if is_ip(host) else host)
            options = [("grpc.ssl_target_name_override", name)] if name != host else []
            return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(roots), options=options)
        if cfg.token_file is not None and not is_loopback(target.rpartition(":")[0].strip("[]")):
            raise AgentError(f"refusing to send the token in clear to {target}: give --ca-bundle (TLS, port 15012)")
        return grpc.aio.insecure_channel(target)

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
            async with self._channel(target) as channel:
                call = channel.unary_unary(f"/{SERVICE}/Report",
                                           request_serializer=nodeagent_pb2.ReportRequest.SerializeToString,
                                           response_deserializer=nodeagent_pb2.ReportResponse.FromString)
                try:
                    resp = await call(request, metadata=metadata, timeout=self.config.timeout)
                except grpc.aio.AioRpcError as exc:
                    raise AgentError(f"report to {target} failed: {exc.code().name}: {exc.details()}") from None
            refused = set(resp.errors)
            for err in sorted(refused - self._refused):
                log.warning("control plane %s: %s", target, err)
            self._refused = refused
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

