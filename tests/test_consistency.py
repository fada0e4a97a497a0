"""The consistency check of proxy snapshots before a push (controlplane/cache/consistency.py):
a snapshot whose routes, listeners or clusters name a cluster, load assignment, route
configuration or secret the proxy does not get is reported; the runtime counts it and still
pushes (or, in strict mode as the tests run, raises and pushes nothing)."""

from __future__ import annotations

import logging

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from google.protobuf import any_pb2

from controlplane.cache.consistency import ConsistencyChecker, InconsistentSnapshot, check_messages
from controlplane.cache.snapshot import SnapshotBuilder, proxy_key
from controlplane.model.ir import ProxyMeta
from controlplane.model.mesh import Mesh
from controlplane.runtime import Runtime, Settings
from controlplane.translate.plan import CLUSTER, ENDPOINT, LISTENER, ROUTE, ResourceSpec, build_all
from controlplane.xds.server import Connection
from controlplane.xds.stream import AdsStream


def _pack(msg: object) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)  # type: ignore[arg-type]
    return a


def _ads() -> config_source_pb2.ConfigSource:
    src = config_source_pb2.ConfigSource()
    src.ads.SetInParent()
    return src


def http_listener(name: str, rds: str) -> listener_pb2.Listener:
    h = hcm_pb2.HttpConnectionManager(stat_prefix=name)
    h.rds.route_config_name = rds
    h.rds.config_source.CopyFrom(_ads())
    lst = listener_pb2.Listener(name=name)
    lst.filter_chains.add().filters.add(name="envoy.filters.network.http_connection_manager", typed_config=_pack(h))
    return lst


def tcp_listener(name: str, cluster: str) -> listener_pb2.Listener:
    lst = listener_pb2.Listener(name=name)
    tp = tcp_proxy_pb2.TcpProxy(stat_prefix=name, cluster=cluster)
    lst.filter_chains.add().filters.add(name="envoy.filters.network.tcp_proxy", typed_config=_pack(tp))
    return lst


def routes(name: str, cluster: str, weighted: tuple[str, ...] = (), mirror: str = "") -> route_pb2.RouteConfiguration:
    rc = route_pb2.RouteConfiguration(name=name)
    vh = rc.virtual_hosts.add(name="vh", domains=["*"])
    r = vh.routes.add()
    r.match.prefix = "/"
    r.route.cluster = cluster
    if mirror:
        r.route.request_mirror_policies.add(cluster=mirror)
    if weighted:
        w = vh.routes.add()
        w.match.prefix = "/w"
        for c in weighted:
            w.route.weighted_clusters.clusters.add(name=c).weight.value = 1
    return rc


def eds_cluster(name: str, secret: str = "") -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS)
    c.eds_cluster_config.eds_config.CopyFrom(_ads())
    if secret:
        ctx = tls_pb2.UpstreamTlsContext()
        sds = ctx.common_tls_context.tls_certificate_sds_secret_configs.add(name=secret)
        sds.sds_config.CopyFrom(_ads())
        c.transport_socket.name = "envoy.transport_sockets.tls"
        c.transport_socket.typed_config.CopyFrom(_pack(ctx))
    return c


def cla(name: str) -> endpoint_pb2.ClusterLoadAssignment:
    return endpoint_pb2.ClusterLoadAssignment(cluster_name=name)


def broken_plan(mesh: Mesh, meta: ProxyMeta) -> list[ResourceSpec]:
    """A route to a missing cluster (and one present), a weighted split and a mirror naming
    missing clusters, a listener naming a missing RDS name, an EDS cluster without its load
    assignment, a secret nobody serves, and a tcp_proxy to the bootstrap's static cluster."""
    return [
        ResourceSpec(LISTENER, "http", http_listener, ("http", "r1")),
        ResourceSpec(LISTENER, "http-2", http_listener, ("http-2", "r-gone")),
        ResourceSpec(LISTENER, "xds", tcp_listener, ("xds", "xds-grpc")),
        ResourceSpec(LISTENER, "tcp", tcp_listener, ("tcp", "c-tcp-gone")),
        ResourceSpec(ROUTE, "r1", routes, ("r1", "c-gone", ("c1", "c-split-gone"), "c-mirror-gone")),
        ResourceSpec(CLUSTER, "c1", eds_cluster, ("c1", "default")),
        ResourceSpec(CLUSTER, "c2", eds_cluster, ("c2",)),
        ResourceSpec(ENDPOINT, "c1", cla, ("c1",)),
    ]


EXPECTED = {
    ("cluster", "c-gone"), ("cluster", "c-split-gone"), ("cluster", "c-mirror-gone"), ("cluster", "c-tcp-gone"),
    ("route", "r-gone"), ("endpoint", "c2"), ("secret", "default"),
}


def test_every_kind_of_missing_name_is_reported_with_what_refers_to_it() -> None:
    found = check_messages(build_all(broken_plan(Mesh(), ProxyMeta("p"))))
    assert {(i.kind, i.missing) for i in found} == EXPECTED
    by_name = {i.missing: i for i in found}
    assert by_name["c-gone"].referrer == (ROUTE, "r1")
    assert by_name["r-gone"].referrer == (LISTENER, "http-2")
    assert by_name["c2"].referrer == (CLUSTER, "c2")
    assert "RouteConfiguration 'r1' refers to cluster 'c-gone'" in str(by_name["c-gone"])
    # Secrets served apart (by the CA, or none by design) are not checked when told so.
    assert "default" not in {i.missing for i in check_messages(build_all(broken_plan(Mesh(), ProxyMeta("p"))),
                                                               secrets=False)}


