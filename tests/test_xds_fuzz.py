"""Fuzz of xDS request fields (issue 14, item 4) against a `meshline serve` subprocess with
its built-in CA (so unauthenticated streams, secrets and node proxies take their real
paths): type URLs, resource names, nonces, versions, node ids and metadata, error_detail
and delta's initial versions, over state-of-the-world and delta. Every fuzzed stream must
end with a status a client can act on (OK, INVALID_ARGUMENT, RESOURCE_EXHAUSTED,
PERMISSION_DENIED), never UNKNOWN (a server bug), a hang or a dead server; meanwhile a
well-behaved delta stream keeps getting its config: an endpoint edited in the config
directory reaches it. Does process, file and network I/O (loopback)."""

from __future__ import annotations

import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.localrun import free_port, stop, wait_http
from controlplane.translate.plan import CLUSTER, ENDPOINT, PUSH_ORDER

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = int(os.environ.get("MESHLINE_FUZZ_EXAMPLES", "200"))
RANDOM = bool(os.environ.get("MESHLINE_FUZZ_RANDOM"))  # explore new examples (default: the same ones every run)
CHECK_EVERY = 50  # examples between checks that the well-behaved stream still gets changes
ACCEPTABLE = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
              grpc.StatusCode.PERMISSION_DENIED}
OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


# --------------------------------------------------------------------------- the server


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    xds: str
    status: str
    services: Path  # the config file the test edits
    log: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("fuzz")
    mesh = tmp / "mesh"
    shutil.copytree(ROOT / "samples" / "bookinfo", mesh)
    xp, sp = free_port(), free_port()
    log = tmp / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "controlplane.cli", "serve", "--config-dir", str(mesh), "--ca-dir", str(tmp / "ca"),
         "--ca-address", "off", "--xds-address", f"127.0.0.1:{xp}", "--status-address", f"127.0.0.1:{sp}",
         "--log-level", "warning"],
        cwd=tmp, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{sp}/readyz", timeout=30)
        yield Served(proc, f"127.0.0.1:{xp}", f"http://127.0.0.1:{sp}", mesh / "10-services.yaml", log)
    finally:
        stop(proc)


class GoodStream:
    """A well-behaved delta client (a bookinfo sidecar): CDS wildcard, EDS for productpage,
    ACKs everything. Runs on gRPC's own threads."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target, options=[*OPTIONS, ("grpc.use_local_subchannel_pool", 1)])
        self.requests: queue.Queue[discovery_pb2.DeltaDiscoveryRequest | None] = queue.Queue()
        self.responses: queue.Queue[Any] = queue.Queue()
        node = base_pb2.Node(id="well-behaved", cluster="bookinfo")
        md = struct_pb2.Struct()
        md.update({"namespace": "bookinfo", "workload": "productpage-v1", "labels": {"app": "productpage"}})
        node.metadata.CopyFrom(md)
        self.requests.put(discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER, node=node))
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        self.call = stub.DeltaAggregatedResources(iter(self.requests.get, None))
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for r in self.call:
                self.requests.put(discovery_pb2.DeltaDiscoveryRequest(type_url=r.type_url, response_nonce=r.nonce))
                self.responses.put(r)
        except grpc.RpcError as exc:
            self.responses.put(exc)

    def next(self, timeout: float = 20.0) -> Any:
        r = self.responses.get(timeout=timeout)
        if isinstance(r, grpc.RpcError):
            raise AssertionError(f"the well-behaved stream ended: {r}")
        return r

    def endpoint_addresses(self, cluster: str, timeout: float = 20.0) -> set[str]:
        """The addresses of the next ClusterLoadAssignment of `cluster` it receives."""
        deadline = time.monotonic() + timeout
        while True:
            r = self.next(max(0.1, deadline - time.monotonic()))
            for res in r.resources:
                if r.type_url == ENDPOINT and res.name == cluster:
                    cla = endpoint_pb2.ClusterLoadAssignment()
                    res.resource.Unpack(cla)
                    return {lb.endpoint.address.socket_address.address
                            for group in cla.endpoints for lb in group.lb_endpoints}

    def close(self) -> None:
        self.requests.put(None)
        self.call.cancel()
        self.channel.close()


@pytest.fixture(scope="module")
def good(served: Served) -> Iterator[tuple[GoodStream, str]]:
    g = GoodStream(served.xds)
    cds = g.next()
    assert cds.type_url == CLUSTER
    cluster = next(r.name for r in cds.resources if "productpage" in r.name and r.name.startswith("outbound|"))
    g.requests.put(discovery_pb2.DeltaDiscoveryRequest(type_url=ENDPOINT, resource_names_subscribe=[cluster]))
    assert g.endpoint_addresses(cluster) == {"127.0.0.41"}
    yield g, cluster
    g.close()


# --------------------------------------------------------------------------- strategies

def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of `choices`, each drawn with its weight (out of their sum). Put the common case
    first: hypothesis favours small integers, so the first choice is drawn more often."""
    total = sum(w for w, _ in choices)

    def pick(i: int) -> st.SearchStrategy[Any]:
        for w, strategy in choices:
            if i < w:
                return strategy
            i -= w
        raise AssertionError(i)

    return st.integers(0, total - 1).flatmap(pick)


