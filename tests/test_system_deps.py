"""`make test` installs the system tools the tests need (scripts/system-deps.sh), and CI
is just `make lint` and `make test`. The script runs here against stand-in commands on a
private PATH (a recording `apt-get`, `id`, `sudo`), so nothing is installed. Does process
and file I/O."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "system-deps.sh"
TOOLS = ("iptables", "ip", "setpriv", "curl", "tcpdump")
PACKAGES = ("iptables", "iproute2", "util-linux", "curl", "tcpdump")
BASH = shutil.which("bash") or "/bin/bash"


def stub(bin_dir: Path, name: str, body: str = "exit 0") -> None:
    path = bin_dir / name
    path.write_text(f"#!{BASH}\n{body}\n")
    path.chmod(0o755)


def run_script(tmp_path: Path, *, present: tuple[str, ...], uid: int, sudo: bool = False,
               apt_installs: tuple[str, ...] = ()) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run the script with only `present` tools on PATH; returns it and the apt-get calls
    (with DEBIAN_FRONTEND). A successful `apt-get install` creates `apt_installs`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "apt.log"
    for tool in present:
        stub(bin_dir, tool)
    stub(bin_dir, "id", f"echo {uid}")
    creates = "".join(f'printf "#!{BASH}\\nexit 0\\n" > {bin_dir}/{t}; chmod +x {bin_dir}/{t}; '
                      for t in apt_installs)
    stub(bin_dir, "apt-get", f'echo "DEBIAN_FRONTEND=$DEBIAN_FRONTEND $*" >> {log}\n'
                             f'if [ "$1" = install ]; then {creates}: ; fi')
    if sudo:  # password-less sudo: runs its VAR=value arguments and command
        stub(bin_dir, "sudo", 'while [ "$1" = -n ]; do shift; done\n'
                              '[ "$1" = true ] && exit 0\nexec env "$@"')
        stub(bin_dir, "env", 'while [ "${1#*=}" != "$1" ]; do export "$1"; shift; done\nexec "$@"')
    proc = subprocess.run([BASH, str(SCRIPT)], env={"PATH": str(bin_dir)}, capture_output=True, text=True,
                          timeout=30)
    calls = log.read_text().splitlines() if log.exists() else []
    return proc, calls


def test_nothing_runs_when_every_tool_is_there(tmp_path: Path) -> None:
    proc, calls = run_script(tmp_path, present=(*TOOLS, "sudo"), uid=0)
    assert (proc.returncode, calls, proc.stderr) == (0, [], "")


def test_root_installs_the_missing_tools_with_apt_get(tmp_path: Path) -> None:
    proc, calls = run_script(tmp_path, present=("ip", "setpriv", "curl"), uid=0, apt_installs=("iptables", "tcpdump"))
    assert proc.returncode == 0, proc.stderr
    assert calls == ["DEBIAN_FRONTEND=noninteractive update -qq",
                     "DEBIAN_FRONTEND=noninteractive install -y -qq --no-install-recommends iptables tcpdump"]
    assert "still missing" not in proc.stderr


def test_every_tool_maps_to_its_package(tmp_path: Path) -> None:
    proc, calls = run_script(tmp_path, present=(), uid=0, apt_installs=TOOLS)
    assert proc.returncode == 0, proc.stderr
    assert calls[-1].endswith(f"--no-install-recommends {' '.join(PACKAGES)}")


def test_password_less_sudo_is_used_when_not_root(tmp_path: Path) -> None:
    proc, calls = run_script(tmp_path, present=("ip", "setpriv", "curl", "tcpdump"), uid=1000, sudo=True,
                             apt_installs=("iptables",))
    assert proc.returncode == 0, proc.stderr
    assert [c.split()[1] for c in calls] == ["update", "install"]
    assert all(c.startswith("DEBIAN_FRONTEND=noninteractive ") for c in calls)


def test_without_root_or_sudo_it_says_what_is_missing_and_succeeds(tmp_path: Path) -> None:
    proc, calls = run_script(tmp_path, present=("ip", "setpriv", "curl"), uid=1000)
    assert proc.returncode == 0
    assert calls == []
    assert "missing iptables tcpdump" in proc.stderr


def test_make_test_runs_the_script_before_pytest() -> None:
    if shutil.which("make") is None:
        pytest.skip("no make")
    out = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    script = next(i for i, line in enumerate(out) if line.strip() == "scripts/system-deps.sh")
    pytest_line = next(i for i, line in enumerate(out) if "-m pytest" in line)
    assert script < pytest_line


def test_ci_is_make_lint_and_make_test() -> None:
    text = (ROOT / ".ci" / "run").read_text()
    commands = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert commands[-2:] == ["make lint", "make test"]
    assert "apt-get" not in text
