"""Golden tests of the sidecar translation: tests/golden/<case>/in/*.yaml + proxies.yaml ->
out/<node_id>.yaml (clusters, endpoints, listeners, routes as MessageToDict, by name).

Regenerate with `pytest tests/test_golden.py --update-golden` and review the diff.
Reads files only (the translation itself is pure).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import json_format
from google.protobuf.message import Message

from controlplane.cache.consistency import check_messages
from controlplane.model.convert import convert
from controlplane.model.ir import ProxyMeta, labels_of
from controlplane.model.mesh import Mesh
from controlplane.model.store import assemble
from controlplane.sources.yamlload import parse_documents
from controlplane.translate.plan import ENDPOINT, PUSH_ORDER, SHORT_NAMES, ResourceSpec, TypeUrl, build_all
from controlplane.translate.proxy import plan_proxy

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "in").is_dir())


@dataclass(frozen=True)
class Case:
    name: str
    mesh: Mesh
    proxies: tuple[ProxyMeta, ...]


def load_mesh(case_dir: Path) -> Mesh:
    """Parse and convert every object of `in/*.yaml`; any parse or conversion error fails.
    An optional `settings.yaml` sets the mesh's `trust_domain` and `root_namespace`."""
    values: list[object] = []
    for path in sorted((case_dir / "in").glob("*.yaml")):
        objects, errors = parse_documents(path.read_text(), f"{case_dir.name}/in/{path.name}")
        assert not errors, [e.format() for e in errors]
        for raw in objects:
            value, issues = convert(raw)
            problems = [i.format() for i in issues if i.severity == "error"]
            assert not problems, problems
            if value is not None:
                values.append(value)
    settings_file = case_dir / "settings.yaml"
    settings = yaml.load(settings_file.read_text(), Loader=_LOADER) if settings_file.exists() else {}
    return assemble(values, **settings)


# libyaml's safe loader where PyYAML has it, for the small proxies.yaml/settings.yaml files
# (the same data; the mesh's own files go through Meshline's parser, parse_documents).
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@functools.cache
def load_case(name: str) -> Case:
    """The case, loaded once per process (its Mesh is frozen): test_golden, the consistency
    check and the digest of a case share it. `load_fresh` loads it again."""
    return load_fresh(name)


def load_fresh(name: str) -> Case:
    case_dir = GOLDEN / name
    entries = yaml.load((case_dir / "proxies.yaml").read_text(), Loader=_LOADER)
    proxies = tuple(
        ProxyMeta(
            node_id=e["node_id"],
            namespace=e.get("namespace", "default"),
            workload=e.get("workload"),
            labels=labels_of(e.get("labels")),
            capture=e.get("capture", "bind"),
            mode=e.get("mode", "sidecar"),
            node=e.get("node"),
            waypoint=e.get("waypoint"),
            gateway=e.get("gateway"),
        )
        for e in entries
    )
    return Case(name, load_mesh(case_dir), proxies)


def proxy_specs(mesh: Mesh, proxy: ProxyMeta) -> list[ResourceSpec]:
    """What the runtime plans for `proxy` (its shared and own layers; certificates come from
    the CA and are not in golden files)."""
    plan = plan_proxy(mesh, proxy)
    for layer in (plan.shared, plan.own):
        keys = [(s.type_url, s.name) for s in layer]
        assert len(keys) == len(set(keys)), f"{proxy.node_id}: duplicate in one layer"
    assert not plan.overlaps(), f"{proxy.node_id}: planned in both layers: {plan.overlaps()}"
    return plan.specs()


def built(specs: list[ResourceSpec]) -> dict[TypeUrl, list[Message]]:
    out: dict[TypeUrl, list[Message]] = {}
    for spec in sorted(specs, key=lambda s: s.name):
        msg = spec.make()
        own_name = msg.cluster_name if spec.type_url == ENDPOINT else msg.name  # type: ignore[attr-defined]
        assert own_name == spec.name, f"{spec.name}: builder named it {own_name}"
        out.setdefault(spec.type_url, []).append(msg)
    return out


MAP_FIELDS = frozenset({"policies", "filterMetadata", "typedExtensionProtocolOptions", "typedPerFilterConfig",
                        "providers"})
"""Protobuf map fields in the output: their entries come out in an order that varies between
processes, so they are sorted by key."""


def _sorted_maps(node: Any) -> Any:
    if isinstance(node, dict):
        items = {k: _sorted_maps(v) for k, v in node.items()}
        for key in MAP_FIELDS & set(items):
            if isinstance(items[key], dict):
                items[key] = dict(sorted(items[key].items()))
        return items
    if isinstance(node, list):
        return [_sorted_maps(v) for v in node]
    return node


