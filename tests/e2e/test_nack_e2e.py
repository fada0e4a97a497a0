"""A rejected config never spreads, with real Envoys whose streams are authenticated
(Meshline's CA): a sidecar that cannot bind its inbound port is the only one affected; an
AuthorizationPolicy whose rules Envoy cannot take fails closed; a content fault that slips
past pre-flight (pre-flight off) is reproduced by Meshline's own Envoy and bisected to the
right object among three changed at once, never by asking fleet proxies."""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import eventually
from tests.e2e.test_mtls_e2e import NS, PORT, Env, mesh_yaml, write

pytestmark = pytest.mark.e2e

SPARE_IP, SPARE_APP = "127.0.0.145", "127.0.1.145"
HOSTS = ("alpha", "beta", "gamma")


def extra_docs() -> str:
    """A second server pod (no endpoint: it never takes traffic) and three more services of
    the server pods, each with a VirtualService setting a header."""
    docs: list[dict[str, Any]] = [{
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "server-1", "namespace": NS, "labels": {"app": "server"},
                     "annotations": {"meshline.io/status": "injected", "meshline.io/app-address": SPARE_APP}},
        "spec": {"serviceAccountName": "server",
                 "containers": [{"name": "app", "image": "x", "ports": [{"containerPort": PORT}]}]},
        "status": {"podIP": SPARE_IP}}]
    for h in HOSTS:
        docs.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": h, "namespace": NS},
                     "spec": {"selector": {"app": "server"},
                              "ports": [{"name": "http", "port": PORT, "targetPort": PORT}]}})
        docs.append({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                     "metadata": {"name": f"{h}-1", "namespace": NS, "labels": {"kubernetes.io/service-name": h}},
                     "addressType": "IPv4", "ports": [{"name": "http", "port": PORT}],
                     "endpoints": [{"addresses": ["127.0.0.141"], "conditions": {"ready": True},
                                    "targetRef": {"kind": "Pod", "name": "server-0", "namespace": NS}}]})
    return yaml.safe_dump_all(docs, sort_keys=False)


def vs_yaml(values: dict[str, str]) -> str:
    return "---\n".join(f"""apiVersion: networking.meshline.io/v1
kind: VirtualService
metadata: {{name: {h}, namespace: {NS}}}
spec:
  hosts: [{h}]
  http:
  - route:
    - destination: {{host: {h}}}
    headers:
      request:
        set: {{x-added: "{v}"}}
""" for h, v in values.items())


def make_env(work: Path, *serve_args: str) -> Env:
    e = Env(work)
    e.mesh_yaml = mesh_yaml() + "---\n" + extra_docs()
    e.serve_args = list(serve_args)
    e.start()
    return e


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with tempfile.TemporaryDirectory(prefix="meshline-nack-") as d:
        e = make_env(Path(d))
        try:
            yield e
        finally:
            e.close()


def proxies(env: Env) -> dict[str, dict[str, Any]]:
    return {p["id"]: p for p in env.http.get(f"http://127.0.0.1:{env.status}/v1/proxies").json()}


def errors(env: Env) -> list[dict[str, Any]]:
    return list(env.http.get(f"http://127.0.0.1:{env.status}/v1/config/errors").json())


def quarantined(env: Env) -> list[str]:
    return list(env.http.get(f"http://127.0.0.1:{env.status}/v1/mesh").json()["quarantined"])


def header(env: Env, host: str) -> str:
    r = env.http.get(f"http://127.0.0.1:{PORT}/", headers={"host": f"{host}.{NS}"})
    return str(r.json()["headers"].get("x-added", "")) if r.status_code == 200 else f"HTTP {r.status_code}"


def rejected_updates(env: Env, workload: str) -> int:
    text = env.http.get(f"http://127.0.0.1:{env.envoys[workload][1]}/stats",
                        params={"filter": "update_rejected"}).text
    return sum(int(line.rsplit(":", 1)[1]) for line in text.splitlines() if line.strip())


def test_a_sidecar_that_cannot_bind_its_inbound_port_is_the_only_one_affected(env: Env) -> None:
    assert env.call().status_code == 200
    blocker = socket.socket()
    blocker.bind((SPARE_IP, PORT))
    blocker.listen()
    try:
        env.start_envoy("server-1", "server", outbound="127.0.0.152")

        def held_back() -> dict[str, Any] | None:
            p = proxies(env).get(f"server-1.{NS}")
            if p is None or p["state"] != "DEGRADED":
                return None
            d = [x for x in p["degraded"] if x["kind"] == "held-back" and x["verdict"] == "proxy-local"]
            return p if d else None

        p = eventually(held_back)
        d = next(x for x in p["degraded"] if x["kind"] == "held-back")
        assert d["type"] == "listeners" and "local to this proxy" in d["detail"]
        assert "already in use" in d["message"] or "cannot bind" in d["message"]
        # Nothing is withheld from anyone else: the client still reaches the service, and
        # its own sidecar is SYNCED.
        assert quarantined(env) == []
        for _ in range(20):
            assert env.call().status_code == 200
        assert proxies(env)[f"client-0.{NS}"]["state"] == "SYNCED"
        assert not [e for e in errors(env) if e["withheld"]]
    finally:
        blocker.close()
        p_, _ = env.envoys.pop("server-1")
        from controlplane.localrun import stop
        stop(p_)
    eventually(lambda: f"server-1.{NS}" not in proxies(env))


def test_an_authorization_policy_envoy_cannot_take_fails_closed(env: Env) -> None:
    eventually(lambda: env.call().status_code == 200)
    # A DENY whose namespace pattern is too large for Envoy's regex engine: Meshline's model
    # accepts it, Envoy does not. Withholding it must not leave the server open.
    write(env, "authz-bad.yaml", f"""apiVersion: security.meshline.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-huge, namespace: {NS}}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  action: DENY
  rules:
  - from:
    - source: {{namespaces: ["{'n' * 3000}"]}}
""")
    eventually(lambda: env.call().status_code == 403)
    errs = eventually(lambda: [e for e in errors(env) if e["object"] == f"AuthorizationPolicy/{NS}/deny-huge"
                               and e["withheld"]])
    assert "fail closed" in errs[0]["message"] and str(errs[0]["file"]).endswith("authz-bad.yaml")
    p = eventually(lambda: proxies(env)[f"server-0.{NS}"] if proxies(env)[f"server-0.{NS}"]["state"] == "DEGRADED"
                   else None)
    assert any(d["kind"] == "fail-closed" and d["object"] == f"AuthorizationPolicy/{NS}/deny-huge"
               for d in p["degraded"])
    assert rejected_updates(env, "server-0") == 0  # pre-flight: Envoy never saw the policy
    (env.config / "authz-bad.yaml").unlink()
    eventually(lambda: env.call().status_code == 200)
    eventually(lambda: proxies(env)[f"server-0.{NS}"]["state"] == "SYNCED")

