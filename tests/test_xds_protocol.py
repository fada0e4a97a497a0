"""xDS protocol behaviour over real gRPC with an in-process client: SotW and delta
ACK/NACK, nonces, subscriptions, reconnect, ordering and shared serialization."""

from __future__ import annotations

from envoy.config.endpoint.v3 import endpoint_pb2

from controlplane.translate.plan import CLUSTER, ENDPOINT, LISTENER, ROUTE
from tests.xdsharness import XdsFixture, make_cla, make_cluster, names_of


def clusters(*names: str, timeout: int = 1) -> dict[str, object]:
    return {n: make_cluster(n, timeout) for n in names}


def cla_names(resp: object) -> list[str]:
    return names_of(resp, endpoint_pb2.ClusterLoadAssignment)


async def test_sotw_initial_response_ack_and_update(fx: XdsFixture) -> None:
    fx.control.publish({CLUSTER: clusters("a", "b")})
    c = fx.client("sotw")
    c.send(CLUSTER)
    r1 = await c.recv()
    assert r1.type_url == CLUSTER and r1.nonce and r1.version_info
    assert sorted(names_of(r1)) == ["a", "b"]
    c.send(CLUSTER, version=r1.version_info, nonce=r1.nonce)  # ACK
    await c.expect_nothing()
    conn = next(iter(fx.xds.connections.values()))
    st = conn.stream.view(CLUSTER)
    assert st is not None and st.version_acked == r1.version_info and not st.pending_nonces

    fx.control.publish({CLUSTER: clusters("a", "b", "c")})
    r2 = await c.recv()
    assert r2.nonce != r1.nonce and r2.version_info != r1.version_info
    assert sorted(names_of(r2)) == ["a", "b", "c"]
    await c.close()


async def test_sotw_nack_recorded_not_resent_and_later_updates_flow(fx: XdsFixture) -> None:
    fx.control.publish({CLUSTER: clusters("a", "b")})
    c = fx.client("sotw")
    c.send(CLUSTER)
    r1 = await c.recv()
    c.send(CLUSTER, version=r1.version_info, nonce=r1.nonce)
    # "b" changes to something Envoy rejects.
    fx.control.publish({CLUSTER: {"a": make_cluster("a"), "b": make_cluster("b", 99)}})
    r2 = await c.recv()
    c.send(CLUSTER, version=r1.version_info, nonce=r2.nonce, error="cluster b: bad connect_timeout")
    # The rejected state is never sent again...
    await c.expect_nothing(0.5)
    conn = next(iter(fx.xds.connections.values()))
    st = conn.stream.view(CLUSTER)
    assert st is not None and st.last_nack is not None and "bad connect_timeout" in st.last_nack.message
    assert st.last_nack.resources == ("b",)
    assert st.version_acked == r1.version_info
    # ...but a later good change of another resource gets through, with the accepted "b".
    fx.control.publish({CLUSTER: {"a": make_cluster("a", 3), "b": make_cluster("b", 99)}})
    r3 = await c.recv()
    got = {}
    for a in r3.resources:
        m = make_cluster("x")
        a.Unpack(m)
        got[m.name] = m.connect_timeout.seconds
    assert got == {"a": 3, "b": 1}
    c.send(CLUSTER, version=r3.version_info, nonce=r3.nonce)
    # Fixing "b" lifts the quarantine.
    fx.control.publish({CLUSTER: {"a": make_cluster("a", 3), "b": make_cluster("b", 5)}})
    r4 = await c.recv()
    got = {}
    for a in r4.resources:
        m = make_cluster("x")
        a.Unpack(m)
        got[m.name] = m.connect_timeout.seconds
    assert got == {"a": 3, "b": 5}
    await c.close()


