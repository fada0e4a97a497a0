"""Shared pytest options and fixtures. `--update-golden` rewrites golden files instead of
comparing; `fx` is a started xDS server (tests/xdsharness.py).

Test pyramid markers (registered in pyproject.toml) are applied here, so no test file has to
name them: by directory (`tests/e2e`, `tests/conformance` -> e2e, `tests/kube_real` -> kube),
and by what a test and the fixtures it uses call (followed through the helpers, classes and
fixtures of the test's own module): launching Envoy -> envoy, creating network namespaces ->
netns, starting a `meshline serve` process (`python -m controlplane[.cli] serve`) -> e2e. A
test none of these applies to is `unit` (`make test-fast` runs `-m unit`)."""

from __future__ import annotations

import inspect
import os
import types
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.xdsharness import XdsFixture

# Snapshots that name a resource their proxy does not get fail loudly in tests (the runtime's
# Settings.consistency; inherited by the `meshline serve` processes the e2e tests start).
os.environ.setdefault("MESHLINE_CONSISTENCY", "raise")


@pytest.fixture
async def fx() -> AsyncIterator[XdsFixture]:
    """A started xDS server over real gRPC with a FakeControl (stopped after the test)."""
    f = XdsFixture()
    await f.start()
    yield f
    await f.stop()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        default=False,
        help="rewrite tests/golden/*/out from the current translation instead of comparing",
    )


# ---------------------------------------------------------------------- pyramid markers
HEAVY = ("envoy", "netns", "kube", "e2e")
_TESTS = Path(__file__).resolve().parent
_BY_DIR = {"e2e": "e2e", "conformance": "e2e", "kube_real": "kube"}
# Names whose use launches Envoy: the binary's finders and the validators/launchers around it.
_ENVOY_NAMES = frozenset({"envoy_binary", "start_envoy", "EnvoyValidator", "validate_resources"})
# Constants of a command that creates network namespaces (`ip netns add`, `unshare --net`).
_NETNS_CONSTS = frozenset({"netns", "--net"})
_NETNS_NAMES = frozenset({"in_netns", "Lab", "Node", "Pod"})
# Constants of a command line that starts the control plane as a process: a whole `serve`
# (sources, servers, CA) per test is end-to-end, and its start-up alone costs ~1 s of CPU.
_SERVE_CONSTS = frozenset({"-m", "serve"})
_SERVE_MODULES = frozenset({"controlplane", "controlplane.cli"})


def _codes(obj: object) -> Iterator[types.CodeType]:
    """The code objects of a function, or of every method of a class, nested ones included."""
    if isinstance(obj, type):
        for v in vars(obj).values():
            yield from _codes(getattr(v, "__func__", v))
        return
    code = getattr(inspect.unwrap(obj) if callable(obj) else obj, "__code__", None)  # type: ignore[arg-type]
    stack = [code] if isinstance(code, types.CodeType) else []
    while stack:
        c = stack.pop()
        yield c
        stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))


def _heavy_kinds(roots: list[object], module: types.ModuleType | None) -> set[str]:
    """"envoy"/"netns"/"e2e" when any of `roots` (a test, its fixtures) reaches Envoy, a netns
    or a `meshline serve` process,
    following names defined in `module` (helpers, classes) transitively."""
    found: set[str] = set()
    seen: set[int] = set()
    todo = list(roots)
    mod_globals = vars(module) if module is not None else {}
    mod_name = getattr(module, "__name__", "")
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        for code in _codes(obj):
            names = set(code.co_names)
            if names & _ENVOY_NAMES:
                found.add("envoy")
            if names & _NETNS_NAMES and ("netns" in code.co_names or "in_netns" in names
                                         or any(isinstance(k, str) and k in _NETNS_CONSTS for k in code.co_consts)):
                found.add("netns")
            if any(isinstance(k, str) and k in _NETNS_CONSTS for k in code.co_consts):
                found.add("netns")
            consts = {k for k in code.co_consts if isinstance(k, str)}
            if _SERVE_CONSTS <= consts and consts & _SERVE_MODULES:
                found.add("e2e")
            for n in names:
                ref = mod_globals.get(n)
                # Follow the module's own helpers and those of the shared test modules.
                if ref is not None and (getattr(ref, "__module__", "") == mod_name
                                        or str(getattr(ref, "__module__", "")).startswith("tests.")):
                    if inspect.isfunction(ref) or inspect.isclass(ref):
                        todo.append(ref)
    return found


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    cache: dict[object, set[str]] = {}
    for item in items:
        kinds: set[str] = set()
        try:
            rel = Path(str(item.path)).resolve().relative_to(_TESTS).parts
        except ValueError:
            rel = ()
        if rel and rel[0] in _BY_DIR:
            kinds.add(_BY_DIR[rel[0]])
        if isinstance(item, pytest.Function):
            roots: list[object] = [item.function]
            info = getattr(item, "_fixtureinfo", None)
            for name in item.fixturenames:
                for fdef in (info.name2fixturedefs.get(name, ()) if info is not None else ()):
                    roots.append(fdef.func)
            key = tuple(id(r) for r in roots)
            if key not in cache:
                cache[key] = _heavy_kinds(roots, item.module)
            kinds |= cache[key]
        for kind in sorted(kinds):
            if item.get_closest_marker(kind) is None:
                item.add_marker(kind)
        if not any(item.get_closest_marker(k) for k in HEAVY):
            item.add_marker("unit")
