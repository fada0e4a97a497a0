"""A tiny HTTP/TCP test backend for the demo and the end-to-end tests. Does network I/O.

`python samples/backend.py NAME=HOST:PORT[/tcp] ...` serves each address in one process.
HTTP answers JSON naming the backend, echoing method, path and request headers, and:
  /status/<code>        answers with that status
  /delay/<ms>           answers after a delay
  /flaky/<key>/<n>      fails (503) the first n requests for key, then 200
  /__requests           how many requests this backend has served (and the last paths)
TCP backends answer each connection with `NAME\n` followed by an echo of what they read.
"""

from __future__ import annotations

import json
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def make_handler(name: str) -> type[BaseHTTPRequestHandler]:
    state: dict[str, object] = {"count": 0, "paths": [], "flaky": {}}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # no 40 ms Nagle/delayed-ACK stalls behind keep-alive proxies
        server_version = f"backend-{name}"

        def log_message(self, format: str, *args: object) -> None:  # quiet
            return

        def _reply(self, status: int, body: dict[str, object]) -> None:
            data = (json.dumps(body, sort_keys=True) + "\n").encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.send_header("x-backend", name)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _handle(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            if length:
                self.rfile.read(length)
            path = self.path
            if path == "/__requests":
                with lock:
                    self._reply(200, {"backend": name, "count": state["count"], "paths": state["paths"]})
                return
            with lock:
                state["count"] = int(state["count"]) + 1  # type: ignore[call-overload]
                paths = state["paths"]
                assert isinstance(paths, list)
                paths.append(path)
                del paths[:-50]
            status = 200
            parts = path.split("?")[0].strip("/").split("/")
            if parts[0] == "status" and len(parts) > 1 and parts[1].isdigit():
                status = int(parts[1])
            elif parts[0] == "delay" and len(parts) > 1 and parts[1].isdigit():
                time.sleep(int(parts[1]) / 1000)
            elif parts[0] == "flaky" and len(parts) > 2 and parts[2].isdigit():
                with lock:
                    flaky = state["flaky"]
                    assert isinstance(flaky, dict)
                    seen = flaky.get(parts[1], 0)
                    flaky[parts[1]] = seen + 1
                if seen < int(parts[2]):
                    status = 503
            self._reply(status, {
                "backend": name,
                "method": self.command,
                "path": path,
                "host": self.headers.get("host"),
                "headers": {k.lower(): ", ".join(self.headers.get_all(k) or []) for k in self.headers},
            })

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _handle

    return Handler


class _TCPHandler(socketserver.BaseRequestHandler):
    name = "tcp"

    def handle(self) -> None:
        self.request.sendall(f"{self.name}\n".encode())
        while data := self.request.recv(4096):
            self.request.sendall(data)


class _ThreadingTCP(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


class _HTTP(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True


def serve(specs: list[str]) -> None:
    servers: list[socketserver.BaseServer] = []
    for spec in specs:
        name, _, addr = spec.partition("=")
        tcp = addr.endswith("/tcp")
        addr = addr.removesuffix("/tcp")
        host, _, port = addr.rpartition(":")
        if tcp:
            handler = type(f"TCP_{name}", (_TCPHandler,), {"name": name})
            servers.append(_ThreadingTCP((host, int(port)), handler))
        else:
            servers.append(_HTTP((host, int(port)), make_handler(name)))
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    print("ready", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    serve(sys.argv[1:])
