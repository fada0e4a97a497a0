"""Fixtures for the tests against a real kube-apiserver + etcd (marker `kube`).

Once per session, before the first test runs, the binaries are built if missing
(`scripts/kube/kube.sh build`: minutes on a cold machine, then cached per version under
~/.cache/meshline/kube/); `real_kube` starts one etcd + API server pair on free ports for
the session, with the mesh CRDs installed. When the build is impossible (no Go), every
`kube` test is skipped with the reason, and the reason is printed in the summary.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kube_real.cluster import RealKube, ensure_built

_REASON_KEY = pytest.StashKey[str | None]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kube: tests against a real kube-apiserver + etcd (built with Go, cached)")


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    # Build here, not in a fixture: a cold build outlasts any per-test timeout.
    if _REASON_KEY in config.stash:
        return
    if not any(item.get_closest_marker("kube") for item in items):
        return
    tr = config.pluginmanager.get_plugin("terminalreporter")

    def echo(msg: str) -> None:
        if tr is not None:
            tr.write_line(msg)

    config.stash[_REASON_KEY] = ensure_built(echo)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    reason = config.stash.get(_REASON_KEY, None)
    if reason:
        terminalreporter.write_sep("-", "kube tests skipped")
        terminalreporter.write_line(f"tests marked `kube` were skipped: {reason}")


@pytest.fixture(scope="session")
def real_kube(pytestconfig: pytest.Config) -> Iterator[RealKube]:
    """A started etcd + kube-apiserver (admin kubeconfig at `.kubeconfig`, ApiClient at
    `.api`) with Meshline's CRDs installed; shared by the session, stopped at its end."""
    reason = pytestconfig.stash.get(_REASON_KEY, None)
    if _REASON_KEY not in pytestconfig.stash:
        reason = ensure_built()
    if reason:
        pytest.skip(f"real kube-apiserver unavailable: {reason}")
    with tempfile.TemporaryDirectory(prefix="meshline-kube-") as d:
        kube = RealKube(Path(d))
        try:
            kube.up()
            kube.install_crds()
            yield kube
        finally:
            kube.down()