def _plain(d: dict[str, Any]) -> Any:
    """MessageToDict nests OrderedDicts for Any fields; YAML wants plain dicts."""
    return _sorted_maps(json.loads(json.dumps(d)))


def render(specs: list[ResourceSpec]) -> str:
    resources = built(specs)
    doc: dict[str, Any] = {}
    for type_url in PUSH_ORDER:
        if type_url in resources:
            doc[SHORT_NAMES[type_url]] = [_plain(json_format.MessageToDict(m)) for m in resources[type_url]]
    # libyaml's emitter (PyYAML's wheels ship it): the same text as the pure-Python one for
    # every golden file (checked on all of them), ~5x faster.
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    return yaml.dump(doc, Dumper=dumper, sort_keys=False, default_flow_style=False, width=120)


@pytest.mark.parametrize("case_name", CASES)
def test_golden(case_name: str, request: pytest.FixtureRequest) -> None:
    case = load_case(case_name)
    out_dir = GOLDEN / case_name / "out"
    update = bool(request.config.getoption("--update-golden"))
    expected_files = {f"{p.node_id}.yaml" for p in case.proxies}
    mismatched = []
    for proxy in case.proxies:
        text = render(proxy_specs(case.mesh, proxy))
        path = out_dir / f"{proxy.node_id}.yaml"
        if update:
            out_dir.mkdir(exist_ok=True)
            if not path.exists() or path.read_text() != text:
                path.write_text(text)
        elif not path.exists() or path.read_text() != text:
            mismatched.append(path.name)
    if update:
        for stale in out_dir.glob("*.yaml"):
            if stale.name not in expected_files:
                stale.unlink()
    else:
        assert {p.name for p in out_dir.glob("*.yaml")} == expected_files, "stale or missing golden files"
    assert not mismatched, f"golden output differs for {mismatched}; rerun with --update-golden and review"


@pytest.mark.parametrize("case_name", CASES)
def test_golden_plans_are_consistent(case_name: str) -> None:
    """Every cluster, load assignment and route configuration a golden proxy's resources
    name is one it gets (secrets come from the CA and are not planned here), but for
    VirtualService destinations the case's mesh lacks (the user's; Envoy answers 503)."""
    case = load_case(case_name)
    for proxy in case.proxies:
        problems = [p for p in check_messages(build_all(proxy_specs(case.mesh, proxy)), secrets=False)
                    if not p.user_destination]
        assert not problems, f"{proxy.node_id}: " + "; ".join(map(str, problems))


@pytest.mark.parametrize("case_name", CASES)
def test_translation_is_deterministic(case_name: str) -> None:
    """Same input, same bytes; and a rebuilt Mesh plans equal args (what the cache relies on)."""
    first, second = load_fresh(case_name), load_fresh(case_name)
    for p1, p2 in zip(first.proxies, second.proxies, strict=True):
        s1, s2 = proxy_specs(first.mesh, p1), proxy_specs(second.mesh, p2)
        assert [(s.type_url, s.name, s.build, s.args) for s in s1] == [
            (s.type_url, s.name, s.build, s.args) for s in s2
        ]
        for a, b in zip(s1, s2, strict=True):
            hash(a.args)  # the cache keys on args: they must be hashable
            assert a.make().SerializeToString(deterministic=True) == b.make().SerializeToString(
                deterministic=True
            )


def _digest_all_cases() -> str:
    import hashlib

    h = hashlib.sha256()
    for name in CASES:
        case = load_case(name)
        for proxy in case.proxies:
            for spec in proxy_specs(case.mesh, proxy):
                h.update(spec.make().SerializeToString(deterministic=True))
    return h.hexdigest()


def test_bytes_are_the_same_in_every_process() -> None:
    """Resources nest messages in `Any`s; with map fields (RBAC policies) their bytes must not
    depend on the process (hash seeds, allocation), or a restarted control plane would send
    every proxy "changed" resources."""
    import os
    import subprocess
    import sys

    code = "from tests.test_golden import _digest_all_cases; print(_digest_all_cases())"
    root = Path(__file__).resolve().parent.parent
    # Two processes with fixed seeds (run side by side), and this one with its own.
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=root, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONHASHSEED": str(seed)}) for seed in (1, 2)]
    mine = _digest_all_cases()
    outs = set()
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
        outs.add(out.strip())
    assert outs == {mine}
