"""Traffic capture for `intercept` sidecars: the nat-table rules that send a pod's TCP
traffic through its Envoy, as `meshline iptables` (and the injected `meshline-init` init
container) applies them inside the pod's network namespace.

Pure rendering (`CaptureSpec`, `render_rules`, `cleanup_rules`, the parsers the webhook
shares for its annotations) plus `apply`/`cleanup`, which run `iptables-save` and
`iptables-restore --noflush` (the only I/O here). IPv4 only.

The rules (iptables-restore format, table nat):

    OUTPUT     -p tcp -j MESHLINE_OUTPUT
    MESHLINE_OUTPUT:  --uid-owner/--gid-owner <proxy> RETURN   (Envoy's own connections)
                      -d 127.0.0.0/8 RETURN                    (loopback stays local)
                      excluded ports / CIDRs RETURN
                      [-d <included CIDR>] -j MESHLINE_REDIRECT
    MESHLINE_REDIRECT: REDIRECT --to-ports 15001
    PREROUTING -p tcp -j MESHLINE_INBOUND
    MESHLINE_INBOUND:  excluded inbound ports RETURN (always 15008, 15020, 15021, 15090)
                       -j MESHLINE_IN_REDIRECT
    MESHLINE_IN_REDIRECT: REDIRECT --to-ports 15006

The jumps from the built-in chains come last, and one `iptables-restore` applies them
atomically; `apply` first removes any earlier rules of ours, so it is idempotent, and
`cleanup` removes exactly the four chains and the jumps to them.

Ambient pods (`meshline iptables --ambient`, applied by `meshline node-agent` inside each
ambient pod's network namespace) have no proxy of their own: the node proxy owns
listeners on 15001/15006/15008 *inside* the pod's netns and marks the sockets it opens
there with SO_MARK `AMBIENT_MARK` (0x539). Their rules (`render_ambient_rules`), in their
own chains, which the sidecar `cleanup` never touches and vice versa:

    OUTPUT     -p tcp -j MESHLINE_AMB_OUTPUT
    MESHLINE_AMB_OUTPUT:  -m mark --mark 0x539/0xfff RETURN  (the node proxy's own sockets)
                          -d 127.0.0.0/8 RETURN              (loopback stays local)
                          -o lo RETURN                       (the pod calling its own IP)
                          REDIRECT --to-ports 15001
    PREROUTING -p tcp -j MESHLINE_AMB_INBOUND
    MESHLINE_AMB_INBOUND: -i lo RETURN
                          --dport 15008 RETURN               (HBONE tunnel: the node proxy)
                          -m mark --mark 0x539/0xfff RETURN
                          REDIRECT --to-ports 15006
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from controlplane.translate.names import AMBIENT_MARK, HBONE_PORT

OUTPUT_CHAIN = "MESHLINE_OUTPUT"
REDIRECT_CHAIN = "MESHLINE_REDIRECT"
INBOUND_CHAIN = "MESHLINE_INBOUND"
IN_REDIRECT_CHAIN = "MESHLINE_IN_REDIRECT"
CHAINS = (INBOUND_CHAIN, IN_REDIRECT_CHAIN, OUTPUT_CHAIN, REDIRECT_CHAIN)
AMBIENT_OUTPUT_CHAIN = "MESHLINE_AMB_OUTPUT"
AMBIENT_INBOUND_CHAIN = "MESHLINE_AMB_INBOUND"
AMBIENT_CHAINS = (AMBIENT_INBOUND_CHAIN, AMBIENT_OUTPUT_CHAIN)

PortRange = tuple[int, int]
Runner = Callable[[Sequence[str], str | None], str]
"""Runs argv with optional stdin text and returns stdout; raises IptablesError on failure."""

DEFAULT_PROXY_UID = 1337
DEFAULT_OUTBOUND_PORT = 15001
DEFAULT_INBOUND_PORT = 15006
ALWAYS_EXCLUDED_INBOUND_PORTS: tuple[PortRange, ...] = ((15008, 15008), (15020, 15021), (15090, 15090))
"""The proxy's own inbound ports (HBONE tunnel, health, Prometheus stats): never captured."""


class IptablesError(Exception):
    """Bad capture options, or iptables refused/failed. The message says which and why."""


# --------------------------------------------------------------------------- parsing


