"""Istio task "TCP Traffic Shifting"
(https://istio.io/latest/docs/tasks/traffic-management/tcp-traffic-shifting/) through real
Envoys: tcp-echo v1 and v2 (samples/tcp-echo/tcp-echo-services.yaml: ports 9000 and 9001,
`tcp`) in `default`, a `sleep` client sidecar. Each tcp-echo pod greets a connection with its
name (the task's tcp-echo prefixes "one" or "two")."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conformance.conftest import MeshFactory
from tests.conformance.harness import (
    CLIENT_OUTBOUND,
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
N = 100


@pytest.fixture(scope="module")
def env(make_mesh: MeshFactory) -> Iterator[tuple[Mesh, Sidecar]]:
    services = [Service("tcp-echo", [("tcp", 9000), ("tcp-other", 9001)])]
    wls = [Workload(f"tcp-echo-{v}", "tcp-echo", f"127.0.4.{61 + i}", {"version": v}, sa="default",
                    tcp_ports=(9000, 9001)) for i, v in enumerate(("v1", "v2"))]
    wls.append(Workload("sleep", "sleep", "127.0.4.99", {}, sa="sleep", serves=False))
    mesh = make_mesh()
    mesh.start({"00-tcp-echo.yaml": mesh_yaml({"default": INJECTION}, services, wls)}, backend_specs(services, wls))
    sleep = mesh.sidecar(wls[-1], CLIENT_OUTBOUND)
    yield mesh, sleep


def echo(sc: Sidecar) -> str:
    return str(tcp_exchange(sc.outbound, 9000))


def test_all_v1_then_80_20(env: tuple[Mesh, Sidecar]) -> None:
    mesh, sleep = env
    mesh.kubectl_apply(read(HERE, "tcp-echo-all-v1.yaml"))
    # Doc: "route all TCP traffic to the v1 version"; "You should notice that all the
    # timestamps have a prefix of one, which means that all traffic was routed to the v1".
    converge(lambda: all(echo(sleep) == "tcp-echo-v1" for _ in range(20)))
    assert sample(N, lambda: echo(sleep)) == {"tcp-echo-v1": N}

    mesh.kubectl_apply(read(HERE, "tcp-echo-20-v2.yaml"))
    # Doc: "Transfer 20% of the traffic from tcp-echo:v1 to tcp-echo:v2"; "You should now
    # notice that about 80% of the timestamps have a prefix of one and about 20% have a
    # prefix of two." Connections opened before the change may still be routed the old way,
    # new ones are split.
    converge(lambda: echo(sleep) == "tcp-echo-v2")
    counts = sample(N, lambda: echo(sleep))
    assert set(counts) == {"tcp-echo-v1", "tcp-echo-v2"}, counts
    assert 0.05 * N <= counts["tcp-echo-v2"] <= 0.40 * N, counts  # binomial sd 4: ~4 sigma
    assert not mesh.errors()
