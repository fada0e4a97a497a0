"""The operator's view with a real Envoy: DEGRADED/STALE/SYNCED states, pre-flight
withholding the object Envoy rejects before any proxy sees it, metrics that move, and the
CLI reading the status API."""

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


def rejected_updates(mesh: MeshEnv) -> int:
    """Envoy's own count of xDS updates it rejected (the independent witness)."""
    text = mesh.client.get(f"{mesh.admin_url}/stats", params={"filter": "update_rejected"}).text
    return sum(int(line.rsplit(":", 1)[1]) for line in text.splitlines() if line.strip())


def test_rejected_object_is_caught_by_preflight_reported_and_fixable(mesh: MeshEnv) -> None:
    routes = (mesh.config / "20-routes.yaml").read_text()
    rejected_before = rejected_updates(mesh)
    good_hdr = routes[routes.index("metadata: {name: hdr"):].split("\n---\n")[0]
    mesh.write("20-routes.yaml", routes.replace(good_hdr, BAD_VS.split("\n", 2)[2].rstrip("\n")))
    t0 = time.monotonic()

    def withheld() -> list[dict[str, object]]:
        return [e for e in mesh.errors() if e["object"] == f"VirtualService/{NS}/hdr" and e["withheld"]]

    errs = eventually(withheld)
    print(f"bad write -> reported in {time.monotonic() - t0:.3f}s")
    assert "NO_SUCH_COMMAND" in str(errs[0]["message"]) and "pre-flight" in str(errs[0]["message"])
    assert str(errs[0]["file"]).endswith("20-routes.yaml") and errs[0]["line"]
    # No proxy ever saw the bad version: Envoy rejected nothing, and it was never NACKED.
    assert rejected_updates(mesh) == rejected_before
    assert all(t["nacks"] == 0 for t in me(mesh)["types"].values())  # type: ignore[attr-defined]
    # The previous version of the VirtualService keeps serving...
    assert mesh.get("hdr").json()["headers"]["x-added"] == "yes"
    # ...the proxy is not reported SYNCED: it does not receive the user's change...
    p = eventually(lambda: me(mesh) if me(mesh)["state"] == "DEGRADED" else None)
    assert any(d["object"] == f"VirtualService/{NS}/hdr" and d["kind"] == "withheld"
               for d in p["degraded"])  # type: ignore[union-attr]
    assert metric(mesh, "meshline_proxies_degraded") == 1
    # ...and a later change to another service still reaches Envoy.
    mesh.write("97-late.yaml", service_yaml("late", NS, HTTP_PORT, [Backend("127.0.0.110")]))
    eventually(lambda: mesh.get("late").status_code == 200)
    # The CLI shows the same truth.
    out = cli(mesh, "proxy-status")
    assert out.returncode == 0 and f"client-{mesh.protocol}" in out.stdout and "DEGRADED" in out.stdout
    assert f"VirtualService/{NS}/hdr" in out.stdout and "NO_SUCH_COMMAND" in out.stdout
    out = cli(mesh, "quarantine", "list")
    assert out.returncode == 0 and f"VirtualService/{NS}/hdr" in out.stdout and "20-routes.yaml:" in out.stdout
    # Releasing it by hand offers it again: pre-flight withholds it again, still no proxy sees it.
    out = cli(mesh, "quarantine", "release", f"VirtualService/{NS}/hdr")
    assert out.returncode == 0, out.stderr
    time.sleep(0.5)
    eventually(withheld)
    assert rejected_updates(mesh) == rejected_before
    # Fixing the object lets it flow and the proxy returns to SYNCED.
    mesh.write("20-routes.yaml", routes.replace('set: {x-added: "yes"}', 'set: {x-added: "fixed"}'))
    eventually(lambda: mesh.get("hdr").json()["headers"]["x-added"] == "fixed")
    eventually(lambda: me(mesh)["state"] == "SYNCED")
    assert not [e for e in mesh.errors() if e["withheld"]]
    assert metric(mesh, "meshline_proxies_degraded") == 0
    mesh.write("20-routes.yaml", routes)
    mesh.remove("97-late.yaml")
    eventually(lambda: mesh.get("late").status_code == 404)


def _routing(mesh: MeshEnv) -> list[object]:
    """What the real sidecar's user sees for each service (deterministic routes only)."""
    return [
        mesh.get("web", headers={"x-user": "alice"}).json()["backend"],
        mesh.get("legacy", "/old/x").json()["path"],
        mesh.get("hdr").json()["headers"]["x-added"],
        mesh.get("api").status_code,
        mesh.get("chaos", headers={"x-fault": "abort"}).status_code,
        mesh.get("nope").status_code,
    ]


