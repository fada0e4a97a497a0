"""Which network namespace each pod on this node is in, from /proc (the node agent's step 2,
see `controlplane.nodeagent.agent`). Reads /proc (or a stand-in root); `match` is pure.

Every process's /proc/<pid>/ns/net is grouped by netns inode (the agent's own, i.e. the
host's, skipped); a netns's addresses are read from /proc/<pid>/net/fib_trie (IPv4) and
if_inet6 (IPv6), and the pods its processes belong to from /proc/<pid>/cgroup: kubelet puts
every container of a pod, the sandbox holding the netns included, in a cgroup named
`pod<uid>` (`/kubepods/<qos>/pod<uid>` with the cgroupfs driver,
`kubepods-<qos>-pod<uid with _>.slice` with systemd's). The agent's own pod does not count
(its `nsenter` children visit pods' namespaces).

A pod with a UID is in the netns of its own processes, which must hold one of its IPs and
no other pod's processes: an IP alone never decides (a neighbour that configured the
victim's IP is another pod). Only a pod without a UID (a `--pods-file` entry without `uid`,
a lab without kubelet) is found by IP, and then only in a netns that belongs to no pod.
Ambiguities are skipped and said, never guessed.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
_UID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32}")
# A pod's cgroup as kubelet names it: `/kubepods/<qos>/pod<uid>` (cgroupfs driver) or
# `kubepods-<qos>-pod<uid with _ for ->.slice` (systemd driver).
_POD_CGROUP = re.compile(
    r"(?:/|-)pod([0-9a-fA-F]{8}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{12}"
    r"|[0-9a-fA-F]{32})(?:\.slice)?(?=/|$)", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class PodRef:
    """A pod the agent looks for: identity and the IPs Kubernetes (or the pods file) gives."""

    namespace: str
    name: str
    ips: tuple[str, ...]
    uid: str = ""  # metadata.uid, lower case ("": unknown; then found by IP, see the module docstring)

    def __post_init__(self) -> None:
        for what, value in (("namespace", self.namespace), ("name", self.name)):
            if not _NAME.fullmatch(value) or len(value) > 253:
                raise ValueError(f"pod {what} {value!r} is not a Kubernetes name")
        for ip in self.ips:
            ipaddress.ip_address(ip)  # ValueError names the bad address
        if self.uid and not _UID.fullmatch(self.uid):
            raise ValueError(f"pod uid {self.uid!r} is not a lower-case Kubernetes UID")

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def file_name(self) -> str:
        """`<namespace>_<name>` (unambiguous: Kubernetes names never hold `_`)."""
        return f"{self.namespace}_{self.name}"


@dataclass(frozen=True, slots=True)
class Netns:
    inode: int
    pid: int  # one process in it
    addresses: frozenset[str]
    pod_uids: frozenset[str] = frozenset()  # the pods its processes belong to (cgroup), the agent's own left out


@dataclass(frozen=True, slots=True)
class Found:
    pod: PodRef
    pid: int
    inode: int
    ips: tuple[str, ...]  # the addresses of its netns
    uid: str = ""  # the pod UID its netns's processes proved ("": found by IP, the pod had none)


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


def pod_uids_of_cgroup(text: str) -> frozenset[str]:
    """The pod UIDs (lower case, dashed) in a /proc/<pid>/cgroup: kubelet's `pod<uid>`
    cgroup of the process's pod, under either cgroup driver; none for a process of no pod."""
    out = set()
    for m in _POD_CGROUP.finditer(text):
        uid = m.group(1).lower().replace("_", "-")
        out.add(uid)
    return frozenset(out)


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


def _pod_uids(proc_root: Path, pid: str) -> frozenset[str]:
    try:
        return pod_uids_of_cgroup((proc_root / pid / "cgroup").read_text())
    except OSError:  # gone meanwhile, or no cgroup file
        return frozenset()