def parse_ports(text: str, what: str = "ports") -> tuple[PortRange, ...]:
    """`"15020,8000-8100"` -> ((8000, 8100), (15020, 15020)): sorted, deduplicated; `a:b` is
    accepted for a range too. Raises ValueError naming the bad item."""
    out: set[PortRange] = set()
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        lo_s, sep, hi_s = item.replace(":", "-").partition("-")
        try:
            lo = int(lo_s)
            hi = int(hi_s) if sep else lo
        except ValueError:
            raise ValueError(f"{what}: {item!r} is not a port or a range a-b") from None
        if not (0 < lo <= hi < 65536):
            raise ValueError(f"{what}: {item!r} is out of range (1-65535, low-high)")
        out.add((lo, hi))
    return tuple(sorted(out))


def parse_cidrs(text: str, what: str = "CIDRs", allow_all: bool = False) -> tuple[ipaddress.IPv4Network, ...] | None:
    """`"10.0.0.0/8,192.168.1.1"` -> networks (host bits dropped), sorted and deduplicated.
    With `allow_all`, `"*"` returns None (meaning everything). Raises ValueError."""
    items = [c.strip() for c in text.split(",") if c.strip()]
    if allow_all and "*" in items:
        if len(items) > 1:
            raise ValueError(f"{what}: '*' cannot be combined with other CIDRs")
        return None
    out: set[ipaddress.IPv4Network] = set()
    for item in items:
        try:
            net = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{what}: {item!r} is not an IPv4 address or CIDR") from None
        if not isinstance(net, ipaddress.IPv4Network):
            raise ValueError(f"{what}: {item!r} is IPv6; only IPv4 traffic is captured")
        out.add(net)
    return tuple(sorted(out))


def format_ports(ports: Sequence[PortRange]) -> str:
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ports)


def format_cidrs(cidrs: Sequence[ipaddress.IPv4Network] | None) -> str:
    return "*" if cidrs is None else ",".join(str(c) for c in cidrs)


# --------------------------------------------------------------------------- rendering


@dataclass(frozen=True, slots=True)
class CaptureSpec:
    proxy_uid: int = DEFAULT_PROXY_UID
    proxy_gid: int | None = None  # None: the same number as the uid
    outbound_port: int = DEFAULT_OUTBOUND_PORT
    inbound_port: int = DEFAULT_INBOUND_PORT
    exclude_outbound_ports: tuple[PortRange, ...] = ()
    exclude_inbound_ports: tuple[PortRange, ...] = ()  # in addition to ALWAYS_EXCLUDED_INBOUND_PORTS
    exclude_outbound_cidrs: tuple[ipaddress.IPv4Network, ...] = ()
    include_outbound_cidrs: tuple[ipaddress.IPv4Network, ...] | None = None  # None: everything
    capture_inbound: bool = True

    def __post_init__(self) -> None:
        for name in ("proxy_uid", "proxy_gid"):
            v = getattr(self, name)
            if v is not None and not 0 < v < 2**32 - 1:
                raise ValueError(f"{name.replace('_', '-')} must be a positive id, got {v}")
        for name in ("outbound_port", "inbound_port"):
            if not 0 < getattr(self, name) < 65536:
                raise ValueError(f"{name.replace('_', '-')} must be 1-65535")
        if self.outbound_port == self.inbound_port:
            raise ValueError("the outbound and inbound capture ports must differ")

    @property
    def inbound_exclusions(self) -> tuple[PortRange, ...]:
        return tuple(sorted(set(ALWAYS_EXCLUDED_INBOUND_PORTS) | set(self.exclude_inbound_ports)))


def _dport(r: PortRange) -> str:
    lo, hi = r
    return f"-p tcp -m tcp --dport {lo}" if lo == hi else f"-p tcp -m tcp --dport {lo}:{hi}"


