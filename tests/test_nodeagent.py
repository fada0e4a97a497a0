"""The sidecarless node agent and the control plane's NodeAgent.Report API.

- the registry over a real grpc.aio server on 127.0.0.1: a report becomes one
  `Replace(origin="node-agent:<node>")` of PodNetns raw objects, sorted, the last
  duplicate winning; the next report without a pod drops it; an unchanged report emits
  nothing; bad fields are INVALID_ARGUMENT naming the field; the authorization hook's
  refusal is PERMISSION_DENIED with its reason; `Synced` comes first, with no report;
- integrity (issue 14): one node's credential cannot speak for another node nor take its
  pods (refused claims are error values on the node's origin, in the response and counted);
  the Pod object decides node and UID; a netns path outside the netns directory, not
  normalised or not the pod's own mount is INVALID_ARGUMENT;
- the agent's pure parts: fib_trie/if_inet6 parsing, which Kubernetes pods are ambient,
  the pods file, pod UIDs in cgroup paths, and discovery over a fake /proc (hard links play
  shared namespaces): a neighbour holding the victim's IP is never the victim's netns;
- `meshline node-agent --once` against the registry, and its exit 1 when the report fails;
- in real network namespaces (root, `ip`, `iptables`, `nsenter`, `mount`; skipped otherwise):
  two fresh netns on 198.19.x.0/30 each running `sleep`, found by IP, bind-mounted under a
  temporary --netns-dir (the reported paths are those namespaces), the ambient capture
  rules applied in each, and after one pod's process and netns are gone the next pass drops
  it and unmounts its path; two netns holding one IP with their `sleep` in kubelet-style
  `pod<uid>` cgroups: the victim's own is found, and once it is gone the neighbour's is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner

from controlplane.cli import main as cli
from controlplane.model.raw import RawObject
from controlplane.model.store import MeshStore
from controlplane.nodeagent import commands, registry
from controlplane.nodeagent.agent import (
    AgentConfig,
    AgentError,
    NodeAgent,
    ambient_pods,
    load_pods_file,
    mounted_inode,
)
from controlplane.nodeagent.discovery import (
    PodRef,
    discover,
    parse_fib_trie,
    parse_if_inet6,
    pod_uids_of_cgroup,
)
from controlplane.nodeagent.gen import nodeagent_pb2
from controlplane.nodeagent.registry import SERVICE, NodeAgentRegistry, PodFacts, PodLookup, pods_in
from controlplane.runtime import Settings
from controlplane.serve import build_runtime, node_agent_handlers
from controlplane.sources.base import Replace, SourceEvent, Synced
from controlplane.sources.yamlload import parse_documents
from tests.netns_mesh import sh

NETNS = "/var/run/meshline/netns"  # the node agents' netns directory (the registry's default)

# --------------------------------------------------------------------------- registry harness


@dataclass
class Registry:
    registry: NodeAgentRegistry
    port: int
    events: list[SourceEvent] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def sink(self, events: list[SourceEvent]) -> None:
        self.events.extend(events)
        self.changed.set()

    def replaces(self) -> list[Replace]:
        return [e for e in self.events if isinstance(e, Replace)]

    async def next_replace(self, count: int, timeout: float = 5.0) -> Replace:
        async def wait() -> None:
            while len(self.replaces()) < count:
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(wait(), timeout)
        return self.replaces()[count - 1]

    async def report(self, request: Any, metadata: Sequence[tuple[str, str]] = ()) -> Any:
        async with grpc.aio.insecure_channel(self.address) as ch:
            call = ch.unary_unary(f"/{SERVICE}/Report",
                                  request_serializer=nodeagent_pb2.ReportRequest.SerializeToString,
                                  response_deserializer=nodeagent_pb2.ReportResponse.FromString)
            return await call(request, metadata=tuple(metadata), timeout=5)


@contextlib.asynccontextmanager
async def serving(authorize: Callable[[Sequence[tuple[str, str | bytes]], str], Awaitable[str | None]] | None = None,
                  netns_dir: str = NETNS, pods: PodLookup | None = None) -> AsyncIterator[Registry]:
    registry = NodeAgentRegistry(authorize=authorize, netns_dir=netns_dir, pods=pods)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(registry.handlers())
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    harness = Registry(registry, port)
    task = asyncio.create_task(registry.run(harness.sink))
    try:
        yield harness
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await server.stop(0)


def pod(namespace: str, name: str, path: str | None = None, *ips: str, uid: str = "") -> Any:
    """A reported pod; its netns path by default the agent's mount of it under NETNS."""
    return nodeagent_pb2.PodNetns(namespace=namespace, name=name, netns_path=path or f"{NETNS}/{namespace}_{name}",
                                  ips=list(ips), uid=uid)


def summary(objects: Sequence[RawObject] | None) -> list[tuple[str, str, str, list[str]]]:
    return [(o.namespace, o.name, o.body["netnsPath"], o.body["ips"]) for o in objects or ()]


# --------------------------------------------------------------------------- registry


async def test_synced_comes_first_without_any_report() -> None:
    async with serving() as reg:
        await asyncio.wait_for(reg.changed.wait(), 5)
        assert reg.events == [Synced("node-agents")]


