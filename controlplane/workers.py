"""`meshline serve --workers N`: N worker processes share the xDS port, each with its own
sources, model, snapshots and streams. Does process, network and file I/O.

Design:
- The xDS port is shared with SO_REUSEPORT (gRPC's `grpc.so_reuseport`, on by default on
  Linux and set explicitly here): the kernel spreads new connections over the workers by
  a hash of the connection's addresses, and a stream stays on the worker that accepted it.
  Every worker reads the same sources and builds the same snapshots (its own copy), so a
  proxy gets the same configuration whichever worker it lands on.
- Status: worker 0 alone owns the status port. Every other worker serves the same status
  app on a private unix socket (in a 0700 temporary directory of the supervisor), and
  worker 0 answers the per-proxy and summary endpoints by asking all of them:
  `/v1/proxies` lists every worker's proxies with `worker` and `worker_pid` fields,
  `/v1/proxies/{id}[/config]` finds the proxy on whichever worker holds it, `/v1/mesh`
  sums the proxy counts and lists the workers (`workers`, `answered_by`), `/readyz` is 200
  only when every worker is ready, and `/metrics` concatenates the workers' samples with a
  `worker` label. Mesh-wide endpoints (`/v1/services`, `/v1/config/errors`) come from
  worker 0: every worker holds the same mesh. Every status response carries
  `x-meshline-worker` and `x-meshline-worker-pid` headers.
- The TLS xDS/CSR port and the webhooks run in worker 0 only (one listener each).
- The supervisor (the `meshline serve` process) restarts a worker that crashes (non-zero
  exit or death by signal; with backoff, giving up after 5 crashes of one worker within a
  minute), forwards SIGTERM/SIGINT to all workers, and exits once they have all exited.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from controlplane.runtime import Settings

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

WORKER_HEADER = "x-meshline-worker"
PID_HEADER = "x-meshline-worker-pid"
MAX_CRASHES = 5
CRASH_WINDOW_S = 60.0
STOP_GRACE_S = 15.0


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """Who this worker is among its siblings, and where the siblings' status sockets are."""

    index: int
    count: int
    run_dir: Path

    def status_socket(self, index: int) -> Path:
        return self.run_dir / f"status-{index}.sock"

    def settings_for(self, settings: Settings) -> Settings:
        """Worker 0 keeps the single-listener services (TLS xDS + CSR port, webhooks)."""
        if self.index == 0:
            return settings
        return dataclasses.replace(settings, ca_address=None, webhook_address="off")

    def grpc_options(self) -> list[tuple[str, Any]]:
        return [("grpc.so_reuseport", 1)]

    def status_bind(self, host: str, port: int) -> dict[str, Any]:
        """uvicorn.Config keyword arguments: the status port for worker 0, a unix socket else."""
        if self.index == 0:
            return {"host": host, "port": port}
        return {"uds": str(self.status_socket(self.index))}

    def wrap_status(self, app: ASGIApp) -> ASGIApp:
        return StatusFront(app, self)


# --------------------------------------------------------------------------- status front
_PROXY_PATH = re.compile(r"^/v1/proxies/[^/]+(/config)?$")


