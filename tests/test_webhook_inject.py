"""Sidecar injection through the /inject endpoint, against golden files.

tests/golden/webhook/<case>/review.yaml (an AdmissionReview request; optional config.yaml
with WebhookConfig overrides) -> response.yaml (the AdmissionReview response with the
JSONPatch decoded) and pod.yaml (the pod with the patch applied by `jsonpatch`). Regenerate
with `pytest tests/test_webhook_inject.py --update-golden` and review the diff.

Every resulting pod validates against the Kubernetes 1.33 Pod schema (kubernetes-validate,
offline, strict); injection is idempotent; the annotations reach the init container's
`meshline iptables` rules and the proxy's resources and log level; the proxy's start
script produces a bootstrap that Envoy itself accepts.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner
from fastapi.testclient import TestClient

from controlplane.cli import main as cli
from controlplane.localrun import envoy_binary
from webhook.app import create_webhook_app
from webhook.config import ENVOY_CONFIG_DIR, WebhookConfig
from webhook.inject import inject, namespace_in_mesh, parse_quantity

GOLDEN = Path(__file__).parent / "golden" / "webhook"
CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "review.yaml").exists())
K8S_VERSION = "1.33"
CLASSIC_K8S_VERSION = "1.27"
"""A cluster without native sidecars (restartPolicy on init containers came in 1.28)."""
BASE = WebhookConfig(sidecar_namespaces=frozenset({"shop"}))


# --------------------------------------------------------------------------- running a case


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def case_config(case: str) -> WebhookConfig:
    path = GOLDEN / case / "config.yaml"
    overrides = load(path) if path.exists() else {}
    return replace(BASE, **overrides)


def post(config: WebhookConfig, review: dict[str, Any], **kw: Any) -> dict[str, Any]:
    with TestClient(create_webhook_app(config, **kw)) as client:
        r = client.post("/inject", json=review)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    assert (out["apiVersion"], out["kind"]) == ("admission.k8s.io/v1", "AdmissionReview")
    assert out["response"]["uid"] == review["request"]["uid"]
    assert out["response"]["allowed"] is True  # injection never fails a pod
    return out["response"]


def decoded_patch(resp: dict[str, Any]) -> list[dict[str, Any]]:
    if "patch" not in resp:
        return []
    assert resp["patchType"] == "JSONPatch"
    ops: list[dict[str, Any]] = json.loads(base64.b64decode(resp["patch"]))
    return ops


def run_case(case: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(input pod, response with decoded patch, output pod)."""
    review = load(GOLDEN / case / "review.yaml")
    resp = post(case_config(case), review)
    ops = decoded_patch(resp)
    pod = review["request"]["object"]
    patched = jsonpatch.apply_patch(pod, ops) if ops else copy.deepcopy(pod)
    shown = {k: v for k, v in resp.items() if k not in ("uid", "patch")}
    if ops:
        shown["patch"] = ops
    return pod, shown, patched


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the proxy's start script) as readable `|` blocks."""


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|" if "\n" in data else None)


_Dumper.add_representer(str, _str)


def dump(doc: Any) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=110)


@pytest.mark.parametrize("case", CASES)
def test_golden(case: str, request: pytest.FixtureRequest) -> None:
    _, resp, patched = run_case(case)
    expected = {"response.yaml": dump(resp), "pod.yaml": dump(patched)}
    if request.config.getoption("--update-golden"):
        for name, text in expected.items():
            (GOLDEN / case / name).write_text(text)
        return
    mismatched = [n for n, text in expected.items() if (GOLDEN / case / n).read_text() != text]
    assert not mismatched, f"{case}: {mismatched} differ; rerun with --update-golden and review the diff"


@pytest.mark.parametrize("case", CASES)
def test_resulting_pod_is_a_valid_kubernetes_pod(case: str) -> None:
    _, _, patched = run_case(case)
    # The classic layout is for clusters without native sidecars: it must use no newer field.
    versions = [K8S_VERSION] if case_config(case).native_sidecars else [K8S_VERSION, CLASSIC_K8S_VERSION]
    for version in versions:
        try:
            kubernetes_validate.validate(patched, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"Kubernetes {version}: {'.'.join(map(str, e.path))}: {e.message}")


