"""Kubernetes mode: the kinds of Istio's and the Gateway API's groups that the API server
serves are found by API discovery; Istio's translated kinds are then watched without
`--istio-api`, and every object of a kind Meshline does not support is reported (a warning
naming the kind, in the store's issues, hence `/v1/config/errors`). Against kmock."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.sources.kube_informer import ISTIO_RESOURCES, Resource, discover, plan_resources
from tests.kube import KubeEnv
from tests.kube.emulator import create_custom as create
from tests.kube.emulator import emulator_serving
from tests.test_kubernetes_source_kmock import eventually, running, settled

EXTRA = (
    Resource("WasmPlugin", "extensions.istio.io", "v1alpha1", "wasmplugins"),
    Resource("UDPRoute", "gateway.networking.k8s.io", "v1alpha2", "udproutes"),
)


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[KubeEnv]:
    with emulator_serving(tmp_path, EXTRA) as env:
        yield env


def test_discovery_finds_served_kinds_and_plans_them(kube: KubeEnv) -> None:
    found = {(r.kind, r.group, r.version) for r in discover(kube.api)}
    assert {("WasmPlugin", "extensions.istio.io", "v1alpha1"), ("UDPRoute", "gateway.networking.k8s.io", "v1alpha2"),
            ("VirtualService", "networking.istio.io", "v1")} <= found
    watched, use_istio, unsupported = plan_resources(discover(kube.api), istio_api=None)
    assert use_istio and set(ISTIO_RESOURCES) <= set(watched)  # Istio's kinds: no --istio-api needed
    assert {(r.kind, r.group) for r in unsupported} == {("WasmPlugin", "extensions.istio.io"),
                                                        ("UDPRoute", "gateway.networking.k8s.io")}


def test_nothing_served_keeps_istio_off() -> None:
    watched, use_istio, unsupported = plan_resources([], istio_api=None)
    assert not use_istio and not unsupported and not set(ISTIO_RESOURCES) & set(watched)


def test_objects_of_unsupported_kinds_are_reported(kube: KubeEnv) -> None:
    create(kube, EXTRA[0], "mesh-default")
    create(kube, EXTRA[1], "reviews-route")

    async def scenario() -> None:
        async with running(kube) as (rec, src):
            await settled(rec, src, kube)
            store = rec.store
            by_object = {(i.ref.display, i.field): i for i in store.mesh().issues}
            tel = by_object.get(("WasmPlugin/default/mesh-default", "kind"))
            route = by_object.get(("UDPRoute/default/reviews-route", "kind"))
            assert tel is not None and tel.severity == "warning" and "not supported" in tel.message, by_object
            assert route is not None and route.severity == "warning" and "UDPRoute" in route.message
            # A new object of such a kind is reported as it appears.
            create(kube, EXTRA[0], "late")
            await eventually(lambda: any(getattr(e, "obj", None) is not None and e.obj.name == "late"
                                         for e in rec.events), what="the new WasmPlugin")
            assert any(i.ref.display == "WasmPlugin/default/late" for i in store.mesh().issues)

    asyncio.run(scenario())


def test_istio_api_flag_overrides_discovery() -> None:
    served = [Resource("VirtualService", "networking.istio.io", "v1", "virtualservices")]
    assert plan_resources(served, istio_api=False)[1] is False  # --no-istio-api
    assert plan_resources([], istio_api=True)[1] is True  # --istio-api