async def test_a_report_becomes_a_replace_of_podnetns_objects() -> None:
    async with serving() as reg:
        resp = await reg.report(nodeagent_pb2.ReportRequest(node="node-1", pods=[
            pod("shop", "web-1", "/var/run/meshline/netns/shop_web-1", "10.1.0.7"),
            pod("bank", "api-0", None, "10.1.0.8"),
            pod("bank", "api-0", "/var/run/meshline/netns/bank_api-0", "10.1.0.9", "fd00::9"),
        ]))
        assert resp.accepted == 2 and list(resp.errors) == []
        ev = await reg.next_replace(1)
        assert ev.origin == "node-agent:node-1"
        assert summary(ev.objects) == [  # sorted; the last duplicate wins
            ("bank", "api-0", "/var/run/meshline/netns/bank_api-0", ["10.1.0.9", "fd00::9"]),
            ("shop", "web-1", "/var/run/meshline/netns/shop_web-1", ["10.1.0.7"]),
        ]
        assert ev.objects is not None
        obj = ev.objects[1]
        assert (obj.kind, obj.api_version, obj.key, obj.file) == (
            "PodNetns", "meshline.io/v1", ("PodNetns", "shop", "web-1"), "node-agent:node-1")
        assert obj.body == {
            "apiVersion": "meshline.io/v1", "kind": "PodNetns",
            "metadata": {"namespace": "shop", "name": "web-1"},
            "node": "node-1", "netnsPath": "/var/run/meshline/netns/shop_web-1", "ips": ["10.1.0.7"], "podUID": "",
        }


async def test_the_next_report_drops_a_missing_pod_and_unchanged_reports_are_quiet() -> None:
    async with serving() as reg:
        both = [pod("shop", "a", None, "10.0.0.1"), pod("shop", "b", None, "10.0.0.2")]
        await reg.report(nodeagent_pb2.ReportRequest(node="n1", pods=both))
        await reg.report(nodeagent_pb2.ReportRequest(node="n2", pods=[pod("shop", "c", None, "10.0.1.3")]))
        await reg.report(nodeagent_pb2.ReportRequest(node="n1", pods=both))  # unchanged: nothing new
        resp = await reg.report(nodeagent_pb2.ReportRequest(node="n1", pods=both[:1]))
        assert resp.accepted == 1
        await reg.next_replace(3)
        origins = [(e.origin, [o.name for o in e.objects or ()]) for e in reg.replaces()]
        assert origins == [("node-agent:n1", ["a", "b"]), ("node-agent:n2", ["c"]), ("node-agent:n1", ["a"])]
        await reg.report(nodeagent_pb2.ReportRequest(node="n1"))  # an empty node
        assert (await reg.next_replace(4)).objects == ()


@pytest.mark.parametrize(("request_", "field_"), [
    (nodeagent_pb2.ReportRequest(node=" "), "node: must not be empty"),
    (nodeagent_pb2.ReportRequest(node="n", pods=[pod("", "a", "/x")]), "pods[0].namespace: must not be empty"),
    (nodeagent_pb2.ReportRequest(node="n", pods=[pod("ns", "a"), pod("ns", "", "/y")]),
     "pods[1].name: must not be empty"),
    (nodeagent_pb2.ReportRequest(node="n", pods=[pod("ns", "a", "var/run/netns/a")]),
     "pods[0].netns_path: 'var/run/netns/a' is not an absolute path"),
    (nodeagent_pb2.ReportRequest(node="n", pods=[pod("ns", "a", None, "10.0.0.300")]),
     "pods[0].ips[0]: '10.0.0.300' is not an IP address"),
    (nodeagent_pb2.ReportRequest(node="n", pods=[pod("ns", "a", None, uid="../etc")]),
     "pods[0].uid: '../etc' is not a Kubernetes UID"),
], ids=["node", "namespace", "name", "netns_path", "ips", "uid"])
async def test_bad_reports_are_invalid_argument_naming_the_field(request_: Any, field_: str) -> None:
    async with serving() as reg:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await reg.report(request_)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == field_
        assert reg.replaces() == []


async def test_the_authorization_hook_decides() -> None:
    seen: list[dict[str, str | bytes]] = []

    async def authorize(metadata: Sequence[tuple[str, str | bytes]], node: str) -> str | None:
        md = dict(metadata)
        seen.append(md)
        return None if md.get("authorization") == "Bearer good" else "not a node agent of this mesh"

    async with serving(authorize) as reg:
        request = nodeagent_pb2.ReportRequest(node="n1", pods=[pod("ns", "a")])
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await reg.report(request, [("authorization", "Bearer bad")])
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert err.value.details() == "not a node agent of this mesh"
        with pytest.raises(grpc.aio.AioRpcError):
            await reg.report(nodeagent_pb2.ReportRequest(node=""))  # refused before validation
        assert reg.replaces() == []
        assert (await reg.report(request, [("authorization", "Bearer good")])).accepted == 1
        assert summary((await reg.next_replace(1)).objects) == [("ns", "a", f"{NETNS}/ns_a", [])]
        assert [md.get("authorization") for md in seen] == ["Bearer bad", None, "Bearer good"]


def test_agent_and_registry_agree_on_the_netns_directory() -> None:
    assert commands.DEFAULT_NETNS_DIR == registry.DEFAULT_NETNS_DIR == str(AgentConfig("n", "h:1").netns_dir) == NETNS


