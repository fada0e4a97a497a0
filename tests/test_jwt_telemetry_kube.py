"""RequestAuthentication and Telemetry from Kubernetes (issue 18): against the kmock API
emulator over real HTTP, objects of Meshline's groups and of Istio's reach the mesh (the
sidecar of the selected pod gets the JWT filter and the access log), and deleting them
takes both away. Does network I/O."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.model.ir import ProxyMeta
from controlplane.translate.sidecar import plan_inbound
from tests.kube import KubeEnv, kube_emulator
from tests.kube.objects import namespace, pod
from tests.test_jwt_telemetry import JWKS, _access_logs, _http_filters
from tests.test_kubernetes_source_kmock import eventually, running

pytestmark = pytest.mark.timeout(120)


def request_authentication(api_version: str) -> dict[str, Any]:
    return {"apiVersion": api_version, "kind": "RequestAuthentication",
            "metadata": {"name": "jwt", "namespace": "default"},
            "spec": {"selector": {"matchLabels": {"app": "web"}},
                     "jwtRules": [{"issuer": "https://issuer.test", "jwks": JWKS}]}}


def telemetry(api_version: str) -> dict[str, Any]:
    return {"apiVersion": api_version, "kind": "Telemetry", "metadata": {"name": "logs", "namespace": "default"},
            "spec": {"accessLogging": [{"providers": [{"name": "envoy"}]}]}}


def service() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.5", "selector": {"app": "web"},
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[KubeEnv]:
    with kube_emulator(tmp_path) as env:
        env.create(namespace("default"))
        yield env


@pytest.mark.parametrize(("security", "telemetry_api", "istio_api"), [
    ("security.meshline.io/v1", "telemetry.meshline.io/v1", False),
    ("security.istio.io/v1", "telemetry.istio.io/v1", True),
])
async def test_jwt_rules_and_access_logs_from_the_api_server(kube: KubeEnv, security: str, telemetry_api: str,
                                                             istio_api: bool) -> None:
    kube.create(service())
    kube.create(pod("web-1", ip="10.0.0.5", app="web"))
    web = ProxyMeta("web-1.default", namespace="default", workload="web-1")
    listener = "inbound_10.0.0.5_8080"
    async with running(kube, istio_api=istio_api) as (rec, _src):
        await eventually(lambda: rec.synced, what="Synced")
        kube.create(request_authentication(security))
        kube.create(telemetry(telemetry_api))

        def configured() -> tuple[bool, list[str]]:
            specs = plan_inbound(rec.store.mesh(), web)
            return "envoy.filters.http.jwt_authn" in _http_filters(specs, listener), _access_logs(specs, listener)
        await eventually(lambda: configured() == (True, ["/dev/stdout"]), what="JWT filter and access log")
        kube.delete(security, "RequestAuthentication", "default", "jwt")
        kube.delete(telemetry_api, "Telemetry", "default", "logs")
        await eventually(lambda: configured() == (False, []), what="both removed")
