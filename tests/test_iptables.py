"""`meshline iptables` without touching the host: the rules it renders (a golden text),
option parsing and its error messages, the cleanup script computed from `iptables-save`
output, and apply/cleanup sequencing through a fake runner. The real thing runs in a
network namespace in tests/test_iptables_netns.py."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import pytest
from click.testing import CliRunner

from controlplane.cli import main as cli
from controlplane.iptables import (
    CaptureSpec,
    Iptables,
    IptablesError,
    apply,
    cleanup,
    cleanup_rules,
    parse_cidrs,
    parse_ports,
    render_rules,
)

DEFAULT_RULES = """\
# meshline capture rules (nat table)
*nat
:MESHLINE_INBOUND - [0:0]
:MESHLINE_IN_REDIRECT - [0:0]
:MESHLINE_OUTPUT - [0:0]
:MESHLINE_REDIRECT - [0:0]
-A MESHLINE_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A MESHLINE_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A MESHLINE_INBOUND -p tcp -m tcp --dport 15008 -j RETURN
-A MESHLINE_INBOUND -p tcp -m tcp --dport 15020:15021 -j RETURN
-A MESHLINE_INBOUND -p tcp -m tcp --dport 15090 -j RETURN
-A MESHLINE_INBOUND -p tcp -j MESHLINE_IN_REDIRECT
-A MESHLINE_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A MESHLINE_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A MESHLINE_OUTPUT -d 127.0.0.0/8 -j RETURN
-A MESHLINE_OUTPUT -j MESHLINE_REDIRECT
-A PREROUTING -p tcp -j MESHLINE_INBOUND
-A OUTPUT -p tcp -j MESHLINE_OUTPUT
COMMIT
"""


def test_default_rules() -> None:
    assert render_rules(CaptureSpec()) == DEFAULT_RULES
    r = CliRunner().invoke(cli, ["iptables", "--dry-run"])
    assert r.exit_code == 0 and r.output == DEFAULT_RULES


def test_options_shape_the_rules() -> None:
    r = CliRunner().invoke(cli, [
        "iptables", "--dry-run", "--proxy-uid", "2000", "--proxy-gid", "3000", "--outbound-port", "16001",
        "--inbound-port", "16006", "--exclude-outbound-ports", "5432, 9000-9100", "--exclude-inbound-ports", "22",
        "--exclude-outbound-cidrs", "10.96.0.10/32,169.254.169.254", "--include-outbound-cidrs", "10.0.0.0/8,192.168.1.7/24"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    for expected in (
        "-A MESHLINE_REDIRECT -p tcp -j REDIRECT --to-ports 16001",
        "-A MESHLINE_IN_REDIRECT -p tcp -j REDIRECT --to-ports 16006",
        "-A MESHLINE_INBOUND -p tcp -m tcp --dport 22 -j RETURN",
        "-A MESHLINE_INBOUND -p tcp -m tcp --dport 15008 -j RETURN",  # always, besides the given ones
        "-A MESHLINE_OUTPUT -m owner --uid-owner 2000 -j RETURN",
        "-A MESHLINE_OUTPUT -m owner --gid-owner 3000 -j RETURN",
        "-A MESHLINE_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN",
        "-A MESHLINE_OUTPUT -p tcp -m tcp --dport 9000:9100 -j RETURN",
        "-A MESHLINE_OUTPUT -d 10.96.0.10/32 -j RETURN",
        "-A MESHLINE_OUTPUT -d 169.254.169.254/32 -j RETURN",
        "-A MESHLINE_OUTPUT -d 10.0.0.0/8 -j MESHLINE_REDIRECT",
        "-A MESHLINE_OUTPUT -d 192.168.1.0/24 -j MESHLINE_REDIRECT",
    ):
        assert expected in lines
    assert "-A MESHLINE_OUTPUT -j MESHLINE_REDIRECT" not in lines
    # Exclusions come before the redirects, and the jumps from the built-in chains last.
    assert lines.index("-A MESHLINE_OUTPUT -d 10.96.0.10/32 -j RETURN") < lines.index(
        "-A MESHLINE_OUTPUT -d 10.0.0.0/8 -j MESHLINE_REDIRECT")
    assert lines[-3:] == ["-A PREROUTING -p tcp -j MESHLINE_INBOUND", "-A OUTPUT -p tcp -j MESHLINE_OUTPUT", "COMMIT"]


def test_inbound_capture_can_be_off() -> None:
    rules = render_rules(CaptureSpec(capture_inbound=False))
    assert "PREROUTING" not in rules and "MESHLINE_INBOUND -p" not in rules
    assert "-A OUTPUT -p tcp -j MESHLINE_OUTPUT" in rules


@pytest.mark.parametrize(("args", "message"), [
    (["--exclude-outbound-ports", "http"], "--exclude-outbound-ports: 'http' is not a port"),
    (["--exclude-inbound-ports", "0"], "--exclude-inbound-ports: '0' is out of range"),
    (["--exclude-outbound-ports", "9-3"], "out of range"),
    (["--exclude-outbound-cidrs", "10.0.0.0/33"], "--exclude-outbound-cidrs: '10.0.0.0/33' is not an IPv4"),
    (["--include-outbound-cidrs", "fd00::/8"], "is IPv6"),
    (["--include-outbound-cidrs", "*,10.0.0.0/8"], "'*' cannot be combined"),
    (["--outbound-port", "15006"], "must differ"),
    (["--outbound-port", "70000"], "70000"),
])
def test_bad_options_are_usage_errors(args: list[str], message: str) -> None:
    r = CliRunner().invoke(cli, ["iptables", "--dry-run", *args])
    assert r.exit_code == 2 and message in r.output, r.output


def test_parsers() -> None:
    assert parse_ports(" 80, 8000-8100,80,15000:15010 ") == ((80, 80), (8000, 8100), (15000, 15010))
    assert parse_ports("") == ()
    assert parse_cidrs("*", allow_all=True) is None
    assert parse_cidrs("10.1.2.3/8, 10.0.0.0/8") == (ipaddress.IPv4Network("10.0.0.0/8"),)
    with pytest.raises(ValueError):
        parse_cidrs("*")


SAVED_WITH_RULES = """\
# Generated by iptables-save v1.8.9 (nf_tables)
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:MESHLINE_INBOUND - [0:0]
:MESHLINE_IN_REDIRECT - [0:0]
:MESHLINE_OUTPUT - [0:0]
:MESHLINE_REDIRECT - [0:0]
-A PREROUTING -j KUBE-SERVICES
-A PREROUTING -p tcp -j MESHLINE_INBOUND
-A OUTPUT -p tcp -j MESHLINE_OUTPUT
-A OUTPUT -p tcp -j MESHLINE_OUTPUT
-A MESHLINE_INBOUND -p tcp -j MESHLINE_IN_REDIRECT
-A MESHLINE_OUTPUT -j MESHLINE_REDIRECT
COMMIT
"""


def test_cleanup_removes_only_ours() -> None:
    script = cleanup_rules(SAVED_WITH_RULES)
    assert script == "\n".join([
        "*nat",
        "-D PREROUTING -p tcp -j MESHLINE_INBOUND",
        "-D OUTPUT -p tcp -j MESHLINE_OUTPUT",
        "-D OUTPUT -p tcp -j MESHLINE_OUTPUT",  # a duplicate jump (an older, unclean apply) goes too
        *(f"-F {c}" for c in ("MESHLINE_INBOUND", "MESHLINE_IN_REDIRECT", "MESHLINE_OUTPUT", "MESHLINE_REDIRECT")),
        *(f"-X {c}" for c in ("MESHLINE_INBOUND", "MESHLINE_IN_REDIRECT", "MESHLINE_OUTPUT", "MESHLINE_REDIRECT")),
        "COMMIT", ""])
    assert "KUBE" not in script
    assert cleanup_rules("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n") is None


class FakeTables:
    """Records what would run; `iptables-save` answers with `saved`."""

    def __init__(self, saved: str, fail: str | None = None) -> None:
        self.saved = saved
        self.fail = fail
        self.calls: list[tuple[tuple[str, ...], str | None]] = []

    def __call__(self, argv: Sequence[str], stdin: str | None) -> str:
        self.calls.append((tuple(argv), stdin))
        if self.fail and argv[0].endswith(self.fail):
            raise IptablesError(f"{argv[0]} failed (exit 1): iptables-restore: line 2 failed")
        return self.saved if argv[0].endswith("-save") else ""


def test_apply_removes_old_rules_first() -> None:
    fake = FakeTables(SAVED_WITH_RULES)
    rules = apply(CaptureSpec(), Iptables("iptables-legacy", fake))
    assert [c[0] for c in fake.calls] == [("iptables-legacy-save", "-t", "nat"),
                                         ("iptables-legacy-restore", "--noflush"),
                                         ("iptables-legacy-restore", "--noflush")]
    assert fake.calls[1][1] == cleanup_rules(SAVED_WITH_RULES)
    assert fake.calls[2][1] == rules == DEFAULT_RULES


def test_cleanup_with_nothing_installed_runs_nothing() -> None:
    fake = FakeTables("*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n")
    assert cleanup(Iptables(runner=fake)) is False
    assert [c[0][0] for c in fake.calls] == ["iptables-save"]


def test_failures_are_reported_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeTables("", fail="-restore")
    monkeypatch.setattr("controlplane.cli_tools.Iptables", lambda command: Iptables(command, fake))
    r = CliRunner().invoke(cli, ["iptables"])
    assert r.exit_code == 1 and "iptables-restore failed (exit 1)" in r.output
    r = CliRunner().invoke(cli, ["iptables", "--iptables-command", "no-such-iptables"])
    assert r.exit_code == 1


def test_missing_binary_is_named() -> None:
    with pytest.raises(IptablesError, match="no-such-iptables-save not found on PATH"):
        Iptables("no-such-iptables").save_nat()
