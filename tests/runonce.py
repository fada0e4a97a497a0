"""Work that several pytest-xdist workers would each repeat, done once per test run.

A module-scoped fixture runs once per worker that runs one of its tests; with work stealing
the tests of one module land on several workers, so an expensive fixture (e.g. the field walk
of tests/test_istio_fields.py, ~11 s of CPU) was computed two to four times. `once` computes
the value in the first worker that asks (under a file lock in the run's shared temporary
directory, where pytest-xdist's documentation puts such state) and the others load its pickle.
Without xdist it just computes. Reads and writes files under the run's temporary directory.
"""

from __future__ import annotations

import fcntl
import os
import pickle
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")


def once(factory: pytest.TempPathFactory, name: str, compute: Callable[[], T]) -> T:
    """`compute()`, computed by one worker of this run and shared with the others."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return compute()
    root = factory.getbasetemp().parent  # this run's directory, shared by its workers
    path = root / f"runonce-{name}.pickle"
    with open(root / f"runonce-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if path.exists():
            value: T = pickle.loads(path.read_bytes())
            return value
        value = compute()
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps(value))
        tmp.replace(path)
        return value