def test_kubernetes_validate_ships_the_schemas_offline() -> None:
    shipped = {kubernetes_validate.utils.major_minor(v) for v in kubernetes_validate.utils.all_versions()}
    assert {K8S_VERSION, CLASSIC_K8S_VERSION} <= shipped
    native = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": {
        "initContainers": [{"name": "s", "image": "x", "restartPolicy": "Always"}],
        "containers": [{"name": "c", "image": "x"}]}}
    with pytest.raises(kubernetes_validate.ValidationError, match="restartPolicy"):
        kubernetes_validate.validate(native, CLASSIC_K8S_VERSION, strict=True)


@pytest.mark.parametrize("case", CASES)
def test_injecting_the_result_again_changes_nothing(case: str) -> None:
    review = load(GOLDEN / case / "review.yaml")
    _, _, patched = run_case(case)
    review["request"]["object"] = patched
    resp = post(case_config(case), review)
    assert "patch" not in resp


def test_cases_cover_the_issue() -> None:
    assert {"deployment-pod", "existing-init-container", "opted-out", "already-injected", "non-mesh-namespace",
            "classic-sidecar", "annotations"} <= set(CASES)


# --------------------------------------------------------------------------- what the pod gets


def containers(pod: dict[str, Any], key: str) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in pod["spec"].get(key, [])}


