"""MeshStore edge cases: status changes that matter, duplicates across files."""

from __future__ import annotations

import yaml

from controlplane.model.raw import RawObject
from controlplane.model.store import MeshStore
from controlplane.sources.base import Replace, Upsert


def pod(ip: str | None, phase: str = "Running") -> RawObject:
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "shop", "labels": {"app": "a"}},
            "spec": {"containers": [{"name": "c", "image": "x"}]}, "status": {"phase": phase}}
    if ip:
        body["status"]["podIP"] = ip  # type: ignore[index]
    return RawObject("Pod", "v1", "shop", "p", body)


def test_pod_ip_written_by_the_kubelet_reaches_the_mesh() -> None:
    store = MeshStore()
    store.apply([Upsert("k8s", pod(None, "Pending"))])
    assert store.mesh().workloads[("shop", "p")].ip is None
    assert store.apply([Upsert("k8s", pod("10.0.0.7"))])  # only status changed: still a real change
    assert store.mesh().workloads[("shop", "p")].ip == "10.0.0.7"


def svc(port: int) -> str:
    return yaml.safe_dump({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x", "namespace": "shop"},
                           "spec": {"ports": [{"name": "http", "port": port}]}})


def raws(text: str, file: str) -> tuple[RawObject, ...]:
    from controlplane.sources.yamlload import parse_documents

    objs, _ = parse_documents(text, file)
    return tuple(objs)


def test_an_object_removed_from_every_file_does_not_come_back() -> None:
    store = MeshStore()
    store.apply([Replace("a.yaml", raws(svc(1), "a.yaml"))])
    store.apply([Replace("b.yaml", raws(svc(2), "b.yaml"))])  # b overrides a's copy
    store.apply([Replace("a.yaml", ())])  # removed from a while b wins
    store.apply([Replace("b.yaml", ())])  # and then from b
    assert not store.mesh().services  # no ghost of a's old copy


def test_removing_the_overridden_duplicate_clears_the_warning() -> None:
    store = MeshStore()
    store.apply([Replace("a.yaml", raws(svc(1), "a.yaml"))])
    store.apply([Replace("b.yaml", raws(svc(2), "b.yaml"))])
    assert any("also defined in" in i.message for i in store.mesh().issues)
    assert store.apply([Replace("a.yaml", ())])
    assert not any("also defined in" in i.message for i in store.mesh().issues)
    assert next(iter(store.mesh().services.values())).ports[0].port == 2
