"""`tcp[].match[].destinationSubnets` through real Envoys (issue 16): a TCP route whose
destination subnet holds the service's cluster IP applies, one whose subnet does not is
skipped (Istio's sidecar matches it against the destination address, the service VIP).

`tcp-echo` (clusterIP 10.96.0.90, two pods) and `tcp-other` (one pod) in `default`; a `sleep`
client sidecar."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conformance.conftest import MeshFactory
from tests.conformance.harness import (
    INJECTION,
    Mesh,
    Service,
    Sidecar,
    Workload,
    backend_specs,
    converge,
    mesh_yaml,
    read,
    sample,
    tcp_exchange,
)

pytestmark = pytest.mark.e2e
HERE = Path(__file__).resolve().parent
PORT = 9000
N = 20


@pytest.fixture(scope="module")
def env(make_mesh: MeshFactory) -> Iterator[tuple[Mesh, Sidecar]]:
    services = [Service("tcp-echo", [("tcp", PORT)], cluster_ip="10.96.0.90"),
                Service("tcp-other", [("tcp", PORT)], cluster_ip="10.96.0.91")]
    wls = [Workload(f"tcp-echo-{v}", "tcp-echo", f"127.0.4.{201 + i}", {"version": v}, tcp_ports=(PORT,))
           for i, v in enumerate(("v1", "v2"))]
    wls.append(Workload("tcp-other-v1", "tcp-other", "127.0.4.203", {"version": "v1"}, tcp_ports=(PORT,)))
    sleep = Workload("sleep", "sleep", "127.0.4.209", {}, sa="sleep", serves=False)
    mesh = make_mesh()
    mesh.start({"00-mesh.yaml": mesh_yaml({"default": INJECTION}, services, [*wls, sleep])},
               backend_specs(services, wls))
    sc = mesh.sidecar(sleep, "127.0.3.61")
    converge(lambda: str(tcp_exchange(sc.outbound, PORT)).startswith("tcp-echo-"))
    yield mesh, sc


def routed(subnet: str) -> str:
    return read(HERE, "virtual-service-destination-subnets.yaml").replace("SUBNET", subnet)


def test_destination_subnets_match_the_service_address(env: tuple[Mesh, Sidecar]) -> None:
    mesh, sleep = env

    def seen() -> set[str]:
        return set(sample(N, lambda: str(tcp_exchange(sleep.outbound, PORT))))

    mesh.kubectl_apply(routed("10.96.0.0/16"))
    # Doc: the rule applies to destinations in the subnet; 10.96.0.90 is in 10.96.0.0/16.
    converge(lambda: seen() == {"tcp-other-v1"})
    mesh.kubectl_apply(routed("10.97.0.0/16"))
    # Not in 10.97.0.0/16: the next route (tcp-echo, both pods).
    converge(lambda: seen() == {"tcp-echo-v1", "tcp-echo-v2"})
    mesh.kubectl_apply(routed("10.96.0.90"))  # "or just a.b.c.d"
    converge(lambda: seen() == {"tcp-other-v1"})
    assert not mesh.errors()