def render_rules(spec: CaptureSpec) -> str:
    """The iptables-restore input that installs capture (with --noflush: other tables and
    chains are left alone). Deterministic: the same spec gives the same text."""
    gid = spec.proxy_gid if spec.proxy_gid is not None else spec.proxy_uid
    lines = [
        "# meshline capture rules (nat table)",
        "*nat",
        *(f":{c} - [0:0]" for c in CHAINS),
        f"-A {REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {spec.outbound_port}",
        f"-A {IN_REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {spec.inbound_port}",
    ]
    if spec.capture_inbound:
        lines += [f"-A {INBOUND_CHAIN} {_dport(r)} -j RETURN" for r in spec.inbound_exclusions]
        lines.append(f"-A {INBOUND_CHAIN} -p tcp -j {IN_REDIRECT_CHAIN}")
    lines += [
        f"-A {OUTPUT_CHAIN} -m owner --uid-owner {spec.proxy_uid} -j RETURN",
        f"-A {OUTPUT_CHAIN} -m owner --gid-owner {gid} -j RETURN",
        f"-A {OUTPUT_CHAIN} -d 127.0.0.0/8 -j RETURN",
    ]
    lines += [f"-A {OUTPUT_CHAIN} {_dport(r)} -j RETURN" for r in spec.exclude_outbound_ports]
    lines += [f"-A {OUTPUT_CHAIN} -d {c} -j RETURN" for c in spec.exclude_outbound_cidrs]
    if spec.include_outbound_cidrs is None:
        lines.append(f"-A {OUTPUT_CHAIN} -j {REDIRECT_CHAIN}")
    else:
        lines += [f"-A {OUTPUT_CHAIN} -d {c} -j {REDIRECT_CHAIN}" for c in spec.include_outbound_cidrs]
    if spec.capture_inbound:
        lines.append(f"-A PREROUTING -p tcp -j {INBOUND_CHAIN}")
    lines += [f"-A OUTPUT -p tcp -j {OUTPUT_CHAIN}", "COMMIT", ""]
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class AmbientSpec:
    """Capture inside an ambient pod's netns, towards the node proxy's in-pod listeners."""

    outbound_port: int = DEFAULT_OUTBOUND_PORT
    inbound_port: int = DEFAULT_INBOUND_PORT
    tunnel_port: int = HBONE_PORT
    mark: int = AMBIENT_MARK
    mark_mask: int = 0xFFF

    def __post_init__(self) -> None:
        for name in ("outbound_port", "inbound_port", "tunnel_port"):
            if not 0 < getattr(self, name) < 65536:
                raise ValueError(f"{name.replace('_', '-')} must be 1-65535")
        if len({self.outbound_port, self.inbound_port, self.tunnel_port}) != 3:
            raise ValueError("the outbound, inbound and tunnel ports must differ")
        if not 0 < self.mark <= self.mark_mask < 2**32 or self.mark & ~self.mark_mask:
            raise ValueError(f"mark {self.mark:#x} does not fit its mask {self.mark_mask:#x}")


def render_ambient_rules(spec: AmbientSpec | None = None) -> str:
    """The iptables-restore input (with --noflush) for an ambient pod's netns: the app's TCP
    to anything but loopback goes to the node proxy's in-pod 15001, TCP arriving from
    outside to 15006 (except the HBONE port); sockets carrying the node proxy's mark pass
    untouched both ways. Deterministic."""
    spec = spec or AmbientSpec()
    mark = f"-m mark --mark {spec.mark:#x}/{spec.mark_mask:#x}"
    out, inb = AMBIENT_OUTPUT_CHAIN, AMBIENT_INBOUND_CHAIN
    return "\n".join([
        "# meshline ambient capture rules (nat table)",
        "*nat",
        *(f":{c} - [0:0]" for c in AMBIENT_CHAINS),
        f"-A {inb} -i lo -j RETURN",
        f"-A {inb} -p tcp -m tcp --dport {spec.tunnel_port} -j RETURN",
        f"-A {inb} {mark} -j RETURN",
        f"-A {inb} -p tcp -j REDIRECT --to-ports {spec.inbound_port}",
        f"-A {out} {mark} -j RETURN",
        f"-A {out} -d 127.0.0.0/8 -j RETURN",
        f"-A {out} -o lo -j RETURN",
        f"-A {out} -p tcp -j REDIRECT --to-ports {spec.outbound_port}",
        f"-A PREROUTING -p tcp -j {inb}",
        f"-A OUTPUT -p tcp -j {out}",
        "COMMIT",
        "",
    ])


