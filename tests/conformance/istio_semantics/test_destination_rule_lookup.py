"""Which DestinationRule a client uses, through real Envoys (issue 16): Istio looks for one in
the client's namespace first, then in the service's, then in the root namespace, and a rule
is visible only where its `exportTo` exports it (Istio's traffic-management best practices,
"Cross-namespace configuration", and DestinationRule.exportTo in its reference).

`echo` (v1 and v2 pods) lives in `default`; clients in namespaces `c1` and `c2`. The rules
differ in something each client can observe: with source-IP hashing every request of a
client reaches one pod, with round robin both answer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conformance.conftest import MeshFactory
from tests.conformance.harness import (
    EchoClients,
    Sidecar,
    converge,
    read,
    start_echo_clients,
)

pytestmark = pytest.mark.e2e
HERE = Path(__file__).resolve().parent
PORT = 8000
N = 20


class Env(EchoClients):
    def pods_seen(self, sc: Sidecar) -> int:
        """How many echo pods answer N requests of this client."""
        seen = self.pods(sc)
        assert all(k.startswith("echo-") for k in seen), seen
        return len(seen)


@pytest.fixture(scope="module")
def env(make_mesh: MeshFactory) -> Iterator[Env]:
    mesh, c1, c2 = start_echo_clients(make_mesh(), PORT, 191, 195, ("127.0.3.41", "127.0.3.42"))
    e = Env(mesh, c1, c2, PORT, N)
    converge(lambda: e.pods_seen(c1) == 2 and e.pods_seen(c2) == 2)  # no rule yet: round robin
    yield e


def test_client_namespace_then_service_namespace_and_export_to(env: Env) -> None:
    # A rule in the service's namespace applies to clients of every namespace.
    env.mesh.kubectl_apply(read(HERE, "destination-rule-echo-sticky.yaml"))
    converge(lambda: env.pods_seen(env.c1) == 1 and env.pods_seen(env.c2) == 1)
    # A rule in the client's namespace wins over it, for that namespace's clients only.
    env.mesh.kubectl_apply(read(HERE, "destination-rule-echo-c1.yaml"))
    converge(lambda: env.pods_seen(env.c1) == 2)
    assert env.pods_seen(env.c2) == 1
    # Exported to its own namespace only, the service namespace's rule no longer applies to c2.
    env.mesh.kubectl_apply(read(HERE, "destination-rule-echo-sticky-local.yaml"))
    converge(lambda: env.pods_seen(env.c2) == 2)
    assert env.pods_seen(env.c1) == 2
    assert not env.mesh.errors()