def test_serve_wires_the_registry_only_with_node_agents() -> None:
    off = build_runtime(Settings())
    assert node_agent_handlers(off) == []
    on = build_runtime(Settings(node_agents=True))
    assert [s.name for s in on.sources if isinstance(s, NodeAgentRegistry)] == ["node-agents"]
    assert len(node_agent_handlers(on)) == 1
    r = CliRunner().invoke(cli, ["serve", "--node-agents", "--workers", "2", "--xds-address", "127.0.0.1:1"])
    assert r.exit_code == 2 and "--node-agents needs --workers 1" in r.output


# --------------------------------------------------------------------------- agent: pure parts

FIB_TRIE = """\
Main:
  +-- 0.0.0.0/0 3 0 5
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
     +-- 198.19.4.0/30 2 0 2
        |-- 198.19.4.0
           /30 link UNICAST
        |-- 198.19.4.1
           /32 host LOCAL
        |-- 198.19.4.3
           /32 link BROADCAST
Local:
  +-- 0.0.0.0/0 3 0 5
     +-- 198.19.4.0/30 2 0 2
        |-- 198.19.4.1
           /32 host LOCAL
        |-- 10.8.0.5
           /32 host LOCAL
"""
IF_INET6 = """\
00000000000000000000000000000001 01 80 10 80       lo
fd000000000000000000000000000009 02 40 00 80     eth0
fe80000000000000b0c2fffffe0a0b0c 02 40 20 80     eth0
"""


def test_addresses_of_a_netns() -> None:
    assert parse_fib_trie(FIB_TRIE) == {"198.19.4.1", "10.8.0.5"}
    assert parse_if_inet6(IF_INET6) == {"fd00::9"}


def test_which_kubernetes_pods_are_ambient() -> None:
    def k8s_pod(name: str, ns: str = "shop", labels: dict[str, str] | None = None, ip: str | None = "10.0.0.1",
                **spec: Any) -> dict[str, Any]:
        status: dict[str, Any] = {"phase": spec.pop("phase", "Running")}
        if ip:
            status |= {"podIP": ip, "podIPs": [{"ip": ip}, {"ip": "fd00::1"}]}
        return {"metadata": {"namespace": ns, "name": name, "labels": labels or {}, "uid": UID_VICTIM.upper()},
                "spec": spec, "status": status}

    namespaces = {"shop": {"meshline.io/dataplane-mode": "ambient"}, "bank": {"meshline.io/dataplane-mode": "sidecar"}}
    pods = [
        k8s_pod("in-ambient-ns"),
        k8s_pod("opted-out", labels={"meshline.io/dataplane-mode": "none"}),
        k8s_pod("host-network", hostNetwork=True),
        k8s_pod("done", phase="Succeeded"),
        k8s_pod("no-ip-yet", ip=None),
        k8s_pod("sidecar-ns", ns="bank"),
        k8s_pod("opted-in", ns="bank", labels={"meshline.io/dataplane-mode": "ambient"}),
        k8s_pod("unlabelled-ns", ns="other"),
    ]
    assert ambient_pods(pods, namespaces) == [
        PodRef("shop", "in-ambient-ns", ("10.0.0.1", "fd00::1"), UID_VICTIM),
        PodRef("bank", "opted-in", ("10.0.0.1", "fd00::1"), UID_VICTIM),
    ]


def test_pods_file(tmp_path: Path) -> None:
    f = tmp_path / "pods.yaml"
    f.write_text(json.dumps([{"namespace": "shop", "name": "web-1", "ips": ["198.19.0.1"]}]))
    assert load_pods_file(f) == [PodRef("shop", "web-1", ("198.19.0.1",))]
    assert load_pods_file(f)[0].file_name == "shop_web-1"
    f.write_text(json.dumps([{"namespace": "shop", "name": "web-1", "ips": [], "uid": UID_VICTIM.upper()}]))
    assert load_pods_file(f) == [PodRef("shop", "web-1", (), UID_VICTIM)]
    for text, message in (("{}", "expected a list"), ("- {namespace: Shop, name: a}", "not a Kubernetes name"),
                          ("- {namespace: s, name: a, ips: [x]}", "item 0"), (": :", "cannot read"),
                          ("- {namespace: s, name: a, uid: ../x}", "not a lower-case Kubernetes UID")):
        f.write_text(text)
        with pytest.raises(AgentError, match=message):
            load_pods_file(f)


def fake_proc(root: Path, layout: dict[int, tuple[str, str]], cgroups: dict[int, str] | None = None) -> Path:
    """A /proc with `pid -> (netns name, fib_trie text)` and `pid -> /proc/<pid>/cgroup text`
    (pid 0: the agent itself, in the host netns); processes of one netns share the ns/net
    inode through hard links, as they share the namespace."""
    proc = root / "proc"
    inodes = root / "inodes"
    inodes.mkdir(parents=True)
    for ns in {"host", *(v[0] for v in layout.values())}:
        (inodes / ns).write_text(ns)
    for pid, (ns, trie) in {0: ("host", ""), **layout}.items():
        d = proc / ("self" if pid == 0 else str(pid))
        (d / "ns").mkdir(parents=True)
        (d / "net").mkdir()
        os.link(inodes / ns, d / "ns" / "net")
        (d / "net" / "fib_trie").write_text(trie)
        if pid in (cgroups or {}):
            (d / "cgroup").write_text((cgroups or {})[pid])
    return proc


def trie(*ips: str) -> str:
    return "Local:\n" + "".join(f"  |-- {ip}\n     /32 host LOCAL\n" for ip in ips)


