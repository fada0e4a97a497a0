"""The control plane's end of the node agents: the `meshline.nodeagent.v1.NodeAgent` gRPC
service (protos/meshline/nodeagent/v1/nodeagent.proto) and a Source (see
`controlplane.sources.base`) that turns each node's report into `PodNetns` raw objects.
Does no I/O itself beyond answering RPCs (served on the xDS port with
`meshline serve --node-agents`).

A report is a node's FULL current set: what the registry accepts of it becomes
`Replace(origin="node-agent:<node>")`, so a pod missing from the next report is gone.

Integrity (what one node's credential can do, issue 14):

- the caller must prove the node it reports for (the authorization hook; `serve` checks
  the node-bound credential of the node proxy): PERMISSION_DENIED with the reason;
- every netns path must be a normalised absolute path (no `.`, `..`, `//`) inside the node
  agents' netns directory (`netns_dir`, /var/run/meshline/netns) ending in
  `/<namespace>_<name>` of its own pod, the name the agent mounts it under: anything else
  (`../../proc/1/ns/net`, `/proc/1/ns/net`, another pod's mount) is INVALID_ARGUMENT
  naming the field;
- a pod is held by at most one node. A claim is refused when the Pod (`pods`, the control
  plane's view of Pod objects) runs on another node or has another UID than the one the
  agent found in the cgroup of the process holding the netns (a neighbour holding the
  victim's IP is another pod), or when another node already holds the pod (the first
  holder keeps it until it stops reporting it, or the Pod says otherwise). A refused claim
  never changes what another node's report gave: it is left out of the node's objects and
  reported as an error value on the node's origin (status: /v1/config/errors), in the
  response's `errors`, in the log, and counted in `refusals` by reason.

Other problems are INVALID_ARGUMENT naming the field: an empty node, a pod without
namespace or name, an IP that is not one. Within one report a pod listed twice keeps its
last entry.

Each accepted pod becomes (sorted by namespace, name):

    RawObject(kind="PodNetns", api_version="meshline.io/v1", namespace=NS, name=NAME,
              file="node-agent:<node>",
              body={"apiVersion": "meshline.io/v1", "kind": "PodNetns",
                    "metadata": {"namespace": NS, "name": NAME},
                    "node": NODE, "netnsPath": PATH, "ips": [IP, ...], "podUID": UID})
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import posixpath
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

import grpc

from controlplane.model.raw import ObjectKey, RawObject
from controlplane.nodeagent.gen import nodeagent_pb2
from controlplane.sources.base import Replace, Sink, SourceEvent, Synced
from controlplane.sources.yamlload import ParseError

log = logging.getLogger(__name__)

SERVICE = "meshline.nodeagent.v1.NodeAgent"
KIND = "PodNetns"
API_VERSION = "meshline.io/v1"
ORIGIN_PREFIX = "node-agent:"
DEFAULT_NETNS_DIR = "/var/run/meshline/netns"

Authorize = Callable[[Sequence[tuple[str, str | bytes]], str], Awaitable[str | None]]
"""(invocation metadata, the node the report is for) -> None when allowed, else why not."""

PodKey = tuple[str, str]  # (namespace, name)
_UID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32}")


class ReportError(ValueError):
    """A report that cannot be accepted; the message names the field."""


class ForeignPath(ReportError):
    """A netns path a node agent may not name (counted and logged: never a bug of ours)."""


@dataclass(frozen=True, slots=True)
class PodNetns:
    """One pod's network namespace as a node agent reports it. `uid`: the pod UID found in
    the cgroup of the process holding the netns ("": none found, e.g. not a kubelet pod)."""

    namespace: str
    name: str
    netns_path: str
    ips: tuple[str, ...] = ()
    uid: str = ""

    @property
    def key(self) -> PodKey:
        return (self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class PodFacts:
    """What the control plane's Pod object says ("" where it says nothing)."""

    uid: str = ""
    node: str = ""


PodLookup = Callable[[str, str], PodFacts | None]
"""(namespace, name) -> the Pod's facts, None when the control plane knows no such Pod."""


def pods_in(objects: Callable[[ObjectKey], RawObject | None]) -> PodLookup:
    """A PodLookup over raw objects by key, e.g. `MeshStore.sources_of`."""

    def lookup(namespace: str, name: str) -> PodFacts | None:
        raw = objects(("Pod", namespace, name))
        if raw is None:
            return None
        meta, spec = raw.body.get("metadata"), raw.body.get("spec")
        uid = meta.get("uid") if isinstance(meta, dict) else None
        node = spec.get("nodeName") if isinstance(spec, dict) else None
        return PodFacts(str(uid or "").lower(), str(node or ""))

    return lookup


