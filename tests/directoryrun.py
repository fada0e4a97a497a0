"""Running a `DirectorySource` in a test (tests/test_directory_incremental.py,
tests/test_directory_lost_events.py): the `running` fixture. A test module binds it
(`running = directoryrun.running`: an imported name a test's argument shadows is what ruff's
F811 flags) and asks for `running: Run`; `running(src)` starts `src.run` with its batches
landing in the queue it returns, and every source started is cancelled (and its cancellation
awaited) when the test ends. Also the two files' YAML and event helpers (`service`,
`replaced`)."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import AsyncIterator, Callable

import pytest

from controlplane.sources.base import Replace, SourceEvent
from controlplane.sources.directory import DirectorySource

Run = Callable[[DirectorySource], asyncio.Queue[list[SourceEvent]]]


def service(name: str, port: int = 9080) -> str:
    """A Service manifest named `name` in `default`, one port."""
    return textwrap.dedent(f"""\
        apiVersion: v1
        kind: Service
        metadata:
          name: {name}
          namespace: default
        spec:
          ports:
          - name: http
            port: {port}
        """)


def replaced(events: list[SourceEvent]) -> dict[str, list[str]]:
    """origin -> the names of the objects it holds now, per Replace event."""
    return {e.origin: sorted(o.name for o in e.objects or ()) for e in events if isinstance(e, Replace)}


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
