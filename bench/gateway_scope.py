"""Bytes a gateway proxy receives before and after scoping its clusters to what its routes reach
(issue 18): for the sample mesh (samples/bookinfo + samples/gateway, the `make run-gateway`
proxy) and the gwapi-gateway golden case, the serialized CDS and EDS resources of the proxy's
shared layer planned unscoped (every mesh service, as before) and scoped (`gateway_scope`), and
the listener + route bytes for scale. Pure planning, no Envoy; prints one table.

    .venv/bin/python bench/gateway_scope.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from controlplane.model.convert import convert  # noqa: E402
from controlplane.model.ir import ProxyMeta  # noqa: E402
from controlplane.model.mesh import Mesh  # noqa: E402
from controlplane.model.store import assemble  # noqa: E402
from controlplane.sources.yamlload import parse_documents  # noqa: E402
from controlplane.translate.gateway import gateway_scope, plan_gateway, plan_gateway_clusters  # noqa: E402
from controlplane.translate.plan import CLUSTER, ENDPOINT, ResourceSpec  # noqa: E402


def load(*dirs: Path) -> Mesh:
    values: list[object] = []
    for d in dirs:
        for path in sorted(d.glob("*.yaml")):
            objects, errors = parse_documents(path.read_text(), str(path))
            assert not errors, [e.format() for e in errors]
            for raw in objects:
                value, _ = convert(raw)
                if value is not None:
                    values.append(value)
    return assemble(values)


def size(specs: list[ResourceSpec], type_url: str) -> tuple[int, int]:
    chosen = [s for s in specs if s.type_url == type_url]
    return len(chosen), sum(len(s.make().SerializeToString(deterministic=True)) for s in chosen)


def report(label: str, mesh: Mesh, meta: ProxyMeta) -> None:
    before = plan_gateway_clusters(mesh, meta.namespace)
    after = plan_gateway_clusters(mesh, meta.namespace, scope=gateway_scope(mesh, meta))
    own = plan_gateway(mesh, meta)
    own_bytes = sum(len(s.make().SerializeToString(deterministic=True)) for s in own)
    for name, t in (("CDS", CLUSTER), ("EDS", ENDPOINT)):
        (n0, b0), (n1, b1) = size(before, t), size(after, t)
        print(f"{label:<34} {name}  before {n0:>4} resources {b0:>8} B   after {n1:>4} resources {b1:>8} B"
              f"   ({b1 / b0:.0%} of before)" if b0 else "")
    print(f"{label:<34} LDS+RDS (unchanged) {own_bytes} B")


def main() -> None:
    sample = load(ROOT / "samples" / "bookinfo", ROOT / "samples" / "gateway")
    report("sample mesh (make run-gateway)", sample,
           ProxyMeta(node_id="ingressgateway-0", namespace="bookinfo", workload="ingressgateway-0", mode="gateway",
                     gateway="bookinfo/bookinfo-gateway"))
    golden = load(ROOT / "tests" / "golden" / "gwapi-gateway" / "in")
    report("golden gwapi-gateway (edge/public)", golden,
           ProxyMeta(node_id="public-gw", namespace="edge", workload="public-1", mode="gateway", gateway="edge/public"))


if __name__ == "__main__":
    main()