def test_a_hostile_unauthenticated_client_nacking_everything_changes_nothing(mesh: MeshEnv) -> None:
    from tests.xdsharness import AdsClient

    eventually(lambda: me(mesh)["state"] == "SYNCED")
    expected = _routing(mesh)
    nacked = 0
    checks = 0

    async def attack(seconds: float) -> None:
        nonlocal nacked, checks
        import asyncio

        from controlplane.translate.plan import CLUSTER, ENDPOINT, LISTENER, ROUTE

        c = AdsClient(f"127.0.0.1:{mesh.xds_port}", "delta", "hostile", {"namespace": NS, "workload": "client",
                                                                        "labels": "app=client"})
        for t in (CLUSTER, LISTENER):
            c.send_delta(t)
        c.send_delta(ROUTE, subscribe=[str(HTTP_PORT)])
        deadline = time.monotonic() + seconds
        loop = asyncio.get_running_loop()
        try:
            # For `seconds`, and on a busy machine until enough NACKs and checks happened.
            while time.monotonic() < deadline or ((nacked < 4 or checks < 10)
                                                  and time.monotonic() < deadline + 120):
                try:
                    resp = await c.recv(timeout=0.2)
                except TimeoutError:
                    resp = None
                if resp is not None:
                    if resp.type_url == CLUSTER:
                        names = [r.name for r in resp.resources]
                        c.send_delta(ENDPOINT, subscribe=names)
                    c.send_delta(resp.type_url, nonce=resp.nonce, error="boom")
                    nacked += 1
                # Meanwhile the real sidecar's routing is unchanged.
                assert await loop.run_in_executor(None, _routing, mesh) == expected
                checks += 1
        finally:
            await c.close()

    import asyncio
    asyncio.run(attack(10.0))
    assert nacked >= 4 and checks >= 10
    # After it has gone, too; nothing is withheld and the real sidecar is SYNCED.
    time.sleep(1.0)
    assert _routing(mesh) == expected
    summary = mesh.client.get(f"{mesh.status_url}/v1/mesh").json()
    assert summary["quarantined"] == [] and summary["nack_policy"]["reproductions"] == 0
    assert me(mesh)["state"] == "SYNCED"
    assert not [e for e in mesh.errors() if e["withheld"]]


def test_proxy_that_stops_acking_is_stale(mesh: MeshEnv) -> None:
    assert mesh.envoy is not None
    eventually(lambda: me(mesh)["state"] == "SYNCED")
    os.kill(mesh.envoy.pid, signal.SIGSTOP)
    try:
        mesh.write("98-stale.yaml", service_yaml("stale", NS, HTTP_PORT, [Backend("127.0.0.110")]))
        eventually(lambda: me(mesh)["state"] == "STALE")
        assert me(mesh)["types"]["clusters"]["state"] == "STALE"  # type: ignore[index]
    finally:
        os.kill(mesh.envoy.pid, signal.SIGCONT)
    eventually(lambda: me(mesh)["state"] == "SYNCED")
    eventually(lambda: mesh.get("stale").status_code == 200)
    mesh.remove("98-stale.yaml")
    eventually(lambda: mesh.get("stale").status_code == 404)


def test_metrics_move_with_pushes_connects_and_convergence(mesh: MeshEnv) -> None:
    # (After the previous test's SIGSTOP the proxy may be reconnecting: one proxy, eventually.)
    eventually(lambda: me(mesh)["state"] == "SYNCED")
    eventually(lambda: metric(mesh, "meshline_proxies_connected", f'protocol="{mesh.protocol}"') == 1)
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
    eventually(lambda: mesh.get("legacy", "/old/x").json()["path"] == "/newer/x")
    eventually(lambda: [e["object"] for e in mesh.errors() if e["withheld"]] == [f"VirtualService/{NS}/hdr"],
               timeout=15)
    assert mesh.get("hdr").json()["headers"]["x-added"] == "yes"
    assert rejected_updates(mesh) == 0  # caught before any proxy saw it
    mesh.write("20-routes.yaml", routes)
    eventually(lambda: not [e for e in mesh.errors() if e["withheld"]])
    eventually(lambda: mesh.get("legacy", "/old/x").json()["path"] == "/new/x")
    eventually(lambda: me(mesh)["state"] == "SYNCED")