text = st.text(max_size=40)
type_urls = weighted(
    (85, st.sampled_from(PUSH_ORDER)), (5, text),
    (10, st.sampled_from(["", "type.googleapis.com/", "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
                          CLUSTER + "\x00", CLUSTER.upper(), "*"])))
one_name = weighted(
    (40, st.sampled_from(["*", "", "outbound|9080||productpage.bookinfo.svc.cluster.local",
                          "outbound|9080||reviews.bookinfo.svc.cluster.local", "default", "ROOTCA",
                          "spiffe://cluster.local/ns/bookinfo/sa/default", "inbound|9080||"])),
    (55, text), (5, st.text(alphabet="ab", min_size=1000, max_size=1030)))
names = weighted((95, st.lists(one_name, max_size=8)),
                 (5, st.integers(9_995, 10_005).map(lambda n: [f"outbound|80||s{i}.bookinfo.svc" for i in range(n)])))
nonces = weighted((40, st.just("")), (30, st.integers(-5, 10**20).map(str)), (30, text))
json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False) | text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4),
    max_leaves=12)
metadata = st.fixed_dictionaries({}, optional={
    "mode": st.sampled_from(["sidecar", "node", "waypoint", "", "x"]) | json_values,
    "namespace": st.sampled_from(["bookinfo", "default", "", "kube-system", "meshline-system"]) | text | json_values,
    "workload": st.sampled_from(["productpage-v1", "reviews-v1", ""]) | text | json_values,
    "service_account": st.sampled_from(["default", "bookinfo-reviews"]) | text | json_values,
    "labels": st.dictionaries(text, text, max_size=5) | json_values,
    "capture": st.sampled_from(["bind", "intercept", "x"]) | json_values,
    "outbound_address": st.sampled_from(["127.0.0.5", "10.0.0.1", "::1", "x", ""]) | json_values,
    "node": st.sampled_from(["node-1", ""]) | text | json_values,
    "waypoint": text | json_values,
    "padding": weighted((95, st.just("")), (5, st.just("p" * 70_000))),
}).flatmap(lambda d: st.dictionaries(text, json_values, max_size=3).map(lambda extra: {**extra, **d}))


@st.composite
def nodes(draw: st.DrawFn) -> base_pb2.Node | None:
    if draw(st.integers(0, 19)) == 19:  # (not 0: hypothesis draws its minimum often)
        return None  # no node at all
    node = base_pb2.Node(id=draw(weighted((90, st.sampled_from(["fuzz", "productpage-v1.bookinfo"])),
                                          (5, st.just("")), (5, text))), cluster=draw(text))
    md = struct_pb2.Struct()
    md.update(draw(metadata))
    node.metadata.CopyFrom(md)
    return node


errors = weighted((70, st.none()), (30, st.builds(status_pb2.Status, code=st.integers(-2**31, 2**31 - 1),
                                                  message=st.text(max_size=2000))))


