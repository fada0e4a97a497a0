"""`meshline ca ...`: operator commands on a CA directory (the one `meshline serve --ca-dir`
uses): root rotation in two steps, the roots in the bundle, and minting a bootstrap token
for a CSR client. Registered on the main group by `controlplane.cli`. Does file I/O."""

from __future__ import annotations

import os
from pathlib import Path

import click

DEFAULT_CA_DIR = Path(".meshline/ca")


def default_ca_dir() -> Path:
    """`$MESHLINE_CA_DIR`, else `.meshline/ca` under the current directory."""
    env = os.environ.get("MESHLINE_CA_DIR")
    return Path(env) if env else DEFAULT_CA_DIR


def _duration(_ctx: click.Context, param: click.Parameter, value: str | None) -> object:
    from controlplane.ca.identity import parse_duration

    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from None


ca_dir_option = click.option(
    "--ca-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="CA directory. Default: $MESHLINE_CA_DIR, else .meshline/ca under the current directory.")


@click.group("ca")
def ca_group() -> None:
    """The built-in CA: root rotation, roots, tokens."""


@ca_group.command("rotate-root")
@ca_dir_option
@click.option("--trust-domain", default="cluster.local", show_default=True)
@click.option("--root-ttl", default="3650d", show_default=True, callback=_duration)
def rotate_root(ca_dir: Path | None, trust_domain: str, root_ttl: object) -> None:
    """Create a new root; keep the previous one in the trust bundle (overlap). A running
    `meshline serve` pushes the two-root bundle, then re-issues workload certificates from
    the new root. Finish with `meshline ca finish-rotation`."""
    import datetime as dt

    from controlplane.ca import CAError
    from controlplane.ca.rotation import rotate_root as do_rotate

    assert isinstance(root_ttl, dt.timedelta)
    d = ca_dir or default_ca_dir()
    try:
        info = do_rotate(d, trust_domain, root_ttl=root_ttl)
    except CAError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"new root {info.fingerprint[:16]} ({info.subject}, until {info.not_after:%Y-%m-%d}) signs from now "
               f"on; the previous root stays trusted until `meshline ca finish-rotation --ca-dir {d}`")


@ca_group.command("finish-rotation")
@ca_dir_option
def finish_rotation(ca_dir: Path | None) -> None:
    """Drop the previous root(s) from the trust bundle. Run it once workloads hold
    certificates from the new root (one workload certificate lifetime after rotate-root)."""
    from controlplane.ca import CAError
    from controlplane.ca.rotation import finish_rotation as do_finish

    try:
        dropped = do_finish(ca_dir or default_ca_dir())
    except CAError as exc:
        raise click.ClickException(str(exc)) from None
    if not dropped:
        click.echo("no rotation in progress: the bundle holds only the signing root")
    for r in dropped:
        click.echo(f"dropped root {r.fingerprint[:16]} ({r.subject})")


@ca_group.command("roots")
@ca_dir_option
def roots(ca_dir: Path | None) -> None:
    """List the roots in the trust bundle (`*` marks the signing one)."""
    from controlplane.ca import CAError
    from controlplane.ca.rotation import roots as list_roots

    try:
        infos = list_roots(ca_dir or default_ca_dir())
    except CAError as exc:
        raise click.ClickException(str(exc)) from None
    for r in infos:
        click.echo(f"{'*' if r.signing else ' '} {r.fingerprint}  until {r.not_after:%Y-%m-%d}  {r.subject}")


@ca_group.command("token")
@ca_dir_option
@click.option("--namespace", required=True)
@click.option("--service-account", required=True)
@click.option("--ttl", default="365d", show_default=True, callback=_duration, help="e.g. 3600, 12h, 365d")
def token(ca_dir: Path | None, namespace: str, service_account: str, ttl: object) -> None:
    """Print a bootstrap token for NAMESPACE/SERVICE_ACCOUNT (for xDS or the CSR API on
    15012: `authorization: Bearer <token>`)."""
    import datetime as dt

    from controlplane.ca import CAError, tokens
    from controlplane.ca.identity import Identity

    assert isinstance(ttl, dt.timedelta)
    try:
        key = tokens.load_or_create_token_key(ca_dir or default_ca_dir())
        click.echo(tokens.mint(key, Identity(namespace, service_account), ttl))
    except CAError as exc:
        raise click.ClickException(str(exc)) from None


COMMANDS = [ca_group]
