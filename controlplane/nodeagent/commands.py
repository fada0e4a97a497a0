"""`meshline node-agent`: the per-node agent of sidecarless mode (see
`controlplane.nodeagent.agent`). Registered on the main group by `controlplane.cli`. Does
I/O (through the agent: /proc, mounts, iptables, Kubernetes, gRPC)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import click

DEFAULT_NETNS_DIR = "/var/run/meshline/netns"  # registry.DEFAULT_NETNS_DIR (not imported here: the CLI starts light)



@click.command("node-agent")
@click.option("--node", required=True, envvar="NODE_NAME", show_envvar=True,
              help="This node's name (spec.nodeName of its pods).")
@click.option("--xds-address", required=True, metavar="H:P",
              help="The control plane's TLS port (15012) serving NodeAgent.Report (`serve --node-agents`); its "
                   "plain port only on loopback (development).")
@click.option("--ca-bundle", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Connect over TLS, verifying the control plane against this PEM bundle (re-read each report). "
                   "Required with --token-file beyond loopback.")
@click.option("--server-name", default=None,
              help="With --ca-bundle: the DNS name the control plane's certificate must carry (default: the host "
                   "of --xds-address, or localhost for an IP).")
@click.option("--all-addresses", is_flag=True,
              help="Report to every address the --xds-address host resolves to (a headless Service: every "
                   "control-plane replica), not just one.")
@click.option("--kubeconfig", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="List pods from this cluster. Default: $KUBECONFIG, else the in-cluster service account.")
@click.option("--pods-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Instead of Kubernetes: a YAML/JSON list of {namespace, name, ips: [...], uid} (re-read each "
                   "pass; `uid`, the pod's metadata.uid, is how its netns is proven: without it a pod is found by IP, "
                   "and only in a netns of no Kubernetes pod).")
@click.option("--netns-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_NETNS_DIR,
              show_default=True, help="Where each pod's netns is bind-mounted, as <namespace>_<name>. The control "
                                      "plane refuses paths outside its node agents' directory (the default).")
@click.option("--interval", type=click.FloatRange(0.1), default=5.0, show_default=True,
              help="Seconds between passes (each pass reports the node's full set).")
@click.option("--token-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Send `authorization: Bearer <token>` with this file's token (re-read each report).")
@click.option("--no-iptables", "no_iptables", is_flag=True,
              help="Do not apply the ambient capture rules inside the pods' network namespaces.")
@click.option("--iptables-command", default="iptables", show_default=True,
              help="Tool family to run: iptables, iptables-nft or iptables-legacy (+ -save/-restore).")
@click.option("--once", is_flag=True, help="One pass and one report, then exit (1 if the report failed).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True)
def node_agent(node: str, xds_address: str, ca_bundle: Path | None, server_name: str | None, all_addresses: bool, kubeconfig: Path | None, pods_file: Path | None,
               netns_dir: Path, interval: float, token_file: Path | None, no_iptables: bool, iptables_command: str,
               once: bool, log_level: str, log_format: str) -> None:
    """Find each local ambient pod's network namespace, bind-mount it under --netns-dir, apply
    the in-pod capture rules and report pod -> netns path to the control plane (root, with
    CAP_SYS_ADMIN and CAP_NET_ADMIN, in the host's PID namespace)."""
    from controlplane.bootstrap import split_address
    from controlplane.logs import setup_logging
    from controlplane.nodeagent.agent import AgentConfig, AgentError, NodeAgent, load_pods_file
    from controlplane.nodeagent.discovery import PodRef

    setup_logging(log_level, log_format)
    try:
        split_address(xds_address)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--xds-address") from exc
    if pods_file is not None and kubeconfig is not None:
        raise click.UsageError("give either --pods-file or --kubeconfig, not both")
    if pods_file is not None:
        path = pods_file

        def list_pods() -> list[PodRef]:
            return load_pods_file(path)
    else:
        if kubeconfig is None and not os.environ.get("KUBECONFIG") and not os.environ.get("KUBERNETES_SERVICE_HOST"):
            raise click.UsageError("no pods: give --pods-file, or --kubeconfig / $KUBECONFIG / an in-cluster "
                                   "service account")
        from controlplane.nodeagent.agent import kubernetes_pod_lister

        list_pods = kubernetes_pod_lister(node, kubeconfig)
    config = AgentConfig(node=node, xds_address=xds_address, netns_dir=netns_dir, interval=interval,
                         token_file=token_file, iptables=not no_iptables, iptables_command=iptables_command,
                         all_addresses=all_addresses, ca_bundle=ca_bundle, server_name=server_name)
    agent = NodeAgent(config, list_pods)
    if once:
        try:
            accepted = asyncio.run(agent.run_once())
        except AgentError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"meshline: reported {accepted} ambient pod(s) of node {node}", err=True)
        return
    try:
        asyncio.run(agent.run())
    except KeyboardInterrupt:
        pass


COMMANDS = (node_agent,)
"""Registered by `controlplane.cli._register`."""
