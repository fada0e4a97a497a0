"""Meshline's admission webhooks registered with a real kube-apiserver, which calls them
over HTTPS verified with the caBundle that Meshline's leader patched in. Does I/O:
processes, HTTP, the session's API server.

What a user would notice: applying an invalid VirtualService is refused by the API server
with Meshline's message (the field and the reason), a valid one is stored; a Pod created
in a namespace labelled `meshline.io/dataplane-mode: sidecar` comes back with its sidecar
injected, one in another namespace (or opted out) unchanged.

The configurations are manifests/webhooks/ as shipped, except `clientConfig`: with no
cluster DNS or kube-proxy here, `service: meshline.meshline-system` becomes
`url: https://localhost:<port>/...` (the webhook certificate names localhost).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from controlplane.localrun import free_port, stop, wait_http
from tests.kube.objects import pod
from tests.kube_real.cluster import ROOT, RealKube, eventually

pytestmark = [pytest.mark.kube, pytest.mark.e2e, pytest.mark.timeout(180)]
SYSTEM = "meshline-system"
VS = "networking.meshline.io/v1"


def webhook_configs(port: int) -> list[dict[str, Any]]:
    docs = []
    for path in sorted((ROOT / "manifests" / "webhooks").glob("*configuration.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            for hook in doc["webhooks"]:
                svc = hook["clientConfig"].pop("service")
                hook["clientConfig"]["url"] = f"https://localhost:{port}{svc['path']}"
                hook["clientConfig"].pop("caBundle", None)
            docs.append(doc)
    return docs


class Hooks:
    def __init__(self, kube: RealKube, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.kube = kube
        self.proc = proc
        self.log = log


@pytest.fixture(scope="module")
def hooks(real_kube: RealKube) -> Iterator[Hooks]:
    kube = real_kube
    kube.namespace(SYSTEM)
    port = free_port()
    adm = k8s.AdmissionregistrationV1Api(kube.api)
    configs = webhook_configs(port)
    for doc in configs:
        kube.apply(doc)
    with tempfile.TemporaryDirectory(prefix="meshline-hooks-") as d:
        log = Path(d) / "meshline.log"
        status = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "controlplane.cli", "serve", "--kubernetes", "--kubeconfig", str(kube.kubeconfig),
             "--xds-address", f"127.0.0.1:{free_port()}", "--status-address", f"127.0.0.1:{status}",
             "--webhook-address", f"127.0.0.1:{port}", "--ca-address", "off", "--leader-lease-seconds", "3"],
            stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
            env={**os.environ, "POD_NAME": "hooks-1", "POD_NAMESPACE": SYSTEM})
        try:
            wait_http(f"http://127.0.0.1:{status}/readyz", proc=proc, timeout=60)

            def patched() -> bool:
                m = adm.read_mutating_webhook_configuration("meshline-sidecar-injector")
                v = adm.read_validating_webhook_configuration("meshline-validator")
                return all(h.client_config.ca_bundle for h in [*m.webhooks, *v.webhooks])

            eventually(patched)
            yield Hooks(kube, proc, log)
        finally:
            # Never leave fail-closed webhooks behind for the tests that follow.
            for doc in configs:
                with contextlib.suppress(ApiException):
                    if doc["kind"] == "MutatingWebhookConfiguration":
                        adm.delete_mutating_webhook_configuration(doc["metadata"]["name"])
                    else:
                        adm.delete_validating_webhook_configuration(doc["metadata"]["name"])
            stop(proc)
            print("--- meshline log (last lines)\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:]))


def _vs(name: str, ns: str, route: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": VS, "kind": "VirtualService", "metadata": {"name": name, "namespace": ns},
            "spec": {"hosts": [name], "http": [route]}}


def test_real_apiserver_refuses_an_invalid_virtualservice_through_meshline(hooks: Hooks) -> None:
    kube = hooks.kube
    kube.namespace("hooks-vs")
    # A typo'd field never reaches Meshline: the CRD's structural schema refuses it first.
    typo = _vs("typo", "hooks-vs", {"route": [{"destination": {"host": "typo"}}], "retries": {"attemps": 1}})
    p = kube.kubectl("apply", "-f", "-", input=yaml.safe_dump(typo), check=False)
    assert p.returncode != 0 and "attemps" in p.stderr and "validate.meshline.io" not in p.stderr, p.stderr
    # What the schema allows but Meshline cannot use is refused by the webhook, with its reason.
    bad = _vs("bad", "hooks-vs", {"match": [{"uri": {"regex": "(unclosed"}}],
                                  "route": [{"destination": {"host": "bad"}}]})

    def refused() -> str:
        p = kube.kubectl("apply", "-f", "-", input=yaml.safe_dump(bad), check=False)
        assert p.returncode != 0, p.stdout
        return p.stderr

    err = eventually(refused)
    assert 'admission webhook "validate.meshline.io" denied the request' in err and "regex" in err, err
    assert kube.get(VS, "VirtualService", "bad", "hooks-vs") is None
    # A valid one is admitted and stored; an update making it invalid is refused too.
    kube.apply(_vs("good", "hooks-vs", {"route": [{"destination": {"host": "good"}}]}))
    assert kube.get(VS, "VirtualService", "good", "hooks-vs") is not None
    with pytest.raises(ApiException) as ei:
        kube.patch(VS, "VirtualService", "good", {"spec": {"http": [
            {"match": [{"uri": {"regex": "(unclosed"}}], "route": [{"destination": {"host": "good"}}]}]}},
            "hooks-vs")
    assert "validate.meshline.io" in (ei.value.body or "")
    got = kube.get(VS, "VirtualService", "good", "hooks-vs")
    assert got is not None and "match" not in got["spec"]["http"][0]


def test_real_apiserver_returns_a_pod_injected_in_an_opted_in_namespace(hooks: Hooks) -> None:
    kube = hooks.kube
    kube.namespace("hooks-mesh", {"meshline.io/dataplane-mode": "sidecar"}, service_accounts=("web",))
    kube.namespace("hooks-plain", service_accounts=("web",))
    created = kube.create(pod("web-1", "10.3.0.1", "web", "hooks-mesh"))
    # The proxy is a native sidecar (an init container with restartPolicy Always), stored as
    # such by the API server after its own validation of the patched Pod.
    init = {c["name"]: c for c in created["spec"].get("initContainers") or []}
    assert [c["name"] for c in created["spec"]["containers"]] == ["web"]
    assert "meshline-proxy" in init and init["meshline-proxy"].get("restartPolicy") == "Always", list(init)
    assert created["metadata"]["annotations"].get("meshline.io/status") == "injected"
    plain = kube.create(pod("web-1", "10.3.0.2", "web", "hooks-plain"))
    assert not plain["spec"].get("initContainers") and [c["name"] for c in plain["spec"]["containers"]] == ["web"]
    opted_out = pod("web-2", "10.3.0.3", "web", "hooks-mesh")
    opted_out["metadata"]["labels"]["meshline.io/inject"] = "false"
    assert not kube.create(opted_out)["spec"].get("initContainers")