def test_a_consistent_snapshot_passes_and_repeated_checks_reuse_the_parsed_references() -> None:
    def fine(mesh: Mesh, meta: ProxyMeta) -> list[ResourceSpec]:
        return [ResourceSpec(LISTENER, "http", http_listener, ("http", "r1")),
                ResourceSpec(ROUTE, "r1", routes, ("r1", "c1")),
                ResourceSpec(CLUSTER, "c1", eds_cluster, ("c1",)),
                ResourceSpec(ENDPOINT, "c1", cla, ("c1",))]

    meta = ProxyMeta("p")
    snap = SnapshotBuilder(fine, lambda m, p: [], lambda p: 0).rebuild(Mesh(), [meta])[proxy_key(meta)]
    checker = ConsistencyChecker()
    assert checker.check(snap) == []
    broken = SnapshotBuilder(broken_plan, lambda m, p: [], lambda p: 0).rebuild(Mesh(), [meta])[proxy_key(meta)]
    assert {(i.kind, i.missing) for i in checker.check(broken)} == EXPECTED
    checker.prune()
    assert checker.check(snap) == []


def _runtime(mode: str) -> tuple[Runtime, Connection]:
    rt = Runtime(Settings(consistency=mode, validator_binary=None), [])  # type: ignore[arg-type]
    rt.builder = SnapshotBuilder(broken_plan, lambda m, p: [], lambda p: 0)
    conn = Connection(ProxyMeta("sidecar~shop/web-1", namespace="shop"), AdsStream("delta", 7))
    rt.xds.connections[7] = conn
    return rt, conn


def test_the_runtime_counts_and_logs_an_inconsistent_snapshot_and_still_pushes_it(
        caplog: pytest.LogCaptureFixture) -> None:
    rt, conn = _runtime("count")
    with caplog.at_level(logging.ERROR, logger="controlplane.runtime"):
        rt.rebuild_now()
    assert conn.stream.target is not None  # pushed: a missing cluster fails one route, not the proxy
    counted = {kind: rt.metrics.registry.get_sample_value("meshline_snapshot_inconsistencies_total", {"type": kind})
               for kind in ("cluster", "route", "endpoint", "secret")}
    # No CA and an unauthenticated stream: secrets are never served to it, so not counted.
    assert counted == {"cluster": 4, "route": 1, "endpoint": 1, "secret": None}
    logged = [r.getMessage() for r in caplog.records]
    assert any("sidecar~shop/web-1" in m and "'c-gone'" in m for m in logged)
    rt.rebuild_now()  # the same snapshot again: not counted twice
    assert rt.metrics.registry.get_sample_value("meshline_snapshot_inconsistencies_total", {"type": "cluster"}) == 4


def test_strict_mode_raises_and_pushes_nothing() -> None:
    rt, conn = _runtime("raise")
    with pytest.raises(InconsistentSnapshot, match="sidecar~shop/web-1: RouteConfiguration 'r1' refers to"):
        rt.rebuild_now()
    assert conn.stream.target is None


def test_the_mode_comes_from_the_environment_and_a_typo_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHLINE_CONSISTENCY", "raise")
    assert Settings().consistency == "raise"
    monkeypatch.setenv("MESHLINE_CONSISTENCY", "count")
    assert Settings().consistency == "count"
    monkeypatch.setenv("MESHLINE_CONSISTENCY", "strict")
    with pytest.raises(ValueError, match="MESHLINE_CONSISTENCY must be 'count' or 'raise', not 'strict'"):
        Settings()


def test_a_route_to_a_destination_the_mesh_lacks_is_reported_but_strict_mode_lets_it_through(
        caplog: pytest.LogCaptureFixture) -> None:
    """A VirtualService naming a subset no DestinationRule defines (or an unknown host/port):
    the user's configuration, answered 503 by Envoy as with Istio; counted, logged as a
    warning, pushed even in strict mode."""
    gone = "outbound|9080|v9|reviews.default.svc.cluster.local"

    def dangling(mesh: Mesh, meta: ProxyMeta) -> list[ResourceSpec]:
        return [ResourceSpec(LISTENER, "http", http_listener, ("http", "r1")),
                ResourceSpec(ROUTE, "r1", routes, ("r1", gone))]

    (problem,) = check_messages(build_all(dangling(Mesh(), ProxyMeta("p"))))
    assert problem.user_destination and problem.missing == gone
    assert not [p for p in check_messages(build_all(broken_plan(Mesh(), ProxyMeta("p")))) if p.user_destination]
    rt, conn = _runtime("raise")
    rt.builder = SnapshotBuilder(dangling, lambda m, p: [], lambda p: 0)
    with caplog.at_level(logging.WARNING, logger="controlplane.runtime"):
        rt.rebuild_now()
    assert conn.stream.target is not None
    assert rt.metrics.registry.get_sample_value("meshline_snapshot_inconsistencies_total", {"type": "cluster"}) == 1
    assert any(r.levelno == logging.WARNING and gone in r.getMessage() for r in caplog.records)
