"""Run the `meshline` command line inside the test process (click's CliRunner): the exit
status, stdout and stderr a user sees, without starting an interpreter per call (~0.4 s of
CPU each). A command that raises (a crash, not a usage error or exit) fails the test with
its traceback. Tests of the process itself (`python -m controlplane.cli ...`) start one:
tests/test_status_api.py (analyze), tests/test_ca_tokens_rotation.py (bootstrap)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from click.testing import CliRunner

from controlplane.cli import main


@dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str | Path, cwd: Path | None = None) -> CliResult:
    old = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        r = CliRunner().invoke(main, [str(a) for a in args], prog_name="meshline")
    finally:
        os.chdir(old)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return CliResult(r.exit_code, r.stdout, r.stderr)