def scan_netns(proc_root: Path = Path("/proc")) -> list[Netns]:
    """Every network namespace some process is in, but the agent's own (the host's), with
    the pods its processes belong to (the agent's own pod left out: its `nsenter` children
    visit pods' namespaces)."""
    own = _inode(proc_root / "self" / "ns" / "net")
    own_pod = _pod_uids(proc_root, "self")
    pids: dict[int, list[int]] = {}
    for entry in proc_root.iterdir():
        if entry.name.isdigit():
            ino = _inode(entry / "ns" / "net")
            if ino is not None and ino != own:
                pids.setdefault(ino, []).append(int(entry.name))
    out = []
    for ino, members in sorted(pids.items()):
        uids = frozenset().union(*(_pod_uids(proc_root, str(pid)) for pid in members)) - own_pod
        for pid in sorted(members):
            try:
                out.append(Netns(ino, pid, netns_addresses(proc_root, pid), uids))
                break
            except OSError:
                continue  # exited meanwhile: try the next process of the netns
    return out


def match(pods: Sequence[PodRef], namespaces: Sequence[Netns]) -> tuple[list[Found], list[str]]:
    """Each pod matched to its network namespace (see the module docstring), sorted by
    namespace/name, and why the others that seem to be here were not. Pure."""
    by_uid: dict[str, list[Netns]] = {}
    by_ip: dict[str, dict[int, Netns]] = {}
    for ns in namespaces:
        for uid in ns.pod_uids:
            by_uid.setdefault(uid, []).append(ns)
        for addr in ns.addresses:
            by_ip.setdefault(addr, {})[ns.inode] = ns
    found: list[Found] = []
    problems: list[str] = []
    for pod in pods:
        who = f"pod {pod.namespace}/{pod.name}"
        holding = {ino: ns for ip in pod.ips for ino, ns in by_ip.get(ip, {}).items()}
        if pod.uid:
            own = by_uid.get(pod.uid, [])
            if not own:
                for ns in holding.values():  # its IP is elsewhere: a neighbour's, never its own
                    owner = f"pod {', '.join(sorted(ns.pod_uids))}" if ns.pod_uids else "no pod"
                    problems.append(f"{who} (uid {pod.uid}): the network namespace holding its IP belongs to "
                                    f"{owner}; not matched")
                continue
            if len(own) > 1:
                problems.append(f"{who} (uid {pod.uid}): its processes are in {len(own)} network namespaces; skipped")
                continue
            (ns,) = own
            if ns.pod_uids != {pod.uid}:
                others = ", ".join(sorted(ns.pod_uids - {pod.uid}))
                problems.append(f"{who} (uid {pod.uid}): its network namespace also holds processes of pod {others}; "
                                "skipped")
            elif not ns.addresses & set(pod.ips):
                problems.append(f"{who} (uid {pod.uid}): its network namespace holds "
                                f"{', '.join(sorted(ns.addresses)) or 'no address'}, not its IPs "
                                f"{', '.join(pod.ips)}; skipped until they agree")
            else:
                found.append(Found(pod, ns.pid, ns.inode, tuple(sorted(ns.addresses)), pod.uid))
            continue
        if len(holding) > 1:
            problems.append(f"{who}: its IPs {', '.join(pod.ips)} are in {len(holding)} network namespaces; skipped")
        elif holding:
            (ns,) = holding.values()
            if ns.pod_uids:
                problems.append(f"{who}: the network namespace holding its IPs belongs to pod "
                                f"{', '.join(sorted(ns.pod_uids))}; give the pod's uid to match it")
            else:
                found.append(Found(pod, ns.pid, ns.inode, tuple(sorted(ns.addresses))))
    return sorted(found, key=lambda f: f.pod.key), problems


def discover(pods: Sequence[PodRef], proc_root: Path = Path("/proc"),
             problems: list[str] | None = None) -> list[Found]:
    """`match` over the network namespaces of `proc_root`; the problems appended to
    `problems` when given, else logged."""
    found, why = match(pods, scan_netns(proc_root))
    if problems is not None:
        problems.extend(why)
    else:
        for message in why:
            log.warning("%s", message)
    return found
