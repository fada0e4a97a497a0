"""Pod-side `meshline` commands, run inside injected pods: `iptables` (the meshline-init
container's traffic capture), `proxy-wait` and `proxy-drain` (the classic sidecar's
postStart/preStop hooks). Registered on the main group by `controlplane.cli`. Does I/O
(iptables, HTTP to the local Envoy)."""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import click
from click.core import ParameterSource

from controlplane.iptables import (
    ALWAYS_EXCLUDED_INBOUND_PORTS,
    DEFAULT_INBOUND_PORT,
    DEFAULT_OUTBOUND_PORT,
    DEFAULT_PROXY_UID,
    AmbientSpec,
    CaptureSpec,
    Iptables,
    IptablesError,
    apply,
    apply_ambient,
    cleanup,
    cleanup_ambient,
    cleanup_ambient_rules,
    cleanup_rules,
    format_ports,
    parse_cidrs,
    parse_ports,
    render_ambient_rules,
    render_rules,
)

SIDECAR_ONLY_OPTIONS = ("proxy_uid", "proxy_gid", "exclude_outbound_ports", "exclude_inbound_ports",
                        "exclude_outbound_cidrs", "include_outbound_cidrs", "capture_inbound")


@click.command("iptables")
@click.option("--proxy-uid", type=click.IntRange(1, 2**32 - 2), default=DEFAULT_PROXY_UID, show_default=True,
              help="The proxy's uid: its own connections are never captured.")
@click.option("--proxy-gid", type=click.IntRange(1, 2**32 - 2), default=None,
              help="The proxy's gid (also exempt). Default: the uid's number.")
@click.option("--outbound-port", type=click.IntRange(1, 65535), default=DEFAULT_OUTBOUND_PORT, show_default=True)
@click.option("--inbound-port", type=click.IntRange(1, 65535), default=DEFAULT_INBOUND_PORT, show_default=True)
@click.option("--exclude-outbound-ports", default="", metavar="P,A-B", help="Outbound ports never captured.")
@click.option("--exclude-inbound-ports", default="", metavar="P,A-B",
              help=f"Inbound ports never captured, besides the proxy's own "
                   f"({format_ports(ALWAYS_EXCLUDED_INBOUND_PORTS)}).")
@click.option("--exclude-outbound-cidrs", default="", metavar="CIDR,...", help="Destinations never captured.")
@click.option("--include-outbound-cidrs", default="*", show_default=True, metavar="CIDR,...|*",
              help="Capture outbound traffic only to these destinations.")
@click.option("--capture-inbound/--no-capture-inbound", default=True, show_default=True)
@click.option("--iptables-command", default="iptables", show_default=True,
              help="Tool family to run: iptables, iptables-nft or iptables-legacy (+ -save/-restore).")
@click.option("--dry-run", is_flag=True, help="Print the iptables-restore input instead of applying it.")
@click.option("--cleanup", "do_cleanup", is_flag=True, help="Remove Meshline's chains and rules (idempotent).")
@click.option("--ambient", is_flag=True,
              help="Ambient pod: capture for the node proxy's in-pod listeners instead of a sidecar (sockets "
                   "marked 0x539 pass; the HBONE port 15008 is never captured). With --cleanup: remove the "
                   "ambient rules only.")
