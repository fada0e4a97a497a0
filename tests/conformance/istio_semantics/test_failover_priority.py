"""`localityLbSetting.failoverPriority` through real Envoys (issue 16): endpoints whose label
values equal the client's come first, and traffic fails over to the others when they fail
(outlier detection ejects them). `helloworld` has a `tier: gold` and a `tier: silver` pod in
`default`; the `sleep` client is `tier: silver`. Failure: the silver pod's app is stopped."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.localrun import stop
from tests.conformance.conftest import MeshFactory
from tests.conformance.harness import (
    INJECTION,
    ROOT,
    Mesh,
    Service,
    Sidecar,
    Workload,
    converge,
    mesh_yaml,
    read,
    sample,
)

pytestmark = pytest.mark.e2e
HERE = Path(__file__).resolve().parent
PORT = 5000
N = 20


@pytest.fixture(scope="module")
def env(make_mesh: MeshFactory) -> Iterator[tuple[Mesh, Sidecar]]:
    services = [Service("helloworld", [("http", PORT)])]
    wls = [Workload(f"helloworld-{t}", "helloworld", f"127.0.4.{211 + i}", {"tier": t}) for i, t in
           enumerate(("gold", "silver"))]
    sleep = Workload("sleep", "sleep", "127.0.4.219", {"tier": "silver"}, sa="sleep", serves=False)
    mesh = make_mesh()
    argvs = [[sys.executable, str(ROOT / "samples" / "backend.py"), f"{w.name}={w.ip}:{PORT}"] for w in wls]
    mesh.start({"00-mesh.yaml": mesh_yaml({"default": INJECTION}, services, [*wls, sleep])}, (), argvs)
    sc = mesh.sidecar(sleep, "127.0.3.71")
    yield mesh, sc


def hello(mesh: Mesh, sc: Sidecar) -> str:
    r = mesh.http(sc, PORT, "helloworld.default.svc.cluster.local", "/hello")
    return str(r.json()["backend"]) if r.status_code == 200 else f"HTTP {r.status_code}"


def test_same_label_first_then_failover(env: tuple[Mesh, Sidecar]) -> None:
    mesh, sleep = env
    converge(lambda: set(sample(N, lambda: hello(mesh, sleep))) == {"helloworld-gold", "helloworld-silver"})
    mesh.kubectl_apply(read(HERE, "destination-rule-failover-priority.yaml"))
    # Doc: endpoints are sorted by the listed labels: the client's tier (silver) comes first.
    converge(lambda: sample(N, lambda: hello(mesh, sleep)) == {"helloworld-silver": N})
    # "to support traffic failover across different groups of endpoints": silver fails, gold answers.
    stop(mesh.procs[1])  # helloworld-silver's app (the apps start in order, before meshline)
    converge(lambda: sample(N, lambda: hello(mesh, sleep)) == {"helloworld-gold": N}, timeout=30)
    assert not mesh.errors()
