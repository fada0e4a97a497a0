"""Which VirtualService a client uses for a host, through real Envoys (issues 16/18). Istio's
reference (VirtualService.exportTo): "exporting a virtual service allows it to be used by
sidecars and gateways defined in other namespaces"; `.` exports it to its own namespace only.
Istio's analyzer IST0109 (ConflictingMeshGatewayVirtualServiceHosts) names scoping each
conflicting VirtualService with `exportTo` as the fix, and Istio's sidecar scope puts the
client namespace's own VirtualServices before public ones, so a consumer's private route
applies to its namespace's clients and to no one else.

`echo` (v1 and v2 pods) lives in `default`; clients in namespaces `c1` and `c2`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conformance.conftest import MeshFactory
from tests.conformance.harness import (
    EchoClients,
    converge,
    read,
    start_echo_clients,
)

pytestmark = pytest.mark.e2e
HERE = Path(__file__).resolve().parent
PORT = 8000
N = 20


Env = EchoClients  # .pods(client): the echo pods that answer N requests of this client


@pytest.fixture(scope="module")
def env(make_mesh: MeshFactory) -> Iterator[Env]:
    mesh, c1, c2 = start_echo_clients(make_mesh(), PORT, 241, 243, ("127.0.3.81", "127.0.3.82"))
    e = Env(mesh, c1, c2, PORT, N)
    both = {"echo-v1", "echo-v2"}
    converge(lambda: e.pods(c1) == both and e.pods(c2) == both)  # no route yet: round robin
    yield e


def test_a_private_virtual_service_routes_only_its_own_namespace(env: Env) -> None:
    env.mesh.kubectl_apply(read(HERE, "destination-rule-echo.yaml"))
    # The service owner's public route applies to clients of every namespace.
    env.mesh.kubectl_apply(read(HERE, "virtual-service-echo-v2.yaml"))
    converge(lambda: env.pods(env.c1) == {"echo-v2"} and env.pods(env.c2) == {"echo-v2"})
    # c1's private route wins for c1's clients only; c2 keeps the owner's route (before the
    # fix c2 lost every route: the private one took the host for all namespaces).
    env.mesh.kubectl_apply(read(HERE, "virtual-service-echo-c1-private.yaml"))
    converge(lambda: env.pods(env.c1) == {"echo-v1"})
    assert env.pods(env.c2) == {"echo-v2"}
    # Without it, c1 is back on the owner's route.
    env.mesh.kubectl_delete(read(HERE, "virtual-service-echo-c1-private.yaml"))
    converge(lambda: env.pods(env.c1) == {"echo-v2"})
    assert env.pods(env.c2) == {"echo-v2"}
    assert not env.mesh.errors()
