"""Which Envoy settings change the CPU per request of the ambient L4 path? (issue 15)

Builds `bench/dataplane.py`'s lab (same mesh, same load generator, same CPU accounting), then:

1. **Floor variants**: next to the stock floors, one extra plain-Envoy HTTP/2 CONNECT pair (HBONE's
   mechanism: `tcp_proxy` tunnelling over a pooled mTLS HTTP/2 connection -> CONNECT terminated by an
   HTTP connection manager) per variant, on its own ports, measured kept alive at 1,000 rps in one
   interleaved run with `ambient-ka` and the stock floors (`dataplane.measure`).
2. **Node-proxy variants**: both node proxies restarted with a variant bootstrap (or pointed at a
   second control plane whose translator carries the variant), then `ambient-ka` and the stock
   `floor-h2-ka` (the control) measured for a few seconds each; variants rotated each round.
3. `--strace`: `strace -c -f` on every Envoy of each floor scenario for a few seconds under the
   same load: system calls per request (an `epoll_wait` is one event-loop iteration).

Variants (`+` combines): `og` / `ng` force the oghttp2 / nghttp2 codec on both ends
(`Http2ProtocolOptions.use_oghttp2_codec`); `rtog` / `rtng` the same through the runtime key
`envoy.reloadable_features.http2_use_oghttp2`; `nostats` rejects every stat
(`stats_config.stats_matcher.reject_all`); `nohist` turns `http2_record_histograms` off; `notimers`
disables the timers re-armed per read (`tcp_proxy` `idle_timeout`, HCM `stream_idle_timeout` and
`idle_timeout`: 0s); `uring` / `uringms` use io_uring for sockets (`DefaultSocketInterface`
`io_uring_options`, with multishot receive); `ilbufN` sets the internal listeners' `buffer_size_kb`
(node proxies only); `cp2` (node proxies only) connects them to a second `meshline serve` whose
translator sets `notimers` on every node-proxy `tcp_proxy` and HBONE terminator.

    .venv/bin/python bench/envoy_knobs.py --floors base,og,nostats --nodes base,rtog,cp2 --strace

Root only (network namespaces); holds the netns lab's lock while it runs. One run on a shared machine:
compare variants within a run only, and repeat before believing a difference under ~5%.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dataplane as dp

H2 = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
SOCKET_IF = "envoy.extensions.network.socket_interface.default_socket_interface"
OGHTTP2 = "envoy.reloadable_features.http2_use_oghttp2"
HISTOGRAMS = "envoy.reloadable_features.http2_record_histograms"
VARIANT_PORT = 18100  # variant i: client side 18100+2i on n1, server side 18101+2i on n2
CP2_OFFSET = 10  # the second control plane's ports: the first's + 10

# The second control plane's translator: every node-proxy tcp_proxy and HBONE terminator without the
# timers re-armed per read (idle_timeout 0s = disabled). Patched in that process only.
CP2_NOTIMERS = """
import runpy, sys
from controlplane.translate import hbone, nodeproxy_envoy, nodepod
_inbound = nodepod.build_hbone_inbound
def untimed(build):
    def tcp(*a, **k):
        from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
        f = build(*a, **k); t = tcp_proxy_pb2.TcpProxy(); f.typed_config.Unpack(t)
        t.idle_timeout.SetInParent(); f.typed_config.Pack(t); return f
    return tcp
def inbound(*a, **k):
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as h
    lst = _inbound(*a, **k); f = lst.filter_chains[0].filters[0]; m = h.HttpConnectionManager()
    f.typed_config.Unpack(m); m.stream_idle_timeout.SetInParent(); m.common_http_protocol_options.idle_timeout.SetInParent()
    f.typed_config.Pack(m); return lst