@st.composite
def sotw_requests(draw: st.DrawFn) -> list[discovery_pb2.DiscoveryRequest]:
    out = []
    for i in range(draw(st.integers(1, 4))):
        req = discovery_pb2.DiscoveryRequest(type_url=draw(type_urls), resource_names=draw(names),
                                             version_info=draw(st.one_of(st.just(""), text)),
                                             response_nonce=draw(nonces))
        err = draw(errors)
        if err is not None:
            req.error_detail.CopyFrom(err)
        node = draw(nodes()) if i == 0 or draw(st.booleans()) else None
        if node is not None:
            req.node.CopyFrom(node)
        out.append(req)
    return out


@st.composite
def delta_requests(draw: st.DrawFn) -> list[discovery_pb2.DeltaDiscoveryRequest]:
    out = []
    for i in range(draw(st.integers(1, 4))):
        req = discovery_pb2.DeltaDiscoveryRequest(
            type_url=draw(type_urls), resource_names_subscribe=draw(names),
            resource_names_unsubscribe=draw(st.lists(one_name, max_size=4)), response_nonce=draw(nonces),
            initial_resource_versions=draw(st.dictionaries(
                one_name, weighted((95, text), (5, st.text(alphabet="v", min_size=1020, max_size=1030))), max_size=4)))
        err = draw(errors)
        if err is not None:
            req.error_detail.CopyFrom(err)
        node = draw(nodes()) if i == 0 or draw(st.booleans()) else None
        if node is not None:
            req.node.CopyFrom(node)
        out.append(req)
    return out


# --------------------------------------------------------------------------- the test


def run_stream(channel: grpc.Channel, protocol: str, reqs: list[Any]) -> tuple[grpc.StatusCode, str, int]:
    """Send `reqs` on a new stream, read what comes back until the server ends the stream
    (after the requests, the client half-closes once it got an answer or 0.3 s passed)."""
    answered = threading.Event()

    def gen() -> Iterator[Any]:
        yield from reqs
        answered.wait(0.3)

    stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
    call = (stub.StreamAggregatedResources if protocol == "sotw" else stub.DeltaAggregatedResources)(gen(), timeout=20)
    got = 0
    try:
        for _ in call:
            got += 1
            answered.set()
    except grpc.RpcError as exc:
        answered.set()
        return exc.code(), exc.details() or "", got
    return grpc.StatusCode.OK, "", got


def test_fuzzed_xds_requests_never_break_the_server_or_other_streams(served: Served,
                                                                     good: tuple[GoodStream, str]) -> None:
    stream, cluster = good
    channel = grpc.insecure_channel(served.xds, options=OPTIONS)
    seen: dict[str, int] = {}
    examples = 0
    addresses = iter(f"127.0.0.{n}" for n in range(200, 255))

    def still_served() -> None:
        """The server is up, answers /healthz, and the well-behaved stream gets an edit."""
        assert served.proc.poll() is None, served.log.read_text()[-3000:]
        assert httpx.get(f"{served.status}/healthz", timeout=5).status_code == 200
        new = next(addresses)
        text = served.services.read_text()
        served.services.write_text(re.sub(r'addresses: \["127\.0\.0\.(41|2\d\d)"\]', f'addresses: ["{new}"]',
                                          text, count=1))
        assert stream.endpoint_addresses(cluster) == {new}

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture])
    @given(st.one_of(st.tuples(st.just("sotw"), sotw_requests()), st.tuples(st.just("delta"), delta_requests())))
    def one(example: tuple[str, list[Any]]) -> None:
        nonlocal examples
        protocol, reqs = example
        code, details, _got = run_stream(channel, protocol, reqs)
        assert code in ACCEPTABLE, (code, details, protocol, [str(r)[:300] for r in reqs])
        seen[code.name] = seen.get(code.name, 0) + 1
        examples += 1
        if examples % CHECK_EVERY == 0:
            still_served()

    try:
        one()
        still_served()
    finally:
        channel.close()
    print(f"fuzzed streams by status: {dict(sorted(seen.items()))}")
    assert "Traceback" not in served.log.read_text(), served.log.read_text()[-5000:]
    # Both kinds of refusal and served streams all occurred (the strategies reach them).
    assert {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"} <= set(seen)