@click.pass_context
def iptables(ctx: click.Context, proxy_uid: int, proxy_gid: int | None, outbound_port: int, inbound_port: int,
             exclude_outbound_ports: str, exclude_inbound_ports: str, exclude_outbound_cidrs: str,
             include_outbound_cidrs: str, capture_inbound: bool, iptables_command: str, dry_run: bool,
             do_cleanup: bool, ambient: bool) -> None:
    """Capture the pod's TCP traffic for its sidecar: outbound -> 15001, inbound -> 15006
    (run in the pod's network namespace, as root with NET_ADMIN)."""
    tools = Iptables(iptables_command)
    if ambient:
        _ambient_iptables(ctx, tools, outbound_port, inbound_port, dry_run, do_cleanup)
        return
    if do_cleanup:
        _remove_rules(tools, dry_run, cleanup_rules, cleanup, "capture rules")
        return
    try:
        spec = CaptureSpec(
            proxy_uid=proxy_uid, proxy_gid=proxy_gid, outbound_port=outbound_port, inbound_port=inbound_port,
            exclude_outbound_ports=parse_ports(exclude_outbound_ports, "--exclude-outbound-ports"),
            exclude_inbound_ports=parse_ports(exclude_inbound_ports, "--exclude-inbound-ports"),
            exclude_outbound_cidrs=parse_cidrs(exclude_outbound_cidrs, "--exclude-outbound-cidrs") or (),
            include_outbound_cidrs=parse_cidrs(include_outbound_cidrs, "--include-outbound-cidrs", allow_all=True),
            capture_inbound=capture_inbound,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    _install_rules(dry_run, lambda: render_rules(spec), lambda: apply(spec, tools),
                   f"meshline: capture rules applied (outbound -> {outbound_port}"
                   f"{f', inbound -> {inbound_port}' if capture_inbound else ''}, proxy uid {proxy_uid})")


def _ambient_iptables(ctx: click.Context, tools: Iptables, outbound_port: int, inbound_port: int, dry_run: bool,
                      do_cleanup: bool) -> None:
    """`meshline iptables --ambient [--cleanup] [--dry-run]`."""
    given = [f"--{n.replace('_', '-')}" for n in SIDECAR_ONLY_OPTIONS
             if ctx.get_parameter_source(n) is not ParameterSource.DEFAULT]
    if given:
        raise click.UsageError(f"{', '.join(given)}: sidecar options, not valid with --ambient")
    if do_cleanup:
        _remove_rules(tools, dry_run, cleanup_ambient_rules, cleanup_ambient, "ambient capture rules")
        return
    try:
        spec = AmbientSpec(outbound_port=outbound_port, inbound_port=inbound_port)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    _install_rules(dry_run, lambda: render_ambient_rules(spec), lambda: apply_ambient(spec, tools),
                   f"meshline: ambient capture rules applied (outbound -> {outbound_port}, inbound -> "
                   f"{inbound_port}, mark {spec.mark:#x} exempt)")


def _remove_rules(tools: Iptables, dry_run: bool, script: Callable[[str | None], str | None],
                  remove: Callable[[Iptables], bool], what: str) -> None:
    """--cleanup: print the removal script for the current state (--dry-run), or remove."""
    try:
        if dry_run:
            click.echo(script(_saved_or_none(tools)) or "# nothing to clean up\n", nl=False)
            return
        removed = remove(tools)
    except IptablesError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"meshline: {what} removed" if removed else f"meshline: no {what} to remove", err=True)


def _install_rules(dry_run: bool, script: Callable[[], str], install: Callable[[], object], done: str) -> None:
    """Print the install script (--dry-run), or install and say so on stderr."""
    if dry_run:
        click.echo(script(), nl=False)
        return
    try:
        install()
    except IptablesError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(done, err=True)


def _saved_or_none(tools: Iptables) -> str | None:
    try:
        return tools.save_nat()
    except IptablesError:
        return None  # state unknown: show the script for a full install


def _get(url: str, timeout: float = 2.0, method: str = "GET") -> tuple[int, str]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), ""


@click.command("proxy-wait")
@click.option("--url", default="http://127.0.0.1:15021/healthz/ready", show_default=True)
@click.option("--timeout", type=click.FloatRange(0), default=600.0, show_default=True)
@click.option("--interval", type=click.FloatRange(0.01), default=0.25, show_default=True)
def proxy_wait(url: str, timeout: float, interval: float) -> None:
    """Wait until the local proxy is ready (classic sidecar postStart hook); exit 1 on timeout."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        try:
            status, _ = _get(url)
            if status == 200:
                return
            last = f"HTTP {status}"
        except (OSError, urllib.error.URLError) as exc:
            last = str(exc)
        if time.monotonic() >= deadline:
            click.echo(f"meshline: proxy not ready after {timeout:g}s ({last})", err=True)
            sys.exit(1)
        time.sleep(interval)


def _inbound_active(admin: str) -> int:
    _, text = _get(f"http://{admin}/stats?filter=^listener\\.0\\.0\\.0\\.0_15006\\.downstream_cx_active$")
    total = 0
    for line in text.splitlines():
        _, _, value = line.partition(":")
        if value.strip().isdigit():
            total += int(value)
    return total


@click.command("proxy-drain")
@click.option("--admin-address", default="127.0.0.1:15000", show_default=True)
@click.option("--min-wait", type=click.FloatRange(0), default=5.0, show_default=True,
              help="Keep serving at least this long (the app may still be sending).")
@click.option("--timeout", type=click.FloatRange(0), default=20.0, show_default=True)
def proxy_drain(admin_address: str, min_wait: float, timeout: float) -> None:
    """Drain the local proxy before it is stopped (classic sidecar preStop hook): stop taking
    new inbound connections, keep outbound working, return when inbound connections are gone."""
    start = time.monotonic()
    try:
        _get(f"http://{admin_address}/drain_listeners?graceful&inboundonly", method="POST")
    except (OSError, urllib.error.URLError) as exc:
        click.echo(f"meshline: cannot reach the proxy admin ({exc}); not draining", err=True)
        return
    time.sleep(min_wait)
    while time.monotonic() - start < timeout:
        try:
            if _inbound_active(admin_address) == 0:
                return
        except (OSError, urllib.error.URLError):
            return
        time.sleep(0.2)


COMMANDS = (iptables, proxy_wait, proxy_drain)
"""Registered by `controlplane.cli._register`."""