nodeproxy_envoy._tcp, hbone._tunnel_proxy = untimed(nodeproxy_envoy._tcp), untimed(hbone._tunnel_proxy)
nodepod.build_hbone_inbound = inbound
sys.argv = ["meshline", *sys.argv[1:]]
runpy.run_module("controlplane.cli", run_name="__main__")
"""


def _runtime(boot: dict[str, Any], key: str, value: bool) -> None:
    layers = boot.setdefault("layered_runtime", {"layers": [{"name": "static", "static_layer": {}}]})["layers"]
    layers[0].setdefault("static_layer", {})[key] = value


def _uring(boot: dict[str, Any], multishot: bool) -> None:
    opts: dict[str, Any] = {"enable_multishot_receive": True} if multishot else {}
    boot.setdefault("bootstrap_extensions", []).append({"name": SOCKET_IF, "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.network.socket_interface.v3.DefaultSocketInterface",
        "io_uring_options": opts}})
    boot["default_socket_interface"] = SOCKET_IF


def _h2_listener(boot: dict[str, Any]) -> dict[str, Any]:
    lst: dict[str, Any] = next(x for x in boot["static_resources"]["listeners"] if x["name"] == "floor_h2")
    return lst


def floor_variant(name: str, client: dict[str, Any], server: dict[str, Any]) -> None:
    """Apply variant `name` to a floor-h2 pair's bootstraps (client side n1, server side n2)."""
    hcm = _h2_listener(server)["filter_chains"][0]["filters"][0]["typed_config"]
    tcp = _h2_listener(client)["filter_chains"][0]["filters"][0]["typed_config"]
    up = next(c for c in client["static_resources"]["clusters"] if c["name"] == "up_h2")
    for part in name.split("+"):
        both = (client, server)
        if part in ("og", "ng"):
            up["typed_extension_protocol_options"][H2]["explicit_http_config"]["http2_protocol_options"][
                "use_oghttp2_codec"] = part == "og"
            hcm["http2_protocol_options"]["use_oghttp2_codec"] = part == "og"
        elif part in ("rtog", "rtng", "nohist"):
            for b in both:
                _runtime(b, HISTOGRAMS if part == "nohist" else OGHTTP2, part == "rtog")
        elif part == "nostats":
            for b in both:
                b["stats_config"] = {"stats_matcher": {"reject_all": True}}
        elif part == "notimers":
            tcp["idle_timeout"] = "0s"
            hcm["stream_idle_timeout"] = "0s"
            hcm["common_http_protocol_options"] = {"idle_timeout": "0s"}
        elif part in ("uring", "uringms"):
            for b in both:
                _uring(b, part == "uringms")
        elif part != "base":
            raise SystemExit(f"unknown floor variant {part!r}")


def node_variant(name: str, boot: dict[str, Any]) -> None:
    """Apply variant `name` to a node proxy's bootstrap."""
    for part in name.split("+"):
        if part in ("rtog", "rtng", "nohist"):
            _runtime(boot, HISTOGRAMS if part == "nohist" else OGHTTP2, part == "rtog")
        elif part == "nostats":
            boot["stats_config"] = {"stats_matcher": {"reject_all": True}}
        elif part in ("uring", "uringms"):
            _uring(boot, part == "uringms")
        elif part.startswith("ilbuf"):
            boot["bootstrap_extensions"][0]["typed_config"]["buffer_size_kb"] = int(part[5:])
        elif part == "cp2":
            grpc = boot["dynamic_resources"]["ads_config"]["grpc_services"][0]["google_grpc"]
            host, _, port = grpc["target_uri"].rpartition(":")
            if int(port) != dp.TLS_PORT:
                raise SystemExit(f"cp2: the node bootstrap's xDS target {grpc['target_uri']} is not the bench's")
            grpc["target_uri"] = f"{host}:{dp.TLS_PORT + CP2_OFFSET}"
        elif part != "base":
            raise SystemExit(f"unknown node variant {part!r}")


def start_floor_variants(lab: dp.Lab, names: list[str]) -> list[dp.Scenario]:
    from controlplane.localrun import envoy_binary

    stock = dp.floor_bootstraps(lab)
    scs = []
    for i, name in enumerate(names):
        cport, sport = VARIANT_PORT + 2 * i, VARIANT_PORT + 2 * i + 1
        client, server = copy.deepcopy(stock["floor-n1"]), copy.deepcopy(stock["floor-n2"])
        for boot, port in ((client, cport), (server, sport)):
            res = boot["static_resources"]
            res["listeners"] = [_h2_listener(boot)]
            res["listeners"][0]["address"]["socket_address"]["port_value"] = port
        client["static_resources"]["clusters"] = [c for c in client["static_resources"]["clusters"]
                                                  if c["name"] == "up_h2"]
        up = client["static_resources"]["clusters"][0]
        up["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"][
            "port_value"] = sport
        floor_variant(name, client, server)
        for node, boot in (("n1", client), ("n2", server)):
            path = lab.topo.workdir / f"knob-{name}-{node}.json"
            path.write_text(json.dumps(boot))
            chk = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
                                 capture_output=True, text=True)
            if chk.returncode != 0:
                raise SystemExit(f"variant {name} ({node}) rejected by envoy --mode validate: {chk.stdout[-800:]}")
            lab.envoys[f"knob-{name}-{node}"] = lab.nodes[node].run(
                [envoy_binary(), "-c", str(path), "--disable-hot-restart", "--concurrency", "1", "-l", "warning"])
        scs.append(dp.Scenario(f"h2-{name}-ka", f"floor-h2 variant {name}", "dc", "ds", lab.nodes["n1"].ip, cport,
                               lab.pods["ds"].ip, [f"knob-{name}-n1", f"knob-{name}-n2"], keepalive=4, rate=1000))
    return scs


