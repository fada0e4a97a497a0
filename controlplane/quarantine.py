"""NACK quarantine with bisection. Pure state machine; the runtime feeds it NACK/ACK
outcomes and applies the store changes it asks for.

When a proxy rejects a response, the suspects are the most recently changed objects
behind the rejected resources. One suspect is withheld at once. Several suspects are all
withheld, then bisected: half of a group is released and the proxy's verdict on the
resulting config (ACK: that half is innocent; NACK: it holds a culprit) narrows the group,
until only culprits stay withheld. Everything else keeps flowing meanwhile.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

Key = tuple[str, str, str]


@dataclass(slots=True)
class Group:
    keys: tuple[Key, ...]
    known_bad: bool  # the group certainly holds a culprit


@dataclass(slots=True)
class Bisection:
    proxy: str
    reason: str
    groups: deque[Group]
    testing: Group | None = None
    released_at_generation: int = 0
    deadline: float = 0.0
    culprits: list[Key] = field(default_factory=list)
    innocent: list[Key] = field(default_factory=list)


@dataclass(slots=True)
class Step:
    """What the runtime should do next."""

    release: tuple[Key, ...] = ()
    quarantine: tuple[Key, ...] = ()
    done: bool = False


class Bisector:
    """At most one bisection at a time (others wait: their suspects simply stay withheld)."""

    def __init__(self, timeout_s: float = 5.0) -> None:
        self.active: Bisection | None = None
        self.timeout_s = timeout_s

    def start(self, proxy: str, suspects: list[Key], reason: str) -> Step:
        """All suspects are already withheld; begin by releasing half of them."""
        if self.active is not None or len(suspects) < 2:
            return Step()
        self.active = Bisection(proxy, reason, deque([Group(tuple(sorted(suspects)), True)]))
        return self._next()

    def _next(self) -> Step:
        b = self.active
        assert b is not None
        while b.groups:
            g = b.groups.popleft()
            if g.known_bad and len(g.keys) == 1:
                b.culprits.append(g.keys[0])
                continue
            test = g.keys[: len(g.keys) // 2] if g.known_bad else g.keys
            rest = g.keys[len(test):]
            b.testing = Group(test, False)
            b.released_at_generation = 0  # not pushed yet: verdicts wait for armed()
            if rest:
                # If `test` turns out innocent and g was known bad, the rest holds the culprit.
                b.groups.appendleft(Group(rest, g.known_bad))
            b.deadline = time.monotonic() + self.timeout_s
            return Step(release=test)
        self.active = None
        return Step(done=True)

    def armed(self, generation: int) -> None:
        """The runtime rebuilt with the release in place at `generation`."""
        if self.active is not None:
            self.active.released_at_generation = generation
            self.active.deadline = time.monotonic() + self.timeout_s

    def on_ack(self, proxy: str, generation: int) -> Step:
        b = self.active
        if b is None or b.testing is None or proxy != b.proxy or not b.released_at_generation:
            return Step()
        if generation < b.released_at_generation:
            return Step()
        b.innocent.extend(b.testing.keys)
        b.testing = None
        return self._next()

    def on_nack(self, proxy: str, generation: int | None = None) -> Step | None:
        """None when this NACK is not part of the bisection (handle it normally). A NACK of
        a response built before the release (`generation` older than armed) is not a verdict."""
        b = self.active
        if b is None or b.testing is None or proxy != b.proxy or not b.released_at_generation:
            return None
        if generation is not None and generation < b.released_at_generation:
            return Step()
        bad = b.testing
        b.testing = None
        # The released group holds a culprit; the group after it (if any) is no longer known bad.
        if b.groups and b.groups[0].known_bad:
            b.groups[0] = Group(b.groups[0].keys, False)
        b.groups.appendleft(Group(bad.keys, True))
        step = self._next()
        return Step(release=step.release, quarantine=bad.keys, done=step.done)

    def involved(self) -> set[Key]:
        """Objects the bisection is still deciding about (kept out of normal NACK handling)."""
        b = self.active
        if b is None:
            return set()
        keys = {k for g in b.groups for k in g.keys}
        if b.testing is not None:
            keys.update(b.testing.keys)
        return keys

    def expired(self) -> bool:
        return self.active is not None and time.monotonic() > self.active.deadline

    def abort(self) -> tuple[Key, ...]:
        """Give up (the proxy under test went away or never answered). Returns the objects
        still undecided: the caller releases them, and a repeat rejection starts over."""
        undecided = tuple(sorted(self.involved()))
        self.active = None
        return undecided
