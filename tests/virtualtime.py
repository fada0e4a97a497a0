"""An asyncio event loop whose clock is virtual: for tests of code that waits on purpose
(debounce windows, rotation delays, retry back-off), so that a 3 s window costs no wall time
and what the code under test sees of time does not depend on the machine's speed.

`loop.time()` starts at 1000 (like a monotonic clock, never 0) and moves only when the loop would otherwise sleep: when nothing is
ready to run and no I/O is pending, the clock jumps to the next timer. Work done between two
waits takes no virtual time at all, so "pushed at once" means "without waiting on the clock".
I/O still works (a selector poll without timeout happens first; with no timer scheduled the
loop blocks on real I/O), but code that waits on threads or subprocesses while timers are
pending would see time jump ahead: use this only for in-process asyncio code.

The code under test must take its clock from the loop (`loop.time`, e.g. an injected
`clock=asyncio.get_running_loop().time`), as `asyncio.sleep` and `call_later` do.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class _JumpingSelector:
    """Wraps the loop's selector: a poll that would block with a timeout advances the clock."""

    def __init__(self, real: selectors.BaseSelector, loop: VirtualTimeLoop) -> None:
        self._real = real
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events = self._real.select(0)
        if events or timeout == 0:
            return events
        if timeout is None:  # no timer at all: only I/O (or a thread's wake-up) can move on
            return self._real.select(None)
        self._loop.advance(timeout)
        return []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        super().__init__()
        self._virtual_now = 1000.0
        self._selector = _JumpingSelector(self._selector, self)  # type: ignore[has-type,assignment]

    def time(self) -> float:
        return self._virtual_now

    def advance(self, seconds: float) -> None:
        self._virtual_now += max(0.0, seconds)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run` on a virtual-time loop."""
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(coro)
