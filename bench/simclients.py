"""Simulated Envoy ADS clients for the benchmark: many gRPC streams in one asyncio loop
(grpc.aio), run as its own process by bench/run.py. Does network I/O (ADS streams) and
talks to its parent over stdin/stdout.

Each client behaves like Envoy's ADS startup: wildcard CDS; on clusters, subscribe EDS
for every EDS cluster received, then ACK CDS; once every cluster has its
ClusterLoadAssignment, wildcard LDS; on listeners, subscribe RDS for the
`rds.route_config_name`s of their HttpConnectionManagers, then ACK LDS; ACK everything
with the response's nonce (and, SotW, its version and the current subscription). With
`--mix mixed` (the default) even client ids use delta xDS and odd ones
state-of-the-world; `--mix delta` / `--mix sotw` use one protocol for all.

Protocol with the parent, one JSON object per line:
  stdout  {"e": "ready"}                                       imports done, waiting for "go"
          {"e": "full", "c": id, "t": ts, "counts": {...}}     client holds the full config
          {"e": "eds", "n": cluster, "a": [addr...], "ct": [[id, ts]...]}
                                                              a CLA changed after "full" for
                                                              these clients; ts = when each
                                                              client's ACK was written
          {"e": "stats", ...}                                  answer to "stats"
          {"e": "error", "c": id, "msg": "..."}                a stream failed (not retried)
  stdin   "go" (connect), "stats", "quit"; EOF also quits.
Timestamps are time.time() (the parent compares them with its own file-write times).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
SHORT = {CLUSTER: "CDS", ENDPOINT: "EDS", LISTENER: "LDS", ROUTE: "RDS"}
ADS = "envoy.service.discovery.v3.AggregatedDiscoveryService"
HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


# --------------------------------------------------------------------------- decoding
@dataclass(frozen=True, slots=True)
class Info:
    """What a client needs from one resource. Interned by the resource's bytes: every
    client receives the same bytes, so each distinct resource is decoded once."""

    name: str
    refs: tuple[str, ...] = ()  # CDS: its EDS service name; LDS: route config names; EDS: addresses


def _cluster(b: bytes) -> Info:
    c = cluster_pb2.Cluster.FromString(b)
    eds = c.type == cluster_pb2.Cluster.EDS or c.HasField("eds_cluster_config")
    return Info(c.name, (c.eds_cluster_config.service_name or c.name,) if eds else ())


def _cla(b: bytes) -> Info:
    cla = endpoint_pb2.ClusterLoadAssignment.FromString(b)
    addrs = sorted(lb.endpoint.address.socket_address.address for loc in cla.endpoints for lb in loc.lb_endpoints)
    return Info(cla.cluster_name, tuple(addrs))


def _listener(b: bytes) -> Info:
    lst = listener_pb2.Listener.FromString(b)
    chains = list(lst.filter_chains)
    if lst.HasField("default_filter_chain"):
        chains.append(lst.default_filter_chain)
    names: set[str] = set()
    for ch in chains:
        for f in ch.filters:
            if f.HasField("typed_config") and f.typed_config.type_url == HCM_TYPE:
                hcm = hcm_pb2.HttpConnectionManager.FromString(f.typed_config.value)
                if hcm.HasField("rds"):
                    names.add(hcm.rds.route_config_name)
    return Info(lst.name, tuple(sorted(names)))


def _route(b: bytes) -> Info:
    return Info(route_pb2.RouteConfiguration.FromString(b).name)


DECODERS = {CLUSTER: _cluster, ENDPOINT: _cla, LISTENER: _listener, ROUTE: _route}


class Decoder:
    def __init__(self) -> None:
        self.cache: dict[str, dict[bytes, Info]] = {t: {} for t in DECODERS}

    def info(self, type_url: str, value: bytes) -> Info:
        c = self.cache[type_url]
        i = c.get(value)
        if i is None:
            i = c[value] = DECODERS[type_url](value)
        return i


# --------------------------------------------------------------------------- output
class Out:
    """Buffered JSON-lines writer, flushed from the loop every few milliseconds. CLA changes
    are grouped: one line per (cluster, addresses) per flush lists every client that got it,
    so a change seen by a thousand clients costs a few lines, not a thousand (the parent
    shares these two cores with the control plane)."""

    def __init__(self) -> None:
        self.buf: list[str] = []
        self.eds_groups: dict[tuple[str, tuple[str, ...]], list[tuple[int, float]]] = {}

    def emit(self, **ev: Any) -> None:
        self.buf.append(json.dumps(ev, separators=(",", ":")))

    def eds(self, cid: int, cluster: str, addrs: tuple[str, ...], t: float) -> None:
        self.eds_groups.setdefault((cluster, addrs), []).append((cid, t))

    def flush(self) -> None:
        for (cluster, addrs), got in self.eds_groups.items():
            self.emit(e="eds", n=cluster, a=list(addrs), ct=got)
        self.eds_groups.clear()
        if self.buf:
            sys.stdout.write("\n".join(self.buf) + "\n")
            sys.stdout.flush()
            self.buf.clear()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(0.005)
            self.flush()


@dataclass
class Stats:
    responses: Counter[str] = field(default_factory=Counter)
    resources: Counter[str] = field(default_factory=Counter)
    bytes: Counter[str] = field(default_factory=Counter)
    errors: int = 0
    clients: int = 0
    full: int = 0


def _serialize(req: Any) -> bytes:
    return bytes(req.SerializeToString())


# --------------------------------------------------------------------------- one client
class Client:
    def __init__(self, cid: int, protocol: str, channel: grpc.aio.Channel, node: base_pb2.Node,
                 dec: Decoder, out: Out, stats: Stats,
                 templates: dict[tuple[str, frozenset[str]], discovery_pb2.DiscoveryRequest]) -> None:
        self.cid, self.protocol, self.channel, self.node = cid, protocol, channel, node
        self.dec, self.out, self.stats = dec, out, stats
        self.clusters: dict[str, Info] = {}
        self.eds_names: set[str] = set()
        self.cla: dict[str, Info] = {}
        self.listeners: dict[str, Info] = {}
        self.rds_names: set[str] = set()
        self.routes: dict[str, Info] = {}
        self.version: dict[str, str] = {}  # SotW: last version_info per type
        self.nonce: dict[str, str] = {}  # SotW: last nonce per type
        self.lds_requested = False
        self.full = False
        self.first = True
        self.templates = templates
        self.template: dict[str, tuple[set[str] | None, discovery_pb2.DiscoveryRequest]] = {}

    # requests -------------------------------------------------------------------
    def _sotw(self, type_url: str, names: set[str] | None = None) -> discovery_pb2.DiscoveryRequest:
        # The subscription part is built once per distinct set of names and copied in C (a
        # SotW EDS ACK repeats a thousand names; Envoy does not rebuild them in Python either).
        mine = self.template.get(type_url)
        if mine is not None and mine[0] is names:  # (the name sets are replaced, never mutated)
            template = mine[1]
        else:
            key = (type_url, frozenset(names) if names else frozenset())
            template = self.templates.get(key)
            if template is None:
                if len(self.templates) > 64:
                    self.templates.clear()
                template = self.templates[key] = discovery_pb2.DiscoveryRequest(
                    type_url=type_url, resource_names=sorted(names) if names else [])
            self.template[type_url] = (names, template)
        req = discovery_pb2.DiscoveryRequest()
        req.CopyFrom(template)
        req.version_info = self.version.get(type_url, "")
        req.response_nonce = self.nonce.get(type_url, "")
        if self.first:
            req.node.CopyFrom(self.node)
            self.first = False
        return req

    def _delta(self, type_url: str, nonce: str = "", sub: list[str] | None = None,
               unsub: list[str] | None = None) -> discovery_pb2.DeltaDiscoveryRequest:
        req = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, response_nonce=nonce,
                                                  resource_names_subscribe=sub or [],
                                                  resource_names_unsubscribe=unsub or [])
        if self.first:
            req.node.CopyFrom(self.node)
            self.first = False
        return req

    def _request(self, type_url: str, names: set[str] | None, old: set[str]) -> Any:
        """A subscription change for a named type (EDS/RDS)."""
        if self.protocol == "sotw":
            return self._sotw(type_url, names)
        new = names or set()
        return self._delta(type_url, sub=sorted(new - old), unsub=sorted(old - new))

    def _ack(self, type_url: str, resp: Any) -> Any:
        if self.protocol == "sotw":
            self.version[type_url] = resp.version_info
            self.nonce[type_url] = resp.nonce
            names = self.eds_names if type_url == ENDPOINT else self.rds_names if type_url == ROUTE else None
            return self._sotw(type_url, names)
        return self._delta(type_url, nonce=resp.nonce)

    # responses ------------------------------------------------------------------
    def _updates(self, resp: Any) -> tuple[dict[str, Info], list[str]]:
        t = resp.type_url
        got: dict[str, Info] = {}
        if self.protocol == "sotw":
            for a in resp.resources:
                i = self.dec.info(t, a.value)
                got[i.name] = i
            return got, []
        for r in resp.resources:
            i = self.dec.info(t, r.resource.value)
            got[r.name or i.name] = i
        return got, list(resp.removed_resources)

    def handle(self, raw: bytes) -> tuple[list[Any], list[tuple[str, Info]]]:
        """Requests to send for one (serialized) response, and the CLAs it changed (after full sync)."""
        resp: Any = (discovery_pb2.DeltaDiscoveryResponse if self.protocol == "delta"
                     else discovery_pb2.DiscoveryResponse).FromString(raw)
        t = resp.type_url
        self.stats.responses[SHORT.get(t, t)] += 1
        self.stats.resources[SHORT.get(t, t)] += len(resp.resources)
        self.stats.bytes[SHORT.get(t, t)] += len(raw)
        got, removed = self._updates(resp)
        sotw_full = self.protocol == "sotw"
        reqs: list[Any] = []
        changed: list[tuple[str, Info]] = []
        if t == CLUSTER:
            if sotw_full:
                self.clusters = got
            else:
                self.clusters.update(got)
                for n in removed:
                    self.clusters.pop(n, None)
            names = {r for i in self.clusters.values() for r in i.refs}
            if names != self.eds_names:
                old, self.eds_names = self.eds_names, names
                for n in old - names:
                    self.cla.pop(n, None)
                reqs.append(self._request(ENDPOINT, names, old))
            reqs.append(self._ack(t, resp))
        elif t == ENDPOINT:
            for n, i in got.items():
                if n not in self.eds_names:
                    continue
                prev = self.cla.get(n)
                self.cla[n] = i
                if self.full and prev is not i:
                    changed.append((n, i))
            for n in removed:
                self.cla.pop(n, None)
            reqs.append(self._ack(t, resp))
        elif t == LISTENER:
            if sotw_full:
                self.listeners = got
            else:
                self.listeners.update(got)
                for n in removed:
                    self.listeners.pop(n, None)
            names = {r for i in self.listeners.values() for r in i.refs}
            if names != self.rds_names:
                old, self.rds_names = self.rds_names, names
                for n in old - names:
                    self.routes.pop(n, None)
                reqs.append(self._request(ROUTE, names, old))
            reqs.append(self._ack(t, resp))
        elif t == ROUTE:
            for n, i in got.items():
                if n in self.rds_names:
                    self.routes[n] = i
            for n in removed:
                self.routes.pop(n, None)
            reqs.append(self._ack(t, resp))
        else:
            reqs.append(self._ack(t, resp))
        # Like Envoy: LDS starts once every cluster has warmed (has its endpoints).
        if not self.lds_requested and self.clusters and all(n in self.cla for n in self.eds_names):
            self.lds_requested = True
            reqs.append(self._sotw(LISTENER) if self.protocol == "sotw" else self._delta(LISTENER))
        return reqs, changed

    def holds_everything(self) -> bool:
        return (bool(self.clusters) and all(n in self.cla for n in self.eds_names)
                and bool(self.listeners) and all(n in self.routes for n in self.rds_names))

    async def run(self) -> None:
        method = "DeltaAggregatedResources" if self.protocol == "delta" else "StreamAggregatedResources"
        # Responses arrive as bytes: handle() decodes them (and counts their size for free).
        call = self.channel.stream_stream(f"/{ADS}/{method}", request_serializer=_serialize,
                                          response_deserializer=None)()
        try:
            await call.write(self._sotw(CLUSTER) if self.protocol == "sotw" else self._delta(CLUSTER))
            while True:
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    raise RuntimeError("the server closed the stream")
                reqs, changed = self.handle(resp)
                for r in reqs:
                    await call.write(r)
                now = time.time()
                for n, i in changed:
                    self.out.eds(self.cid, n, i.refs, now)
                if not self.full and self.lds_requested and self.holds_everything():
                    self.full = True
                    self.stats.full += 1
                    if self.stats.full == self.stats.clients:
                        # Every client holds its config: stop the cyclic collector scanning it,
                        # so the simulator's own pauses do not show up as control-plane latency.
                        gc.freeze()
                    self.out.emit(e="full", c=self.cid, t=now, p=self.protocol, counts={
                        "clusters": len(self.clusters), "endpoints": len(self.cla),
                        "listeners": len(self.listeners), "routes": len(self.routes)})
        except asyncio.CancelledError:
            call.cancel()
            raise
        except Exception as exc:  # report, do not retry: a benchmark must fail visibly
            self.stats.errors += 1
            msg = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            self.out.emit(e="error", c=self.cid, msg=f"{type(exc).__name__}: {msg}")


# --------------------------------------------------------------------------- main
def make_node(cid: int, namespace: str) -> base_pb2.Node:
    node = base_pb2.Node(id=f"bench-proxy-{cid:05d}", cluster="bench")
    md = struct_pb2.Struct()
    md.update({"namespace": namespace, "capture": "bind"})
    node.metadata.CopyFrom(md)
    return node


async def commands() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def main(args: argparse.Namespace) -> None:
    out = Out()
    flusher = asyncio.create_task(out.run())
    stdin = await commands()
    out.emit(e="ready")
    out.flush()
    line = await stdin.readline()
    if line.strip() != b"go":
        return
    dec, stats = Decoder(), Stats(clients=args.clients)
    templates: dict[tuple[str, frozenset[str]], discovery_pb2.DiscoveryRequest] = {}  # shared by the clients
    gc.set_threshold(50_000, 20, 100)
    options = [
        ("grpc.max_receive_message_length", 512 * 1024 * 1024),
        ("grpc.use_local_subchannel_pool", 1),  # one connection per client, like separate Envoys
        # Like Envoy's HTTP/2 client: no bandwidth-probing PINGs, and a 256 MiB window
        # (Envoy's default initial_stream_window_size), so a big first push is never held back
        # by flow control (gRPC's own default, 64 KiB without probing, would make the server
        # buffer every client's initial config).
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", 256 * 1024 * 1024),
    ]
    channels: list[grpc.aio.Channel] = []
    tasks: list[asyncio.Task[None]] = []
    per = max(1, args.clients_per_channel)
    for cid in range(args.clients):
        if cid % per == 0:
            channels.append(grpc.aio.insecure_channel(args.target, options=options))
        protocol = args.mix if args.mix != "mixed" else ("delta" if cid % 2 == 0 else "sotw")
        client = Client(cid, protocol, channels[-1], make_node(cid, args.namespace), dec, out, stats, templates)
        tasks.append(asyncio.create_task(client.run()))
    try:
        while True:
            line = await stdin.readline()
            cmd = line.strip().decode()
            if not line or cmd == "quit":
                break
            if cmd == "stats":
                out.emit(e="stats", responses=dict(stats.responses), resources=dict(stats.resources),
                         bytes=dict(stats.bytes), errors=stats.errors)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ch in channels:
            await ch.close(grace=None)
        out.flush()
        flusher.cancel()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True, help="xDS address host:port")
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--namespace", default="bench")
    p.add_argument("--clients-per-channel", type=int, default=1)
    p.add_argument("--mix", choices=["mixed", "delta", "sotw"], default="mixed")
    try:
        asyncio.run(main(p.parse_args()))
    except KeyboardInterrupt:
        pass
