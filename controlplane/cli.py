"""The `meshline` command line: the composition root. Parses flags into Settings and
wires sources, runtime, xDS and status servers. Does I/O."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import click

from controlplane import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="meshline")
def main() -> None:
    """Meshline: a service-mesh control plane for Envoy (sidecar and sidecarless)."""


@main.command()
@click.option("--config-dir", "config_dirs", multiple=True, type=click.Path(path_type=Path),
              help="Directory of mesh YAML (repeatable). Default: ./samples/bookinfo when no source is given.")
@click.option("--kubernetes", is_flag=True, help="Watch a Kubernetes cluster (may be combined with --config-dir).")
@click.option("--kubeconfig", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Kubeconfig for --kubernetes. Default: $KUBECONFIG, else the in-cluster service account.")
@click.option("--watch-namespaces", default=None, metavar="A,B",
              help="With --kubernetes: watch only these namespaces (comma-separated). Default: all.")
@click.option("--namespace", "single_namespace", default=None, help="With --kubernetes: watch only this namespace.")
@click.option("--istio-api", is_flag=True,
              help="With --kubernetes: also watch Istio's networking.istio.io/v1 VirtualServices and DestinationRules.")
@click.option("--leader-lease-seconds", default=15.0, show_default=True, type=click.FloatRange(1, 3600),
              help="With --kubernetes: Lease duration for leader election (handover time after a crash).")
@click.option("--xds-address", default="127.0.0.1:15010", show_default=True)
@click.option("--status-address", default="127.0.0.1:15014", show_default=True)
@click.option("--webhook-address", default=None)
@click.option("--debounce-ms", default=100, show_default=True, type=int)
@click.option("--status-token-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Require `Authorization: Bearer <token>` on the status API (token read from this file).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True)
def serve(config_dirs: tuple[Path, ...], kubernetes: bool, kubeconfig: Path | None, watch_namespaces: str | None,
          single_namespace: str | None, istio_api: bool, leader_lease_seconds: float, xds_address: str,
          status_address: str,
          webhook_address: str | None, debounce_ms: int, status_token_file: Path | None, log_level: str,
          log_format: str) -> None:
    """Run the control plane."""
    from controlplane.logs import setup_logging
    from controlplane.runtime import Settings
    from controlplane.serve import run

    setup_logging(log_level, log_format)
    namespaces = _watch_namespaces(kubernetes, kubeconfig, watch_namespaces, single_namespace, istio_api)
    if not config_dirs and not kubernetes:
        config_dirs = (Path("samples/bookinfo"),)
    settings = Settings(config_dirs=config_dirs, kubernetes=kubernetes, xds_address=xds_address,
                        status_address=status_address, webhook_address=webhook_address, debounce_ms=debounce_ms,
                        status_token_file=status_token_file, kubeconfig=kubeconfig, watch_namespaces=namespaces,
                        istio_api=istio_api, leader_lease_seconds=leader_lease_seconds)
    try:
        asyncio.run(run(settings))
    except KeyboardInterrupt:
        pass


def _watch_namespaces(kubernetes: bool, kubeconfig: Path | None, watch_namespaces: str | None,
                      single_namespace: str | None, istio_api: bool) -> tuple[str, ...] | None:
    """The namespaces `serve --kubernetes` watches (None: all), checking the flag combination."""
    if not kubernetes:
        for flag, given in (("--kubeconfig", kubeconfig is not None), ("--watch-namespaces", watch_namespaces is not None),
                            ("--namespace", single_namespace is not None), ("--istio-api", istio_api)):
            if given:
                raise click.UsageError(f"{flag} requires --kubernetes")
        return None
    if kubeconfig is None and not os.environ.get("KUBECONFIG") and not os.environ.get("KUBERNETES_SERVICE_HOST"):
        raise click.UsageError("--kubernetes needs --kubeconfig, $KUBECONFIG or an in-cluster service account")
    if watch_namespaces is not None and single_namespace is not None:
        raise click.UsageError("give either --watch-namespaces or --namespace, not both")
    raw = watch_namespaces if watch_namespaces is not None else single_namespace
    if raw is None:
        return None
    names = tuple(sorted({n.strip() for n in raw.split(",") if n.strip()}))
    if not names:
        raise click.BadParameter("no namespace given", param_hint="--watch-namespaces")
    return names


@main.command()
@click.option("--mode", type=click.Choice(["sidecar", "node", "waypoint"]), default="sidecar", show_default=True)
@click.option("--node-id", required=True)
@click.option("--namespace", required=True)
@click.option("--workload", default=None)
@click.option("--service-account", default="default", show_default=True)
@click.option("--labels", default="", help="k=v,k2=v2")
@click.option("--capture", type=click.Choice(["bind", "intercept"]), default="bind", show_default=True)
@click.option("--xds-protocol", type=click.Choice(["delta", "sotw"]), default="delta", show_default=True)
@click.option("--xds-address", default="127.0.0.1:15010", show_default=True)
@click.option("--admin-address", default="127.0.0.1:15000", show_default=True)
def bootstrap(mode: str, node_id: str, namespace: str, workload: str | None, service_account: str, labels: str,
              capture: str, xds_protocol: str, xds_address: str, admin_address: str) -> None:
    """Print an Envoy bootstrap (YAML) for a proxy."""
    from controlplane.bootstrap import BootstrapOptions, render, split_address
    from controlplane.model.ir import labels_of

    for flag, address in (("--xds-address", xds_address), ("--admin-address", admin_address)):
        try:
            split_address(address)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=flag) from exc
    pairs: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in labels.split(","))):
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise click.BadParameter(f"label {item!r} is not k=v", param_hint="--labels")
        pairs[k] = v
    opts = BootstrapOptions(
        node_id=node_id, namespace=namespace, mode=mode, workload=workload,  # type: ignore[arg-type]
        service_account=service_account, labels=labels_of(pairs), capture=capture,  # type: ignore[arg-type]
        xds_protocol=xds_protocol, xds_address=xds_address, admin_address=admin_address,
    )
    try:
        click.echo(render(opts), nl=False)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--warnings/--no-warnings", default=True, show_default=True)
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--status-address", envvar="MESHLINE_STATUS_ADDRESS", default=None,
              help="Also report objects a running control plane withholds because a proxy NACKed them.")
@click.option("--token", envvar="MESHLINE_STATUS_TOKEN", default=None)
def analyze(paths: tuple[str, ...], warnings: bool, output: str, status_address: str | None,
            token: str | None) -> None:
    """Validate mesh YAML offline: prints `file:line: Kind/ns/name: message`, exit 1 on errors."""
    import json

    from controlplane.analyze import analyze_paths

    issues = analyze_paths(paths)
    rows = [{"file": i.ref.file, "line": i.line or i.ref.line, "object": i.ref.display, "field": i.field,
             "severity": i.severity, "message": i.message, "text": i.format()} for i in issues]
    if status_address:
        from controlplane.cli_status import get_json

        for e in get_json(status_address, "/v1/config/errors", token):
            if e.get("nacked"):
                rows.append({k: e.get(k) for k in ("file", "line", "object", "field", "severity", "message",
                                                   "text")})
    errors = sum(1 for r in rows if r["severity"] == "error")
    shown = [r for r in rows if warnings or r["severity"] == "error"]
    if output == "json":
        click.echo(json.dumps(shown, indent=2))
    else:
        for r in shown:
            click.echo(r["text"])
    if errors:
        click.echo(f"{errors} error(s)", err=True)
        sys.exit(1)


def _register() -> None:
    from controlplane.cli_status import proxy_config, proxy_status, version

    main.add_command(proxy_status)
    main.add_command(proxy_config)
    main.add_command(version)
    from controlplane.cli_tools import COMMANDS
    for command in COMMANDS:
        main.add_command(command)


_register()

if __name__ == "__main__":
    main()
