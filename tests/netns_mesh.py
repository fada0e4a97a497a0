"""A multi-node sidecarless (ambient) mesh lab in Linux network namespaces, for real-dataplane tests.

Address plan (all from 198.18.0.0/15, the benchmarking range, never a real network):

  198.18.0.1/24        fabric bridge `mlbr<sfx>` in the host netns; the control plane under test
                       listens here, every node and pod can reach it
  198.18.0.(10+i)/24   node i (1, 2, ...): netns `mln-<name>-<sfx>`, `eth0` = veth `mlv<sfx><i>`
                       on the bridge; ip_forward=1 inside the node netns only
  198.18.(10+i).0/24   node i's pods: netns `mlp-<name>-<sfx>`, eth0 198.18.(10+i).X/32 (X = 2, 3,
                       ... unless given), `default via 198.18.(10+i).1 dev eth0 onlink`; the node
                       end of every pod veth holds 198.18.(10+i).1/32 plus a /32 route to its pod
                       (ptp/Calico CNI style)
  198.19.0.n           service VIPs (`Topology.vip(n)`): no interface owns them, reachable only
                       through capture (iptables in the pod, a node proxy...)

Routes: every node has `198.18.(10+j).0/24 via 198.18.0.(10+j)` for each other node j, the host
the same for every node (so it can answer pods). The host never routes (pod<->pod crosses the
bridge at L2 between node netns), so no host sysctl is touched. If the host firewall could drop
bridge traffic (a policy other than ACCEPT or any rule in INPUT/FORWARD/OUTPUT; with br_netfilter
bridged frames traverse FORWARD), ACCEPT rules commented `meshline-netns-<sfx>` are inserted
and removed at teardown.

The addresses are fixed, so one Topology is live per machine at a time: `start()` waits for an
exclusive flock on /run/meshline-netns-mesh.lock, then reaps what killed runs left (netns
`ml[np]-*-<6 hex>` and the processes in them, links `mlbr|mlv<6 hex>`, our iptables rules).
Teardown (`close()`: `__exit__`, atexit) stops tracked processes (SIGTERM, SIGKILL after 3 s),
deletes the bridge, veths (host routes go with them), netns and rules. Needs root.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import functools
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

ROOT = Path(__file__).resolve().parent.parent
BACKEND = ROOT / "samples" / "backend.py"
HOST_IP = "198.18.0.1"
LOCK_PATH = "/run/meshline-netns-mesh.lock"
COMMENT = "meshline-netns-"
_T = TypeVar("_T")


def sh(*argv: str, check: bool = True, timeout: float = 20.0, input: str | None = None) -> str:
    """Run a command in the host netns; return stdout, raise with stderr on failure."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def bootstrap_file(args: list[str], out: Path) -> Path:
    """`meshline bootstrap ARGS` written to `out` (world-readable: Envoy may run as another user)."""
    text = subprocess.run([sys.executable, "-m", "controlplane.cli", "bootstrap", *args], check=True,
                          capture_output=True, text=True, cwd=ROOT).stdout
    out.write_text(text)
    out.chmod(0o644)
    return out


def ip(netns: str | None, *cmds: str) -> None:
    """Run `ip` commands (one per string) as one `ip -batch`, in `netns` (None: the host)."""
    sh("ip", *(["-n", netns] if netns else []), "-batch", "-", input="\n".join(cmds) + "\n")


def missing_tools() -> str | None:
    """Why the harness cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, bridge, iptables)"
    for tool in ("ip", "setpriv", "curl"):
        if shutil.which(tool) is None:
            return f"needs {tool} on PATH (apt-get install -y iproute2 util-linux curl)"
    return None


def in_netns(netns_path: str, fn: Callable[[], _T]) -> _T:
    """Call `fn` on a fresh thread that joined the netns (sockets it opens live there)."""
    out: list[tuple[bool, Any]] = []

    def body() -> None:
        try:
            fd = os.open(netns_path, os.O_RDONLY)
            try:
                if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
                    raise OSError(ctypes.get_errno(), f"setns({netns_path})")
            finally:
                os.close(fd)
            out.append((True, fn()))
        except BaseException as exc:
            out.append((False, exc))

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join()
    if not out[0][0]:
        raise out[0][1]
    return out[0][1]  # type: ignore[no-any-return]


def stop_process(proc: subprocess.Popen[Any], grace: float = 3.0) -> None:
    """SIGTERM (its process group if it leads one), SIGKILL after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig) if os.getpgid(proc.pid) == proc.pid else proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)


