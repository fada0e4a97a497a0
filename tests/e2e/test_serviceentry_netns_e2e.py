"""REGISTRY_ONLY admits exactly the registry, ServiceEntry hosts included (issue 18): a real
Envoy sidecar with intercept capture (`meshline iptables`) in a network namespace, as
tests/test_iptables_netns.py builds it (pod 198.18.x.2, host 198.18.x.3 running `meshline
serve` and the backends). The pod's Sidecar is REGISTRY_ONLY and imports its namespace;
the namespace has a ServiceEntry `api.external.example` (STATIC, the host's address).

- a call to the ServiceEntry host is captured and delivered (200, through its cluster), and
  a TCP connection to the address of a resolution NONE entry goes where it was dialled;
- an HTTP call for a host outside the registry on the same port is refused (502), and a
  connection to an address and port nothing in the registry names is closed (BlackHole);
- with the Sidecar's mode back to ALLOW_ANY that unknown destination passes through, so
  the refusal above is REGISTRY_ONLY's doing.

Needs root, `ip`, `iptables`, `setpriv` and `curl`; skipped with the reason otherwise.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_iptables_netns import NS, ROOT, Lab, _missing

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(_missing() is not None, reason=_missing() or "")]

BLOCKED_PORT = 8082  # a backend on the host that no Service or ServiceEntry names
NONE_PORT = 8083  # a backend a resolution NONE entry admits by address (TCP)


def sidecar_doc(mode: str) -> dict[str, Any]:
    return {"apiVersion": "networking.istio.io/v1", "kind": "Sidecar", "metadata": {"name": "default", "namespace": NS},
            "spec": {"egress": [{"hosts": ["./*"]}], "outboundTrafficPolicy": {"mode": mode}}}


class RegistryLab(Lab):
    def write_mesh(self) -> Path:
        cfg = self.work / "config"
        cfg.mkdir()
        docs: list[dict[str, Any]] = [
            {"apiVersion": "v1", "kind": "Namespace",
             "metadata": {"name": NS, "labels": {"meshline.io/dataplane-mode": "sidecar"}}},
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "app-0", "namespace": NS, "labels": {"app": "app"}},
             "spec": {"containers": [{"name": "app", "image": "app", "ports": [{"containerPort": 9080}]}]},
             "status": {"podIP": self.pod_ip}},
            {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
             "metadata": {"name": "external-api", "namespace": NS},
             "spec": {"hosts": ["api.external.example"], "location": "MESH_EXTERNAL", "resolution": "STATIC",
                      "ports": [{"number": 8080, "name": "http", "protocol": "HTTP"}],
                      "endpoints": [{"address": self.host_ip}]}},
            {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
             "metadata": {"name": "external-db", "namespace": NS},
             "spec": {"hosts": ["db.external.example"], "addresses": [self.host_ip], "resolution": "NONE",
                      "ports": [{"number": NONE_PORT, "name": "tcp", "protocol": "TCP"}]}},
        ]
        (cfg / "mesh.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
        self.set_mode(cfg, "REGISTRY_ONLY")
        return cfg

    def set_mode(self, cfg: Path, mode: str) -> None:
        tmp = cfg / ".sidecar.yaml.tmp"
        tmp.write_text(yaml.safe_dump(sidecar_doc(mode), sort_keys=False))
        tmp.rename(cfg / "sidecar.yaml")

    def start(self) -> None:
        super().start()
        self.spawn(self.host, "blocked", sys.executable, str(ROOT / "samples" / "backend.py"),
                   f"blocked={self.host_ip}:{BLOCKED_PORT}", f"by-address={self.host_ip}:{NONE_PORT}")
        self.wait("the blocked backend", lambda: self.run_in(
            self.host, "curl", "-sf", "-m", "2", f"http://{self.host_ip}:{BLOCKED_PORT}/", check=False))

    def try_curl(self, url: str, *extra: str) -> int | None:
        """The HTTP status, or None when the connection failed (closed, reset)."""
        try:
            return self.curl(self.pod, url, *extra)[0]
        except RuntimeError:  # curl failed: no HTTP answer
            return None


@pytest.fixture(scope="module")
def lab() -> Iterator[RegistryLab]:
    env = RegistryLab()
    try:
        env.start()
        yield env
    finally:
        env.close()


def test_serviceentry_host_is_reachable(lab: RegistryLab) -> None:
    cluster = "cluster.outbound|8080||api.external.example.upstream_rq_total"
    before = lab.admin_stat(cluster)
    status, _, body = lab.curl(lab.pod, f"http://{lab.host_ip}:8080/", "-H", "Host: api.external.example")
    assert status == 200 and '"backend": "backend"' in body
    assert lab.admin_stat(cluster) == before + 1


def test_a_resolution_none_entry_admits_its_address(lab: RegistryLab) -> None:
    cluster = f"cluster.outbound|{NONE_PORT}||db.external.example.upstream_cx_total"
    before = lab.admin_stat(cluster)
    status, _, body = lab.curl(lab.pod, f"http://{lab.host_ip}:{NONE_PORT}/")
    assert status == 200 and '"backend": "by-address"' in body
    assert lab.admin_stat(cluster) == before + 1  # through the entry's ORIGINAL_DST cluster


def test_other_destinations_are_refused(lab: RegistryLab) -> None:
    status = lab.try_curl(f"http://{lab.host_ip}:8080/", "-H", "Host: unknown.example")
    assert status == 502
    assert lab.try_curl(f"http://{lab.host_ip}:{BLOCKED_PORT}/") is None


def test_allow_any_lets_the_unknown_destination_pass(lab: RegistryLab) -> None:
    lab.set_mode(lab.work / "config", "ALLOW_ANY")
    try:
        lab.wait("ALLOW_ANY", lambda: lab.try_curl(f"http://{lab.host_ip}:{BLOCKED_PORT}/") == 200, timeout=60)
    finally:
        lab.set_mode(lab.work / "config", "REGISTRY_ONLY")
    lab.wait("REGISTRY_ONLY again", lambda: lab.try_curl(f"http://{lab.host_ip}:{BLOCKED_PORT}/") is None, timeout=60)
