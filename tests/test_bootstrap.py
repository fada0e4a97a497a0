"""`meshline bootstrap` as a user runs it: the YAML it prints, that real Envoy accepts it
(`envoy --mode validate`, and a running Envoy's own view of its node), and usage errors.
Does process I/O."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from controlplane.localrun import envoy_binary, free_port, start_envoy, stop, wait_http
from tests.clirun import CliResult, run_cli

REPO = Path(__file__).resolve().parent.parent
SIDECAR = ("--node-id", "reviews-v1-abc.bookinfo", "--namespace", "bookinfo", "--workload", "reviews-v1-abc",
           "--service-account", "bookinfo-reviews", "--labels", "app=reviews,version=v1")
HTTP2_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def run_bootstrap(*args: str) -> CliResult:
    return run_cli("bootstrap", *args, cwd=REPO)


def bootstrap_doc(*args: str) -> dict[str, Any]:
    proc = run_bootstrap(*args)
    assert proc.returncode == 0, proc.stderr
    doc = yaml.safe_load(proc.stdout)
    assert isinstance(doc, dict)
    return doc


def xds_cluster(doc: dict[str, Any]) -> dict[str, Any]:
    [grpc_service] = doc["dynamic_resources"]["ads_config"]["grpc_services"]
    name = grpc_service["envoy_grpc"]["cluster_name"]
    [cluster] = [c for c in doc["static_resources"]["clusters"] if c["name"] == name]
    return cluster


def cluster_address(cluster: dict[str, Any]) -> tuple[str, int]:
    [locality] = cluster["load_assignment"]["endpoints"]
    [lb] = locality["lb_endpoints"]
    sock = lb["endpoint"]["address"]["socket_address"]
    return sock["address"], sock["port_value"]


def envoy_validate(text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "bootstrap.yaml"
    cfg.write_text(text)
    return subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(cfg)],
                          capture_output=True, text=True, timeout=60)


# --------------------------------------------------------------------------- printed YAML


def test_sidecar_bootstrap_carries_node_identity_and_metadata() -> None:
    doc = bootstrap_doc(*SIDECAR)
    node = doc["node"]
    assert node["id"] == "reviews-v1-abc.bookinfo"
    assert node["metadata"] == {
        "mode": "sidecar",
        "namespace": "bookinfo",
        "workload": "reviews-v1-abc",
        "service_account": "bookinfo-reviews",
        "labels": {"app": "reviews", "version": "v1"},
        "capture": "bind",
    }


def test_metadata_defaults_and_other_modes() -> None:
    node = bootstrap_doc("--node-id", "ztunnel-node-a", "--namespace", "meshline-system",
                         "--mode", "node", "--node-name", "node-a", "--capture", "intercept")["node"]
    assert node["id"] == "ztunnel-node-a"
    meta = node["metadata"]
    assert (meta["mode"], meta["namespace"], meta["capture"]) == ("node", "meshline-system", "intercept")
    assert meta["service_account"] == "default"
    assert meta["labels"] == {}
    assert "workload" not in meta
    assert meta["node"] == "node-a"
    waypoint = bootstrap_doc("--node-id", "wp-1", "--namespace", "shop", "--mode", "waypoint",
                             "--waypoint", "shop-wp")
    assert waypoint["node"]["metadata"]["waypoint"] == "shop-wp"
    assert waypoint["bootstrap_extensions"][0]["name"] == "envoy.bootstrap.internal_listener"


def test_ads_is_delta_by_default_over_an_http2_xds_cluster() -> None:
    doc = bootstrap_doc(*SIDECAR)
    dyn = doc["dynamic_resources"]
    assert dyn["ads_config"]["api_type"] == "DELTA_GRPC"
    assert dyn["ads_config"]["set_node_on_first_message_only"] is True
    assert dyn["cds_config"]["ads"] == {}
    assert dyn["lds_config"]["ads"] == {}
    cluster = xds_cluster(doc)
    # Without HTTP/2 on the xDS cluster, ADS fails silently.
    assert cluster["typed_extension_protocol_options"][HTTP2_OPTIONS]["explicit_http_config"] == {
        "http2_protocol_options": {}}
    assert cluster_address(cluster) == ("127.0.0.1", 15010)
    assert doc["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 15000}


def test_sotw_protocol_selects_grpc_api_type() -> None:
    doc = bootstrap_doc(*SIDECAR, "--xds-protocol", "sotw")
    assert doc["dynamic_resources"]["ads_config"]["api_type"] == "GRPC"
    assert HTTP2_OPTIONS in xds_cluster(doc)["typed_extension_protocol_options"]


def test_addresses_are_used() -> None:
    doc = bootstrap_doc(*SIDECAR, "--xds-address", "10.1.2.3:16010", "--admin-address", "127.0.0.1:19000")
    assert cluster_address(xds_cluster(doc)) == ("10.1.2.3", 16010)
    assert doc["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 19000}

    dns = xds_cluster(bootstrap_doc(*SIDECAR, "--xds-address", "meshline.meshline-system.svc:15010"))
    assert cluster_address(dns) == ("meshline.meshline-system.svc", 15010)
    assert dns["type"] in ("STRICT_DNS", "LOGICAL_DNS")

    v6 = xds_cluster(bootstrap_doc(*SIDECAR, "--xds-address", "[::1]:15010"))
    assert cluster_address(v6) == ("::1", 15010)


def test_bind_capture_opens_no_shared_ports_but_intercept_serves_health_and_stats() -> None:
    bind = bootstrap_doc(*SIDECAR)
    assert bind["static_resources"].get("listeners", []) == []

    intercept = bootstrap_doc(*SIDECAR, "--capture", "intercept")
    ports = {ln["address"]["socket_address"]["port_value"] for ln in intercept["static_resources"]["listeners"]}
    assert ports == {15021, 15090}


# --------------------------------------------------------------------------- accepted by Envoy


VALIDATE_CASES = {
    "sidecar-bind": SIDECAR,
    "sidecar-intercept": (*SIDECAR, "--capture", "intercept"),
    "sidecar-sotw": (*SIDECAR, "--xds-protocol", "sotw"),
    "node": ("--mode", "node", "--node-id", "node-a", "--node-name", "node-a", "--namespace", "meshline-system",
             "--capture", "intercept"),
    "waypoint": ("--mode", "waypoint", "--node-id", "waypoint-1", "--namespace", "bookinfo",
                 "--service-account", "waypoint"),
    "dns-xds-address": (*SIDECAR, "--xds-address", "meshline.meshline-system.svc:15010"),
    # Values YAML 1.1 readers (Envoy's yaml-cpp) take as booleans must stay strings.
    "boolean-like-values": ("--node-id", "n", "--namespace", "ns", "--labels", "canary=y,legacy=N"),
}


@pytest.mark.parametrize("args", list(VALIDATE_CASES.values()), ids=list(VALIDATE_CASES))
def test_envoy_accepts_the_bootstrap(args: tuple[str, ...], tmp_path: Path) -> None:
    proc = run_bootstrap(*args)
    assert proc.returncode == 0, proc.stderr
    result = envoy_validate(proc.stdout, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


def test_envoy_rejects_a_broken_bootstrap(tmp_path: Path) -> None:
    # The validation above is meaningful: Envoy does reject a bad config in this mode.
    text = run_bootstrap(*SIDECAR).stdout.replace("DELTA_GRPC", "CARRIER_PIGEON")
    assert envoy_validate(text, tmp_path).returncode != 0


def test_running_envoy_reports_the_node_metadata_as_strings(tmp_path: Path) -> None:
    admin_port = free_port()
    unused_xds = free_port()
    proc = run_bootstrap("--node-id", "y", "--namespace", "bookinfo", "--workload", "reviews-v1",
                         "--labels", "app=reviews,canary=n,version=1", "--capture", "bind",
                         "--admin-address", f"127.0.0.1:{admin_port}", "--xds-address", f"127.0.0.1:{unused_xds}")
    assert proc.returncode == 0, proc.stderr
    envoy = start_envoy(proc.stdout, tmp_path, "envoy")
    try:
        wait_http(f"http://127.0.0.1:{admin_port}/server_info", proc=envoy)
        dump = httpx.get(f"http://127.0.0.1:{admin_port}/config_dump", timeout=5).json()
    finally:
        stop(envoy)
    [boot] = [c for c in dump["configs"] if c["@type"].endswith("BootstrapConfigDump")]
    node = boot["bootstrap"]["node"]
    assert node["id"] == "y"
    assert node["metadata"]["labels"] == {"app": "reviews", "canary": "n", "version": "1"}
    assert node["metadata"]["workload"] == "reviews-v1"
    assert node["metadata"]["namespace"] == "bookinfo"


# --------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize("labels", ["app", "app=reviews,version", "=v1"])
def test_bad_labels_is_a_usage_error_naming_the_flag(labels: str) -> None:
    proc = run_bootstrap(*SIDECAR, "--labels", labels)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "--labels" in proc.stderr


@pytest.mark.parametrize("flag", ["--xds-address", "--admin-address"])
@pytest.mark.parametrize("address", ["meshline", "127.0.0.1:", ":15010", "127.0.0.1:http", "127.0.0.1:70000",
                                     "127.0.0.1:0", "mesh line:15010"])
def test_bad_address_is_a_usage_error_naming_the_flag(flag: str, address: str) -> None:
    proc = run_bootstrap(*SIDECAR, flag, address)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert flag in proc.stderr
    assert address in proc.stderr


def test_missing_node_id_is_a_usage_error() -> None:
    proc = run_bootstrap("--namespace", "bookinfo")
    assert proc.returncode == 2
    assert "--node-id" in proc.stderr