def strace_counts(lab: dp.Lab, scs: list[dp.Scenario], secs: float) -> None:
    for sc in scs:
        outs = {e: lab.topo.workdir / f"strace-{sc.key}-{e}.txt" for e in sc.envoys}
        tracers = [subprocess.Popen(["strace", "-c", "-f", "-o", str(out), "-p", str(lab.envoys[e].pid)],
                                    stderr=subprocess.DEVNULL) for e, out in outs.items()]
        time.sleep(1.0)
        n = dp.summarize(dp.run_load(lab, sc, sc.rate, secs))["requests"]
        for t in tracers:
            t.send_signal(2)
            t.wait(10)
        for e, out in outs.items():
            calls: dict[str, int] = {}
            for line in out.read_text().splitlines():
                f = line.split()
                if len(f) >= 5 and f[0][0].isdigit() and f[-1] != "total" and f[3].isdigit():
                    calls[f[-1]] = int(f[3])
            top = sorted(calls.items(), key=lambda kv: -kv[1])[:5]
            print(f"  strace {sc.key} {e}: {sum(calls.values()) / n:.2f} syscalls per request ("
                  + ", ".join(f"{k} {v / n:.2f}" for k, v in top) + ")", flush=True)


def start_cp2(lab: dp.Lab) -> None:
    off = CP2_OFFSET
    proc = lab.topo.spawn("controlplane-notimers", [
        sys.executable, "-c", CP2_NOTIMERS, "serve", "--config-dir", str(lab.config), "--ca-dir", str(lab.ca_dir),
        "--xds-address", f"{lab.topo.host_ip}:{dp.XDS_PORT + off}",
        "--status-address", f"127.0.0.1:{dp.STATUS_PORT + off}", "--ca-address", f"{lab.topo.host_ip}:{dp.TLS_PORT + off}"])

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{dp.STATUS_PORT + off}/readyz", timeout=5) as r:
                return bool(json.loads(r.read()).get("ready"))
        except (OSError, ValueError):
            return False

    lab.topo.wait("second control plane", ready, 30, proc)


def _check_no_timers(lab: dp.Lab) -> None:
    """Envoy's own view (n1's and n2's /config_dump): every node-proxy tcp_proxy and HBONE
    terminator came from the second control plane with its timers disabled."""
    for node in ("n1", "n2"):
        status, body = lab.nodes[node].curl(f"http://{lab.nodes[node].ip}:15000/config_dump?resource=dynamic_listeners")
        text = json.dumps(json.loads(body)) if status == 200 else ""
        tcp = text.count('"@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"')
        hcm = text.count('"stream_idle_timeout": "0s"')
        off = text.count('"idle_timeout": "0s"')
        if not tcp or not hcm or off != tcp + hcm:
            raise SystemExit(f"cp2 on {node}: {off} idle_timeout 0s for {tcp} tcp_proxies and {hcm} HBONE "
                             f"terminators ({status})")
        print(f"  cp2 on {node}: {tcp} tcp_proxies and {hcm} HBONE terminators without idle timers in Envoy's "
              "config_dump", flush=True)


