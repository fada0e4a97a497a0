"""Writes the inputs of the per-field golden cases (`tests/golden/f-*`): every field that
docs/istio-compatibility.md lists as "supported", set in an object of its kind in the mesh of
tests/test_istio_fields.py (its SCENARIO), with the sibling fields it needs (that test's
CONTEXT, OVERRIDES and SAMPLES), two fields per case where their objects merge without a
conflict or a new warning. Each case names the proxy whose configuration the fields
change (the first of them).

Regenerate (inputs, then outputs; review the diff of both):

    .venv/bin/python tests/golden/generate_fields.py
    .venv/bin/python -m pytest -q tests/test_golden.py --update-golden

Envoy validates every golden proxy's resources in one run (tests/test_envoycheck.py).
"""

from __future__ import annotations

import copy
import re
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from controlplane.model.convert import convert  # noqa: E402
from tests import test_istio_fields as F  # noqa: E402

GOLDEN = Path(__file__).resolve().parent
SHORT = {"VirtualService": "vs", "DestinationRule": "dr", "Sidecar": "sidecar", "PeerAuthentication": "pa",
         "AuthorizationPolicy": "authz"}
NEEDS_MESH_CONFIG = {("AuthorizationPolicy", "provider.name")}  # an extension provider (--mesh-config)
# Files on the proxy's host that Envoy reads even in validate mode (they do not exist where
# the golden set is validated).
NEEDS_FILES = ("tls.clientCertificate", "tls.privateKey", "tls.caCertificates", "tls.caCrl")
PER_CASE = 2
MAX_PROXIES = 1


def supported_fields() -> list[tuple[str, str]]:
    """(kind, path) of every row marked supported in the compatibility doc, in its order."""
    out: list[tuple[str, str]] = []
    kind = ""
    for line in F.DOC.read_text().splitlines():
        if line.startswith("## "):
            kind = line[3:].strip()
        m = re.match(r"^\| `([^`]+)` \| supported \|", line)
        if m and kind in F.KINDS:
            out.append((kind, m.group(1)))
    return out


def variant(kind: str, path: str, types: dict[str, str | None]) -> dict[str, Any]:
    """The spec that sets `path` (as tests/test_istio_fields.py's classify builds it)."""
    base = copy.deepcopy(F.BASE[kind])
    if (kind, path) in F.OVERRIDES:
        _before, after = F.OVERRIDES[(kind, path)]
        return {**base, **copy.deepcopy(after)}
    toks = F.tokens(path)
    for anchor, fields in F._contexts(kind, path):
        F.merge_at(base, toks, anchor, fields)
    F.set_path(base, toks, copy.deepcopy(F.sample(path, types.get(path))))
    return base


class Conflict(Exception):
    pass


def merged(a: Any, b: Any) -> Any:
    """`b` laid over `a`: dicts by key, lists by index; different scalars conflict."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = dict(a)
        for k, v in b.items():
            out[k] = merged(a[k], v) if k in a else copy.deepcopy(v)
        return out
    if isinstance(a, list) and isinstance(b, list):
        if a == b:
            return copy.deepcopy(a)
        if len(a) != len(b) or not all(isinstance(x, dict) for x in (*a, *b)):
            raise Conflict
        return [merged(x, y) for x, y in zip(a, b, strict=True)]
    if a != b:
        raise Conflict
    return copy.deepcopy(a)


def clean(kind: str, spec: dict[str, Any]) -> bool:
    """Converts and assembles with no error and no warning about the object."""
    value, own = convert(F._object(kind, spec))
    if value is None or own:
        return False
    own2, cross, _ = F.evaluate(kind, spec)
    return not own2 and not [i for i in cross if i.severity == "error"]


def changed_proxies(kind: str, spec: dict[str, Any]) -> list[str]:
    _, _, before = F.evaluate(kind, copy.deepcopy(F.BASE[kind]))
    _, _, after = F.evaluate(kind, spec)
    out: list[str] = []
    for p in F.PROXIES:
        mine = {k: v for k, v in after.items() if k.startswith(p.node_id + "/")}
        theirs = {k: v for k, v in before.items() if k.startswith(p.node_id + "/")}
        if mine != theirs:
            out.append(p.node_id)
    return out


def slug(path: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", path.replace("[]", "").replace("{}", "").lower()).strip("-")


def main() -> int:
    for old in GOLDEN.glob("f-*"):
        shutil.rmtree(old)
    every = supported_fields()
    skipped = [f for f in every if f in NEEDS_MESH_CONFIG or f[1].endswith(NEEDS_FILES)]
    fields = [f for f in every if f not in skipped]
    types: dict[str, dict[str, str | None]] = {k: F._schema_types(k) for k in F.KINDS}
    scenario = textwrap.dedent(F.SCENARIO).strip() + "\n"
    proxies = {p.node_id: p for p in F.PROXIES}
    cases: list[tuple[str, list[str], dict[str, Any]]] = []
    pending: dict[str, tuple[list[str], dict[str, Any]]] = {}
    for kind, path in fields:
        spec = variant(kind, path, types[kind])
        held = pending.get(kind)
        if held is not None:
            try:
                both = merged(held[1], spec)
            except Conflict:
                both = None
            if both is not None and clean(kind, both):
                held = ([*held[0], path], both)
                if len(held[0]) >= PER_CASE:
                    cases.append((kind, held[0], held[1]))
                    del pending[kind]
                else:
                    pending[kind] = held
                continue
            cases.append((kind, held[0], held[1]))
        pending[kind] = ([path], spec)
    cases += [(kind, paths, spec) for kind, (paths, spec) in pending.items()]
    names: set[str] = set()
    for n, (kind, paths, spec) in enumerate(cases):
        name = f"f-{SHORT[kind]}-{n:03d}-{slug(paths[0])}"[:70].rstrip("-")
        assert name not in names
        names.add(name)
        case = GOLDEN / name
        (case / "in").mkdir(parents=True)
        (case / "in" / "scenario.yaml").write_text(
            "# The mesh of tests/test_istio_fields.py (SCENARIO); written by tests/golden/generate_fields.py.\n"
            + scenario)
        obj = F._object(kind, spec).body
        header = "".join(f"# {kind} field: spec.{p}\n" for p in paths)
        (case / "in" / "object.yaml").write_text(header + yaml.safe_dump(obj, sort_keys=False))
        chosen = changed_proxies(kind, spec)[:MAX_PROXIES] or [F.PROXIES[0].node_id]
        entries = []
        for node_id in chosen:
            p = proxies[node_id]
            e: dict[str, Any] = {"node_id": p.node_id, "namespace": p.namespace, "capture": p.capture}
            if p.workload:
                e["workload"] = p.workload
            if p.labels:
                e["labels"] = dict(p.labels)
            entries.append(e)
        (case / "proxies.yaml").write_text(yaml.safe_dump(entries, sort_keys=False))
    covered = sum(len(p) for _, p, _ in cases)
    print(f"{len(cases)} cases covering {covered} of {len(every)} supported fields; skipped (a mesh config "
          f"or files on the proxy's host): {', '.join(f'{k} {p}' for k, p in skipped)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