def test_native_layout() -> None:
    _, resp, pod = run_case("existing-init-container")
    assert "warnings" not in resp
    assert [c["name"] for c in pod["spec"]["initContainers"]] == ["meshline-init", "meshline-proxy", "migrate"]
    assert [c["name"] for c in pod["spec"]["containers"]] == ["ratings"]
    init, proxy = pod["spec"]["initContainers"][:2]
    assert proxy["restartPolicy"] == "Always"
    assert proxy["startupProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021, "scheme": "HTTP"}
    assert init["securityContext"]["capabilities"] == {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}
    assert init["securityContext"]["runAsUser"] == 0 and init["securityContext"]["runAsNonRoot"] is False
    assert init["command"] == ["meshline"] and init["args"][0] == "iptables"
    uid = proxy["securityContext"]["runAsUser"]
    assert uid == 1337 and init["args"][init["args"].index("--proxy-uid") + 1] == str(uid)
    assert proxy["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    mounts = {m["name"]: m for m in proxy["volumeMounts"]}
    assert mounts["meshline-token"]["mountPath"] == "/var/run/secrets/meshline/tokens"
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert set(vols) == {"data", "meshline-envoy", "meshline-token"}
    source, bundle = vols["meshline-token"]["projected"]["sources"]
    assert source["serviceAccountToken"]["audience"] == "meshline"
    assert bundle["configMap"] == {"name": "meshline-ca-root",
                                   "items": [{"key": "root-cert.pem", "path": "root-cert.pem"}]}
    assert pod["metadata"]["annotations"] == {"example.com/owner": "team-a", "meshline.io/status": "injected"}
    env = {e["name"]: e for e in proxy["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["MESHLINE_XDS_ADDRESS"]["value"] == "meshline.meshline-system.svc:15012"  # TLS
    assert env["MESHLINE_CA_BUNDLE"]["value"] == "/var/run/secrets/meshline/tokens/root-cert.pem"


def test_classic_layout() -> None:
    _, _, pod = run_case("classic-sidecar")
    assert [c["name"] for c in pod["spec"]["initContainers"]] == ["migrate", "meshline-init"]
    assert [c["name"] for c in pod["spec"]["containers"]] == ["meshline-proxy", "ratings"]
    proxy = pod["spec"]["containers"][0]
    assert "restartPolicy" not in proxy
    assert proxy["lifecycle"]["postStart"]["exec"]["command"][:2] == ["meshline", "proxy-wait"]
    assert proxy["lifecycle"]["preStop"]["exec"]["command"][:2] == ["meshline", "proxy-drain"]


def test_skipped_pods_are_allowed_unchanged() -> None:
    for case, warned in (("opted-out", False), ("already-injected", False), ("non-mesh-namespace", False),
                         ("invalid-annotation", True), ("host-network", True)):
        pod, resp, patched = run_case(case)
        assert patched == pod and "patch" not in resp, case
        assert bool(resp.get("warnings")) == warned, case
    _, resp, _ = run_case("invalid-annotation")
    assert resp["warnings"] == ["meshline: sidecar not injected: invalid annotation meshline.io/exclude-outbound-ports: "
                                "'http' is not a port or a range a-b"]


def test_annotations_take_effect() -> None:
    _, _, pod = run_case("annotations")
    init, proxy = pod["spec"]["initContainers"]
    assert proxy["resources"] == {"requests": {"cpu": "250m", "memory": "256Mi"},
                                  "limits": {"cpu": "1", "memory": "512Mi"}}
    assert {e["name"]: e.get("value") for e in proxy["env"]}["MESHLINE_LOG_LEVEL"] == "debug"
    # The init container's arguments, run through the real CLI, give the rules the annotations asked for.
    result = CliRunner().invoke(cli, [*init["args"], "--dry-run"])
    assert result.exit_code == 0, result.output
    rules = result.output.splitlines()
    for line in ("-A MESHLINE_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN",
                 "-A MESHLINE_OUTPUT -p tcp -m tcp --dport 6379 -j RETURN",
                 "-A MESHLINE_OUTPUT -d 10.96.0.1/32 -j RETURN",
                 "-A MESHLINE_OUTPUT -d 169.254.169.254/32 -j RETURN",
                 "-A MESHLINE_OUTPUT -d 10.0.0.0/8 -j MESHLINE_REDIRECT",
                 "-A MESHLINE_INBOUND -p tcp -m tcp --dport 9090 -j RETURN",
                 "-A MESHLINE_OUTPUT -m owner --uid-owner 1337 -j RETURN"):
        assert line in rules
    assert "-A MESHLINE_OUTPUT -j MESHLINE_REDIRECT" not in rules  # only 10.0.0.0/8 is captured


def test_default_init_container_captures_everything() -> None:
    _, _, pod = run_case("deployment-pod")
    init = pod["spec"]["initContainers"][0]
    result = CliRunner().invoke(cli, [*init["args"], "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "-A MESHLINE_OUTPUT -j MESHLINE_REDIRECT" in result.output.splitlines()
    assert "-A MESHLINE_REDIRECT -p tcp -j REDIRECT --to-ports 15001" in result.output
    assert "-A MESHLINE_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006" in result.output


def test_proxy_start_script_writes_a_bootstrap_envoy_accepts(tmp_path: Path) -> None:
    """Run the injected proxy's shell script with the downward-API env set, the real
    `meshline`, and `envoy` replaced by `envoy --mode validate`."""
    _, _, pod = run_case("deployment-pod")
    proxy = containers(pod, "initContainers")["meshline-proxy"]
    assert proxy["command"] == ["/bin/sh", "-c"]
    script = proxy["args"][0].replace(ENVOY_CONFIG_DIR, str(tmp_path))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "envoy"
    stub.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/envoy-args\nexec {envoy_binary()} --mode validate "$@"\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    env = {"PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "POD_NAME": "reviews-v1-7d4f8b9c6d-x2x9z", "POD_NAMESPACE": "shop", "SERVICE_ACCOUNT": "reviews",
           "POD_IP": "10.1.2.3", "NODE_NAME": "node-1"}
    for e in proxy["env"]:
        if "value" in e:
            env[e["name"]] = e["value"]
    token = tmp_path / "meshline-token"  # what the kubelet projects (audience meshline), no newline
    token.write_text("projected.sa.token")
    env["MESHLINE_TOKEN_FILE"] = str(token)
    from controlplane.ca import CertificateAuthority
    CertificateAuthority.load_or_create(tmp_path / "ca")
    env["MESHLINE_CA_BUNDLE"] = str(tmp_path / "ca" / "root-cert.pem")  # the projected ConfigMap key
    proc = subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    boot = yaml.safe_load((tmp_path / "envoy.yaml").read_text())
    g = boot["dynamic_resources"]["ads_config"]["grpc_services"][0]["google_grpc"]
    # TLS to 15012, verified against the bundle; the token is read from its file at every
    # stream (so the kubelet's rotation needs no restart) and never written into the bootstrap.
    assert g["target_uri"] == "meshline.meshline-system.svc:15012"
    assert g["channel_credentials"]["ssl_credentials"]["root_certs"] == {"filename": env["MESHLINE_CA_BUNDLE"]}
    assert g["call_credentials"][0]["from_plugin"]["typed_config"]["secret_data"] == {"filename": str(token)}
    assert "projected.sa.token" not in (tmp_path / "envoy.yaml").read_text()
    assert boot["node"]["id"] == "reviews-v1-7d4f8b9c6d-x2x9z.shop"
    assert boot["node"]["metadata"] == {
        "mode": "sidecar", "namespace": "shop", "service_account": "reviews", "capture": "intercept",
        "labels": {"app": "reviews", "pod-template-hash": "7d4f8b9c6d", "version": "v1"},
        "workload": "reviews-v1-7d4f8b9c6d-x2x9z"}
    assert {lst["name"] for lst in boot["static_resources"]["listeners"]} == {"health", "stats"}
    assert "--log-level warning" in (tmp_path / "envoy-args").read_text()


# --------------------------------------------------------------------------- decisions


def pod(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "shop", "labels": {"app": "p"}},
            "spec": {"containers": [{"name": "app", "image": "x"}], **spec}}


def review_of(obj: Any, namespace: str = "shop", kind: str = "Pod") -> dict[str, Any]:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "u-1", "kind": {"group": "", "version": "v1", "kind": kind}, "namespace": namespace,
        "operation": "CREATE", "object": obj}}


def test_namespace_knowledge_overrides_the_configured_set() -> None:
    cfg = BASE
    assert "patch" in post(cfg, review_of(pod()))
    assert "patch" not in post(cfg, review_of(pod(), namespace="other"))
    assert "patch" in post(cfg, review_of(pod(), namespace="other"), namespace_in_mesh=lambda ns: True)
    assert "patch" not in post(cfg, review_of(pod()), namespace_in_mesh=lambda ns: False)
    # Unknown to the caller: trust the namespaceSelector (no configured set) ...
    assert "patch" in post(WebhookConfig(), review_of(pod(), namespace="any"), namespace_in_mesh=lambda ns: None)


def test_namespace_labels_helper() -> None:
    assert namespace_in_mesh(None) is None
    assert namespace_in_mesh({"meshline.io/dataplane-mode": "sidecar"}) is True
    assert namespace_in_mesh({"meshline.io/dataplane-mode": "ambient"}) is False
    assert namespace_in_mesh({}) is False


def test_opt_out_label_is_honoured_too() -> None:
    p = pod()
    p["metadata"]["labels"]["meshline.io/inject"] = "false"
    assert "patch" not in post(BASE, review_of(p))


def test_conflicts_are_warnings_not_failures() -> None:
    p = pod()
    p["spec"]["containers"][0]["ports"] = [{"containerPort": 15001}]
    resp = post(BASE, review_of(p))
    assert "patch" not in resp and "uses port 15001" in resp["warnings"][0]
    p = pod(volumes=[{"name": "meshline-envoy", "emptyDir": {}}])
    resp = post(BASE, review_of(p))
    assert "patch" not in resp and "partly injected" in resp["warnings"][0]
    resp = post(BASE, review_of({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": {}}))
    assert "patch" not in resp and "no containers" in resp["warnings"][0]
    resp = post(BASE, review_of(None))
    assert "patch" not in resp and "missing" in resp["warnings"][0]
    resp = post(BASE, review_of({"apiVersion": "apps/v1", "kind": "Deployment"}, kind="Deployment"))
    assert "patch" not in resp and "only Pod" in resp["warnings"][0]


def test_app_running_as_the_proxy_uid_is_injected_with_a_warning() -> None:
    p = pod(securityContext={"runAsUser": 1337})
    resp = post(BASE, review_of(p))
    assert "patch" in resp
    assert resp["warnings"] == ["meshline: container app runs as uid 1337, the proxy's uid: its traffic bypasses "
                                "the proxy"]


def resources_of(annotations: dict[str, str], config: WebhookConfig = BASE) -> Any:
    p = pod()
    p["metadata"]["annotations"] = annotations
    result = inject(p, "shop", config)
    if not result.patch:
        return result.warnings
    patched = jsonpatch.apply_patch(p, list(result.patch))
    return containers(patched, "initContainers")["meshline-proxy"]["resources"]


def test_resource_annotations() -> None:
    assert resources_of({}) == {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}}
    # A lower limit alone pulls the default request down with it (as Kubernetes would).
    assert resources_of({"meshline.io/proxy-memory-limit": "64Mi"}) == {
        "requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "64Mi"}}
    (warning,) = resources_of({"meshline.io/proxy-cpu": "2", "meshline.io/proxy-cpu-limit": "500m"})
    assert "meshline.io/proxy-cpu: the request 2 exceeds the limit 500m" in warning
    (warning,) = resources_of({"meshline.io/proxy-memory": "lots"})
    assert "meshline.io/proxy-memory: 'lots' is not a Kubernetes quantity" in warning
    (warning,) = resources_of({"meshline.io/proxy-log-level": "loud"})
    assert "meshline.io/proxy-log-level" in warning


@pytest.mark.parametrize(("text", "value"), [
    ("100m", "0.1"), ("1", "1"), ("1.5", "1.5"), ("128Mi", str(128 * 2**20)), ("1Gi", str(2**30)), ("2k", "2000"),
    ("1e3", "1000"), ("1E3", "1000"), ("5E", str(5 * 10**18)), (".5", "0.5"), ("250u", "0.000250"),
])
def test_parse_quantity(text: str, value: str) -> None:
    from decimal import Decimal

    assert parse_quantity(text) == Decimal(value)


@pytest.mark.parametrize("text", ["", "-1", "1.2.3", "1 Gi", "Gi", "1gi", "1x", "e3"])
def test_parse_quantity_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_quantity(text)


# --------------------------------------------------------------------------- classic hooks


class _FakeEnvoy:
    """A local HTTP server standing in for the proxy's health and admin endpoints."""

    def __init__(self, ready_after: int = 0, inbound_active: list[int] | None = None) -> None:
        self.calls: list[str] = []
        self.ready_after = ready_after
        self.active = list(inbound_active or [0])
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                return

            def _answer(self) -> None:
                fake.calls.append(f"{self.command} {self.path}")
                if self.path.startswith("/healthz/ready"):
                    ok = sum(c.startswith("GET /healthz") for c in fake.calls) > fake.ready_after
                    body, status = b"ok", 200 if ok else 503
                elif self.path.startswith("/stats"):
                    n = fake.active.pop(0) if len(fake.active) > 1 else fake.active[0]
                    body, status = f"listener.0.0.0.0_15006.downstream_cx_active: {n}\n".encode(), 200
                else:
                    body, status = b"OK\n", 200
                self.send_response(status)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_envoy() -> Iterator[_FakeEnvoy]:
    f = _FakeEnvoy(ready_after=2, inbound_active=[2, 1, 0])
    yield f
    f.close()


def test_proxy_wait_returns_once_ready(fake_envoy: _FakeEnvoy) -> None:
    r = CliRunner().invoke(cli, ["proxy-wait", "--url", f"http://127.0.0.1:{fake_envoy.port}/healthz/ready",
                                 "--interval", "0.01", "--timeout", "5"])
    assert r.exit_code == 0, r.output
    assert len(fake_envoy.calls) == 3


def test_proxy_wait_times_out() -> None:
    r = CliRunner().invoke(cli, ["proxy-wait", "--url", "http://127.0.0.1:9/healthz/ready", "--interval", "0.01",
                                 "--timeout", "0.1"])
    assert r.exit_code == 1 and "not ready" in r.output


def test_proxy_drain_drains_inbound_then_waits_for_connections(fake_envoy: _FakeEnvoy) -> None:
    r = CliRunner().invoke(cli, ["proxy-drain", "--admin-address", f"127.0.0.1:{fake_envoy.port}",
                                 "--min-wait", "0", "--timeout", "10"])
    assert r.exit_code == 0, r.output
    assert fake_envoy.calls[0] == "POST /drain_listeners?graceful&inboundonly"
    assert sum(c.startswith("GET /stats") for c in fake_envoy.calls) == 3


def test_envoy_binary_is_available() -> None:
    assert shutil.which(envoy_binary())


def test_an_internal_error_refuses_the_pod_instead_of_running_it_outside_the_mesh(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import webhook.app

    def broken(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("bug")

    monkeypatch.setattr(webhook.app, "inject", broken)
    review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "Pod"}, "operation": "CREATE",
        "namespace": "shop", "object": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                                        "spec": {"containers": [{"name": "app", "image": "x"}]}}}}
    with TestClient(create_webhook_app(BASE)) as client:
        r = client.post("/inject", json=review)
    resp = r.json()["response"]
    assert resp["allowed"] is False and resp["status"]["code"] == 500
    assert "refused rather than run outside the mesh" in resp["status"]["message"]
