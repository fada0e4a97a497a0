"""caBundle upkeep of the webhook configurations: `ca_bundle_patch` (pure) on the shipped
manifests, and `patch_webhook_ca_bundles` through the official client against the kmock
Kubernetes API emulator over HTTP. Also checks the shipped webhook configurations against
what the server and the CRDs expect."""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import jsonpatch
import kmock
import pytest
import yaml
from kubernetes import client as k8s

from controlplane.ca import CertificateAuthority
from tests.kube import kube_emulator
from webhook.server import (
    MUTATING_CONFIGURATION,
    VALIDATING_CONFIGURATION,
    WebhookConfigurationNames,
    ca_bundle_patch,
    patch_webhook_ca_bundles,
)

ROOT = Path(__file__).resolve().parent.parent
WEBHOOKS = ROOT / "manifests" / "webhooks"
CRDS = ROOT / "manifests" / "crds"


def manifest(kind: str) -> dict[str, Any]:
    for path in sorted(WEBHOOKS.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == kind:
                return dict(doc)
    raise AssertionError(f"no {kind} under {WEBHOOKS}")


MUTATING = "MutatingWebhookConfiguration"
VALIDATING = "ValidatingWebhookConfiguration"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> str:
    return CertificateAuthority.load_or_create(tmp_path_factory.mktemp("ca")).trust_bundle()


# --------------------------------------------------------------------------- the manifests


def test_mutating_configuration() -> None:
    m = manifest(MUTATING)
    assert m["metadata"]["name"] == MUTATING_CONFIGURATION
    hook, istio = m["webhooks"]
    assert istio["namespaceSelector"]["matchLabels"] == {"istio-injection": "enabled"}  # Istio's label
    assert {k: v for k, v in istio.items() if k not in ("name", "namespaceSelector")} == {
        k: v for k, v in hook.items() if k not in ("name", "namespaceSelector")}
    assert hook["clientConfig"]["service"] == {"name": "meshline", "namespace": "meshline-system", "path": "/inject",
                                               "port": 443}
    assert hook["clientConfig"]["caBundle"] == ""  # the leader patches it
    assert hook["namespaceSelector"] == {
        "matchLabels": {"meshline.io/dataplane-mode": "sidecar"},
        "matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "NotIn",
                              "values": ["kube-system", "meshline-system"]}]}
    assert hook["objectSelector"] == {"matchExpressions": [
        {"key": "meshline.io/inject", "operator": "NotIn", "values": ["false"]},
        {"key": "sidecar.istio.io/inject", "operator": "NotIn", "values": ["false"]}]}
    assert (hook["failurePolicy"], hook["sideEffects"], hook["admissionReviewVersions"], hook["timeoutSeconds"]) == (
        "Fail", "None", ["v1"], 10)
    assert hook["rules"] == [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                              "resources": ["pods"], "scope": "Namespaced"}]


def test_validating_configuration_covers_every_mesh_crd() -> None:
    v = manifest(VALIDATING)
    assert v["metadata"]["name"] == VALIDATING_CONFIGURATION
    covered: set[tuple[str, str]] = set()
    for hook in v["webhooks"]:
        assert hook["clientConfig"]["service"]["path"] == "/validate"
        assert hook["clientConfig"]["service"]["port"] == 443
        assert (hook["failurePolicy"], hook["sideEffects"], hook["admissionReviewVersions"]) == ("Fail", "None", ["v1"])
        for rule in hook["rules"]:
            assert rule["operations"] == ["CREATE", "UPDATE"]
            covered |= {(g, r) for g in rule["apiGroups"] for r in rule["resources"]}
    for path in CRDS.glob("*.yaml"):
        for crd in yaml.safe_load_all(path.read_text()):
            if crd and crd.get("kind") == "CustomResourceDefinition":
                group, plural = crd["spec"]["group"], crd["spec"]["names"]["plural"]
                assert (group, plural) in covered
                assert (group.replace("meshline.io", "istio.io"), plural) in covered


def test_service_maps_443_to_the_webhook_port() -> None:
    svc = yaml.safe_load((ROOT / "manifests" / "service.yaml").read_text())
    assert {"name": "https-webhook-443", "port": 443, "targetPort": 15017, "protocol": "TCP",
            "appProtocol": "https"} in svc["spec"]["ports"]


# --------------------------------------------------------------------------- ca_bundle_patch


@pytest.mark.parametrize("kind", [MUTATING, VALIDATING])
def test_patch_sets_every_webhook_and_is_then_empty(kind: str, bundle: str) -> None:
    doc = manifest(kind)
    ops = ca_bundle_patch(doc, bundle)
    assert len(ops) == 2 * len(doc["webhooks"])
    patched = jsonpatch.apply_patch(doc, ops)
    for hook in patched["webhooks"]:
        assert base64.b64decode(hook["clientConfig"]["caBundle"]).decode() == bundle
    assert ca_bundle_patch(patched, bundle) == []
    # A rotated bundle changes them all again.
    assert len(ca_bundle_patch(patched, bundle + bundle)) == len(ops)


def test_patch_refuses_to_touch_a_reordered_configuration(bundle: str) -> None:
    doc = manifest(VALIDATING)
    ops = ca_bundle_patch(doc, bundle)
    reordered = copy.deepcopy(doc)
    reordered["webhooks"].reverse()
    with pytest.raises(jsonpatch.JsonPatchTestFailed):
        jsonpatch.apply_patch(reordered, ops)


# --------------------------------------------------------------------------- through the API (kmock)


def test_patch_webhook_ca_bundles_against_kmock(bundle: str) -> None:
    with kube_emulator() as env:
        for plural, kind in (("mutatingwebhookconfigurations", MUTATING),
                             ("validatingwebhookconfigurations", VALIDATING)):
            env.emulator.resources[f"admissionregistration.k8s.io/v1/{plural}"] = kmock.ResourceInfo(
                kind=kind, namespaced=False, verbs={"get", "list", "watch", "create", "update", "patch", "delete"})
        api = k8s.AdmissionregistrationV1Api(env.api)
        names = WebhookConfigurationNames()
        assert patch_webhook_ca_bundles(env.api, names, bundle) == {
            f"{MUTATING}/{MUTATING_CONFIGURATION}": "missing", f"{VALIDATING}/{VALIDATING_CONFIGURATION}": "missing"}
        api.create_mutating_webhook_configuration(manifest(MUTATING))
        api.create_validating_webhook_configuration(manifest(VALIDATING))
        assert patch_webhook_ca_bundles(env.api, names, bundle) == {
            f"{MUTATING}/{MUTATING_CONFIGURATION}": "patched", f"{VALIDATING}/{VALIDATING_CONFIGURATION}": "patched"}
        for read, name in ((api.read_mutating_webhook_configuration, MUTATING_CONFIGURATION),
                           (api.read_validating_webhook_configuration, VALIDATING_CONFIGURATION)):
            obj = read(name)
            assert obj.webhooks and all(base64.b64decode(h.client_config.ca_bundle).decode() == bundle
                                        for h in obj.webhooks)
        assert set(patch_webhook_ca_bundles(env.api, None, bundle).values()) == {"unchanged"}