async def test_sotw_nack_of_an_earlier_response_still_counts(fx: XdsFixture) -> None:
    fx.control.publish({ENDPOINT: {"a": make_cla("a"), "b": make_cla("b")}})
    c = fx.client("sotw")
    c.send(ENDPOINT, names=["a", "b"])
    r1 = await c.recv()
    c.send(ENDPOINT, names=["a", "b"], version=r1.version_info, nonce=r1.nonce)
    fx.control.publish({ENDPOINT: {"a": make_cla("a", 2), "b": make_cla("b")}})
    r2 = await c.recv()  # a changed
    fx.control.publish({ENDPOINT: {"a": make_cla("a", 2), "b": make_cla("b", 3)}})
    r3 = await c.recv()  # b changed; sent before Envoy answered r2
    assert cla_names(r2) == ["a"] and cla_names(r3) == ["b"]
    # Envoy answers every response in order: r2 rejected (a), r3 accepted (b).
    c.send(ENDPOINT, names=["a", "b"], version=r1.version_info, nonce=r2.nonce, error="a is bad")
    c.send(ENDPOINT, names=["a", "b"], version=r3.version_info, nonce=r3.nonce)
    await c.expect_nothing()  # the rejected a is not resent
    stream = next(iter(fx.xds.connections.values())).stream
    st = stream.view(ENDPOINT)
    assert st is not None and st.last_nack is not None and st.last_nack.resources == ("a",)
    acked_a, held = stream.acked_resource(ENDPOINT, "a"), {r.name: r for r in stream.held_resources(ENDPOINT)}
    assert acked_a is not None and acked_a.version != held["b"].version
    assert not st.pending_nonces and set(st.quarantine) == {"a"}  # a is held back; b went through
    assert st.state == "NACKED"
    await c.close()


async def test_sotw_partial_cds_rejection_keeps_the_valid_clusters(fx: XdsFixture) -> None:
    # Envoy applies the valid clusters of a rejected CDS response: the next full state must
    # not drop them (that would delete them from Envoy).
    fx.control.publish({CLUSTER: clusters("a")})
    c = fx.client("sotw")
    c.send(CLUSTER)
    r1 = await c.recv()
    c.send(CLUSTER, version=r1.version_info, nonce=r1.nonce)
    fx.control.publish({CLUSTER: {"a": make_cluster("a"), "bad": make_cluster("bad"), "good": make_cluster("good")}})
    r2 = await c.recv()
    c.send(CLUSTER, version=r1.version_info, nonce=r2.nonce,
           error="Error adding/updating cluster(s) bad: invalid thing")
    fx.control.publish({CLUSTER: {"a": make_cluster("a", 3), "bad": make_cluster("bad"),
                                  "good": make_cluster("good")}})
    r3 = await c.recv()
    assert sorted(names_of(r3)) == ["a", "bad", "good"]  # full state still names every cluster
    st = next(iter(fx.xds.connections.values())).stream.view(CLUSTER)
    assert st is not None and st.last_nack is not None and st.last_nack.resources == ("bad",)  # only the named one is blamed
    await c.close()


async def test_sotw_named_subscribe_and_unsubscribe(fx: XdsFixture) -> None:
    fx.control.publish({CLUSTER: clusters("a", "b"), ENDPOINT: {"a": make_cla("a"), "b": make_cla("b", 2)}})
    c = fx.client("sotw")
    c.send(ENDPOINT, names=["a"])
    r1 = await c.recv()
    assert cla_names(r1) == ["a"]
    c.send(ENDPOINT, names=["a", "b"], version=r1.version_info, nonce=r1.nonce)
    r2 = await c.recv()
    assert sorted(cla_names(r2)) == ["a", "b"]
    c.send(ENDPOINT, names=["b"], version=r2.version_info, nonce=r2.nonce)
    r3 = await c.recv()
    assert cla_names(r3) == ["b"]
    # An update to an unsubscribed resource is not pushed.
    c.send(ENDPOINT, names=["b"], version=r3.version_info, nonce=r3.nonce)
    fx.control.publish({CLUSTER: clusters("a", "b"), ENDPOINT: {"a": make_cla("a", 3), "b": make_cla("b", 2)}})
    await c.expect_nothing()
    await c.close()


async def test_delta_wildcard_updates_removals_and_ack(fx: XdsFixture) -> None:
    fx.control.publish({CLUSTER: clusters("a", "b")})
    c = fx.client("delta")
    c.send_delta(CLUSTER)
    r1 = await c.recv()
    assert sorted(r.name for r in r1.resources) == ["a", "b"]
    versions = {r.name: r.version for r in r1.resources}
    c.send_delta(CLUSTER, nonce=r1.nonce)
    fx.control.publish({CLUSTER: {"a": make_cluster("a", 7), "b": make_cluster("b")}})
    r2 = await c.recv()
    assert [r.name for r in r2.resources] == ["a"] and not r2.removed_resources
    assert r2.resources[0].version != versions["a"]
    c.send_delta(CLUSTER, nonce=r2.nonce)
    fx.control.publish({CLUSTER: {"a": make_cluster("a", 7)}})
    r3 = await c.recv()
    assert not r3.resources and list(r3.removed_resources) == ["b"]
    c.send_delta(CLUSTER, nonce=r3.nonce)
    await c.expect_nothing()
    await c.close()