def origin_of(node: str) -> str:
    return f"{ORIGIN_PREFIX}{node}"


def _within(path: str, directory: str) -> bool:
    return path.startswith(directory.rstrip("/") + "/")


def check_netns_path(where: str, path: str, namespace: str, name: str, netns_dir: str) -> str:
    """`path` when a node agent may name it for pod `namespace/name`; else ReportError.
    Lexical (the path is on the agent's node): normalised, inside `netns_dir`, and the
    pod's own mount name last."""
    if not path.startswith("/"):
        raise ForeignPath(f"{where}: {path!r} is not an absolute path")
    if "\0" in path or path.startswith("//") or posixpath.normpath(path) != path:
        raise ForeignPath(f"{where}: {path!r} is not a normalised path (no `.`, `..`, `//` or trailing `/`)")
    if not _within(path, netns_dir):
        raise ForeignPath(f"{where}: {path!r} is outside the node agents' netns directory {netns_dir}")
    if posixpath.basename(path) != f"{namespace}_{name}":
        raise ForeignPath(f"{where}: {path!r} is not this pod's mount (…/{namespace}_{name})")
    return path


def parse_report(request: nodeagent_pb2.ReportRequest, netns_dir: str = DEFAULT_NETNS_DIR
                 ) -> tuple[str, tuple[PodNetns, ...]]:
    """(node, pods sorted by namespace/name, the last entry of a duplicate winning) from a
    `ReportRequest`; raises ReportError naming the offending field."""
    node = str(request.node).strip()
    if not node:
        raise ReportError("node: must not be empty")
    pods: dict[PodKey, PodNetns] = {}
    for i, p in enumerate(request.pods):
        pod = _parse_pod(f"pods[{i}]", p, netns_dir)
        pods[pod.key] = pod
    return node, tuple(pods[k] for k in sorted(pods))


def _parse_pod(where: str, p: nodeagent_pb2.PodNetns, netns_dir: str) -> PodNetns:
    for field in ("namespace", "name"):
        if not str(getattr(p, field)).strip():
            raise ReportError(f"{where}.{field}: must not be empty")
    namespace, name = str(p.namespace).strip(), str(p.name).strip()
    path = check_netns_path(f"{where}.netns_path", str(p.netns_path), namespace, name, netns_dir)
    ips = []
    for j, ip in enumerate(p.ips):
        try:
            ips.append(str(ipaddress.ip_address(str(ip).strip())))
        except ValueError:
            raise ReportError(f"{where}.ips[{j}]: {ip!r} is not an IP address") from None
    uid = str(p.uid).strip().lower()
    if uid and not _UID.fullmatch(uid):
        raise ReportError(f"{where}.uid: {p.uid!r} is not a Kubernetes UID")
    return PodNetns(namespace, name, path, tuple(ips), uid)


def raw_object(node: str, pod: PodNetns) -> RawObject:
    body = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"namespace": pod.namespace, "name": pod.name},
        "node": node,
        "netnsPath": pod.netns_path,
        "ips": list(pod.ips),
        "podUID": pod.uid,
    }
    return RawObject(kind=KIND, api_version=API_VERSION, namespace=pod.namespace, name=pod.name, body=body,
                     file=origin_of(node))


