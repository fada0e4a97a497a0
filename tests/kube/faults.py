"""A thin HTTP proxy in front of the kmock emulator that scripts what kmock lacks: API
server outages, dropped watches, 410 Gone, BOOKMARK events and resourceVersions. Does
network I/O (aiohttp server + client) on the emulator's event-loop thread.

Every control method is thread-safe: tests call them from their own thread or loop.

- `set_online(False)`: stop listening (connection refused), abort open connections and
  watch streams; `set_online(True)` listens again on the same port.
- `cut_watches(abort=False)`: end every open watch stream (clean end of the chunked
  body), or reset the connection with `abort=True`.
- `block_watches(status)`: answer every new watch with that HTTP status (None: stop).
- `fail(path_part, status)`: answer every request whose path contains `path_part`
  (lists and watches) with `status` (None: stop).
- `mute_watches(True)`: open watch streams swallow kmock's events (the client misses them).
- `expire_watches(mode)`: 410 Gone: `"event"` writes an ERROR event with code 410 into
  each open watch and ends it; `"http"` cuts them and answers the next watch of each with
  HTTP 410.
- `inject(event, path_part)`: write a raw watch event line into open watch streams.
- `versioned = True`: stamp `metadata.resourceVersion` on objects (a content hash, so a
  replayed unchanged object keeps its version) and on lists (a counter), like a real
  API server; kmock itself sends none.
- `requests`: every request seen (method, path, query), for assertions.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

T = TypeVar("T")
_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "accept-encoding"}


@dataclass(frozen=True)
class SeenRequest:
    method: str
    path: str
    query: dict[str, str]

    @property
    def watch(self) -> bool:
        return self.query.get("watch") in ("true", "1", "True")


@dataclass(eq=False)
class _Stream:
    request: web.Request
    response: web.StreamResponse
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    abort: bool = False
    tail: bytes = b""


def status_body(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


def content_rv(obj: dict[str, Any]) -> str:
    meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k != "resourceVersion"}
    blob = json.dumps({**obj, "metadata": meta}, sort_keys=True).encode()
    return str(int.from_bytes(hashlib.sha256(blob).digest()[:6], "big"))


def _stamp(obj: Any) -> None:
    if isinstance(obj, dict) and isinstance(obj.get("metadata"), dict):
        obj["metadata"]["resourceVersion"] = content_rv(obj)


class FaultProxy:
    def __init__(self, loop: asyncio.AbstractEventLoop, upstream: str, host: str, port: int) -> None:
        self.loop = loop
        self.upstream = upstream.rstrip("/")
        self.host = host
        self.port = port
        self.requests: list[SeenRequest] = []
        self.versioned = False
        self._online = False
        self._epoch = 0  # bumped by every outage: a watch that raced one is cut too
        self._watches: set[_Stream] = set()
        self._muted = False
        self._watch_status: int | None = None
        self._fail: dict[str, int] = {}
        self._gone_next: set[str] = set()  # watch paths whose next watch answers HTTP 410
        self._list_rv = 1000
        self._runner: web.ServerRunner | None = None
        self._site: web.TCPSite | None = None
        self._session: aiohttp.ClientSession | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ------------------------------------------------------------------ thread-safe control
    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def set_online(self, online: bool) -> None:
        self._call(self._set_online(online))

    def cut_watches(self, abort: bool = False, path_part: str = "") -> int:
        return self._call(self._cut(abort, path_part))

    def block_watches(self, status: int | None) -> None:
        self._watch_status = status

    def fail(self, path_part: str, status: int | None) -> None:
        with self._lock:
            if status is None:
                self._fail.pop(path_part, None)
            else:
                self._fail[path_part] = status

    def mute_watches(self, muted: bool = True) -> None:
        self._muted = muted

    def expire_watches(self, mode: str = "event", path_part: str = "") -> int:
        return self._call(self._expire(mode, path_part))

    def inject(self, event: dict[str, Any], path_part: str = "") -> int:
        return self._call(self._inject(event, path_part))

    def open_watches(self, path_part: str = "") -> int:
        return sum(1 for s in list(self._watches) if path_part in s.request.path)

    def watch_requests(self, path_part: str = "") -> list[SeenRequest]:
        return [r for r in list(self.requests) if r.watch and path_part in r.path]

    # ------------------------------------------------------------------ lifecycle (on the loop)
    async def start(self, online: bool = True) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=None))
        self._runner = web.ServerRunner(web.Server(self._handle, access_log=None), handle_signals=False)
        await self._runner.setup()
        if online:
            await self._set_online(True)

    async def close(self) -> None:
        await self._cut(abort=True, path_part="")
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _set_online(self, online: bool) -> None:
        if online == self._online:
            return
        self._online = online
        self._epoch += 1
        if online:
            assert self._runner is not None
            self._site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
            await self._site.start()
        else:
            if self._site is not None:
                await self._site.stop()
                self._site = None
            await self._cut(abort=True, path_part="")

    async def _cut(self, abort: bool, path_part: str) -> int:
        n = 0
        for s in list(self._watches):
            if path_part in s.request.path:
                s.abort = abort
                s.stop.set()
                n += 1
        return n

    async def _expire(self, mode: str, path_part: str) -> int:
        n = 0
        line = json.dumps({"type": "ERROR", "object": status_body(410, "Expired", "too old resource version")})
        for s in list(self._watches):
            if path_part not in s.request.path:
                continue
            if mode == "event":
                s.tail = line.encode() + b"\n"
            else:
                self._gone_next.add(s.request.path)
            s.stop.set()
            n += 1
        return n

    async def _inject(self, event: dict[str, Any], path_part: str) -> int:
        n = 0
        data = json.dumps(event).encode() + b"\n"
        for s in list(self._watches):
            if path_part in s.request.path:
                await s.response.write(data)
                n += 1
        return n

    # ------------------------------------------------------------------ serving
    def _forced_status(self, req: SeenRequest) -> int | None:
        with self._lock:
            for part, status in self._fail.items():
                if part in req.path:
                    return status
        if req.watch:
            if req.path in self._gone_next:
                self._gone_next.discard(req.path)
                return 410
            return self._watch_status
        return None

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if not self._online:  # a kept-alive connection from before the outage
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=503)  # never sent: the connection is gone
        epoch = self._epoch
        seen = SeenRequest(request.method, request.path, dict(request.query))
        self.requests.append(seen)
        forced = self._forced_status(seen)
        if forced is not None:
            reason = "Expired" if forced == 410 else "ServiceUnavailable"
            return web.json_response(status_body(forced, reason, f"scripted by the fault proxy: {forced}"),
                                     status=forced)
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        assert self._session is not None
        async with self._session.request(request.method, self.upstream + request.path_qs, data=body or None,
                                         headers=headers) as up:
            if not seen.watch or up.status != 200:
                data = await up.read()
                if self.versioned and up.status == 200 and request.method == "GET":
                    data = self._version_list(data)
                return web.Response(status=up.status, body=data,
                                    headers={"Content-Type": up.headers.get("Content-Type", "application/json")})
            return await self._stream(request, up, epoch)

    def _version_list(self, data: bytes) -> bytes:
        try:
            doc = json.loads(data)
        except ValueError:
            return data
        if isinstance(doc, dict) and isinstance(doc.get("items"), list):
            self._list_rv += 1
            doc.setdefault("metadata", {})["resourceVersion"] = str(self._list_rv)
            for item in doc["items"]:
                _stamp(item)
        else:
            _stamp(doc)
        return json.dumps(doc).encode()

    async def _stream(self, request: web.BaseRequest, up: aiohttp.ClientResponse, epoch: int) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        stream = _Stream(request, resp)  # type: ignore[arg-type]
        self._watches.add(stream)
        if epoch != self._epoch:  # an outage began while this watch was being opened
            stream.abort = True
            stream.stop.set()

        async def pump() -> None:
            async for line in up.content:
                if self._muted or not line.strip():
                    continue
                if self.versioned:
                    ev = json.loads(line)
                    _stamp(ev.get("object"))
                    line = json.dumps(ev).encode() + b"\n"
                await resp.write(line)

        pumping = asyncio.ensure_future(pump())
        stopping = asyncio.ensure_future(stream.stop.wait())
        try:
            await asyncio.wait({pumping, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            pumping.cancel()
            stopping.cancel()
            self._watches.discard(stream)
        if stream.abort:
            if request.transport is not None:
                request.transport.abort()
            return resp
        if stream.tail:
            await resp.write(stream.tail)
        await resp.write_eof()
        return resp