async def test_delta_nack_then_good_update(fx: XdsFixture) -> None:
    fx.control.publish({CLUSTER: clusters("a", "b")})
    c = fx.client("delta")
    c.send_delta(CLUSTER)
    r1 = await c.recv()
    c.send_delta(CLUSTER, nonce=r1.nonce)
    fx.control.publish({CLUSTER: {"a": make_cluster("a", 9), "b": make_cluster("b")}})
    r2 = await c.recv()
    c.send_delta(CLUSTER, nonce=r2.nonce, error="a is bad")
    await c.expect_nothing(0.5)
    fx.control.publish({CLUSTER: {"a": make_cluster("a", 9), "b": make_cluster("b", 4)}})
    r3 = await c.recv()
    assert [r.name for r in r3.resources] == ["b"]
    st = next(iter(fx.xds.connections.values())).stream.view(CLUSTER)
    assert st is not None and st.last_nack is not None and st.last_nack.message == "a is bad"
    await c.close()


async def test_delta_named_subscribe_unsubscribe_and_absent(fx: XdsFixture) -> None:
    fx.control.publish({ENDPOINT: {"a": make_cla("a"), "b": make_cla("b")}})
    c = fx.client("delta")
    c.send_delta(ENDPOINT, subscribe=["a", "missing"])
    r1 = await c.recv()
    assert [r.name for r in r1.resources] == ["a"]
    assert list(r1.removed_resources) == ["missing"]  # tells Envoy it does not exist
    c.send_delta(ENDPOINT, nonce=r1.nonce, subscribe=["b"], unsubscribe=["a"])
    r2 = await c.recv()
    assert [r.name for r in r2.resources] == ["b"]
    c.send_delta(ENDPOINT, nonce=r2.nonce)
    fx.control.publish({ENDPOINT: {"a": make_cla("a", 4), "b": make_cla("b")}})
    await c.expect_nothing()
    await c.close()


async def test_delta_reconnect_with_initial_versions_sends_only_changes(fx: XdsFixture) -> None:
    fx.control.publish({CLUSTER: clusters("a", "b")})
    c = fx.client("delta")
    c.send_delta(CLUSTER)
    r1 = await c.recv()
    held = {r.name: r.version for r in r1.resources}
    c.send_delta(CLUSTER, nonce=r1.nonce)
    await c.close()
    # Same server state: a reconnect that holds everything gets nothing.
    c2 = fx.client("delta")
    c2.send_delta(CLUSTER, initial=held)
    await c2.expect_nothing(0.5)
    await c2.close()
    # One resource changed while away: only that one is sent.
    fx.control.publish({CLUSTER: {"a": make_cluster("a"), "b": make_cluster("b", 8)}})
    c3 = fx.client("delta")
    c3.send_delta(CLUSTER, initial=held)
    r = await c3.recv()
    assert [x.name for x in r.resources] == ["b"]
    await c3.close()


async def test_sotw_reconnect_gets_full_state(fx: XdsFixture) -> None:
    fx.control.publish({CLUSTER: clusters("a")})
    c = fx.client("sotw")
    c.send(CLUSTER)
    r1 = await c.recv()
    await c.close()
    c2 = fx.client("sotw")
    c2.send(CLUSTER, version=r1.version_info)  # what Envoy sends after a restart of the server
    r2 = await c2.recv()
    assert names_of(r2) == ["a"] and r2.version_info == r1.version_info
    await c2.close()


