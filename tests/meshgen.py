"""Generate Kubernetes-shaped mesh YAML (Service + EndpointSlice + Pods) for tests and
benchmarks, so fixtures stay short and readable."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import yaml


@dataclass
class Backend:
    ip: str
    labels: dict[str, str] = field(default_factory=dict)
    pod: str | None = None


def service_yaml(name: str, namespace: str, port: int, backends: Sequence[Backend], *,
                 port_name: str = "http", target_port: int | None = None,
                 cluster_ip: str | None = None) -> str:
    """A Service, its EndpointSlice and one Pod per backend, as multi-document YAML."""
    tp = target_port or port
    docs: list[dict[str, object]] = [{
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"selector": {"app": name}, "ports": [{"name": port_name, "port": port, "targetPort": tp}],
                 **({"clusterIP": cluster_ip} if cluster_ip else {})},
    }]
    eps = []
    for i, b in enumerate(backends):
        pod = b.pod or f"{name}-{i}"
        eps.append({"addresses": [b.ip], "conditions": {"ready": True},
                    "targetRef": {"kind": "Pod", "name": pod, "namespace": namespace}})
        docs.append({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod, "namespace": namespace, "labels": {"app": name, **b.labels}},
            "spec": {"containers": [{"name": "app", "image": "x", "ports": [{"containerPort": tp}]}]},
            "status": {"podIP": b.ip},
        })
    docs.insert(1, {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"{name}-1", "namespace": namespace, "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "ports": [{"name": port_name, "port": tp, "protocol": "TCP"}],
        "endpoints": eps,
    })
    return yaml.safe_dump_all(docs, sort_keys=False)


def subsets_dr(host: str, namespace: str, subsets: Sequence[str], label: str = "version") -> str:
    return yaml.safe_dump({
        "apiVersion": "networking.meshline.io/v1", "kind": "DestinationRule",
        "metadata": {"name": host, "namespace": namespace},
        "spec": {"host": host, "subsets": [{"name": s, "labels": {label: s}} for s in subsets]},
    }, sort_keys=False)


def generated_mesh(services: int, endpoints: int, namespace: str = "bench", port: int = 8080) -> str:
    """S services with E endpoints each on 10.x addresses (never dialled: config only)."""
    out = [yaml.safe_dump({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})]
    for s in range(services):
        name = f"svc-{s:05d}"
        eps = [{"addresses": [f"10.{(s >> 8) & 255}.{s & 255}.{e + 1}"], "conditions": {"ready": True}}
               for e in range(endpoints)]
        out.append(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
            "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": port, "targetPort": port}]},
        }))
        out.append(yaml.safe_dump({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-1", "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": port}], "endpoints": eps,
        }))
    return "---\n".join(out)
