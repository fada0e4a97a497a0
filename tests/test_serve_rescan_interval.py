"""`meshline serve --rescan-interval SECONDS` (issues 19/20 follow-up): the directory source's
periodic look at the whole tree (`DirectorySource.rescan_s`, the backstop for changes inotify
lost without a word) is a serve option. A bad value is refused with a clear error before
anything starts; a good one reaches the directory source `serve` builds. In-process (click's
CliRunner): `run` is replaced by a stand-in that builds the runtime as `run` does and stops."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane import logs, serve
from controlplane.runtime import Settings
from controlplane.sources.directory import DEFAULT_RESCAN_S, DirectorySource
from tests.clirun import run_cli


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list[DirectorySource]:
    """The directory sources of the runtime each `serve` invocation builds (nothing is started)."""
    out: list[DirectorySource] = []

    async def run(settings: Settings, **_kwargs: object) -> None:
        runtime = serve.build_runtime(settings)
        out.extend(s for s in runtime.sources if isinstance(s, DirectorySource))

    monkeypatch.setattr(serve, "run", run)
    monkeypatch.setattr(logs, "setup_logging", lambda *_args, **_kwargs: None)  # keep pytest's log handlers
    monkeypatch.setattr(serve.GcPolicy, "install", lambda _self: None)  # keep this process's gc thresholds
    return out


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf", "soon"])
def test_a_bad_interval_is_refused_naming_the_option(tmp_path: Path, built: list[DirectorySource],
                                                     value: str) -> None:
    r = run_cli("serve", "--config-dir", tmp_path, "--no-ca", "--rescan-interval", value)
    assert r.returncode == 2, r
    assert "Invalid value for '--rescan-interval'" in r.stderr
    expected = "is not a valid float" if value == "soon" else "must be a number of seconds greater than 0"
    assert expected in r.stderr, r.stderr
    assert built == []  # nothing was built, let alone started


def test_a_good_interval_reaches_the_directory_source(tmp_path: Path, built: list[DirectorySource]) -> None:
    r = run_cli("serve", "--config-dir", tmp_path, "--no-ca", "--rescan-interval", "2.5")
    assert r.returncode == 0, r
    [source] = built
    assert source.dirs == [tmp_path] and source.rescan_s == 2.5


def test_without_the_option_the_source_keeps_its_default(tmp_path: Path, built: list[DirectorySource]) -> None:
    r = run_cli("serve", "--config-dir", tmp_path, "--no-ca")
    assert r.returncode == 0, r
    [source] = built
    assert source.rescan_s == DEFAULT_RESCAN_S
    help_text = " ".join(run_cli("serve", "--help").stdout.split())
    assert "--rescan-interval SECONDS" in help_text and f"[default: {DEFAULT_RESCAN_S:g}]" in help_text