async def test_make_before_break_order(fx: XdsFixture) -> None:
    from tests.xdsharness import make_cla as cla

    fx.control.publish({CLUSTER: clusters("old"), ENDPOINT: {"old": cla("old")}})
    c = fx.client("delta")
    c.send_delta(CLUSTER)
    r = await c.recv()
    c.send_delta(CLUSTER, nonce=r.nonce)
    c.send_delta(ENDPOINT, subscribe=["old"])
    r = await c.recv()
    c.send_delta(ENDPOINT, nonce=r.nonce)
    c.send_delta(LISTENER)
    r = await c.recv()
    c.send_delta(LISTENER, nonce=r.nonce)
    c.send_delta(ROUTE, subscribe=["80"])
    r = await c.recv()
    c.send_delta(ROUTE, nonce=r.nonce)
    await c.expect_nothing()

    # Replace cluster "old" by "new" and change the route config at the same time.
    from envoy.config.route.v3 import route_pb2

    fx.control.publish({CLUSTER: clusters("new"), ENDPOINT: {"new": cla("new")},
                        ROUTE: {"80": route_pb2.RouteConfiguration(name="80")}})
    first = await c.recv()
    assert first.type_url == CLUSTER and [x.name for x in first.resources] == ["new"]
    assert not first.removed_resources  # removal comes last
    # While "new" warms, Envoy asks for its endpoints: answered at once...
    c.send_delta(ENDPOINT, subscribe=["new"])
    eds = await c.recv()
    assert eds.type_url == ENDPOINT and [x.name for x in eds.resources] == ["new"]
    c.send_delta(ENDPOINT, nonce=eds.nonce)
    # ...but routes that may point at it wait until the clusters are ACKed (warm).
    await c.expect_nothing(0.3)
    c.send_delta(CLUSTER, nonce=first.nonce)
    seen = []
    for _ in range(3):
        r = await c.recv()
        seen.append((r.type_url, [x.name for x in r.resources], list(r.removed_resources)))
        c.send_delta(r.type_url, nonce=r.nonce)
    assert seen[0] == (ROUTE, ["80"], [])
    assert seen[1] == (CLUSTER, [], ["old"])  # removals last: the cluster, then its endpoints
    assert seen[2] == (ENDPOINT, [], ["old"])
    await c.close()


async def test_one_serialization_per_resource_shared_by_streams(fx: XdsFixture) -> None:
    fx.control.publish({CLUSTER: clusters(*[f"c{i}" for i in range(50)])})
    before = fx.control.memo.stats.serializations
    clients = [fx.client("sotw" if i % 2 else "delta", node_id=f"p{i}") for i in range(6)]
    for cl in clients:
        cl.send(CLUSTER) if cl.protocol == "sotw" else cl.send_delta(CLUSTER)
    for cl in clients:
        r = await cl.recv()
        assert len(r.resources) == 50
        cl.send(CLUSTER, version=r.version_info, nonce=r.nonce) if cl.protocol == "sotw" else cl.send_delta(
            CLUSTER, nonce=r.nonce)
    assert fx.control.memo.stats.serializations == before  # streams serialized nothing
    fx.control.publish({CLUSTER: {**clusters(*[f"c{i}" for i in range(50)]), "c7": make_cluster("c7", 2)}})
    for cl in clients:
        await cl.recv()
    assert fx.control.memo.stats.serializations == before + 1  # one changed resource, six proxies
    for cl in clients:
        await cl.close()


async def test_sotw_endpoint_update_sends_only_the_changed_assignment(fx: XdsFixture) -> None:
    fx.control.publish({ENDPOINT: {n: make_cla(n) for n in ("a", "b", "c")}})
    c = fx.client("sotw")
    c.send(ENDPOINT, names=["a", "b", "c"])
    r1 = await c.recv()
    assert sorted(cla_names(r1)) == ["a", "b", "c"]
    c.send(ENDPOINT, names=["a", "b", "c"], version=r1.version_info, nonce=r1.nonce)
    fx.control.publish({ENDPOINT: {"a": make_cla("a"), "b": make_cla("b", 3), "c": make_cla("c")}})
    r2 = await c.recv()
    # EDS is not a full-state type in SotW: unchanged assignments are not resent.
    assert cla_names(r2) == ["b"] and r2.version_info != r1.version_info
    c.send(ENDPOINT, names=["a", "b", "c"], version=r2.version_info, nonce=r2.nonce)
    await c.expect_nothing()
    stream = next(iter(fx.xds.connections.values())).stream
    st = stream.view(ENDPOINT)
    assert st is not None and st.version_acked == r2.version_info
    assert [r.name for r in stream.held_resources(ENDPOINT)] == ["a", "b", "c"]
    await c.close()


async def test_per_type_cluster_service_works_without_ads(fx: XdsFixture) -> None:
    import grpc
    from envoy.config.core.v3 import base_pb2
    from envoy.service.cluster.v3 import cds_pb2_grpc
    from envoy.service.discovery.v3 import discovery_pb2

    fx.control.publish({CLUSTER: clusters("a", "b")})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{fx.port}") as ch:
        stub = cds_pb2_grpc.ClusterDiscoveryServiceStub(ch)
        req = discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER, node=base_pb2.Node(id="cds-only"))
        call = stub.DeltaClusters(iter([req]))
        resp = await call.read()
        assert sorted(r.name for r in resp.resources) == ["a", "b"]
        call.cancel()
