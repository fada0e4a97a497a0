"""CLI commands that read the status REST API: proxy-status, proxy-config, version.
Does network I/O (HTTP client only)."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click
import httpx
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from controlplane import __version__

STATUS_ENV = "MESHLINE_STATUS_ADDRESS"
TOKEN_ENV = "MESHLINE_STATUS_TOKEN"
TYPES = ("clusters", "endpoints", "listeners", "routes", "secrets")
COLORS = {"SYNCED": "green", "STALE": "yellow", "NACKED": "red bold", "DEGRADED": "red bold", "NOT_SENT": "dim"}

status_option = click.option(
    "--status-address", envvar=STATUS_ENV, default="127.0.0.1:15014", show_default=True,
    help=f"Meshline status API (HOST:PORT or URL; env {STATUS_ENV}).",
)
token_option = click.option("--token", envvar=TOKEN_ENV, default=None, help=f"Bearer token (env {TOKEN_ENV}).")
output_option = click.option("-o", "--output", type=click.Choice(["table", "json", "yaml"]), default="table",
                             show_default=True)


def get_json(address: str, path: str, token: str | None, params: dict[str, str] | None = None) -> Any:
    base = address if address.startswith(("http://", "https://")) else f"http://{address}"
    headers = {"authorization": f"Bearer {token}"} if token else {}
    try:
        r = httpx.get(base.rstrip("/") + path, params=params, headers=headers, timeout=10)
    except httpx.HTTPError as exc:
        raise click.ClickException(f"cannot reach the Meshline status API at {base}: {exc}") from exc
    if r.status_code == 401:
        raise click.ClickException("the status API needs a bearer token (--token or MESHLINE_STATUS_TOKEN)")
    if r.status_code == 404:
        raise click.ClickException(r.json().get("detail", "not found"))
    if r.status_code >= 400:
        raise click.ClickException(f"status API answered {r.status_code}: {r.text[:200]}")
    return r.json()


def _emit(data: Any, output: str) -> None:
    if output == "json":
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        click.echo(yaml.safe_dump(data, sort_keys=True), nl=False)


def proxy_status_table(proxies: list[dict[str, Any]], console: Console) -> None:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("NAME", "NAMESPACE", "MODE", "XDS", "CDS", "EDS", "LDS", "RDS", "SDS", "STATE"):
        table.add_column(col, no_wrap=True)
    for p in proxies:
        cells = []
        for t in TYPES:
            info = p["types"].get(t)
            state = info["state"] if info else "-"
            cells.append(f"[{COLORS.get(state, '')}]{state}[/]" if state in COLORS else state)
        # column order CDS, EDS, LDS, RDS, SDS
        cds, eds, lds, rds, sds = cells
        overall = p["state"]
        table.add_row(p["id"], p["namespace"], p["mode"], p["protocol"], cds, eds, lds, rds, sds,
                      f"[{COLORS.get(overall, '')}]{overall}[/]")
    console.print(table)
    for p in proxies:
        for t in TYPES:
            info = p["types"].get(t)
            if info and info.get("last_nack") and info["state"] == "NACKED":
                n = info["last_nack"]
                srcs = ", ".join(s.get("location") or s["object"] for s in n["sources"]) or "unknown source"
                console.print(f"[red]{p['id']} {t} NACK[/]: {escape(n['message'].strip())} (from {escape(srcs)})")
        for d in p.get("degraded", []):
            if d["kind"] == "held-back":
                what = f"holds back {d['type']} {', '.join(d['resources'])} ({d['verdict']}: {d['detail']})"
            else:
                where = f" at {d['location']}" if d.get("location") else ""
                what = f"{d['kind']} {d['object']}{where}: {d['message']}"
            console.print(f"{p['id']} DEGRADED: {what}", markup=False, highlight=False)


@click.command("proxy-status")
@status_option
@token_option
@output_option
@click.option("--namespace", default=None)
def proxy_status(status_address: str, token: str | None, output: str, namespace: str | None) -> None:
    """Sync state of every connected proxy, per resource type."""
    params = {"namespace": namespace} if namespace else None
    proxies = get_json(status_address, "/v1/proxies", token, params)
    if output != "table":
        _emit(proxies, output)
        return
    console = Console(force_terminal=None if sys.stdout.isatty() else False, width=200,
                      no_color=not sys.stdout.isatty() or bool(os.environ.get("NO_COLOR")))
    proxy_status_table(proxies, console)


@click.command("proxy-config")
@click.argument("proxy_id")
@click.argument("type_", metavar="TYPE", type=click.Choice(TYPES))
@status_option
@token_option
@click.option("-o", "--output", type=click.Choice(["json", "yaml"]), default="yaml", show_default=True)
def proxy_config(proxy_id: str, type_: str, status_address: str, token: str | None, output: str) -> None:
    """What Meshline sent to a proxy (secrets show certificate metadata only)."""
    data = get_json(status_address, f"/v1/proxies/{proxy_id}/config", token, {"type": type_})
    _emit(data, output)


@click.command("version")
@status_option
@token_option
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--client", "client_only", is_flag=True, help="Only the client version.")
def version(status_address: str, token: str | None, output: str, client_only: bool) -> None:
    """Client and server versions."""
    info: dict[str, Any] = {"client": __version__}
    if not client_only:
        try:
            info["server"] = get_json(status_address, "/v1/mesh", token)["version"]
        except click.ClickException as exc:
            info["server"] = None
            info["server_error"] = exc.message
    if output == "json":
        click.echo(json.dumps(info, sort_keys=True))
        return
    click.echo(f"client version: {info['client']}")
    if not client_only:
        click.echo(f"server version: {info['server'] or 'unavailable (' + info.get('server_error', '') + ')'}")


@click.group("quarantine")
def quarantine() -> None:
    """Objects withheld mesh-wide because Meshline's own Envoy rejects what they produce."""


@quarantine.command("list")
@status_option
@token_option
@output_option
def quarantine_list(status_address: str, token: str | None, output: str) -> None:
    """Withheld objects, where they are defined and why."""
    rows = get_json(status_address, "/v1/quarantine", token)
    if output != "table":
        _emit(rows, output)
        return
    if not rows:
        click.echo("nothing is withheld")
    for r in rows:
        where = f" ({r['location']})" if r.get("location") else ""
        click.echo(f"{r['object']}{where}: {r['reason']}")


@quarantine.command("release")
@click.argument("obj", metavar="KIND/NAMESPACE/NAME")
@status_option
@token_option
def quarantine_release(obj: str, status_address: str, token: str | None) -> None:
    """Offer a withheld object again (pre-flight withholds it again if Envoy still rejects it)."""
    base = status_address if status_address.startswith(("http://", "https://")) else f"http://{status_address}"
    headers = {"authorization": f"Bearer {token}"} if token else {}
    try:
        r = httpx.post(base.rstrip("/") + "/v1/quarantine/release", json={"object": obj}, headers=headers,
                       timeout=10)
    except httpx.HTTPError as exc:
        raise click.ClickException(f"cannot reach the Meshline status API at {base}: {exc}") from exc
    if r.status_code >= 400:
        raise click.ClickException(str(r.json().get("detail", r.text[:200])))
    click.echo(f"released {', '.join(r.json()['released'])}")