def test_discover_matches_pods_to_namespaces_by_ip(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, {
        1: ("host", trie("192.0.2.10")),      # the agent's own netns: never a pod's
        40: ("a", trie("10.0.0.1")), 41: ("a", trie("10.0.0.1")),
        50: ("b", trie("10.0.0.2", "10.0.0.22")),
        60: ("c", trie("10.0.0.3")), 61: ("d", trie("10.0.0.3")),  # one IP in two namespaces
    })
    pods = [PodRef("x", "b", ("10.0.0.22",)), PodRef("x", "a", ("10.0.0.1",)), PodRef("x", "host", ("192.0.2.10",)),
            PodRef("x", "twice", ("10.0.0.3",)), PodRef("x", "nowhere", ("10.0.0.9",))]
    found = discover(pods, proc)
    assert [(f.pod.name, f.pid, f.ips) for f in found] == [("a", 40, ("10.0.0.1",)),
                                                            ("b", 50, ("10.0.0.2", "10.0.0.22"))]
    assert found[0].inode == os.stat(tmp_path / "inodes" / "a").st_ino


UID_VICTIM = "0f3c1a2b-4c5d-4e6f-8a9b-0c1d2e3f4a5b"
UID_NEIGHBOUR = "11111111-2222-4333-8444-555555555555"
UID_AGENT = "99999999-8888-4777-8666-555555555555"
UID_MOVED = "22222222-3333-4444-8555-666666666666"


def cgroup_v1(uid: str) -> str:
    """/proc/<pid>/cgroup of a container under kubelet's cgroupfs driver (cgroup v1)."""
    return f"12:pids:/kubepods/besteffort/pod{uid}/{'c' * 64}\n4:memory:/kubepods/besteffort/pod{uid}/{'c' * 64}\n"


def cgroup_systemd(uid: str) -> str:
    """... under the systemd driver (cgroup v2): `_` for `-` in the UID."""
    return (f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid.replace('-', '_')}.slice/"
            f"cri-containerd-{'c' * 64}.scope\n")


def test_pod_uids_from_cgroups() -> None:
    assert pod_uids_of_cgroup(cgroup_v1(UID_VICTIM)) == {UID_VICTIM}
    assert pod_uids_of_cgroup(cgroup_systemd(UID_VICTIM)) == {UID_VICTIM}
    assert pod_uids_of_cgroup(f"0::/kubepods/pod{UID_VICTIM.upper()}\n") == {UID_VICTIM}
    for no_pod in ("0::/\n", "4:memory:/process_api/34a1f924079d83f1fee36057c95dba93\n",
                   "0::/user.slice/user-0.slice/session-1.scope\n", f"0::/kubepods/xpod{UID_VICTIM}\n"):
        assert pod_uids_of_cgroup(no_pod) == frozenset()


def test_a_neighbour_holding_the_victims_ip_is_not_matched_to_the_victim(tmp_path: Path) -> None:
    victim = PodRef("shop", "victim", ("10.0.0.7",), UID_VICTIM)

    # The victim's sandbox is gone (or not there yet); a neighbour configured its IP.
    proc = fake_proc(tmp_path / "1", {40: ("neighbour", trie("10.0.0.7"))}, {40: cgroup_v1(UID_NEIGHBOUR)})
    problems: list[str] = []
    assert discover([victim], proc, problems) == []
    assert problems == [f"pod shop/victim (uid {UID_VICTIM}): the network namespace holding its IP belongs to "
                        f"pod {UID_NEIGHBOUR}; not matched"]

    # Both hold it: the victim's own processes say which is its (the agent's own `nsenter`
    # visiting it does not count).
    proc = fake_proc(tmp_path / "2", {
        40: ("neighbour", trie("10.0.0.7")), 50: ("victim", trie("10.0.0.7")), 51: ("victim", trie("10.0.0.7")),
    }, {0: cgroup_v1(UID_AGENT), 40: cgroup_v1(UID_NEIGHBOUR), 50: cgroup_systemd(UID_VICTIM),
        51: cgroup_v1(UID_AGENT)})
    [found] = discover([victim], proc)
    assert (found.pod, found.uid, found.ips) == (victim, UID_VICTIM, ("10.0.0.7",))
    assert found.inode == os.stat(tmp_path / "2" / "inodes" / "victim").st_ino

    # A netns shared with another pod's processes, or without the pod's IP: never guessed.
    proc = fake_proc(tmp_path / "3", {50: ("victim", trie("10.0.0.7")), 52: ("victim", trie("10.0.0.7")),
                                      60: ("other", trie("10.0.0.8"))},
                     {50: cgroup_v1(UID_VICTIM), 52: cgroup_v1(UID_NEIGHBOUR), 60: cgroup_v1(UID_MOVED)})
    problems = []
    moved = PodRef("shop", "moved", ("10.0.0.9",), UID_MOVED)
    assert discover([victim, moved], proc, problems) == []
    assert [p.split(": ", 1)[1] for p in problems] == [
        f"its network namespace also holds processes of pod {UID_NEIGHBOUR}; skipped",
        "its network namespace holds 10.0.0.8, not its IPs 10.0.0.9; skipped until they agree"]

    # A pod without a UID is found by IP only in a netns that belongs to no pod.
    anonymous = PodRef("shop", "anonymous", ("10.0.0.7",))
    problems = []
    assert discover([anonymous], fake_proc(tmp_path / "4", {40: ("neighbour", trie("10.0.0.7"))},
                                           {40: cgroup_v1(UID_NEIGHBOUR)}), problems) == []
    assert problems == [f"pod shop/anonymous: the network namespace holding its IPs belongs to pod {UID_NEIGHBOUR}; "
                        "give the pod's uid to match it"]


