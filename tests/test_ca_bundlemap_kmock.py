"""The trust-bundle ConfigMap the leader keeps in every mesh namespace, through the official
client against the kmock emulator: created, left alone when current, updated on rotation."""

from __future__ import annotations

from kubernetes import client as k8s

from controlplane.ca.bundlemap import CONFIGMAP, KEY, sync_bundle_configmaps
from tests.kube import kube_emulator


def test_bundle_configmaps_are_created_kept_and_updated() -> None:
    with kube_emulator() as env:
        core = k8s.CoreV1Api(env.api)
        assert sync_bundle_configmaps(env.api, ["shop", "web"], "ROOT-1") == {"shop": "created", "web": "created"}
        assert core.read_namespaced_config_map(CONFIGMAP, "shop").data == {KEY: "ROOT-1"}
        assert sync_bundle_configmaps(env.api, ["shop", "web"], "ROOT-1") == {
            "shop": "unchanged", "web": "unchanged"}
        # A root rotation: the bundle grows; every namespace follows.
        assert sync_bundle_configmaps(env.api, ["shop", "web"], "ROOT-1\nROOT-2") == {
            "shop": "updated", "web": "updated"}
        assert core.read_namespaced_config_map(CONFIGMAP, "web").data == {KEY: "ROOT-1\nROOT-2"}
