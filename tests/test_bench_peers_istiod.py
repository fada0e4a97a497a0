"""The istiod bench peer's pure parts (issue 20), no istiod or API server needed: the Istio
sidecar identity the simulated clients present, what counts as "holds everything" for an
istiod sidecar, the API objects of the bench mesh, and the skip (with the reason) when Go
is missing."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH) not in sys.path:
    sys.path.append(str(BENCH))

import harness  # noqa: E402
import meshfiles  # noqa: E402
import simclients  # noqa: E402
from peers import istiod, istiod_clients  # noqa: E402


def test_node_id_is_an_istio_sidecar_id() -> None:
    assert istiod_clients.node_id(7, "bench") == "sidecar~10.240.0.7~bench-proxy-00007.bench~bench.svc.cluster.local"
    assert istiod_clients.node_id(300, "ns1").split("~")[1] == "10.240.1.44"


def test_proxy_ips_are_distinct_and_apart_from_the_mesh_addresses() -> None:
    ips = {istiod_clients.proxy_ip(c) for c in range(1000)}
    assert len(ips) == 1000
    mesh = {a for s in range(1000) for a in meshfiles.default_addresses(s, 10)}
    assert not ips & mesh
    with pytest.raises(ValueError, match="65535"):
        istiod_clients.proxy_ip(65536)


def test_node_metadata_carries_what_istiod_reads() -> None:
    node = istiod_clients.make_node(3, "bench")
    md = node.metadata
    assert md["NAMESPACE"] == "bench"
    assert md["CLUSTER_ID"] == "Kubernetes"
    assert md["ISTIO_VERSION"].startswith("1.")
    assert md["NAME"] == "bench-proxy-00003"
    assert md["INSTANCE_IPS"] == "10.240.0.3"
    assert dict(md["LABELS"]) == {"app": "bench-proxy"}
    assert node.id.startswith("sidecar~10.240.0.3~")
    assert node.cluster == "bench-proxy.bench"


def _client() -> istiod_clients.IstioClient:
    return istiod_clients.IstioClient(0, "delta", None, istiod_clients.make_node(0, "bench"),  # type: ignore[arg-type]
                                      simclients.Decoder(), simclients.Out(), simclients.Stats(clients=1), {})


def test_holds_everything_needs_istiods_own_clusters_and_listeners() -> None:
    c = _client()
    mesh = "outbound|8080||svc-00000.bench.svc.cluster.local"
    c.clusters = {mesh: simclients.Info(mesh, (mesh,))}
    c.eds_names = {mesh}
    c.cla = {mesh: simclients.Info(mesh, ("10.0.0.1",))}
    c.listeners = {"0.0.0.0_8080": simclients.Info("0.0.0.0_8080", ("8080",))}
    c.rds_names = {"8080"}
    c.routes = {"8080": simclients.Info("8080")}
    assert simclients.Client.holds_everything(c)  # enough for Meshline's sidecar ...
    assert not c.holds_everything()  # ... not for istiod's
    c.clusters.update({n: simclients.Info(n) for n in istiod_clients.EXTRA_CLUSTERS})
    assert not c.holds_everything()
    c.listeners.update({n: simclients.Info(n) for n in istiod_clients.EXTRA_LISTENERS})
    assert c.holds_everything()


def test_expected_counts_for_istiod() -> None:
    good = {"clusters": 1000 + 4, "endpoints": 1000 + 1, "listeners": 4, "routes": 1}
    assert istiod_clients.expected_counts_problem(good, 1000) is None
    why = istiod_clients.expected_counts_problem({**good, "clusters": 1000, "endpoints": 1000}, 1000)
    assert why is not None and "1004 clusters" in why and "BlackHoleCluster" in why
    why = istiod_clients.expected_counts_problem({**good, "listeners": 1}, 1000)
    assert why is not None and "virtualOutbound" in why


def test_mesh_objects_are_the_bench_mesh() -> None:
    objs = istiod.mesh_objects(3, 10)
    assert [o["metadata"]["name"] for o in objs[:2]] == ["istio-system", "bench"]
    services = [o for o in objs if o["kind"] == "Service"]
    slices = [o for o in objs if o["kind"] == "EndpointSlice"]
    assert [s["metadata"]["name"] for s in services] == ["svc-00000", "svc-00001", "svc-00002"]
    for s, (svc, sl) in enumerate(zip(services, slices, strict=True)):
        assert svc["metadata"]["namespace"] == sl["metadata"]["namespace"] == "bench"
        assert svc["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": 8080}]
        assert sl["metadata"]["labels"]["kubernetes.io/service-name"] == svc["metadata"]["name"]
        assert [e["addresses"][0] for e in sl["endpoints"]] == meshfiles.default_addresses(s, 10)
        assert istiod.slice_url(s) == f"{istiod._collection(sl)}/{sl['metadata']['name']}"
    assert istiod._collection(objs[0]) == "/api/v1/namespaces"
    assert istiod._collection(services[0]) == "/api/v1/namespaces/bench/services"
    assert istiod._collection(slices[0]) == "/apis/discovery.k8s.io/v1/namespaces/bench/endpointslices"


def test_a_change_is_the_same_slice_with_new_addresses() -> None:
    addrs = meshfiles.default_addresses(5, 10)
    addrs[2] = "10.250.0.6"
    sl = istiod.endpoint_slice(5, addrs)
    assert sl["metadata"]["name"] == "svc-00005-1"
    assert [e["addresses"][0] for e in sl["endpoints"]] == addrs
    assert all(e["conditions"] == {"ready": True} for e in sl["endpoints"])


def test_without_go_the_peer_is_skipped_with_the_reason(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bash = shutil.which("bash")
    assert bash is not None
    bindir = tmp_path / "bin"  # a PATH with the tools build.sh needs but no `go`
    bindir.mkdir()
    for tool in ("bash", "dirname", "sha256sum", "cut", "cat", "mkdir", "env"):
        found = shutil.which(tool)
        if found:
            (bindir / tool).symlink_to(found)
    monkeypatch.setenv("PATH", str(bindir))
    monkeypatch.setenv("MESHLINE_CACHE", str(tmp_path / "cache"))
    p = subprocess.run([bash, str(BENCH / "peers" / "istiod" / "build.sh")], capture_output=True, text=True,
                       env=dict(os.environ))
    assert p.returncode == 1
    assert "no 'go' on PATH" in p.stderr
    with pytest.raises(harness.BenchError, match="no 'go' on PATH"):
        asyncio.run(istiod.build())
