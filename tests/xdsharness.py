"""Test harness for the xDS layer: a controllable snapshot source and an in-process
gRPC ADS client (the official generated stubs from xds-protos)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import duration_pb2, struct_pb2

from controlplane.cache.resources import ResourceMemo
from controlplane.cache.snapshot import Snapshot, TypeResources
from controlplane.model.ir import TypeUrl
from controlplane.translate.plan import CLUSTER, ENDPOINT, PUSH_ORDER, ResourceSpec
from controlplane.xds.server import Connection, XdsServer, start_grpc


def make_cluster(name: str, timeout_s: int = 1) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS,
                            connect_timeout=duration_pb2.Duration(seconds=timeout_s))
    c.eds_cluster_config.eds_config.ads.SetInParent()
    c.eds_cluster_config.service_name = name
    return c


def make_cla(name: str, n: int = 1) -> endpoint_pb2.ClusterLoadAssignment:
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    loc = cla.endpoints.add()
    for i in range(n):
        ep = loc.lb_endpoints.add()
        ep.endpoint.address.socket_address.address = f"127.0.0.{i + 2}"
        ep.endpoint.address.socket_address.port_value = 8080
    return cla


def _ident(m: Any) -> Any:
    return m


class FakeControl:
    """Plays the composition root: hands every connection the current snapshot."""

    def __init__(self) -> None:
        self.memo = ResourceMemo()
        self.types: dict[TypeUrl, TypeResources] = {}
        self.snapshot: Snapshot | None = None
        self.conns: list[Connection] = []
        self.generation = 0

    def publish(self, resources: Mapping[TypeUrl, Mapping[str, Any]]) -> Snapshot:
        self.generation += 1
        self.memo.begin_round()
        types: dict[TypeUrl, TypeResources] = {}
        for t in PUSH_ORDER:
            items = {n: self.memo.realize(ResourceSpec(t, n, _ident, (m,))) for n, m in resources.get(t, {}).items()}
            prev = self.types.get(t)
            if prev is not None and prev.items.keys() == items.keys() and all(
                prev.items[n] is r for n, r in items.items()
            ):
                types[t] = prev
            else:
                types[t] = TypeResources(t, items, prev)
        self.memo.end_round()
        self.types = types
        self.snapshot = Snapshot(types, self.generation)
        for c in self.conns:
            c.update(self.snapshot)
        return self.snapshot

    def attach(self, conn: Connection) -> None:
        self.conns.append(conn)
        if self.snapshot is not None:
            conn.update(self.snapshot)

    def detach(self, conn: Connection) -> None:
        self.conns.remove(conn)


class XdsFixture:
    def __init__(self) -> None:
        self.control = FakeControl()
        self.xds = XdsServer(self.control)
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server, self.port = await start_grpc("127.0.0.1:0", self.xds.handlers())

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)

    def client(self, protocol: str = "sotw", node_id: str = "proxy-1", **meta: str) -> AdsClient:
        return AdsClient(f"127.0.0.1:{self.port}", protocol, node_id, meta)


class AdsClient:
    """A scripted Envoy: sends requests, receives decoded responses."""

    def __init__(self, target: str, protocol: str, node_id: str, meta: Mapping[str, str],
                 metadata: Sequence[tuple[str, str]] = (), channel: grpc.aio.Channel | None = None) -> None:
        """`metadata`: gRPC metadata on the stream (e.g. authorization); `channel`: use this
        channel (e.g. a TLS one) instead of an insecure channel to `target`."""
        self.channel = channel if channel is not None else grpc.aio.insecure_channel(target)
        self.protocol = protocol
        self.node = base_pb2.Node(id=node_id, cluster="test")
        md = struct_pb2.Struct()
        md.update({"namespace": "default", **meta})
        self.node.metadata.CopyFrom(md)
        self.requests: asyncio.Queue[Any] = asyncio.Queue()
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)

        async def gen() -> Any:
            while True:
                r = await self.requests.get()
                if r is None:
                    return
                yield r

        md = tuple(metadata) or None
        if protocol == "sotw":
            self.call = stub.StreamAggregatedResources(gen(), metadata=md)
        else:
            self.call = stub.DeltaAggregatedResources(gen(), metadata=md)
        self._first = True
        self.responses: asyncio.Queue[Any] = asyncio.Queue()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        # A cancelled read() cancels the whole RPC, so one task reads and tests wait on a queue.
        try:
            async for resp in self.call:
                self.responses.put_nowait(resp)
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as exc:
            self.responses.put_nowait(exc)

    def _with_node(self, req: Any) -> Any:
        if self._first:
            req.node.CopyFrom(self.node)
            self._first = False
        return req

    def send(self, type_url: str, names: list[str] | None = None, version: str = "", nonce: str = "",
             error: str | None = None) -> None:
        req = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names or [], version_info=version,
                                             response_nonce=nonce)
        if error is not None:
            req.error_detail.code = 13
            req.error_detail.message = error
        self.requests.put_nowait(self._with_node(req))

    def send_delta(self, type_url: str, subscribe: list[str] | None = None, unsubscribe: list[str] | None = None,
                   nonce: str = "", error: str | None = None,
                   initial: Mapping[str, str] | None = None) -> None:
        req = discovery_pb2.DeltaDiscoveryRequest(
            type_url=type_url, resource_names_subscribe=subscribe or [],
            resource_names_unsubscribe=unsubscribe or [], response_nonce=nonce,
            initial_resource_versions=dict(initial or {}))
        if error is not None:
            req.error_detail.code = 13
            req.error_detail.message = error
        self.requests.put_nowait(self._with_node(req))

    async def recv(self, timeout: float = 30.0) -> Any:
        r = await asyncio.wait_for(self.responses.get(), timeout)
        if isinstance(r, BaseException):
            raise AssertionError(f"stream ended: {r!r}")
        return r

    async def expect_nothing(self, within: float = 0.3) -> None:
        try:
            r = await asyncio.wait_for(self.responses.get(), within)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected response: {r}")

    async def close(self) -> None:
        self.requests.put_nowait(None)
        self.call.cancel()
        self._reader.cancel()
        await self.channel.close()


def names_of(resp: Any, cls: Any = cluster_pb2.Cluster) -> list[str]:
    out = []
    for a in resp.resources:
        any_msg = a.resource if hasattr(a, "resource") and a.HasField("resource") else a
        m = cls()
        any_msg.Unpack(m)
        out.append(m.name if hasattr(m, "name") and m.name else getattr(m, "cluster_name", ""))
    return out


__all__ = ["CLUSTER", "ENDPOINT", "AdsClient", "XdsFixture", "make_cla", "make_cluster", "names_of"]