# --------------------------------------------------------------------------- integrity (issue 14)


def pod_yaml(name: str, node: str, uid: str, ip: str) -> str:
    return (f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, uid: {uid}, "
            f"labels: {{meshline.io/dataplane-mode: ambient}}}}\nspec: {{nodeName: {node}, containers: [{{name: app}}]}}\n"
            f"status: {{podIP: {ip}, phase: Running}}\n")


def cluster_store() -> MeshStore:
    """A cluster's view: pod shop/a (UID_VICTIM) on n1, shop/b (UID_NEIGHBOUR) on n2."""
    text = pod_yaml("a", "n1", UID_VICTIM, "10.0.0.1") + "---\n" + pod_yaml("b", "n2", UID_NEIGHBOUR, "10.0.0.2")
    objects, errors = parse_documents(text, "cluster")
    assert not errors
    store = MeshStore(netns_annotations=False)
    store.apply([Replace("cluster", tuple(objects))])
    return store


def node_credentials() -> tuple[Callable[[Sequence[tuple[str, str | bytes]], str], Awaitable[str | None]],
                                Callable[[str], list[tuple[str, str]]]]:
    """`serve`'s authorization hook over Meshline tokens, and the metadata of each node's
    agent (the node proxy's identity, bound to that node)."""
    import datetime as dt
    import types

    from controlplane.ca import tokens
    from controlplane.ca.authn import Authenticator
    from controlplane.ca.identity import Identity
    from controlplane.serve import _node_agent_authorizer

    key = b"k" * 32
    fake = types.SimpleNamespace(authenticator=Authenticator(lambda: key))
    proxy = Identity("meshline-system", "meshline-node-proxy")

    def credential(node: str) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {tokens.mint(key, proxy, dt.timedelta(hours=1), node=node)}")]

    return _node_agent_authorizer(fake, "meshline-system"), credential  # type: ignore[arg-type]


async def test_a_node_agent_cannot_override_another_nodes_report() -> None:
    authorize, credential = node_credentials()
    store = cluster_store()
    a, b = pod("shop", "a", None, "10.0.0.1"), pod("shop", "b", None, "10.0.0.2")
    async with serving(authorize) as reg:
        assert (await reg.report(nodeagent_pb2.ReportRequest(node="n1", pods=[a]), credential("n1"))).accepted == 1

        # n2's credential cannot speak for n1 (e.g. report it empty) ...
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await reg.report(nodeagent_pb2.ReportRequest(node="n1"), credential("n2"))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "not n1" in (err.value.details() or "")
        # ... nor take n1's pod: the claim is refused, the rest of its report accepted.
        resp = await reg.report(nodeagent_pb2.ReportRequest(node="n2", pods=[a, b]), credential("n2"))
        assert resp.accepted == 1
        assert list(resp.errors) == ["pod shop/a: refused: node n1 holds it (one pod, one node)"]

        await reg.next_replace(2)
        store.apply(reg.events)
        mesh = store.mesh()
        assert mesh.workloads[("shop", "a")].netns == f"{NETNS}/shop_a"
        assert mesh.workloads[("shop", "b")].netns == f"{NETNS}/shop_b"
        assert [(o.origin, [x.name for x in o.objects or ()]) for o in reg.replaces()] == [
            ("node-agent:n1", ["a"]), ("node-agent:n2", ["b"])]
        # The refusal is an error a user sees (status: /v1/config/errors), and counted.
        [issue] = [i for i in mesh.issues if i.ref.file == "node-agent:n2"]
        assert issue.severity == "error" and issue.message == resp.errors[0]
        assert reg.registry.refusals == {"conflict": 1}


async def test_the_pod_object_decides_which_node_and_uid_hold_a_pod() -> None:
    """With the Pods known: a claim from another node than the Pod's, or with another UID
    than the Pod's (a neighbour holding its IP), is refused; the pod's own claim is not."""
    store = cluster_store()
    async with serving(pods=pods_in(store.sources_of)) as reg:
        async def claim(node: str, uid: str) -> Any:
            return await reg.report(nodeagent_pb2.ReportRequest(node=node, pods=[pod("shop", "a", None, "10.0.0.1",
                                                                                     uid=uid)]))

        first = await claim("n2", UID_VICTIM)  # first to report, still not n2's
        assert (first.accepted, list(first.errors)) == (0, ["pod shop/a: refused: the Pod runs on node n1, not n2"])
        neighbour = await claim("n1", UID_NEIGHBOUR)
        assert neighbour.accepted == 0
        assert list(neighbour.errors) == [
            f"pod shop/a: refused: the network namespace at {NETNS}/shop_a belongs to UID {UID_NEIGHBOUR}, not the "
            f"Pod's {UID_VICTIM} (another pod holds its IP?)"]
        unproven = await claim("n1", "")
        assert unproven.accepted == 0 and "belongs to no pod UID" in unproven.errors[0]
        assert (await claim("n1", UID_VICTIM.upper())).accepted == 1

        await reg.next_replace(4)
        store.apply(reg.events)
        assert store.mesh().workloads[("shop", "a")].netns == f"{NETNS}/shop_a"
        assert [(e.origin, len(e.objects or ()), len(e.errors)) for e in reg.replaces()] == [
            ("node-agent:n2", 0, 1), ("node-agent:n1", 0, 1), ("node-agent:n1", 0, 1), ("node-agent:n1", 1, 0)]
        assert reg.registry.refusals == {"node": 1, "uid": 2}


