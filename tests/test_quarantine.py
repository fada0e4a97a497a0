"""Bisection of NACK suspects: only culprits stay withheld, innocents are released."""

from __future__ import annotations

from controlplane.quarantine import Bisector, Key


def run(suspects: list[Key], culprits: set[Key]) -> tuple[set[Key], int]:
    """Simulate a proxy that rejects any config containing a culprit; return what stays
    withheld and how many verdicts it took."""
    b = Bisector()
    withheld = set(suspects)
    step = b.start("p", suspects, "bad")
    rounds = 0
    gen = 0
    while True:
        withheld -= set(step.release)
        withheld |= set(step.quarantine) - set(step.release)
        if step.done or b.active is None:
            return withheld, rounds
        gen += 1
        b.armed(gen)
        rounds += 1
        released_bad = bool(culprits - withheld)
        if released_bad:
            nxt = b.on_nack("p")
            assert nxt is not None
            step = nxt
        else:
            step = b.on_ack("p", gen)


def keys(n: int) -> list[Key]:
    return [("VirtualService", "ns", f"vs{i}") for i in range(n)]


def test_single_culprit_among_many_is_isolated_in_log_rounds() -> None:
    ks = keys(8)
    withheld, rounds = run(ks, {ks[5]})
    assert withheld == {ks[5]}
    assert rounds <= 4


def test_two_culprits_are_both_found() -> None:
    ks = keys(6)
    withheld, _ = run(ks, {ks[0], ks[4]})
    assert withheld == {ks[0], ks[4]}


def test_all_suspects_guilty() -> None:
    ks = keys(3)
    withheld, _ = run(ks, set(ks))
    assert withheld == set(ks)


def test_verdicts_from_other_proxies_or_old_generations_are_ignored() -> None:
    ks = keys(4)
    b = Bisector()
    step = b.start("p", ks, "bad")
    assert step.release == tuple(sorted(ks))[:2]
    assert b.on_ack("p", 1) .release == ()  # not armed yet: an ACK of an older config
    b.armed(5)
    assert b.on_nack("other") is None
    assert b.on_ack("p", 4).release == ()
    assert b.on_ack("p", 5).release  # now it moves on


def test_abort_hands_back_every_undecided_object() -> None:
    ks = keys(4)
    b = Bisector()
    b.start("p", ks, "bad")
    assert set(b.involved()) == set(ks)
    assert set(b.abort()) == set(ks) and b.active is None


def test_a_nack_of_a_config_built_before_the_release_is_not_a_verdict() -> None:
    ks = keys(4)
    b = Bisector()
    b.start("p", ks, "bad")
    b.armed(7)
    step = b.on_nack("p", generation=6)  # answers an older push
    assert step is not None and not step.release and not step.quarantine and b.active is not None
    assert b.on_nack("p", generation=7) is not None  # the real verdict