def cleanup_ambient_rules(saved_nat: str | None) -> str | None:
    """Like `cleanup_rules`, for the ambient chains only (the sidecar chains stay)."""
    return _cleanup_script(saved_nat, AMBIENT_CHAINS, AMBIENT_INBOUND_CHAIN, AMBIENT_OUTPUT_CHAIN)


def cleanup_rules(saved_nat: str | None) -> str | None:
    """iptables-restore input removing every rule and chain of ours, given `iptables-save -t
    nat` output; None when there is nothing to remove. With `saved_nat=None` (state
    unknown, e.g. a dry run without iptables) the generic script for a full install."""
    return _cleanup_script(saved_nat, CHAINS, INBOUND_CHAIN, OUTPUT_CHAIN)


def _cleanup_script(saved_nat: str | None, chains: tuple[str, ...], prerouting_chain: str,
                    output_chain: str) -> str | None:
    """Removal of `chains` and of every jump to them from another chain (see cleanup_rules)."""
    if saved_nat is None:
        jumps = [f"-A PREROUTING -p tcp -j {prerouting_chain}", f"-A OUTPUT -p tcp -j {output_chain}"]
        present = list(chains)
    else:
        present = [c for c in chains if any(line.startswith(f":{c} ") for line in saved_nat.splitlines())]
        ours = tuple(f"-j {c}" for c in chains)
        jumps = []
        for line in saved_nat.splitlines():
            words = line.split()
            if len(words) > 1 and words[0] == "-A" and words[1] not in chains and line.rstrip().endswith(ours):
                jumps.append(line.strip())
    if not present and not jumps:
        return None
    out = ["*nat"]
    out += ["-D" + j[2:] for j in jumps]
    out += [f"-F {c}" for c in present]
    out += [f"-X {c}" for c in present]
    out += ["COMMIT", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------- running


def _default_runner(argv: Sequence[str], stdin: str | None) -> str:
    if shutil.which(argv[0]) is None:
        raise IptablesError(f"{argv[0]} not found on PATH (install the iptables package)")
    try:
        proc = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise IptablesError(f"{' '.join(argv)}: {exc}") from exc
    if proc.returncode != 0:
        raise IptablesError(f"{' '.join(argv)} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


@dataclass(frozen=True, slots=True)
class Iptables:
    """The iptables tools to run (`iptables` -> iptables-save / iptables-restore; give
    `iptables-legacy` or `iptables-nft` to pick a backend)."""

    command: str = "iptables"
    runner: Runner = _default_runner

    def save_nat(self) -> str:
        return self.runner([f"{self.command}-save", "-t", "nat"], None)

    def restore(self, text: str) -> None:
        self.runner([f"{self.command}-restore", "--noflush"], text)


def in_netns(netns_path: str, tools: Iptables | None = None) -> Iptables:
    """`tools` run inside the network namespace at `netns_path` (through `nsenter --net`)."""
    base = tools or Iptables()

    def run(argv: Sequence[str], stdin: str | None) -> str:
        return base.runner(["nsenter", f"--net={netns_path}", *argv], stdin)

    return Iptables(base.command, run)


def _remove(tools: Iptables, cleanup_script: Callable[[str | None], str | None]) -> bool:
    script = cleanup_script(tools.save_nat())
    if script is None:
        return False
    tools.restore(script)
    return True


def cleanup(tools: Iptables | None = None) -> bool:
    """Remove our chains and the jumps to them. Idempotent; True if anything was removed."""
    return _remove(tools or Iptables(), cleanup_rules)


def apply(spec: CaptureSpec, tools: Iptables | None = None) -> str:
    """Replace any earlier capture rules of ours by `spec`'s; returns the rules applied."""
    tools = tools or Iptables()
    rules = render_rules(spec)
    cleanup(tools)
    tools.restore(rules)
    return rules


def cleanup_ambient(tools: Iptables | None = None) -> bool:
    """Remove the ambient chains and the jumps to them. Idempotent; True if anything went."""
    return _remove(tools or Iptables(), cleanup_ambient_rules)


def apply_ambient(spec: AmbientSpec | None = None, tools: Iptables | None = None) -> str:
    """Replace any earlier ambient rules of ours by `spec`'s; returns the rules applied."""
    tools = tools or Iptables()
    rules = render_ambient_rules(spec)
    cleanup_ambient(tools)
    tools.restore(rules)
    return rules