async def test_a_pod_left_by_its_node_can_be_claimed_by_another() -> None:
    """Without Pod objects the first holder keeps a pod only while it reports it."""
    async with serving() as reg:
        a = pod("shop", "a", None, "10.0.0.1")
        await reg.report(nodeagent_pb2.ReportRequest(node="n1", pods=[a]))
        assert (await reg.report(nodeagent_pb2.ReportRequest(node="n2", pods=[a]))).accepted == 0
        await reg.report(nodeagent_pb2.ReportRequest(node="n1"))  # gone from n1: n2's claim applies at once
        await reg.next_replace(4)
        assert [(e.origin, [o.name for o in e.objects or ()]) for e in reg.replaces()] == [
            ("node-agent:n1", ["a"]), ("node-agent:n2", []), ("node-agent:n1", []), ("node-agent:n2", ["a"])]
        assert reg.replaces()[-1].errors == ()


@pytest.mark.parametrize("path", [
    "../../proc/1/ns/net", "/proc/1/ns/net", f"{NETNS}/../../../proc/1/ns/net", f"{NETNS}/x/../shop_a",
    f"{NETNS}/./shop_a", f"{NETNS}//shop_a", f"{NETNS}/shop_a/", f"{NETNS}-evil/shop_a", NETNS,
    f"{NETNS}/shop_b", f"{NETNS}/shop_a\0",
])
async def test_a_node_agent_cannot_name_a_foreign_path(path: str) -> None:
    async with serving() as reg:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await reg.report(nodeagent_pb2.ReportRequest(node="n1", pods=[pod("shop", "a", path, "10.0.0.1")]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (err.value.details() or "").startswith(f"pods[0].netns_path: {path!r} ")
        assert reg.replaces() == [] and reg.registry.refusals == {"path": 1}
        # Its own mount, also in a per-node directory below the netns directory, is fine.
        for good in (f"{NETNS}/shop_a", f"{NETNS}/n1/shop_a"):
            assert (await reg.report(nodeagent_pb2.ReportRequest(node="n1", pods=[pod("shop", "a", good)]))).accepted


# --------------------------------------------------------------------------- the CLI


async def test_node_agent_once_reports_and_fails_clearly(tmp_path: Path) -> None:
    pods = tmp_path / "pods.yaml"
    pods.write_text("- {namespace: shop, name: ghost, ips: [198.19.255.254]}\n")  # no such netns: not reported
    token = tmp_path / "token"
    token.write_text("t0k3n\n")
    seen: list[str | bytes | None] = []

    async def authorize(metadata: Sequence[tuple[str, str | bytes]], node: str) -> str | None:
        seen.append(dict(metadata).get("authorization"))
        return None

    args = ["node-agent", "--node", "node-7", "--pods-file", str(pods), "--netns-dir", str(tmp_path / "netns"),
            "--no-iptables", "--token-file", str(token), "--once"]
    async with serving(authorize) as reg:
        r = await asyncio.to_thread(CliRunner().invoke, cli, [*args, "--xds-address", reg.address])
        assert r.exit_code == 0, r.output
        assert "reported 0 ambient pod(s) of node node-7" in r.output
        assert (await reg.next_replace(1)) == reg.replaces()[0] and reg.replaces()[0].objects == ()
        assert seen == ["Bearer t0k3n"]
        dead = reg.address
    r = await asyncio.to_thread(CliRunner().invoke, cli, [*args, "--xds-address", dead])
    assert r.exit_code == 1 and f"Error: report to {dead} failed: UNAVAILABLE" in r.output


# --------------------------------------------------------------------------- real network namespaces


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, bind mounts, iptables)"
    for tool in ("ip", "iptables", "iptables-save", "iptables-restore", "nsenter", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"needs {tool} on PATH (apt-get install -y iproute2 iptables util-linux mount)"
    return None


def _sleep_in(ns: str) -> subprocess.Popen[bytes]:
    """`sleep` in netns `ns`, returned once it is in there (`ip netns exec` enters, then execs)."""
    proc = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "300"], start_new_session=True)
    want = os.stat(f"/run/netns/{ns}").st_ino
    for _ in range(1000):
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/{proc.pid}/ns/net").st_ino == want:
                return proc
        assert proc.poll() is None, f"ip netns exec {ns} sleep: exit {proc.returncode}"
        time.sleep(0.01)
    raise AssertionError(f"sleep did not enter netns {ns}")