def node_variants(lab: dp.Lab, names: list[str], rounds: int, secs: float, warmup: float) -> None:
    import yaml

    by = {s.key: s for s in dp.scenarios(lab, 4, True, 200, 1000)}
    amb, ctl = by["ambient-ka"], by["floor-h2-ka"]
    orig = dict(lab.boot)
    boots: dict[str, dict[str, Path]] = {}
    for name in names:
        boots[name] = {}
        for node in ("n1", "n2"):
            doc = yaml.safe_load(orig[node].read_text())
            node_variant(name, doc)
            path = lab.topo.workdir / f"boot-{node}-{name}.yaml"
            path.write_text(yaml.safe_dump(doc))
            path.chmod(0o644)
            boots[name][node] = path
    res: dict[str, dict[str, list[float]]] = {n: {"ambient": [], "control": [], "failed": []} for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            for node in ("n1", "n2"):
                old = lab.envoys[f"node-{node}"]
                old.terminate()
                old.wait(10)
                lab.boot[node] = boots[name][node]
                lab.start_node_proxy(node)
            dp._wait_http(lab.pods[amb.client], f"http://{amb.host}:{amb.port}/", amb.host_header,
                          f'"backend": "{amb.server}"')
            if "cp2" in name and r == 0:
                _check_no_timers(lab)
            dp.run_load(lab, amb, amb.rate, warmup)
            for sc, key in ((amb, "ambient"), (ctl, "control")):
                pids = [lab.envoys[e].pid for e in sc.envoys]
                c0 = sum(dp.cpu_seconds(p) for p in pids)
                s = dp.summarize(dp.run_load(lab, sc, sc.rate, secs))
                res[name][key].append((sum(dp.cpu_seconds(p) for p in pids) - c0) / s["requests"] * 1000)
                if key == "ambient":
                    res[name]["failed"].append(s["failed"])
            print(f"  round {r} {name}: ambient {res[name]['ambient'][-1]:.3f}, control {res[name]['control'][-1]:.3f}"
                  f" CPU s/1k; load average {os.getloadavg()[0]:.2f}", flush=True)
    lab.boot.update(orig)
    print("node-proxy variants, CPU s per 1k requests kept alive at 1,000 rps (per round; median):")
    for name in names:
        a, c = res[name]["ambient"], res[name]["control"]
        print(f"  {name:20s} ambient {' '.join(f'{x:.3f}' for x in a)}  median {statistics.median(a):.3f} | "
              f"control floor-h2 median {statistics.median(c):.3f} | failed {sum(res[name]['failed'])}", flush=True)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--floors", default="base,og,ng,nostats,notimers,nohist,uring",
                    help="floor-h2 variants, comma-separated ('' : none)")
    ap.add_argument("--nodes", default="", help="node-proxy variants, comma-separated (e.g. base,rtog,nostats,cp2)")
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds per floor scenario")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--node-rounds", type=int, default=4)
    ap.add_argument("--node-secs", type=float, default=5.0, help="measured seconds per node variant and round")
    ap.add_argument("--strace", action="store_true", help="system calls per request of each floor scenario's Envoys")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("envoy_knobs: needs root (network namespaces); skipped.")
        return 0
    sys.path.insert(0, str(dp.ROOT))
    from tests.netns_mesh import Topology

    t0 = time.monotonic()
    print(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load average", os.getloadavg(), flush=True)
    with Topology() as topo:
        lab = dp.build_lab(topo)
        dp.start_floors(lab)
        scs = [s for s in dp.scenarios(lab, 4, True, 200, 1000)
               if s.key in ("direct-ka", "ambient-ka", "floor-tls-ka", "floor-h2-ka")]
        if args.floors:
            scs += start_floor_variants(lab, args.floors.split(","))
            for sc in scs:
                dp._wait_http(lab.pods[sc.client], f"http://{sc.host}:{sc.port}/", sc.host_header,
                              f'"backend": "{sc.server}"')
            dp.measure(lab, scs, args.duration, 2.0, 3.0, args.rounds)
            print("CPU s per 1k requests, kept alive at 1,000 rps (one interleaved run):")
            for sc in scs:
                r = sc.result
                print(f"  {sc.key:28s} {r['cpu_per_1k']:.3f}  p50 {r['p50']:.2f} ms, p90 {r['p90']:.2f} ms, "
                      f"failed {r['failed']}/{r['requests']}", flush=True)
        if args.strace:
            strace_counts(lab, [s for s in scs if s.envoys], 4.0)
        if args.nodes:
            if any("cp2" in n for n in args.nodes.split(",")):
                start_cp2(lab)
            node_variants(lab, args.nodes.split(","), args.node_rounds, args.node_secs, 1.5)
    print(time.strftime("%H:%M UTC", time.gmtime()), f"took {time.monotonic() - t0:.0f} s, load average",
          os.getloadavg(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
