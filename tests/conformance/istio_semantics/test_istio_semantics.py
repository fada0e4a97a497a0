"""Istio semantics issue 16 names that no Istio task exercises, through real Envoys, with the
expected results written from Istio's reference documentation (quoted in each YAML file):
`sourceLabels` (the route depends on the client's labels), `consistentHash.useSourceIp` on a
TCP port (one client's connections all reach one backend) and DestinationRule
`workloadSelector` (the policy applies to the selected clients only).

`echo` (HTTP, port 8000) and `tcp-echo` (TCP, port 9000) each have a v1 and a v2 pod in
`default`; two `sleep` clients differ only in their `version` label, each with its sidecar."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
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
HTTP_PORT, TCP_PORT = 8000, 9000
N = 20


@dataclass
class Env:
    mesh: Mesh
    v1: Sidecar  # the sleep client labelled version: v1
    v2: Sidecar  # ... version: v2

    def echo(self, sc: Sidecar) -> str:
        r = self.mesh.http(sc, HTTP_PORT, "echo.default.svc.cluster.local", "/")
        return str(r.json()["backend"]) if r.status_code == 200 else f"HTTP {r.status_code}"

    def tcp(self, sc: Sidecar) -> str:
        return str(tcp_exchange(sc.outbound, TCP_PORT))


@pytest.fixture(scope="module")
def env(make_mesh: MeshFactory) -> Iterator[Env]:
    services = [Service("echo", [("http", HTTP_PORT)]), Service("tcp-echo", [("tcp", TCP_PORT)])]
    wls = [Workload(f"echo-{v}", "echo", f"127.0.4.{171 + i}", {"version": v}) for i, v in enumerate(("v1", "v2"))]
    wls += [Workload(f"tcp-echo-{v}", "tcp-echo", f"127.0.4.{173 + i}", {"version": v}, tcp_ports=(TCP_PORT,))
            for i, v in enumerate(("v1", "v2"))]
    clients = [Workload(f"sleep-{v}", "sleep", f"127.0.4.{181 + i}", {"version": v}, sa="sleep", serves=False)
               for i, v in enumerate(("v1", "v2"))]
    mesh = make_mesh()
    mesh.start({"00-mesh.yaml": mesh_yaml({"default": INJECTION}, services, [*wls, *clients])},
               backend_specs(services, wls))
    v1, v2 = mesh.start_sidecars([(clients[0], "127.0.3.31"), (clients[1], "127.0.3.32")])
    e = Env(mesh, v1, v2)
    converge(lambda: e.echo(v1).startswith("echo-") and e.tcp(v2).startswith("tcp-echo-"))
    yield e


def test_source_labels_route_by_the_clients_labels(env: Env) -> None:
    env.mesh.kubectl_apply(read(HERE, "destination-rule-echo.yaml"))
    env.mesh.kubectl_apply(read(HERE, "virtual-service-source-labels.yaml"))
    # Doc: sourceLabels "constrain the applicability of a rule to source (client) workloads
    # with the given labels": the version: v2 client matches the first rule, v1 the second.
    converge(lambda: all(env.echo(env.v2) == "echo-v2" for _ in range(5)))
    assert sample(N, lambda: env.echo(env.v2)) == {"echo-v2": N}
    assert sample(N, lambda: env.echo(env.v1)) == {"echo-v1": N}
    assert not env.mesh.errors()


def test_source_ip_hashing_on_tcp_and_workload_selector(env: Env) -> None:
    # Without a DestinationRule, connections are balanced over both pods (round robin).
    assert set(sample(N, lambda: env.tcp(env.v1))) == {"tcp-echo-v1", "tcp-echo-v2"}
    env.mesh.kubectl_apply(read(HERE, "destination-rule-tcp-echo-source-ip.yaml"))
    # Doc: useSourceIp "Hash based on the source IP address. This is applicable for both TCP
    # and HTTP connections": every connection of a client (one source address) reaches the
    # same pod.
    converge(lambda: len(sample(N, lambda: env.tcp(env.v2))) == 1)
    assert len(sample(N, lambda: env.tcp(env.v1))) == 1
    assert len(sample(N, lambda: env.tcp(env.v2))) == 1
    env.mesh.kubectl_apply(read(HERE, "destination-rule-tcp-echo-workload-selector.yaml"))
    # Doc: workloadSelector selects "the specific set of pods/VMs on which this
    # DestinationRule configuration should be applied": the version: v1 client keeps the
    # hashing, the v2 client (no rule applies to it) is balanced again.
    converge(lambda: len(sample(N, lambda: env.tcp(env.v2))) == 2)
    assert len(sample(N, lambda: env.tcp(env.v1))) == 1
    assert not env.mesh.errors()
