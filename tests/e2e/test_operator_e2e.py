"""The operator's view with a real Envoy: NACKED/STALE/SYNCED states, quarantine of the
object Envoy rejects, metrics that move, and the CLI reading the status API."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.e2e.conftest import HTTP_PORT, NS, ROOT, MeshEnv, eventually
from tests.meshgen import Backend, service_yaml

pytestmark = pytest.mark.e2e

# A header value whose %...% command only Envoy's formatter checks: Envoy rejects the route config.
BAD_VS = """apiVersion: networking.meshline.io/v1
kind: VirtualService
metadata: {name: hdr, namespace: shop}
spec:
  hosts: [hdr]
  http:
  - route:
    - destination: {host: hdr}
    headers:
      request:
        set: {x-added: "%NO_SUCH_COMMAND%"}
"""


def me(mesh: MeshEnv) -> dict[str, object]:
    return next(p for p in mesh.proxies() if p["id"] == f"client-{mesh.protocol}")


def metric(mesh: MeshEnv, name: str, labels: str = "") -> float:
    text = mesh.client.get(f"{mesh.status_url}/metrics").text
    pat = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", re.M)
    total = 0.0
    for m in pat.finditer(text):
        if labels and labels not in (m.group(1) or ""):
            continue
        total += float(m.group(2))
    return total


def cli(mesh: MeshEnv, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "controlplane.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "MESHLINE_STATUS_ADDRESS": f"127.0.0.1:{mesh.status_port}"},
                          timeout=30)


def test_rejected_object_is_quarantined_reported_and_fixable(mesh: MeshEnv) -> None:
    routes = (mesh.config / "20-routes.yaml").read_text()
    nacks_before = metric(mesh, "meshline_xds_nacks_total")
    good_hdr = routes[routes.index("metadata: {name: hdr"):].split("\n---\n")[0]
    mesh.write("20-routes.yaml", routes.replace(good_hdr, BAD_VS.split("\n", 2)[2].rstrip("\n")))
    t0 = time.monotonic()

    def nacked() -> dict[str, object] | None:
        p = me(mesh)
        return p if p["state"] == "NACKED" else None

    p = eventually(nacked, timeout=5)
    elapsed = time.monotonic() - t0
    print(f"NACK visible after {elapsed:.3f}s")
    assert elapsed < 1.0  # file watch + debounce + push + Envoy rejects + status shows it
    routes_state = p["types"]["routes"]  # type: ignore[index]
    nack = routes_state["last_nack"]
    assert routes_state["state"] == "NACKED"
    assert "NO_SUCH_COMMAND" in nack["message"]
    assert any(s["object"] == f"VirtualService/{NS}/hdr" and "20-routes.yaml:" in s["location"]
               for s in nack["sources"])
    assert nack["withheld"] == [f"VirtualService/{NS}/hdr"]  # only the changed object is held back
    errs = [e for e in mesh.errors() if e["object"] == f"VirtualService/{NS}/hdr" and e["nacked"]]
    assert errs and "NO_SUCH_COMMAND" in errs[0]["message"]
    assert metric(mesh, "meshline_xds_nacks_total") >= nacks_before + 1
    # The previous version of the VirtualService keeps serving...
    assert mesh.get("hdr").json()["headers"]["x-added"] == "yes"
    # ...and a later change to another service still reaches Envoy.
    mesh.write("97-late.yaml", service_yaml("late", NS, HTTP_PORT, [Backend("127.0.0.110")]))
    eventually(lambda: mesh.get("late").status_code == 200)
    # The CLI shows the same truth.
    out = cli(mesh, "proxy-status")
    assert out.returncode == 0 and f"client-{mesh.protocol}" in out.stdout and "NACKED" in out.stdout
    assert "NO_SUCH_COMMAND" in out.stdout
    # Fixing the object lets it flow and the proxy returns to SYNCED.
    mesh.write("20-routes.yaml", routes.replace('set: {x-added: "yes"}', 'set: {x-added: "fixed"}'))
    eventually(lambda: mesh.get("hdr").json()["headers"]["x-added"] == "fixed")
    eventually(lambda: me(mesh)["state"] == "SYNCED")
    assert not [e for e in mesh.errors() if e["nacked"]]
    mesh.write("20-routes.yaml", routes)
    mesh.remove("97-late.yaml")
    eventually(lambda: mesh.get("late").status_code == 404)


def test_proxy_that_stops_acking_is_stale(mesh: MeshEnv) -> None:
    assert mesh.envoy is not None
    eventually(lambda: me(mesh)["state"] == "SYNCED")
    os.kill(mesh.envoy.pid, signal.SIGSTOP)
    try:
        mesh.write("98-stale.yaml", service_yaml("stale", NS, HTTP_PORT, [Backend("127.0.0.110")]))
        eventually(lambda: me(mesh)["state"] == "STALE", timeout=5)
        assert me(mesh)["types"]["clusters"]["state"] == "STALE"  # type: ignore[index]
    finally:
        os.kill(mesh.envoy.pid, signal.SIGCONT)
    eventually(lambda: me(mesh)["state"] == "SYNCED")
    eventually(lambda: mesh.get("stale").status_code == 200)
    mesh.remove("98-stale.yaml")
    eventually(lambda: mesh.get("stale").status_code == 404)


def test_metrics_move_with_pushes_connects_and_convergence(mesh: MeshEnv) -> None:
    assert metric(mesh, "meshline_proxies_connected", f'protocol="{mesh.protocol}"') == 1
    pushes = metric(mesh, "meshline_xds_pushes_total", 'type="ClusterLoadAssignment"')
    converged = metric(mesh, "meshline_convergence_seconds_count")
    pushed = metric(mesh, "meshline_xds_push_seconds_count")
    # Move web's v1 endpoint to another address: one EDS push to this proxy.
    text = (mesh.config / "10-web.yaml").read_text()
    mesh.write("10-web.yaml", text.replace("- 127.0.0.101\n", "- 127.0.0.99\n", 1))
    eventually(lambda: metric(mesh, "meshline_xds_pushes_total", 'type="ClusterLoadAssignment"') >= pushes + 1)
    eventually(lambda: metric(mesh, "meshline_convergence_seconds_count") >= converged + 1)
    assert metric(mesh, "meshline_xds_push_seconds_count") >= pushed + 1
    mesh.write("10-web.yaml", text)
    eventually(lambda: metric(mesh, "meshline_xds_pushes_total", 'type="ClusterLoadAssignment"') >= pushes + 2)


def test_rest_views_and_cli_json(mesh: MeshEnv) -> None:
    eventually(lambda: me(mesh)["state"] == "SYNCED")
    pid = f"client-{mesh.protocol}"
    one = mesh.client.get(f"{mesh.status_url}/v1/proxies/{pid}").json()
    assert one["id"] == pid and one["types"]["clusters"]["subscribed"] == "*"
    assert mesh.client.get(f"{mesh.status_url}/v1/proxies/nope").status_code == 404
    cfg = mesh.client.get(f"{mesh.status_url}/v1/proxies/{pid}/config", params={"type": "routes"}).json()
    vhosts = [vh["name"] for r in cfg["resources"] for vh in r["config"]["virtual_hosts"]]
    assert f"web.{NS}.svc.cluster.local:{HTTP_PORT}" in vhosts
    services = mesh.client.get(f"{mesh.status_url}/v1/services", params={"namespace": NS}).json()
    web = next(s for s in services if s["name"] == "web")
    assert web["endpoints"]["ready"] == 3 and web["subsets"] == ["v1", "v2", "v3"]
    assert web["virtual_service"] == f"VirtualService/{NS}/web"
    summary = mesh.client.get(f"{mesh.status_url}/v1/mesh").json()
    assert summary["ready"] is True and summary["proxies"]["by_protocol"] == {mesh.protocol: 1}
    # CLI -o json parses back to the API's data.
    out = cli(mesh, "proxy-status", "-o", "json")
    assert out.returncode == 0, out.stderr
    parsed = json.loads(out.stdout)
    assert [p["id"] for p in parsed] == [pid] and parsed[0]["state"] == "SYNCED"
    out = cli(mesh, "proxy-config", pid, "clusters", "-o", "json")
    names = {r["name"] for r in json.loads(out.stdout)["resources"]}
    assert f"outbound|{HTTP_PORT}|v1|web.{NS}.svc.cluster.local" in names
    out = cli(mesh, "version", "-o", "json")
    assert json.loads(out.stdout)["server"] == json.loads(out.stdout)["client"]


def test_bisect_withholds_only_the_bad_one_of_two_simultaneous_changes(mesh: MeshEnv) -> None:
    routes = (mesh.config / "20-routes.yaml").read_text()
    good_hdr = routes[routes.index("metadata: {name: hdr"):].split("\n---\n")[0]
    changed = routes.replace(good_hdr, BAD_VS.split("\n", 2)[2].rstrip("\n"))
    # In the same write, a harmless change to another VirtualService sharing the route config.
    changed = changed.replace("      uri: /new/\n      authority: legacy.internal",
                              "      uri: /newer/\n      authority: legacy.internal")
    assert changed.count("/newer/") == 1
    mesh.write("20-routes.yaml", changed)
    # The good change gets through; the bad one ends up the only object withheld.
    eventually(lambda: mesh.get("legacy", "/old/x").json()["path"] == "/newer/x", timeout=15)
    eventually(lambda: [e["object"] for e in mesh.errors() if e["nacked"]] == [f"VirtualService/{NS}/hdr"],
               timeout=15)
    assert mesh.get("hdr").json()["headers"]["x-added"] == "yes"
    mesh.write("20-routes.yaml", routes)
    eventually(lambda: not [e for e in mesh.errors() if e["nacked"]])
    eventually(lambda: mesh.get("legacy", "/old/x").json()["path"] == "/new/x")
    eventually(lambda: me(mesh)["state"] == "SYNCED")
