"""A Bookinfo-style app that calls another service for each request, as reviews v2/v3 call
ratings: `python chain_app.py NAME=HOST:PORT UPSTREAM_HOST PROXY_HOST:PORT`. Each request
calls http://UPSTREAM_HOST/ through the sidecar listener at PROXY_HOST:PORT (bind capture),
forwarding Bookinfo's `end-user` header, and answers 200 with JSON naming itself and the
upstream's status (or the error). Does network I/O."""

from __future__ import annotations

import json
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main(spec: str, upstream: str, proxy: str) -> None:
    name, _, addr = spec.partition("=")
    host, _, port = addr.rpartition(":")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            return

        def do_GET(self) -> None:
            req = urllib.request.Request(f"http://{proxy}/", headers={"host": upstream})
            if self.headers.get("end-user"):
                req.add_header("end-user", self.headers["end-user"])
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    up: object = r.status
            except urllib.error.HTTPError as exc:
                up = exc.code
            except OSError as exc:
                up = repr(exc)
            data = (json.dumps({"backend": name, "upstream": upstream, "upstream_status": up}) + "\n").encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    class Server(ThreadingHTTPServer):
        allow_reuse_address = True
        daemon_threads = True

    srv = Server((host, int(port)), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main(*sys.argv[1:4])
