"""DestinationRule `trafficPolicy.loadBalancer.simple: PASSTHROUGH` through a real Envoy
sidecar with intercept capture (issue 16, item 4).

Istio documents (DestinationRule reference, LoadBalancerSettings.SimpleLB): "PASSTHROUGH:
This option will forward the connection to the original IP address requested by the caller
without doing any form of load balancing. This option must be used with care. It is meant
for advanced use cases." An original destination only exists where the sidecar captures
the connection (iptables), so this reuses tests/test_iptables_netns.py's lab: a pod netns
(198.18.x.2, the client `app-0` with Envoy and `meshline iptables`) and a host netns
(198.18.x.3, `meshline serve`), plus two endpoint pods of Service `echo` (port 8090) on
198.18.x.4 (echo-a) and 198.18.x.5 (echo-b), each a samples/backend.py answering its name.

The client calls pod A's IP with `Host: echo` (the service's name). Without a rule the
sidecar routes by Host to `outbound|8090||echo...` and round-robins, so pod B answers some
of the calls addressed to A. With PASSTHROUGH every call reaches the IP it was addressed to.
(The service VIP is not used: with PASSTHROUGH the original destination would be the VIP
itself, which in Kubernetes kube-proxy rewrites after the sidecar; this lab has no
kube-proxy, so nothing owns a VIP.)

Needs root, `ip`, `iptables`, `setpriv` and `curl`; skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.netns_mesh import sh
from tests.test_iptables_netns import NS, ROOT, Lab, _missing

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(_missing() is not None, reason=_missing() or "")]

HERE = Path(__file__).resolve().parent
PORT = 8090
ECHO_HOST = f"echo.{NS}.svc.cluster.local"
CALLS = 20


class PassthroughLab(Lab):
    def __init__(self) -> None:
        super().__init__()
        prefix = self.host_ip.rsplit(".", 1)[0]
        self.ip_a = f"{prefix}.4"
        self.ip_b = f"{prefix}.5"

    def setup_network(self) -> None:
        super().setup_network()
        for ip in (self.ip_a, self.ip_b):  # the two endpoint pods, reachable from the client pod
            sh("ip", "-n", self.host, "addr", "add", f"{ip}/24", "dev", "eth0")

    def write_mesh(self) -> Path:
        cfg = super().write_mesh()
        docs: list[dict[str, Any]] = [
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo", "namespace": NS},
             "spec": {"selector": {"app": "echo"},
                      "ports": [{"name": "http", "port": PORT, "targetPort": PORT}]}},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
             "metadata": {"name": "echo-1", "namespace": NS, "labels": {"kubernetes.io/service-name": "echo"}},
             "addressType": "IPv4", "ports": [{"name": "http", "port": PORT, "protocol": "TCP"}],
             "endpoints": [{"addresses": [self.ip_a], "conditions": {"ready": True}},
                           {"addresses": [self.ip_b], "conditions": {"ready": True}}]},
        ]
        (cfg / "echo.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
        return cfg

    def start(self) -> None:
        super().start()
        self.spawn(self.host, "echo", sys.executable, str(ROOT / "samples" / "backend.py"),
                   f"echo-a={self.ip_a}:{PORT}", f"echo-b={self.ip_b}:{PORT}")
        self.wait("the echo pods", lambda: all(self.run_in(
            self.host, "curl", "-sf", "-m", "2", f"http://{ip}:{PORT}/", check=False) for ip in (self.ip_a, self.ip_b)))
        self.wait("Envoy's echo route", lambda: ECHO_HOST in self.run_in(
            self.pod, "curl", "-sf", "-m", "2", "http://127.0.0.1:15000/config_dump?resource=dynamic_route_configs",
            check=False))

    def set_rule(self, present: bool) -> None:
        target = self.work / "config" / "destination-rule.yaml"
        if present:
            tmp = target.with_suffix(".tmp")
            tmp.write_text((HERE / "destination-rule-echo-passthrough.yaml").read_text())
            tmp.rename(target)
        else:
            target.unlink(missing_ok=True)

    def answers(self, ip: str) -> list[str]:
        """Who answers CALLS calls addressed to `ip` with the service's Host, one connection each."""
        out = []
        for _ in range(CALLS):
            status, _, body = self.curl(self.pod, f"http://{ip}:{PORT}/", "-H", f"Host: {ECHO_HOST}")
            assert status == 200, body
            out.append(json.loads(body)["backend"])
        return out


@pytest.fixture(scope="module")
def lab() -> Iterator[PassthroughLab]:
    env = PassthroughLab()
    try:
        env.start()
        yield env
    finally:
        env.close()


def test_passthrough_reaches_the_address_the_caller_asked_for(lab: PassthroughLab) -> None:
    cluster = f"outbound|{PORT}||{ECHO_HOST}"
    # Without a DestinationRule the service's cluster load-balances (round robin): calls
    # addressed to pod A's IP are answered by both pods.
    assert set(lab.answers(lab.ip_a)) == {"echo-a", "echo-b"}

    lab.set_rule(True)

    lab.wait("the PASSTHROUGH rule in Envoy", lambda: lab_is_original_dst(lab, cluster), timeout=60)
    # Istio: "PASSTHROUGH: This option will forward the connection to the original IP address
    # requested by the caller without doing any form of load balancing."
    assert lab.answers(lab.ip_a) == ["echo-a"] * CALLS
    assert lab.answers(lab.ip_b) == ["echo-b"] * CALLS
    before = lab.admin_stat(f"cluster.{cluster}.upstream_rq_total")
    lab.answers(lab.ip_a)
    assert lab.admin_stat(f"cluster.{cluster}.upstream_rq_total") == before + CALLS  # the service's cluster

    # Removing the rule brings the load balancing back.
    lab.set_rule(False)
    lab.wait("round robin again", lambda: not lab_is_original_dst(lab, cluster), timeout=60)
    assert set(lab.answers(lab.ip_a)) == {"echo-a", "echo-b"}


def lab_is_original_dst(lab: PassthroughLab, cluster: str) -> bool:
    """Whether Envoy's dynamic cluster `cluster` is of type ORIGINAL_DST (its config dump)."""
    out = lab.run_in(lab.pod, "curl", "-sf", "-m", "2",
                     "http://127.0.0.1:15000/config_dump?resource=dynamic_active_clusters", check=False)
    for entry in json.loads(out or "{}").get("configs", []):
        c = entry.get("cluster", {})
        if c.get("name") == cluster:
            return bool(c.get("type") == "ORIGINAL_DST")
    return False
