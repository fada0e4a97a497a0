"""Builders for the Kubernetes objects the tests create through the API. Pure data."""

from __future__ import annotations

from typing import Any

MESHLINE = "networking.meshline.io/v1"
ISTIO = "networking.istio.io/v1"


def namespace(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}}


def service(name: str, namespace: str = "default", port: int = 9080) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
            "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": port, "targetPort": port}]}}


def endpoint_slice(service_name: str, addresses: list[str], namespace: str = "default", port: int = 9080,
                   suffix: str = "1") -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{service_name}-{suffix}", "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addresses]}


def pod(name: str, ip: str, app: str, namespace: str = "default", port: int = 9080) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": {"app": app}},
            "spec": {"serviceAccountName": app, "containers": [{"name": app, "image": "example/app",
                                                                  "ports": [{"containerPort": port}]}]},
            "status": {"phase": "Running", "podIP": ip}}


def virtual_service(name: str, host: str, subset_host: str | None = None, namespace: str = "default",
                    api_version: str = MESHLINE, regex: str | None = None) -> dict[str, Any]:
    route: dict[str, Any] = {"route": [{"destination": {"host": subset_host or host}}]}
    if regex is not None:
        route["match"] = [{"uri": {"regex": regex}}]
    return {"apiVersion": api_version, "kind": "VirtualService", "metadata": {"name": name, "namespace": namespace},
            "spec": {"hosts": [host], "http": [route]}}


def destination_rule(name: str, host: str, namespace: str = "default", api_version: str = MESHLINE) -> dict[str, Any]:
    return {"apiVersion": api_version, "kind": "DestinationRule", "metadata": {"name": name, "namespace": namespace},
            "spec": {"host": host, "subsets": [{"name": "v1", "labels": {"version": "v1"}}]}}
