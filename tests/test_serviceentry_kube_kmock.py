"""ServiceEntry and WorkloadEntry from Kubernetes (issue 18): against the kmock API emulator
over real HTTP, objects of Meshline's group and of Istio's reach the mesh as registry hosts
and endpoints, and their removal takes the host away. Does network I/O."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.model.ir import Hostname
from tests.kube import KubeEnv, kube_emulator
from tests.kube.objects import namespace, pod
from tests.test_kubernetes_source_kmock import eventually, running

pytestmark = pytest.mark.timeout(120)

HOST = Hostname("billing.internal.example")


def service_entry(api_version: str) -> dict[str, Any]:
    return {"apiVersion": api_version, "kind": "ServiceEntry",
            "metadata": {"name": "billing", "namespace": "default"},
            "spec": {"hosts": [HOST], "location": "MESH_INTERNAL", "resolution": "STATIC",
                     "ports": [{"number": 7070, "name": "http", "protocol": "HTTP", "targetPort": 8080}],
                     "workloadSelector": {"labels": {"app": "billing"}}}}


def workload_entry(api_version: str) -> dict[str, Any]:
    return {"apiVersion": api_version, "kind": "WorkloadEntry",
            "metadata": {"name": "billing-vm", "namespace": "default"},
            "spec": {"address": "192.0.2.20", "labels": {"app": "billing"}, "serviceAccount": "vm"}}


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[KubeEnv]:
    with kube_emulator(tmp_path) as env:
        env.create(namespace("default"))
        yield env


@pytest.mark.parametrize(("api_version", "istio_api"), [("networking.meshline.io/v1", False),
                                                         ("networking.istio.io/v1", True)])
async def test_entries_from_the_api_server_reach_the_mesh(kube: KubeEnv, api_version: str, istio_api: bool) -> None:
    kube.create(pod("billing-1", ip="10.0.0.21", app="billing"))
    kube.create(workload_entry(api_version))
    async with running(kube, istio_api=istio_api) as (rec, _src):
        await eventually(lambda: rec.synced, what="Synced")
        # Created once the watch runs (kmock has no resourceVersion: a delete made between the
        # list and the watch would never be replayed, which a real API server does).
        kube.create(service_entry(api_version))

        def endpoints() -> list[str]:
            mesh = rec.store.mesh()
            return sorted(ep.address for es in mesh.endpoints.get(HOST, ()) for ep in es.endpoints)
        await eventually(lambda: endpoints() == ["10.0.0.21", "192.0.2.20"], what="entry endpoints")
        svc = rec.store.mesh().services[HOST]
        assert svc.ref.display == "ServiceEntry/default/billing" and svc.entry is not None
        kube.delete(api_version, "ServiceEntry", "default", "billing")
        await eventually(lambda: HOST not in rec.store.mesh().services, what="host removed")
