"""The control plane's end of the node agents: the `meshline.nodeagent.v1.NodeAgent` gRPC
service (protos/meshline/nodeagent/v1/nodeagent.proto) and a Source (see
`controlplane.sources.base`) that turns each node's report into `PodNetns` raw objects.
Does no I/O itself beyond answering RPCs (served on the plain xDS port with
`meshline serve --node-agents`).

A report is a node's FULL current set: it becomes `Replace(origin="node-agent:<node>")`, so
a pod missing from the next report is gone. Status codes: PERMISSION_DENIED when the
authorization hook refuses the caller (its reason as the message); INVALID_ARGUMENT naming
the field for an empty node, a pod without namespace or name, a relative netns_path or an
IP that is not one. Within one report a pod listed twice keeps its last entry.

Each pod becomes (sorted by namespace, name):

    RawObject(kind="PodNetns", api_version="meshline.io/v1", namespace=NS, name=NAME,
              file="node-agent:<node>",
              body={"apiVersion": "meshline.io/v1", "kind": "PodNetns",
                    "metadata": {"namespace": NS, "name": NAME},
                    "node": NODE, "netnsPath": PATH, "ips": [IP, ...]})
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from controlplane.model.raw import RawObject
from controlplane.nodeagent.gen import nodeagent_pb2
from controlplane.sources.base import Replace, Sink, SourceEvent, Synced

log = logging.getLogger(__name__)

SERVICE = "meshline.nodeagent.v1.NodeAgent"
KIND = "PodNetns"
API_VERSION = "meshline.io/v1"
ORIGIN_PREFIX = "node-agent:"

Authorize = Callable[[Sequence[tuple[str, str | bytes]], str], Awaitable[str | None]]
"""(invocation metadata, the node the report is for) -> None when allowed, else why not."""
"""Given the call's invocation metadata: None to allow it, else the reason to refuse it."""


class ReportError(ValueError):
    """A report that cannot be accepted; the message names the field."""


@dataclass(frozen=True, slots=True)
class PodNetns:
    """One pod's network namespace as a node agent reports it."""

    namespace: str
    name: str
    netns_path: str
    ips: tuple[str, ...] = ()

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


def origin_of(node: str) -> str:
    return f"{ORIGIN_PREFIX}{node}"


def parse_report(request: Any) -> tuple[str, tuple[PodNetns, ...]]:
    """(node, pods sorted by namespace/name, the last entry of a duplicate winning) from a
    `ReportRequest`; raises ReportError naming the offending field."""
    node = str(request.node).strip()
    if not node:
        raise ReportError("node: must not be empty")
    pods: dict[tuple[str, str], PodNetns] = {}
    for i, p in enumerate(request.pods):
        pod = _parse_pod(f"pods[{i}]", p)
        pods[pod.key] = pod
    return node, tuple(pods[k] for k in sorted(pods))


def _parse_pod(where: str, p: Any) -> PodNetns:
    for field in ("namespace", "name"):
        if not str(getattr(p, field)).strip():
            raise ReportError(f"{where}.{field}: must not be empty")
    path = str(p.netns_path)
    if not path.startswith("/"):
        raise ReportError(f"{where}.netns_path: {path!r} is not an absolute path")
    ips = []
    for j, ip in enumerate(p.ips):
        try:
            ips.append(str(ipaddress.ip_address(str(ip).strip())))
        except ValueError:
            raise ReportError(f"{where}.ips[{j}]: {ip!r} is not an IP address") from None
    return PodNetns(str(p.namespace).strip(), str(p.name).strip(), path, tuple(ips))


def raw_object(node: str, pod: PodNetns) -> RawObject:
    body = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"namespace": pod.namespace, "name": pod.name},
        "node": node,
        "netnsPath": pod.netns_path,
        "ips": list(pod.ips),
    }
    return RawObject(kind=KIND, api_version=API_VERSION, namespace=pod.namespace, name=pod.name, body=body,
                     file=origin_of(node))


def report_event(node: str, pods: Sequence[PodNetns]) -> Replace:
    """The Replace a node's report becomes (`pods` already sorted)."""
    return Replace(origin=origin_of(node), objects=tuple(raw_object(node, p) for p in pods))


class NodeAgentRegistry:
    """Source of `PodNetns` objects, fed by the `NodeAgent.Report` RPC. Readiness never waits
    for agents: `Synced` is emitted as soon as `run` starts."""

    def __init__(self, authorize: Authorize | None = None, name: str = "node-agents",
                 expire_after_s: float = 60.0) -> None:
        """`expire_after_s`: a node whose agent has not reported for this long loses its pods'
        netns paths (the node is gone, or its agent is: nothing keeps the paths valid)."""
        self.name = name
        self._authorize = authorize
        self._queue: asyncio.Queue[list[SourceEvent]] = asyncio.Queue()
        self._last: dict[str, tuple[PodNetns, ...]] = {}  # node -> its last accepted set
        self._seen: dict[str, float] = {}  # node -> when its agent last reported (monotonic)
        self.expire_after_s = expire_after_s

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        return [grpc.method_handlers_generic_handler(SERVICE, {
            "Report": grpc.unary_unary_rpc_method_handler(
                self.report,
                request_deserializer=nodeagent_pb2.ReportRequest.FromString,
                response_serializer=nodeagent_pb2.ReportResponse.SerializeToString,
            ),
        })]

    async def run(self, sink: Sink) -> None:
        await sink([Synced(self.name)])
        while True:
            try:
                events = await asyncio.wait_for(self._queue.get(), timeout=max(0.05, self.expire_after_s / 4))
            except TimeoutError:
                events = self.expire(time.monotonic())
            if events:
                await sink(events)

    def expire(self, now: float) -> list[SourceEvent]:
        """Forget the nodes whose agents stopped reporting."""
        out: list[SourceEvent] = []
        for node, seen in sorted(self._seen.items()):
            if now - seen > self.expire_after_s:
                del self._seen[node]
                if self._last.pop(node, ()):
                    log.warning("node %s: no report from its node agent for %.0f s; its pods' netns paths "
                                "are dropped", node, now - seen)
                    out.append(report_event(node, ()))
        return out

    async def report(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if self._authorize is not None:
            reason = await self._authorize(tuple(context.invocation_metadata() or ()), str(request.node))
            if reason is not None:
                log.warning("node-agent report from %s refused: %s", context.peer(), reason)
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)
        try:
            node, pods = parse_report(request)
        except ReportError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self.accept(node, pods)
        return nodeagent_pb2.ReportResponse(accepted=len(pods))

    def accept(self, node: str, pods: tuple[PodNetns, ...]) -> bool:
        """Queue `node`'s new set; False (nothing queued) when it equals the last one."""
        self._seen[node] = time.monotonic()
        previous = self._last.get(node)
        if previous == pods:
            return False
        self._last[node] = pods
        _log_change(node, previous or (), pods)
        self._queue.put_nowait([report_event(node, pods)])
        return True


def _log_change(node: str, before: Sequence[PodNetns], after: Sequence[PodNetns]) -> None:
    old = {p.key: p for p in before}
    new = {p.key: p for p in after}
    gained = sorted(k for k in new if old.get(k) != new[k])
    lost = sorted(k for k in old if k not in new)
    log.info("node %s: %d ambient pod(s)%s%s", node, len(new),
             f"; now {', '.join('/'.join(k) for k in gained)}" if gained else "",
             f"; gone {', '.join('/'.join(k) for k in lost)}" if lost else "")
