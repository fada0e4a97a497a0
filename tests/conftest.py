"""Shared pytest options and fixtures. `--update-golden` rewrites golden files instead of
comparing; `fx` is a started xDS server (tests/xdsharness.py)."""

from __future__ import annotations

import inspect
import os
import types
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.xdsharness import XdsFixture


@pytest.fixture
async def fx() -> AsyncIterator[XdsFixture]:
    """A started xDS server over real gRPC with a FakeControl (stopped after the test)."""
    f = XdsFixture()
    await f.start()
# Snapshots that name a resource their proxy does not get fail loudly in tests (the runtime's
# Settings.consistency; inherited by the `meshline serve` processes the e2e tests start).
os.environ.setdefault("MESHLINE_CONSISTENCY", "raise")

    yield f
    await f.stop()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        default=False,
        help="rewrite tests/golden/*/out from the current translation instead of comparing",
    )
