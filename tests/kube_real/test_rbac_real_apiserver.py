"""manifests/rbac.yaml against a real kube-apiserver with RBAC on: `meshline serve
--kubernetes` authenticated as the ServiceAccount meshline-system/meshline (a TokenRequest
token), nothing else. Does I/O: processes, HTTP, the session's API server.

What a user would notice: with exactly the shipped least-privilege RBAC, Meshline syncs
every watched kind, wins the leader Lease, persists the CA root Secret, writes CRD status,
patches its webhooks' caBundle and may create TokenReviews — and is refused what it was
not granted (writing Secrets other than its CA root, deleting that one, writing a Service).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from controlplane.ca.authn import TokenReviewer
from controlplane.ca.identity import Identity
from controlplane.localrun import free_port, stop, wait_http
from controlplane.sources.kubernetes import make_api_client
from tests.kube.objects import service
from tests.kube_real.cluster import ROOT, RealKube, eventually
from tests.kube_real.test_webhooks_real_apiserver import webhook_configs

pytestmark = [pytest.mark.kube, pytest.mark.e2e, pytest.mark.timeout(180)]
SYSTEM = "meshline-system"
VS = "networking.meshline.io/v1"
API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"


def test_real_rbac_manifests_grant_what_meshline_uses_and_nothing_more(real_kube: RealKube, tmp_path: Path) -> None:
    kube = real_kube
    for rel in ("namespace.yaml", "serviceaccount.yaml", "rbac.yaml"):
        for doc in yaml.safe_load_all((ROOT / "manifests" / rel).read_text()):
            if doc:
                kube.apply(doc)
    core = k8s.CoreV1Api(kube.api)
    with contextlib.suppress(ApiException):
        core.delete_namespaced_secret("meshline-ca-root", SYSTEM)
    ns = "rbac-shop"
    kube.namespace(ns, {"meshline.io/dataplane-mode": "sidecar"}, service_accounts=("cart",))
    kube.apply(service("cart", ns))
    token = kube.token(SYSTEM, "meshline", [API_AUDIENCE])
    kubeconfig = kube.kubeconfig_for_token(tmp_path / "meshline.kubeconfig", token)
    sa_api = make_api_client(kubeconfig)
    hooks = free_port()
    configs = webhook_configs(hooks)
    adm = k8s.AdmissionregistrationV1Api(kube.api)
    for doc in configs:
        kube.apply(doc)
    status = free_port()
    log = tmp_path / "meshline.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "controlplane.cli", "serve", "--kubernetes", "--kubeconfig", str(kubeconfig),
         "--xds-address", f"127.0.0.1:{free_port()}", "--status-address", f"127.0.0.1:{status}",
         "--webhook-address", f"127.0.0.1:{hooks}", "--ca-address", "off", "--leader-lease-seconds", "3"],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
        env={**os.environ, "POD_NAME": "rbac-1", "POD_NAMESPACE": SYSTEM})
    try:
        wait_http(f"http://127.0.0.1:{status}/readyz", proc=proc, timeout=60)  # every kind listed
        http = f"http://127.0.0.1:{status}"
        with httpx.Client(timeout=5) as c:
            eventually(lambda: c.get(f"{http}/v1/mesh").json()["leader"])
            assert "cart" in {s["name"] for s in c.get(f"{http}/v1/services", params={"namespace": ns}).json()}
        # The CA root Secret (create, then get by name).
        eventually(lambda: core.read_namespaced_secret("meshline-ca-root", SYSTEM).data)
        # caBundle of its own two webhook configurations (get/patch by name).
        eventually(lambda: all(h.client_config.ca_bundle for h in [
            *adm.read_mutating_webhook_configuration("meshline-sidecar-injector").webhooks,
            *adm.read_validating_webhook_configuration("meshline-validator").webhooks]))
        # CRD status through the status subresource.
        kube.apply({"apiVersion": VS, "kind": "VirtualService", "metadata": {"name": "cart", "namespace": ns},
                    "spec": {"hosts": ["cart"], "http": [{"route": [{"destination": {"host": "cart"}}]}]}})

        def accepted() -> bool:
            obj = kube.get(VS, "VirtualService", "cart", ns) or {}
            return any(cd.get("type") == "Accepted" for cd in (obj.get("status") or {}).get("conditions") or [])

        eventually(accepted)
        # TokenReview with Meshline's own credentials.
        cart = kube.token(ns, "cart", ["meshline"], seconds=600)
        res = TokenReviewer(sa_api).review(cart)
        assert res.identity == Identity(ns, "cart"), res.reason
        text = log.read_text(errors="replace")
        assert not re.search(r"\bHTTP 403\b|forbidden", text, re.IGNORECASE), text[-3000:]
        # Least privilege: Secrets are readable (DestinationRule credentialName) but never
        # written outside the CA root's name; no writes to what it watches.
        sa_core = k8s.CoreV1Api(sa_api)
        secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "planted"}, "stringData": {"a": "b"}}
        for attempt in (lambda: sa_core.create_namespaced_secret(ns, secret),
                        lambda: sa_core.patch_namespaced_secret("other", SYSTEM, {"metadata": {"labels": {"x": "y"}}}),
                        lambda: sa_core.delete_namespaced_secret("meshline-ca-root", SYSTEM),
                        lambda: sa_core.patch_namespaced_service("cart", ns, {"metadata": {"labels": {"x": "y"}}})):
            with pytest.raises(ApiException) as ei:
                attempt()
            assert ei.value.status == 403
    finally:
        stop(proc)
        sa_api.close()
        for doc in configs:
            with contextlib.suppress(ApiException):
                if doc["kind"] == "MutatingWebhookConfiguration":
                    adm.delete_mutating_webhook_configuration(doc["metadata"]["name"])
                else:
                    adm.delete_validating_webhook_configuration(doc["metadata"]["name"])
        print("--- meshline log (last lines)\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:]))
