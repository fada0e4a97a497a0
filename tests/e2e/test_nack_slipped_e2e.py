"""A content fault that slips past pre-flight (pre-flight off here) is reproduced by
Meshline's own Envoy after an authenticated sidecar's NACK, and bisected to the right
object among three changed at once by that validator, never by asking fleet proxies.
(Its own module: it runs its own control plane and backends on the addresses of
test_nack_e2e's.)"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.e2e.conftest import eventually
from tests.e2e.test_mtls_e2e import NS, write
from tests.e2e.test_nack_e2e import HOSTS, errors, header, make_env, proxies, rejected_updates, vs_yaml

pytestmark = pytest.mark.e2e


def test_a_content_fault_past_preflight_is_bisected_by_meshlines_own_envoy(tmp_path: Path) -> None:
    e = make_env(tmp_path, "--no-preflight")
    try:
        write(e, "vs.yaml", vs_yaml({"alpha": "a1", "beta": "b1", "gamma": "c1"}))
        eventually(lambda: [header(e, h) for h in HOSTS] == ["a1", "b1", "c1"])
        before = rejected_updates(e, "client-0")
        t0 = time.monotonic()
        write(e, "vs.yaml", vs_yaml({"alpha": "a2", "beta": "%NO_SUCH_COMMAND%", "gamma": "c2"}))
        errs = eventually(lambda: [x for x in errors(e) if x["withheld"]])
        print(f"bad write -> withheld after the validator reproduced the NACK: {time.monotonic() - t0:.3f}s")
        assert [x["object"] for x in errs] == [f"VirtualService/{NS}/beta"]
        assert "reproduced by Meshline's Envoy" in errs[0]["message"] and "NO_SUCH_COMMAND" in errs[0]["message"]
        # It did slip past (the real proxy rejected it), and the good changes flow.
        assert rejected_updates(e, "client-0") > before
        eventually(lambda: [header(e, h) for h in HOSTS] == ["a2", "b1", "c2"])
        eventually(lambda: proxies(e)[f"client-0.{NS}"]["state"] == "DEGRADED")
        mesh = e.http.get(f"http://127.0.0.1:{e.status}/v1/mesh").json()
        assert mesh["nack_policy"]["content_faults"] >= 1
        write(e, "vs.yaml", vs_yaml({"alpha": "a2", "beta": "b3", "gamma": "c2"}))
        eventually(lambda: [header(e, h) for h in HOSTS] == ["a2", "b3", "c2"])
        eventually(lambda: not [x for x in errors(e) if x["withheld"]])
        eventually(lambda: proxies(e)[f"client-0.{NS}"]["state"] == "SYNCED")
    finally:
        e.close()