class _Netns:
    """Something living in a named netns: run processes and short commands there."""

    topo: Topology
    name: str
    netns: str

    @property
    def netns_path(self) -> str:
        return f"/var/run/netns/{self.netns}"

    def argv(self, argv: Sequence[str], user: int | None = None) -> list[str]:
        """`argv` wrapped to run in this netns (as uid/gid `user`, no groups, when given)."""
        priv = [] if user is None else ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
        return ["ip", "netns", "exec", self.netns, *priv, *argv]

    def run(self, argv: Sequence[str], user: int | None = None, **popen_kw: Any) -> subprocess.Popen[bytes]:
        """Start a long-running process here, tracked for teardown (log in topo.workdir)."""
        return self.topo.spawn(f"{self.netns}-{Path(argv[0]).name}", self.argv(argv, user), **popen_kw)

    def exec(self, argv: Sequence[str], user: int | None = None, timeout: float = 20.0,
             check: bool = False, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a short command here; its result, as text."""
        return subprocess.run(self.argv(argv, user), capture_output=True, text=True, timeout=timeout,
                              input=input, check=check)

    def curl(self, url: str, headers: dict[str, str] | None = None, timeout: float = 5.0,
             extra: Sequence[str] = ()) -> tuple[int, str]:
        """(status, body) of curl run here; (0, curl's error) when no HTTP answer came."""
        hdrs = [a for k, v in (headers or {}).items() for a in ("-H", f"{k}: {v}")]
        res = self.exec(["curl", "-sS", "-m", str(timeout), *hdrs, *extra, "-w", "\n%{http_code}", url],
                        timeout=timeout + 5)
        body, _, code = res.stdout.rpartition("\n")
        status = int(code) if code.isdigit() else 0
        return status, body if status else (res.stderr.strip() or body)

    def can_connect(self, host: str, port: int, timeout: float = 1.0) -> bool:
        """Whether a TCP connect() from here succeeds."""
        def attempt() -> bool:
            with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
                return True
            return False
        return in_netns(self.netns_path, attempt)


@dataclass(eq=False)
class Node(_Netns):
    topo: Topology
    name: str
    index: int
    netns: str
    ip: str  # on the bridge
    pod_subnet: str
    gateway: str  # the node end of every pod veth
    pods: list[Pod] = field(default_factory=list)

    def add_pod(self, name: str, ip_suffix: int | None = None) -> Pod:
        """New pod netns wired to this node (ptp veth, /32 address, default via the node)."""
        used = {int(p.ip.rsplit(".", 1)[1]) for p in self.pods}
        x = ip_suffix if ip_suffix is not None else min(set(range(2, 255)) - used)
        if not 2 <= x <= 254 or x in used:
            raise ValueError(f"pod address suffix {x} is taken or out of range 2..254")
        t = self.topo
        t.pod_count += 1
        pod = Pod(t, name, self, f"mlp-{name}-{t.sfx}", f"{self.pod_subnet.rsplit('.', 1)[0]}.{x}",
                  f"mlp{t.pod_count}{t.sfx}")
        t.netns.append(pod.netns)
        ip(None, f"netns add {pod.netns}")
        ip(self.netns, f"link add {pod.veth} type veth peer name eth0 netns {pod.netns}",
           f"addr add {self.gateway}/32 dev {pod.veth}", f"link set {pod.veth} up",
           f"route add {pod.ip}/32 dev {pod.veth}")
        ip(pod.netns, "link set lo up", f"addr add {pod.ip}/32 dev eth0", "link set eth0 up",
           f"route add {self.gateway} dev eth0", f"route add default via {self.gateway} dev eth0 onlink")
        self.pods.append(pod)
        return pod


@dataclass(eq=False)
class Pod(_Netns):
    topo: Topology
    name: str
    node: Node
    netns: str
    ip: str
    veth: str  # its node end, inside the node netns

    def serve_http(self, port: int, name: str, timeout: float = 10.0) -> subprocess.Popen[bytes]:
        """samples/backend.py NAME=0.0.0.0:PORT here; returns once it accepts connections."""
        return self._serve(f"{name}=0.0.0.0:{port}", port, timeout)

    def serve_tcp(self, port: int, name: str, timeout: float = 10.0) -> subprocess.Popen[bytes]:
        """The backend's TCP mode (greets `NAME\\n`, then echoes); returns once it accepts."""
        return self._serve(f"{name}=0.0.0.0:{port}/tcp", port, timeout)

    def _serve(self, spec: str, port: int, timeout: float) -> subprocess.Popen[bytes]:
        proc = self.run([sys.executable, str(BACKEND), spec])
        self.topo.wait(f"backend {spec} in {self.netns}", lambda: self.can_connect("127.0.0.1", port),
                       timeout, proc)
        return proc


class Segment(NamedTuple):
    src: str
    sport: int
    dst: str
    dport: int
    payload: bytes


@dataclass
class Capture:
    """Filled when the `capture()` block exits: the TCP segments seen (and the pcap, with tcpdump)."""

    iface: str
    pcap: Path | None = None
    segments: list[Segment] = field(default_factory=list)


_HTTP_LINE = re.compile(rb"(?:^|\n)(?:(?:GET|POST|PUT|DELETE|HEAD|OPTIONS|PATCH|CONNECT|TRACE|PRI) \S+ "
                        rb"HTTP/[12](?:\.[01])?\r?\n|HTTP/[12](?:\.[01])? \d{3}[ \r])")


def plaintext_http_seen(segments: Sequence[Segment]) -> bool:
    """Whether any payload carries a cleartext HTTP request or status line (or the h2c preface)."""
    return any(_HTTP_LINE.search(s.payload) for s in segments)


def parse_frame(frame: bytes, linktype: int = 1) -> Segment | None:
    """The TCP segment in an Ethernet (linktype 1) or Linux cooked (113) IPv4 frame, else None."""
    proto, off = struct.unpack_from("!H", frame, 14 if linktype == 113 else 12)[0], 16 if linktype == 113 else 14
    if proto == 0x8100 and linktype != 113:  # one VLAN tag
        proto, off = struct.unpack_from("!H", frame, 16)[0], 18
    if proto != 0x0800 or len(frame) < off + 20 or frame[off + 9] != 6:
        return None
    tcp, total = off + (frame[off] & 0x0F) * 4, struct.unpack_from("!H", frame, off + 2)[0]
    sport, dport = struct.unpack_from("!HH", frame, tcp)
    return Segment(socket.inet_ntoa(frame[off + 12:off + 16]), sport, socket.inet_ntoa(frame[off + 16:off + 20]),
                   dport, frame[tcp + (frame[tcp + 12] >> 4) * 4:off + total])


def read_pcap(path: Path) -> list[Segment]:
    """TCP segments of a classic pcap file (either byte order, us or ns timestamps)."""
    raw = path.read_bytes()
    end = "<" if raw[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    linktype, pos, out = struct.unpack_from(end + "I", raw, 20)[0] if len(raw) >= 24 else 1, 24, []
    while pos + 16 <= len(raw):
        caplen = struct.unpack_from(end + "I", raw, pos + 8)[0]
        if (seg := parse_frame(raw[pos + 16:pos + 16 + caplen], linktype)) is not None:
            out.append(seg)
        pos += 16 + caplen
    return out


class Topology:
    """The lab: a bridge fabric, nodes and pods; a context manager that always tears down."""

    def __init__(self, open_firewall: bool | None = None, lock_timeout: float = 600.0) -> None:
        """open_firewall: None = ACCEPT rules only if the host firewall might drop; True = always."""
        self.sfx = secrets.token_hex(3)
        self.bridge, self.host_ip = f"mlbr{self.sfx}", HOST_IP
        self.nodes: list[Node] = []
        self.netns: list[str] = []
        self.links: list[str] = []
        self.procs: list[subprocess.Popen[Any]] = []
        self.rules: list[list[str]] = []
        self.pod_count = 0
        self.open_firewall, self.lock_timeout = open_firewall, lock_timeout
        self.workdir = Path(tempfile.mkdtemp(prefix="meshline-netns-mesh-"))
        os.chmod(self.workdir, 0o755)  # processes may run under other uids
        self._lock: int | None = None
        self._filter_table_existed = True
        self._closed = False
        atexit.register(self.close)

    def __enter__(self) -> Topology:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        try:
            self.close()
        except Exception as err:
            if exc is None:
                raise
            print(f"netns_mesh: teardown error (after {exc!r}): {err}", file=sys.stderr)

    def start(self) -> None:
        """Take the machine-wide lock, reap stale leftovers, create the bridge, open the firewall."""
        if why := missing_tools():
            raise RuntimeError(why)
        self.lock()
        self.reap_stale()
        self.links.append(self.bridge)
        ip(None, f"link add {self.bridge} type bridge", f"addr add {HOST_IP}/24 dev {self.bridge}",
           f"link set {self.bridge} up")
        if not shutil.which("iptables"):
            return
        # (not `iptables-save -t filter`: it prints empty builtin chains even when no table exists)
        self._filter_table_existed = "*filter" in sh("iptables-save").split("\n")
        for chain, match in (("FORWARD", ["-i", self.bridge, "-o", self.bridge]),
                             ("INPUT", ["-i", self.bridge]), ("OUTPUT", ["-o", self.bridge])):
            listing = sh("iptables", "-S", chain).splitlines()
            if self.open_firewall or listing != [f"-P {chain} ACCEPT"]:
                rule = [chain, *match, "-m", "comment", "--comment", COMMENT + self.sfx, "-j", "ACCEPT"]
                sh("iptables", "-I", chain, "1", *rule[1:])
                self.rules.append(rule)

    def lock(self) -> None:
        """Wait for the machine-wide lock (`start()` calls this; idempotent)."""
        if self._lock is not None:
            return
        self._lock = lock = os.open(LOCK_PATH, os.O_CREAT | os.O_RDWR, 0o600)

        def locked() -> bool:
            with contextlib.suppress(BlockingIOError):
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            return False
        self.wait(f"{LOCK_PATH} held by another run", locked, self.lock_timeout)

    @staticmethod
    def reap_stale() -> None:
        """Remove what killed runs left (only under the lock: then no live run owns any of it)."""
        for name in re.findall(r"^(ml[np]-\S+-[0-9a-f]{6})\b", sh("ip", "netns", "list"), re.M):
            for pid in sh("ip", "netns", "pids", name, check=False).split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            sh("ip", "netns", "del", name, check=False)
        for name in re.findall(r"^\d+: ((?:mlbr|mlv)[0-9a-f]{6}\d*)[:@]", sh("ip", "-o", "link"), re.M):
            sh("ip", "link", "del", name, check=False)
        for ln in sh("iptables", "-S").splitlines() if shutil.which("iptables") else []:
            if ln.startswith("-A") and COMMENT in ln:
                sh("iptables", "-D", *shlex.split(ln)[1:], check=False)

    def add_node(self, name: str) -> Node:
        """New node netns on the bridge (198.18.0.(10+i)), forwarding on, routes to all pod subnets."""
        i = len(self.nodes) + 1
        node = Node(self, name, i, f"mln-{name}-{self.sfx}", f"198.18.0.{10 + i}",
                    f"198.18.{10 + i}.0/24", f"198.18.{10 + i}.1")
        veth = f"mlv{self.sfx}{i}"
        self.netns.append(node.netns)
        self.links.append(veth)
        ip(None, f"netns add {node.netns}", f"link add {veth} type veth peer name eth0 netns {node.netns}",
           f"link set {veth} master {self.bridge} up", f"route add {node.pod_subnet} via {node.ip} dev {self.bridge}")
        ip(node.netns, "link set lo up", f"addr add {node.ip}/24 dev eth0", "link set eth0 up",
           *(f"route add {o.pod_subnet} via {o.ip} dev eth0" for o in self.nodes))
        sh(*node.argv(["sysctl", "-qw", "net.ipv4.ip_forward=1"]))
        for other in self.nodes:
            ip(other.netns, f"route add {node.pod_subnet} via {node.ip} dev eth0")
        self.nodes.append(node)
        return node

    @staticmethod
    def vip(n: int) -> str:
        """Service VIP number n (1..254): 198.19.0.n, owned by no interface."""
        if not 1 <= n <= 254:
            raise ValueError("VIP index must be 1..254")
        return f"198.19.0.{n}"

    def spawn(self, label: str, argv: Sequence[str], **popen_kw: Any) -> subprocess.Popen[bytes]:
        """Popen in a new session, tracked for teardown; output to workdir/<label>-<n>.log by default."""
        popen_kw.setdefault("cwd", ROOT)
        popen_kw["start_new_session"] = True
        with contextlib.ExitStack() as stack:
            if "stdout" not in popen_kw:
                popen_kw["stdout"] = stack.enter_context(open(self.workdir / f"{label}-{len(self.procs)}.log", "wb"))
                popen_kw.setdefault("stderr", subprocess.STDOUT)
            proc: subprocess.Popen[bytes] = subprocess.Popen(list(argv), **popen_kw)
        self.procs.append(proc)
        return proc

    def track(self, proc: subprocess.Popen[Any]) -> None:
        """Stop this externally started process at teardown too (before the netns go)."""
        self.procs.append(proc)

    def wait(self, what: str, ok: Callable[[], object], timeout: float = 10.0,
             proc: subprocess.Popen[Any] | None = None) -> None:
        """Poll `ok` until truthy; fail early (with the logs) if `proc` exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{what}: process exited ({proc.returncode})\n{self.logs()}")
            if ok():
                return
            time.sleep(0.05)
        raise TimeoutError(f"{what}: not ready after {timeout}s\n{self.logs()}")

    def logs(self, tail: int = 3000) -> str:
        """The tail of every process log in the workdir."""
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}"
                         for p in sorted(self.workdir.glob("*.log")))

    @contextlib.contextmanager
    def capture(self, iface: str | None = None, filter: str = "tcp", tool: str = "auto") -> Iterator[Capture]:
        """Record TCP segments on `iface` (default: the bridge, promiscuous) while the block runs.

        tool: "tcpdump" (BPF `filter`, pcap kept in the workdir), "python" (AF_PACKET sniffer: the
        filter is ignored, every IPv4 TCP segment is kept) or "auto" (tcpdump when installed).
        """
        cap = Capture(iface or self.bridge)
        if tool == "tcpdump" or (tool == "auto" and shutil.which("tcpdump")):
            cap.pcap, log = (self.workdir / f"tcpdump-{len(self.procs)}.{x}" for x in ("pcap", "log"))
            # --immediate-mode: otherwise frames wait in the ring buffer and are lost at SIGINT
            proc = self.spawn("tcpdump", ["tcpdump", "-i", cap.iface, "-n", "-U", "--immediate-mode", "-s", "0",
                                          "-w", str(cap.pcap), *filter.split()])
            self.wait("tcpdump", lambda: b"listening on" in log.read_bytes(), 10.0, proc)
            try:
                yield cap
            finally:
                time.sleep(0.1)  # let the last frames land
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGINT)
                proc.wait(5)
                cap.segments = read_pcap(cap.pcap)
            return
        stop, frames = threading.Event(), []
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003)) as sock:  # ETH_P_ALL
            sock.bind((cap.iface, 0))
            mreq = struct.pack("iHH8s", socket.if_nametoindex(cap.iface), 1, 0, b"")  # PACKET_MR_PROMISC
            sock.setsockopt(263, 1, mreq)  # SOL_PACKET, PACKET_ADD_MEMBERSHIP
            sock.settimeout(0.05)

            def sniff() -> None:
                while not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        frames.append(sock.recv(65536))
            thread = threading.Thread(target=sniff, daemon=True)
            thread.start()
            try:
                yield cap
            finally:
                time.sleep(0.1)
                stop.set()
                thread.join(2)
                cap.segments = [s for s in map(parse_frame, frames) if s is not None]

    def close(self) -> None:
        """Stop processes; delete bridge, veths, netns and rules; release the lock. Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        steps: list[Callable[[], object]] = [functools.partial(stop_process, p) for p in reversed(self.procs)]
        steps += [functools.partial(sh, "ip", "link", "del", ln) for ln in self.links]  # node ends go too
        steps += [functools.partial(sh, "ip", "netns", "del", ns) for ns in reversed(self.netns)]
        steps += [functools.partial(sh, "iptables", "-D", *rule) for rule in self.rules]
        if self.rules and not self._filter_table_existed:
            steps.append(self._drop_empty_filter_table)
        errors = []
        for step in steps:
            try:
                step()
            except Exception as exc:
                errors.append(str(exc))
        if self._lock is not None:
            os.close(self._lock)  # releases the flock
        shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            raise RuntimeError("netns_mesh teardown: " + "; ".join(errors))

    @staticmethod
    def _drop_empty_filter_table() -> None:
        """iptables-nft created table `ip filter` for our rules: drop it if nothing else uses it."""
        if "nf_tables" in sh("iptables", "-V") and shutil.which("nft") and all(
                re.fullmatch(r"-P \S+ ACCEPT", ln) for ln in sh("iptables", "-S").splitlines()):
            sh("nft", "delete", "table", "ip", "filter")