class StatusFront:
    """ASGI wrapper of one worker's status app: tags every response with the worker, and
    on worker 0 answers the per-proxy and summary endpoints for all workers."""

    def __init__(self, app: ASGIApp, info: WorkerInfo) -> None:
        self.app, self.info, self.pid = app, info, os.getpid()
        self._tags = [(WORKER_HEADER.encode(), str(info.index).encode()), (PID_HEADER.encode(), str(self.pid).encode())]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if self.info.index == 0 and self.info.count > 1 and scope["method"] == "GET":
            handler = self._handler(path)
            if handler is not None:
                status, body, ctype = await handler(scope)
                await send({"type": "http.response.start", "status": status,
                            "headers": [(b"content-type", ctype.encode()), *self._tags]})
                await send({"type": "http.response.body", "body": body})
                return

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self._tags]}
            await send(message)

        await self.app(scope, receive, tagged)

    def _handler(self, path: str) -> Callable[[Scope], Awaitable[tuple[int, bytes, str]]] | None:
        if path == "/v1/proxies":
            return self._proxies
        if _PROXY_PATH.match(path):
            return self._one_proxy
        if path == "/v1/mesh":
            return self._mesh
        if path == "/readyz":
            return self._readyz
        if path == "/metrics":
            return self._metrics
        return None

    # fan-out ------------------------------------------------------------------------
    async def _ask_all(self, scope: Scope) -> list[_Answer]:
        """GET the same path and query from every worker (worker 0 in-process)."""
        import asyncio

        import httpx

        target = scope["path"] + ("?" + scope["query_string"].decode() if scope.get("query_string") else "")
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])
                   if k.lower() in (b"authorization", b"accept")}

        async def one(index: int) -> _Answer:
            if index == 0:
                transport: httpx.AsyncBaseTransport = httpx.ASGITransport(app=self.app)
            else:
                transport = httpx.AsyncHTTPTransport(uds=str(self.info.status_socket(index)))
            try:
                async with httpx.AsyncClient(transport=transport, base_url="http://worker", timeout=10.0) as c:
                    r = await c.get(target, headers=headers)
                pid = self.pid if index == 0 else int(r.headers.get(PID_HEADER, "0"))
                return _Answer(index, pid, r.status_code, r.content, r.headers.get("content-type", ""))
            except (httpx.HTTPError, OSError) as exc:
                return _Answer(index, 0, 0, b"", "", error=f"{type(exc).__name__}: {exc}")

        return list(await asyncio.gather(*(one(i) for i in range(self.info.count))))

    @staticmethod
    def _json(status: int, value: Any) -> tuple[int, bytes, str]:
        return status, json.dumps(value, separators=(",", ":")).encode(), "application/json"

    @staticmethod
    def _passthrough(a: _Answer) -> tuple[int, bytes, str]:
        return a.status, a.body, a.content_type or "application/json"

    async def _proxies(self, scope: Scope) -> tuple[int, bytes, str]:
        answers = await self._ask_all(scope)
        if answers[0].status != 200:
            return self._passthrough(answers[0])
        out: list[dict[str, Any]] = []
        for a in answers:
            if a.status == 200:
                out.extend({**p, "worker": a.index, "worker_pid": a.pid} for p in json.loads(a.body))
        out.sort(key=lambda p: (p["id"], p["connected_at"]))
        missing = [a.index for a in answers if a.status != 200]
        return self._json(200 if not missing else 503, out if not missing else {
            "detail": f"workers {missing} did not answer", "proxies": out})

    async def _one_proxy(self, scope: Scope) -> tuple[int, bytes, str]:
        answers = await self._ask_all(scope)
        for a in answers:
            if a.status == 200:
                return self._json(200, {**json.loads(a.body), "worker": a.index, "worker_pid": a.pid})
        return self._passthrough(answers[0])

    async def _mesh(self, scope: Scope) -> tuple[int, bytes, str]:
        answers = await self._ask_all(scope)
        if answers[0].status != 200:
            return self._passthrough(answers[0])
        base: dict[str, Any] = json.loads(answers[0].body)
        total = 0
        sums: dict[str, Counter[str]] = {k: Counter() for k in ("by_mode", "by_protocol", "by_state")}
        members: list[dict[str, Any]] = []
        for a in answers:
            if a.status != 200:
                members.append({"index": a.index, "pid": a.pid or None, "error": a.error or f"HTTP {a.status}"})
                continue
            m = json.loads(a.body)
            total += m["proxies"]["total"]
            for k, c in sums.items():
                c.update(m["proxies"].get(k, {}))
            members.append({"index": a.index, "pid": a.pid, "ready": m["ready"], "generation": m["generation"],
                            "proxies": m["proxies"]["total"]})
        base["proxies"] = {"total": total, **{k: dict(c) for k, c in sums.items()}}
        base["ready"] = all(m.get("ready") is True for m in members)
        base["workers"] = members
        base["answered_by"] = {"index": 0, "pid": self.pid}
        return self._json(200, base)

    async def _readyz(self, scope: Scope) -> tuple[int, bytes, str]:
        answers = await self._ask_all(scope)
        waiting = {str(a.index): (json.loads(a.body) if a.status == 503 else a.error or f"HTTP {a.status}")
                   for a in answers if a.status != 200}
        if not waiting:
            return self._json(200, {"ready": True, "workers": self.info.count})
        return self._json(503, {"ready": False, "waiting_for_workers": waiting})

    async def _metrics(self, scope: Scope) -> tuple[int, bytes, str]:
        answers = await self._ask_all(scope)
        if answers[0].status != 200:
            return self._passthrough(answers[0])
        text = merge_metrics([(a.index, a.body.decode()) for a in answers if a.status == 200])
        return 200, text.encode(), answers[0].content_type or "text/plain"


@dataclass(frozen=True, slots=True)
class _Answer:
    index: int
    pid: int
    status: int
    body: bytes
    content_type: str
    error: str = ""