class Node:
    """Two pods: fresh network namespaces joined by a veth pair, a `sleep` in each."""

    def __init__(self, tmp: Path) -> None:
        tag = secrets.token_hex(3)
        third, base = secrets.randbelow(256), 4 * secrets.randbelow(64)
        self.netns = {"pod-a": f"ml-na-a-{tag}", "pod-b": f"ml-na-b-{tag}"}
        self.ips = {"pod-a": f"198.19.{third}.{base + 1}", "pod-b": f"198.19.{third}.{base + 2}"}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.created: list[str] = []
        self.netns_dir = tmp / "netns"
        self.pods_file = tmp / "pods.json"

    def start(self) -> None:
        a, b = self.netns["pod-a"], self.netns["pod-b"]
        for ns in (a, b):
            sh("ip", "netns", "add", ns)
            self.created.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", b)
        for name, ns in self.netns.items():
            sh("ip", "-n", ns, "addr", "add", f"{self.ips[name]}/30", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            self.procs[name] = _sleep_in(ns)
        self.pods_file.write_text(json.dumps([{"namespace": "lab", "name": n, "ips": [ip]}
                                              for n, ip in self.ips.items()]))

    def netns_inode(self, name: str) -> int:
        pid = self.procs[name].pid  # `ip netns exec` execs the command: this is the sleep
        return os.stat(f"/proc/{pid}/ns/net").st_ino

    def nat(self, name: str) -> str:
        return sh("ip", "netns", "exec", self.netns[name], "iptables-save", "-t", "nat")

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.kill()
        proc.wait(timeout=10)
        ns = self.netns[name]
        sh("ip", "netns", "del", ns)
        self.created.remove(ns)

    def close(self) -> None:
        for proc in self.procs.values():
            proc.kill()
            proc.wait(timeout=10)
        if self.netns_dir.is_dir():
            for path in self.netns_dir.iterdir():
                while mounted_inode(path) is not None:
                    sh("umount", str(path))
        for ns in self.created:
            sh("ip", "netns", "del", ns, check=False)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    if _missing() is not None:
        pytest.skip(_missing() or "")
    n = Node(tmp_path)
    try:
        n.start()
        yield n
    finally:
        n.close()


async def test_agent_finds_mounts_captures_and_reports_real_namespaces(node: Node) -> None:
    async with serving(netns_dir=str(node.netns_dir)) as reg:
        agent = NodeAgent(AgentConfig(node="node-1", xds_address=reg.address, netns_dir=node.netns_dir),
                          lambda: load_pods_file(node.pods_file))
        assert await agent.run_once() == 2
        ev = await reg.next_replace(1)
        assert ev.origin == "node-agent:node-1"
        assert [(o.name, o.body["ips"]) for o in ev.objects or ()] == [
            ("pod-a", [node.ips["pod-a"]]), ("pod-b", [node.ips["pod-b"]])]
        for obj in ev.objects or ():
            path = Path(obj.body["netnsPath"])
            assert path == node.netns_dir / f"lab_{obj.name}" and path.is_file()
            assert os.stat(path).st_ino == node.netns_inode(obj.name)
            # The path is usable as that namespace, and the capture rules are in place there.
            assert node.ips[obj.name] in sh("nsenter", f"--net={path}", "ip", "-o", "-4", "addr", "show")
            rules = node.nat(obj.name)
            assert "-A OUTPUT -p tcp -j MESHLINE_AMB_OUTPUT" in rules
            assert "-A MESHLINE_AMB_OUTPUT -p tcp -j REDIRECT --to-ports 15001" in rules

        assert await agent.run_once() == 2  # nothing changed: same mounts, no new event
        await asyncio.sleep(0.2)
        assert len(reg.replaces()) == 1
        assert sum(ln == "-A OUTPUT -p tcp -j MESHLINE_AMB_OUTPUT" for ln in node.nat("pod-a").splitlines()) == 1

        gone = node.netns_dir / "lab_pod-b"
        node.stop("pod-b")
        assert mounted_inode(gone) is not None  # our mount alone holds that netns now
        assert await agent.run_once() == 1
        ev = await reg.next_replace(2)
        assert [o.name for o in ev.objects or ()] == ["pod-a"]
        assert not gone.exists() and mounted_inode(gone) is None
        assert os.stat(node.netns_dir / "lab_pod-a").st_ino == node.netns_inode("pod-a")


def test_control_plane_accepts_reports_only_from_the_node_proxy_of_that_node() -> None:
    """`serve --node-agents` with a CA: the reporting credential must be the node proxy's
    identity, bound to the node the report is for."""
    import datetime as dt
    import types

    from controlplane.ca import tokens
    from controlplane.ca.authn import Authenticator
    from controlplane.ca.identity import Identity
    from controlplane.serve import _node_agent_authorizer

    key = b"x" * 32
    fake = types.SimpleNamespace(authenticator=Authenticator(lambda: key))
    authorize = _node_agent_authorizer(fake, "meshline-system")  # type: ignore[arg-type]
    proxy = Identity("meshline-system", "meshline-node-proxy")

    def md(token: str) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {token}")]

    async def check() -> list[str | None]:
        hour = dt.timedelta(hours=1)
        return [
            await authorize(md(tokens.mint(key, proxy, hour, node="n1")), "n1"),
            await authorize(md(tokens.mint(key, proxy, hour, node="n1")), "n2"),
            await authorize(md(tokens.mint(key, proxy, hour)), "n1"),
            await authorize(md(tokens.mint(key, Identity("shop", "web"), hour, node="n1")), "n1"),
            await authorize([], "n1"),
        ]

    ok, other_node, unbound, not_proxy, anonymous = asyncio.run(check())
    assert ok is None
    assert other_node is not None and "not n2" in other_node
    assert unbound is not None and "not bound to a node" in unbound
    assert not_proxy is not None and "not the node proxy" in not_proxy
    assert anonymous is not None and "not authenticated" in anonymous


def test_a_node_whose_agent_stops_reporting_loses_its_pods() -> None:
    """An agent that goes silent (its node is gone) must not leave netns paths behind forever."""
    from controlplane.nodeagent.registry import NodeAgentRegistry
    from controlplane.nodeagent.registry import PodNetns as Reported
    from controlplane.sources.base import Replace

    async def scenario() -> list[Replace]:
        reg = NodeAgentRegistry(expire_after_s=0.3)
        got: list[Replace] = []

        async def sink(events: list[object]) -> None:
            got.extend(e for e in events if isinstance(e, Replace))

        task = asyncio.create_task(reg.run(sink))  # type: ignore[arg-type]
        try:
            reg.accept("n1", (Reported("shop", "a", "/var/run/meshline/netns/shop_a", ("10.0.0.1",)),))
            reg.accept("n2", ())
            for _ in range(3):  # n2 keeps reporting, n1 went silent
                await asyncio.sleep(0.2)
                reg.accept("n2", ())
            await asyncio.sleep(0.3)
            return got
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    got = asyncio.run(scenario())
    assert [len(e.objects or ()) for e in got if e.origin == "node-agent:n1"] == [1, 0]  # reported, then dropped
    assert [len(e.objects or ()) for e in got if e.origin == "node-agent:n2"] == [0]  # still reporting: kept


def _pod_cgroup(uid: str) -> Path:
    return Path("/sys/fs/cgroup/pids/kubepods/besteffort") / f"pod{uid}"


class Neighbours:
    """Two pods as kubelet leaves them on a node: each a fresh netns with a `sleep` in its own
    `pod<uid>` cgroup (cgroup v1 pids hierarchy, cgroupfs layout) and the same IP, the
    neighbour having configured the victim's."""

    def __init__(self, tmp: Path) -> None:
        tag = secrets.token_hex(3)
        self.ip = f"198.18.{secrets.randbelow(256)}.{1 + secrets.randbelow(250)}"
        self.uids = {"victim": UID_VICTIM, "neighbour": UID_NEIGHBOUR}
        self.netns = {"victim": f"ml-vi-{tag}", "neighbour": f"ml-ne-{tag}"}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.created: list[str] = []
        self.cgroups: list[Path] = []
        self.netns_dir = tmp / "netns"

    def start(self) -> None:
        for ns in self.netns.values():
            sh("ip", "netns", "add", ns)
            self.created.append(ns)
        sh("ip", "-n", self.netns["victim"], "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns",
           self.netns["neighbour"])
        for pod, ns in self.netns.items():
            sh("ip", "-n", ns, "addr", "add", f"{self.ip}/32", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            proc = self.procs[pod] = _sleep_in(ns)
            cgroup = _pod_cgroup(self.uids[pod])
            cgroup.mkdir(parents=True, exist_ok=True)
            self.cgroups.append(cgroup)
            (cgroup / "cgroup.procs").write_text(str(proc.pid))

    def inode(self, pod: str) -> int:
        return os.stat(f"/proc/{self.procs[pod].pid}/ns/net").st_ino

    def stop(self, pod: str) -> None:
        proc = self.procs.pop(pod)
        proc.kill()
        proc.wait(timeout=10)
        sh("ip", "netns", "del", self.netns[pod])
        self.created.remove(self.netns[pod])

    def close(self) -> None:
        for proc in self.procs.values():
            proc.kill()
            proc.wait(timeout=10)
        if self.netns_dir.is_dir():
            for path in self.netns_dir.iterdir():
                while mounted_inode(path) is not None:
                    sh("umount", str(path))
        for ns in self.created:
            sh("ip", "netns", "del", ns, check=False)
        for cgroup in self.cgroups:
            with contextlib.suppress(OSError):
                cgroup.rmdir()
        for parent in (Path("/sys/fs/cgroup/pids/kubepods/besteffort"), Path("/sys/fs/cgroup/pids/kubepods")):
            with contextlib.suppress(OSError):
                parent.rmdir()  # only when empty: a real kubelet's stay


@pytest.fixture
def neighbours(tmp_path: Path) -> Iterator[Neighbours]:
    if _missing() is not None:
        pytest.skip(_missing() or "")
    if not os.access("/sys/fs/cgroup/pids", os.W_OK) or (Path("/sys/fs/cgroup/pids/kubepods").exists()
                                                          and not _pod_cgroup(UID_VICTIM).exists()):
        pytest.skip("needs a writable cgroup v1 pids hierarchy, without a kubelet's kubepods")
    n = Neighbours(tmp_path)
    try:
        n.start()
        yield n
    finally:
        n.close()


async def test_real_neighbour_holding_the_victims_ip_never_gets_the_victims_netns(neighbours: Neighbours) -> None:
    victim = PodRef("shop", "victim", (neighbours.ip,), UID_VICTIM)
    facts = {("shop", "victim"): PodFacts(UID_VICTIM, "node-1")}
    async with serving(netns_dir=str(neighbours.netns_dir), pods=lambda ns, name: facts.get((ns, name))) as reg:
        agent = NodeAgent(AgentConfig(node="node-1", xds_address=reg.address, netns_dir=neighbours.netns_dir,
                                      iptables=False), lambda: [victim])
        assert await agent.run_once() == 1
        [obj] = (await reg.next_replace(1)).objects or ()
        path = Path(obj.body["netnsPath"])
        assert (obj.name, obj.body["podUID"]) == ("victim", UID_VICTIM)
        assert os.stat(path).st_ino == neighbours.inode("victim") != neighbours.inode("neighbour")

        # The victim's sandbox is gone; its IP lives on in the neighbour: not the victim's.
        neighbours.stop("victim")
        assert await agent.run_once() == 0
        assert (await reg.next_replace(2)).objects == ()
        assert not path.exists()
