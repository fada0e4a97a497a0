"""DestinationRule `credentialName` in Kubernetes mode against a real kube-apiserver with RBAC
on (issue 16): `meshline serve --kubernetes` authenticated as the ServiceAccount
meshline-system/meshline with exactly manifests/rbac.yaml. A rule naming a Secret that does not
exist is an error in /v1/config/errors naming the rule and `credentialName`; `kubectl create
secret tls` makes it go away; `kubectl delete secret` brings it back. Secrets of other types
are never listed (the API server is asked for TLS and Opaque ones only), and no key material
reaches the log. Does I/O: processes, HTTP, the session's API server."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from controlplane.localrun import free_port, stop, wait_http
from tests.e2e.test_locality_mutual_e2e import Pki
from tests.kube_real.cluster import ROOT, RealKube, eventually

pytestmark = [pytest.mark.kube, pytest.mark.e2e, pytest.mark.timeout(180)]
SYSTEM = "meshline-system"
API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"
NS = "cred-shop"
FIELD = "spec.trafficPolicy.tls.credentialName"


def test_a_tls_secret_created_and_deleted_with_kubectl_is_seen_by_the_mesh(real_kube: RealKube,
                                                                         tmp_path: Path) -> None:
    kube = real_kube
    for rel in ("namespace.yaml", "serviceaccount.yaml", "rbac.yaml"):
        for doc in yaml.safe_load_all((ROOT / "manifests" / rel).read_text()):
            if doc:
                kube.apply(doc)
    kube.namespace(NS, {"meshline.io/dataplane-mode": "sidecar"})
    pki = Pki(tmp_path)
    # A Secret of another type with TLS-looking keys: never listed, so never a credential.
    kube.apply({"apiVersion": "v1", "kind": "Secret", "type": "example.com/not-tls",
                "metadata": {"name": "other-cred", "namespace": NS},
                "stringData": {"tls.crt": pki.client_pem, "tls.key": pki.client_key}})
    for name in ("client-cred", "other-cred"):
        kube.apply({"apiVersion": "networking.meshline.io/v1", "kind": "DestinationRule",
                    "metadata": {"name": name, "namespace": NS},
                    "spec": {"host": f"{name}.example.com",
                             "trafficPolicy": {"tls": {"mode": "MUTUAL", "credentialName": name}}}})
    token = kube.token(SYSTEM, "meshline", [API_AUDIENCE])
    kubeconfig = kube.kubeconfig_for_token(tmp_path / "meshline.kubeconfig", token)
    status = free_port()
    log = tmp_path / "meshline.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "controlplane.cli", "serve", "--kubernetes", "--kubeconfig", str(kubeconfig),
         "--xds-address", f"127.0.0.1:{free_port()}", "--status-address", f"127.0.0.1:{status}",
         "--webhook-address", f"127.0.0.1:{free_port()}", "--ca-address", "off"],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
        env={**os.environ, "POD_NAME": "cred-1", "POD_NAMESPACE": SYSTEM})
    http = httpx.Client(timeout=5)

    def errors(rule: str) -> list[dict[str, Any]]:
        return [e for e in http.get(f"http://127.0.0.1:{status}/v1/config/errors").json()
                if e["object"] == f"DestinationRule/{NS}/{rule}" and e["field"] == FIELD and e["severity"] == "error"]

    try:
        wait_http(f"http://127.0.0.1:{status}/readyz", proc=proc, timeout=60)  # Secrets listed too
        eventually(lambda: errors("client-cred"))
        assert "client-cred" in errors("client-cred")[0]["message"]
        kube.kubectl("create", "secret", "tls", "client-cred", "-n", NS, f"--cert={pki.files['client.pem']}",
                     f"--key={pki.files['client-key.pem']}")
        eventually(lambda: not errors("client-cred"))
        kube.kubectl("delete", "secret", "client-cred", "-n", NS)
        eventually(lambda: errors("client-cred"))
        # The Secret of another type was never taken for a credential.
        assert errors("other-cred")
        text = log.read_text(errors="replace")
        assert "forbidden" not in text.lower() and "HTTP 403" not in text, text[-3000:]
        for pem in (pki.client_key, pki.client_pem):
            assert pem.splitlines()[1] not in text  # no key material in the log
    finally:
        http.close()
        stop(proc)
        with contextlib.suppress(ApiException):
            k8s.CoreV1Api(kube.api).delete_namespaced_secret("other-cred", NS)
        print("--- meshline log (last lines)\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:]))