def merge_metrics(texts: list[tuple[int, str]]) -> str:
    """The workers' Prometheus expositions as one, every sample labelled `worker="<i>"`."""
    from prometheus_client import CollectorRegistry, Metric, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    for index, text in texts:
        for fam in text_string_to_metric_families(text):
            merged = families.get(fam.name)
            if merged is None:
                merged = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            for s in fam.samples:
                merged.add_sample(s.name, {**s.labels, "worker": str(index)}, s.value, s.timestamp, s.exemplar)

    class _Merged:
        def collect(self) -> list[Metric]:
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry).decode()


# --------------------------------------------------------------------------- supervisor
def _die_with_parent() -> None:
    """preexec_fn: a worker gets SIGTERM when the supervisor dies without stopping it."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    crashes: list[float] = dataclasses.field(default_factory=list)
    restart_at: float | None = None
    done: bool = False


def supervise(settings: Settings, count: int, log_level: str = "info", log_format: str = "text") -> int:
    """Run `count` workers until a signal (forwarded to them) or until they have all exited.
    Returns the exit code: 0, or 1 when a worker kept crashing. Exits at once (SystemExit)
    when the status API would be served unprotected, before starting any worker."""
    from controlplane.serve import status_access_error

    refused = status_access_error(settings.status_address, settings.status_token_file)
    if refused is not None:
        raise SystemExit(f"meshline serve: {refused}")
    run_dir = Path(tempfile.mkdtemp(prefix="meshline-workers-"))
    workers = [_Worker(i) for i in range(count)]
    stop: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.append(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def spawn(w: _Worker) -> None:
        payload = pickle.dumps({"settings": settings, "index": w.index, "count": count, "run_dir": str(run_dir),
                                "log_level": log_level, "log_format": log_format})
        w.proc = subprocess.Popen([sys.executable, "-m", "controlplane.workers"], stdin=subprocess.PIPE,
                                  preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        assert w.proc.stdin is not None
        w.proc.stdin.write(payload)
        w.proc.stdin.close()
        w.restart_at = None
        log.info("worker %d/%d started (pid %d)", w.index, count, w.proc.pid)

    code = 0
    try:
        for w in workers:
            spawn(w)
        while not stop:
            now = time.monotonic()
            for w in workers:
                if w.done:
                    continue
                if w.proc is None:
                    if w.restart_at is not None and now >= w.restart_at:
                        spawn(w)
                    continue
                rc = w.proc.poll()
                if rc is None:
                    continue
                w.proc = None
                if rc == 0:
                    log.info("worker %d exited", w.index)
                    w.done = True
                    continue
                w.crashes = [t for t in w.crashes if now - t < CRASH_WINDOW_S] + [now]
                how = f"signal {-rc}" if rc < 0 else f"code {rc}"
                if len(w.crashes) >= MAX_CRASHES:
                    log.error("worker %d died (%s) %d times within %.0f s; stopping", w.index, how,
                              len(w.crashes), CRASH_WINDOW_S)
                    code = 1
                    stop.append(signal.SIGTERM)
                    break
                delay = min(5.0, 0.2 * 2 ** (len(w.crashes) - 1))
                log.warning("worker %d died (%s); restarting it in %.1f s", w.index, how, delay)
                w.restart_at = now + delay
            if all(w.done for w in workers):
                break
            time.sleep(0.1)
        _stop_all(workers, signal.SIGTERM)
    finally:
        _stop_all(workers, signal.SIGKILL, grace=0.0)
        for s, h in old.items():
            signal.signal(s, h)
        shutil.rmtree(run_dir, ignore_errors=True)
    log.info("all %d workers stopped", count)
    return code


def _stop_all(workers: list[_Worker], sig: int, grace: float = STOP_GRACE_S) -> None:
    alive = [w.proc for w in workers if w.proc is not None and w.proc.poll() is None]
    for p in alive:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(sig)
    deadline = time.monotonic() + grace
    for p in alive:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("worker pid %d did not stop within %.0f s; killing it", p.pid, grace)
            p.kill()
            p.wait()


# --------------------------------------------------------------------------- worker entry
def worker_main() -> None:
    """`python -m controlplane.workers`: one worker, configured by a pickle on stdin from
    its supervisor."""
    import asyncio

    from controlplane.logs import setup_logging
    from controlplane.serve import run

    cfg = pickle.loads(sys.stdin.buffer.read())
    info = WorkerInfo(cfg["index"], cfg["count"], Path(cfg["run_dir"]))
    setup_logging(cfg["log_level"], cfg["log_format"])
    logging.getLogger("httpx").setLevel(logging.WARNING)  # worker 0's status fan-out requests
    logging.getLogger("controlplane.workers").info("worker %d/%d (pid %d)", info.index, info.count, os.getpid())
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(info.settings_for(cfg["settings"]), worker=info))


if __name__ == "__main__":
    worker_main()
