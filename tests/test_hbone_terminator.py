"""Every HBONE terminator (15008 on sidecars, waypoints and node proxies) leaves tunnels
without a stream idle timeout, as Istio's connect_terminate does: a tunnel is one TCP
connection, bounded by the source's tcp_proxy idle timeout (1 h). With Envoy's default
(5 min) an idle tunnelled connection, such as a database pool's, was reset after 300 s.

Checked on the golden outputs, which tests/test_golden.py holds equal to the translator's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

GOLDEN = Path(__file__).parent / "golden"


def _terminators(doc: Any) -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = []
    for lst in doc.get("listeners") or []:
        for fc in lst.get("filterChains") or []:
            for f in fc.get("filters") or []:
                tc = f.get("typedConfig") or {}
                if any(u.get("upgradeType") == "CONNECT" for u in tc.get("upgradeConfigs") or []):
                    found.append((lst.get("name", "?"), tc))
    return found


def test_hbone_terminators_set_no_stream_idle_timeout() -> None:
    kinds: dict[str, int] = {"node": 0, "waypoint": 0, "sidecar": 0}
    for path in sorted(GOLDEN.glob("*/out/*.yaml")):
        doc = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        for name, hcm in _terminators(doc if isinstance(doc, dict) else {}):
            assert hcm.get("streamIdleTimeout") == "0s", f"{path}: {name}"
            kind = "node" if path.stem.startswith("node-") else "waypoint" if "-wp-" in path.stem else "sidecar"
            kinds[kind] += 1
    assert all(kinds.values()), kinds  # every kind of proxy was checked
