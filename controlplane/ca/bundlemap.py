"""The mesh trust bundle as a ConfigMap in every namespace that runs proxies, so injected
sidecars, node proxies and waypoints can verify the control plane on port 15012 (a
projected volume reads ConfigMaps of its own namespace only). Written by the leader only.
Does network I/O through the official Kubernetes client (blocking: call it in a thread).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)

CONFIGMAP = "meshline-ca-root"
KEY = "root-cert.pem"
LABELS = {"app.kubernetes.io/part-of": "meshline", "meshline.io/ca-root": "true"}


def sync_bundle_configmaps(api_client: Any, namespaces: Iterable[str], bundle: str) -> dict[str, str]:
    """Create or update `meshline-ca-root` (key `root-cert.pem` = `bundle`) in each of
    `namespaces`. Returns namespace -> created | updated | unchanged | error: <reason>."""
    from kubernetes import client as k8s
    from kubernetes.client.exceptions import ApiException

    core = k8s.CoreV1Api(api_client)
    out: dict[str, str] = {}
    for ns in sorted(set(namespaces)):
        try:
            try:
                cm = core.read_namespaced_config_map(CONFIGMAP, ns)
            except ApiException as exc:
                if exc.status != 404:
                    raise
                body = {"apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": CONFIGMAP, "namespace": ns, "labels": LABELS},
                        "data": {KEY: bundle}}
                core.create_namespaced_config_map(ns, body)
                out[ns] = "created"
                continue
            if (cm.data or {}).get(KEY) == bundle:
                out[ns] = "unchanged"
                continue
            core.patch_namespaced_config_map(CONFIGMAP, ns, {"data": {KEY: bundle}})
            out[ns] = "updated"
        except ApiException as exc:  # one namespace failing never stops the others
            out[ns] = f"error: HTTP {exc.status} {exc.reason}"
            log.warning("cannot write ConfigMap %s/%s: HTTP %s %s", ns, CONFIGMAP, exc.status, exc.reason)
    return out
