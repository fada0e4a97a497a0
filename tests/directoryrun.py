"""Running a `DirectorySource` in a test (tests/test_directory_incremental.py,
tests/test_directory_lost_events.py): the `running` fixture. A test module binds it
(`running = directoryrun.running`: an imported name a test's argument shadows is what ruff's
F811 flags) and asks for `running: Run`; `running(src)` starts `src.run` with its batches
landing in the queue it returns, and every source started is cancelled (and its cancellation
awaited) when the test ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from controlplane.sources.base import SourceEvent
from controlplane.sources.directory import DirectorySource

Run = Callable[[DirectorySource], asyncio.Queue[list[SourceEvent]]]


@pytest.fixture
async def running() -> AsyncIterator[Run]:
    """`running(src)` runs `src` with its batches landing in the returned queue."""
    tasks: list[asyncio.Task[None]] = []

    def _run(src: DirectorySource) -> asyncio.Queue[list[SourceEvent]]:
        queue: asyncio.Queue[list[SourceEvent]] = asyncio.Queue()

        async def sink(events: list[SourceEvent]) -> None:
            await queue.put(list(events))

        tasks.append(asyncio.create_task(src.run(sink)))
        return queue

    yield _run
    for task in tasks:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