def report_event(node: str, pods: Sequence[PodNetns], refused: Sequence[str] = ()) -> Replace:
    """The Replace a node's accepted pods become (`pods` already sorted); `refused`: why its
    other claims were refused, as error values on the node's origin."""
    origin = origin_of(node)
    return Replace(origin=origin, objects=tuple(raw_object(node, p) for p in pods),
                   errors=tuple(ParseError(origin, 0, message) for message in refused))


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the registry makes of a node's claims: the pods it holds, and why it holds no
    others it claims ((reason, message) by pod; reasons: "node", "uid", "conflict")."""

    accepted: tuple[PodNetns, ...] = ()
    refused: tuple[tuple[PodKey, str, str], ...] = ()

    @property
    def messages(self) -> tuple[str, ...]:
        return tuple(message for _key, _reason, message in self.refused)


def _name(key: PodKey) -> str:
    return "/".join(key)


class NodeAgentRegistry:
    """Source of `PodNetns` objects, fed by the `NodeAgent.Report` RPC. Readiness never waits
    for agents: `Synced` is emitted as soon as `run` starts."""

    def __init__(self, authorize: Authorize | None = None, name: str = "node-agents",
                 expire_after_s: float = 60.0, netns_dir: str = DEFAULT_NETNS_DIR,
                 pods: PodLookup | None = None) -> None:
        """`expire_after_s`: a node whose agent has not reported for this long loses its pods'
        netns paths (the node is gone, or its agent is: nothing keeps the paths valid).
        `netns_dir`: where node agents mount pods' netns (their `--netns-dir`). `pods`: the
        Pod objects to check claims against (settable later, once the store exists);
        without it only the first-holder rule applies."""
        self.name = name
        self._authorize = authorize
        self.netns_dir = posixpath.normpath(netns_dir)
        self.pods = pods
        self._queue: asyncio.Queue[list[SourceEvent]] = asyncio.Queue()
        self._reports: dict[str, dict[PodKey, PodNetns]] = {}  # node -> its last report
        self._claims: dict[PodKey, dict[str, PodNetns]] = {}  # pod -> node -> its claim
        self._holder: dict[PodKey, str] = {}  # pod -> the node whose claim is accepted
        self._refused: dict[PodKey, dict[str, tuple[str, str]]] = {}  # pod -> node -> (reason, message)
        self._verdicts: dict[str, Verdict] = {}  # node -> what was last emitted for it
        self._seen: dict[str, float] = {}  # node -> when its agent last reported (monotonic)
        self.expire_after_s = expire_after_s
        self.refusals: Counter[str] = Counter()  # reason -> claims refused (in reports received)

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
        loop = asyncio.get_running_loop()
        period = max(0.05, self.expire_after_s / 4)
        check_at = loop.time() + period  # however busy the reports keep the queue
        while True:
            events: list[SourceEvent] = []
            with contextlib.suppress(TimeoutError):
                events = await asyncio.wait_for(self._queue.get(), timeout=max(0.0, check_at - loop.time()))
            if loop.time() >= check_at:
                events = [*events, *self.expire(time.monotonic())]
                check_at = loop.time() + period
            if events:
                await sink(events)

    def expire(self, now: float) -> list[SourceEvent]:
        """Forget the nodes whose agents stopped reporting (other nodes' refused claims on
        their pods may now be accepted)."""
        gone = sorted(node for node, seen in self._seen.items() if now - seen > self.expire_after_s)
        keys: set[PodKey] = set()
        for node in gone:
            if self._reports.get(node):
                log.warning("node %s: no report from its node agent for %.0f s; its pods' netns paths "
                            "are dropped", node, now - self._seen[node])
            del self._seen[node]
            keys |= self._set_report(node, None)
        return self._settle(keys, gone)

    async def report(self, request: nodeagent_pb2.ReportRequest, context: grpc.aio.ServicerContext
                     ) -> nodeagent_pb2.ReportResponse:
        if self._authorize is not None:
            reason = await self._authorize(tuple(context.invocation_metadata() or ()), str(request.node))
            if reason is not None:
                log.warning("node-agent report from %s refused: %s", context.peer(), reason)
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)
        try:
            node, pods = parse_report(request, self.netns_dir)
        except ReportError as exc:
            if isinstance(exc, ForeignPath):
                self.refusals["path"] += 1
                log.warning("node-agent report for node %s from %s refused: %s", request.node, context.peer(), exc)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self.accept(node, pods)
        verdict = self.verdict(node)
        self.refusals.update(reason for _key, reason, _message in verdict.refused)
        return nodeagent_pb2.ReportResponse(accepted=len(verdict.accepted), errors=list(verdict.messages))

    def verdict(self, node: str) -> Verdict:
        return self._verdicts.get(node, Verdict())

    def accept(self, node: str, pods: tuple[PodNetns, ...]) -> bool:
        """Take `node`'s new full set; True when this changed what some node holds (events
        queued), False when nothing changed."""
        self._seen[node] = time.monotonic()
        events = self._settle(self._set_report(node, pods), [node])
        if events:
            self._queue.put_nowait(events)
        return bool(events)

    # ------------------------------------------------------------------ claims
    def _set_report(self, node: str, pods: tuple[PodNetns, ...] | None) -> set[PodKey]:
        """Record `node`'s report (None: forget the node); the pods whose claims it touches."""
        before = self._reports.pop(node, {})
        for key in before:
            claims = self._claims.get(key, {})
            claims.pop(node, None)
            if not claims:
                self._claims.pop(key, None)
        if pods is not None:
            self._reports[node] = {p.key: p for p in pods}
            for p in pods:
                self._claims.setdefault(p.key, {})[node] = p
        return set(before) | {p.key for p in pods or ()}

    def _check(self, node: str, claim: PodNetns, facts: PodFacts | None) -> tuple[str, str] | None:
        """Why the Pod refutes `node`'s claim, if it does: (reason, message)."""
        if facts is None:
            return None
        pod = _name(claim.key)
        if facts.node and facts.node != node:
            return "node", f"pod {pod}: refused: the Pod runs on node {facts.node}, not {node}"
        if facts.uid and claim.uid != facts.uid:
            found = f"UID {claim.uid}" if claim.uid else "no pod UID"
            return "uid", (f"pod {pod}: refused: the network namespace at {claim.netns_path} belongs to {found}, not "
                           f"the Pod's {facts.uid} (another pod holds its IP?)")
        return None

    def _resolve(self, key: PodKey) -> tuple[str | None, dict[str, tuple[str, str]]]:
        """The node holding pod `key` (None: nobody) and every other claimant's refusal."""
        claims = self._claims.get(key, {})
        facts = self.pods(*key) if self.pods is not None and claims else None
        refused: dict[str, tuple[str, str]] = {}
        valid = []
        for node in sorted(claims):
            why = self._check(node, claims[node], facts)
            if why is None:
                valid.append(node)
            else:
                refused[node] = why
        if len(valid) <= 1:
            return (valid[0] if valid else None), refused
        holder = self._holder.get(key)
        holder = holder if holder in valid else None
        for node in valid:
            if node == holder:
                continue
            if holder is not None:
                message = f"pod {_name(key)}: refused: node {holder} holds it (one pod, one node)"
            else:
                message = (f"pod {_name(key)}: refused: nodes {', '.join(valid)} all report it; none is used until "
                           "only one does")
            refused[node] = ("conflict", message)
        return holder, refused

    def _settle(self, keys: Iterable[PodKey], nodes: Iterable[str]) -> list[SourceEvent]:
        """Resolve pods `keys` again; the events of every node whose verdict changed (`nodes`:
        reported or forgotten just now, always looked at). Nodes losing a pod come first, so
        no pod is ever held by two origins."""
        touched = set(nodes)
        for key in sorted(set(keys)):
            previous = self._holder.get(key)
            holder, refused = self._resolve(key)
            if holder is None:
                self._holder.pop(key, None)
            else:
                self._holder[key] = holder
            if refused:
                self._refused[key] = refused
            else:
                self._refused.pop(key, None)
            touched |= set(self._claims.get(key, {}))
            if previous is not None:
                touched.add(previous)
        shrink: list[SourceEvent] = []
        grow: list[SourceEvent] = []
        for node in sorted(touched):
            before = self._verdicts.get(node)
            report = self._reports.get(node)
            if report is not None:
                verdict = Verdict(
                    tuple(p for k, p in sorted(report.items()) if self._holder.get(k) == node),
                    tuple((k, *self._refused.get(k, {}).get(node, ("conflict", f"pod {_name(k)}: refused")))
                          for k in sorted(report) if self._holder.get(k) != node))
                self._verdicts[node] = verdict
            else:  # forgotten
                verdict = Verdict()
                self._verdicts.pop(node, None)
                if before is None or before == verdict:
                    continue
            if before == verdict:
                continue
            _log_change(node, before or Verdict(), verdict)
            kept = {p.key for p in verdict.accepted}
            held = before.accepted if before is not None else ()
            final = report_event(node, verdict.accepted, verdict.messages)
            if not any(p.key not in kept for p in held):
                grow.append(final)
            elif set(verdict.accepted) <= set(held):
                shrink.append(final)  # only loses pods
            else:  # loses some and gains others: first without the lost ones
                shrink.append(report_event(node, [p for p in held if p.key in kept], verdict.messages))
                grow.append(final)
        return [*shrink, *grow]


def _log_change(node: str, before: Verdict, after: Verdict) -> None:
    old = {p.key: p for p in before.accepted}
    new = {p.key: p for p in after.accepted}
    gained = sorted(k for k in new if old.get(k) != new[k])
    lost = sorted(k for k in old if k not in new)
    if gained or lost or (not old and not new):
        log.info("node %s: %d ambient pod(s)%s%s", node, len(new),
                 f"; now {', '.join(map(_name, gained))}" if gained else "",
                 f"; gone {', '.join(map(_name, lost))}" if lost else "")
    known = set(before.messages)
    for message in after.messages:
        if message not in known:
            log.warning("node-agent report of node %s: %s", node, message)
