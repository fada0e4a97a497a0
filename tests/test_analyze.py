"""`meshline analyze PATH...` as a user runs it: its exit code and its
`file:line: Kind/ns/name: message` lines (the command line run in this process,
tests/clirun.py; tests/test_status_api.py runs it as a process). Does file I/O."""

from __future__ import annotations

import re
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.clirun import run_cli

REPO = Path(__file__).resolve().parent.parent
BOOKINFO = REPO / "samples" / "bookinfo"

LINE = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+): (?P<kind>[A-Za-z]+)/(?P<ns>[a-z0-9-]+)/(?P<name>[^:/]+): "
                  r"(?P<message>.+)$")
HERE = "# <- HERE"

BASE = """\
apiVersion: v1
kind: Service
metadata:
  name: reviews
  namespace: default
spec:
  selector:
    app: reviews
  ports:
  - name: http
    port: 9080
---
apiVersion: v1
kind: Pod
metadata:
  name: reviews-v1
  namespace: default
  labels:
    app: reviews
    version: v1
spec: {}
status:
  podIP: 10.0.0.1
---
apiVersion: networking.meshline.io/v1
kind: DestinationRule
metadata:
  name: reviews
  namespace: default
spec:
  host: reviews
  subsets:
  - name: v1
    labels:
      version: v1
"""


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return self.stdout.splitlines()

    @property
    def errors(self) -> list[re.Match[str]]:
        out = []
        for line in self.lines:
            m = LINE.match(line)
            assert m is not None, f"not in `file:line: Kind/ns/name: message` form: {line!r}"
            if not m["message"].startswith("warning: "):
                out.append(m)
        return out


def analyze(*args: str | Path, cwd: Path = REPO) -> Result:
    proc = run_cli("analyze", *args, cwd=cwd)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def vs(name: str, body: str) -> str:
    return (
        "apiVersion: networking.meshline.io/v1\nkind: VirtualService\n"
        f"metadata:\n  name: {name}\n  namespace: default\nspec:\n  hosts:\n  - reviews\n"
        + textwrap.indent(textwrap.dedent(body), "  ")
    )


def marked_line(text: str) -> int:
    [n] = [i for i, line in enumerate(text.splitlines(), start=1) if HERE in line]
    return n


def write(tmp_path: Path, name: str, *docs: str) -> tuple[Path, str]:
    text = "---\n".join(docs)
    path = tmp_path / name
    path.write_text(text)
    return path, text


# --------------------------------------------------------------------------- valid input


def test_bookinfo_sample_is_valid() -> None:
    r = analyze(BOOKINFO)
    assert r.code == 0, r.stdout + r.stderr
    assert r.errors == []


def test_valid_file_exits_0_with_no_output(tmp_path: Path) -> None:
    path, _ = write(tmp_path, "ok.yaml", BASE, vs("reviews", """\
        http:
        - route:
          - destination:
              host: reviews
              subset: v1
        """))
    r = analyze(path)
    assert (r.code, r.stdout) == (0, "")


def test_warnings_alone_exit_0_and_can_be_hidden(tmp_path: Path) -> None:
    text = BASE + "---\n" + vs("ghost", """\
        http:
        - route:
          - destination:
              host: ghost  # <- HERE
        """)
    path = tmp_path / "warn.yaml"
    path.write_text(text)
    r = analyze(path)
    assert r.code == 0
    assert r.errors == []
    [line] = r.lines
    m = LINE.match(line)
    assert m is not None
    assert (m["file"], int(m["line"]), m["kind"], m["ns"], m["name"]) == (
        str(path), marked_line(text), "VirtualService", "default", "ghost")
    assert m["message"].startswith("warning: ") and "ghost" in m["message"]

    quiet = analyze("--no-warnings", path)
    assert (quiet.code, quiet.stdout) == (0, "")


# --------------------------------------------------------------------------- one bad object each


@dataclass(frozen=True)
class Bad:
    id: str
    doc: str
    name: str
    needles: tuple[str, ...]  # each must occur in the message


BAD = [
    Bad("invalid-regex", vs("bad-regex", """\
        http:
        - match:
          - uri:
              regex: "([a-z"  # <- HERE
          route:
          - destination:
              host: reviews
        """), "bad-regex", ("spec.http[0].match[0].uri.regex", "([a-z")),
    Bad("unknown-field", vs("unknown-field", """\
        http:
        - route:
          - destination:
              host: reviews
          retriez:  # <- HERE
            attempts: 3
        """), "unknown-field", ("spec.http[0].retriez", "unknown field")),
    Bad("bad-duration", vs("bad-duration", """\
        http:
        - route:
          - destination:
              host: reviews
          timeout: 10 seconds  # <- HERE
        """), "bad-duration", ("spec.http[0].timeout", "10 seconds")),
    Bad("negative-weight", vs("negative-weight", """\
        http:
        - route:
          - destination:
              host: reviews
            weight: 110
          - destination:
              host: reviews
              subset: v1
            weight: -10  # <- HERE
        """), "negative-weight", ("spec.http[0].route[1].weight", "negative")),
    Bad("all-weights-zero", vs("zero-weights", """\
        http:
        - route:  # <- HERE
          - destination:
              host: reviews
            weight: 0
          - destination:
              host: reviews
              subset: v1
            weight: 0
        """), "zero-weights", ("spec.http[0].route", "all weights are 0")),
    Bad("undefined-subset", vs("bad-subset", """\
        http:
        - route:
          - destination:
              host: reviews
              subset: v9  # <- HERE
        """), "bad-subset", ("spec.http[0].route[0].destination.subset", "'v9'", "DestinationRule default/reviews")),
    Bad("subset-of-host-without-rule", BASE.split("---\n")[0].replace("reviews", "ratings") + "---\n" + vs("no-rule", """\
        http:
        - route:
          - destination:
              host: ratings
              subset: v1  # <- HERE
        """), "no-rule", ("spec.http[0].route[0].destination.subset", "no DestinationRule")),
]


@pytest.mark.parametrize("case", BAD, ids=[c.id for c in BAD])
def test_bad_object_exits_1_with_a_line_at_the_offending_field(tmp_path: Path, case: Bad) -> None:
    path, text = write(tmp_path, "bad.yaml", BASE, case.doc)
    r = analyze(path)

    assert r.code == 1, r.stdout
    [m] = r.errors
    assert m["file"] == str(path)
    assert int(m["line"]) == marked_line(text), m.group(0)
    assert (m["kind"], m["ns"], m["name"]) == ("VirtualService", "default", case.name)
    for needle in case.needles:
        assert needle in m["message"], m.group(0)
    assert "1 error(s)" in r.stderr


def test_every_bad_object_of_a_file_is_reported_in_line_order(tmp_path: Path) -> None:
    docs = [c.doc for c in BAD[:6]]
    path, text = write(tmp_path, "many.yaml", BASE, *docs)
    r = analyze(path)
    assert r.code == 1
    names = [m["name"] for m in r.errors]
    assert names == [c.name for c in BAD[:6]]
    assert [int(m["line"]) for m in r.errors] == [
        n for n, line in enumerate(text.splitlines(), start=1) if HERE in line]
    assert "6 error(s)" in r.stderr


def test_errors_from_several_paths_and_relative_file_names(tmp_path: Path) -> None:
    (tmp_path / "good").mkdir()
    (tmp_path / "good" / "base.yaml").write_text(BASE)
    write(tmp_path, "bad.yaml", BAD[0].doc)
    r = analyze("good", "bad.yaml", cwd=tmp_path)
    assert r.code == 1
    [m] = r.errors
    assert (m["file"], m["name"]) == ("bad.yaml", "bad-regex")


# --------------------------------------------------------------------------- unreadable files


def test_malformed_yaml_exits_1_with_file_and_line(tmp_path: Path) -> None:
    broken = "apiVersion: v1\nkind: Service\nmetadata:\n  name: x\n  namespace: default: no  # <- HERE\n"
    path, text = write(tmp_path, "broken.yaml", BASE, broken)
    r = analyze(path)
    assert r.code == 1
    lines = [line for line in r.lines if "warning: " not in line]
    assert len(lines) == 1
    prefix = f"{path}:{marked_line(text)}: "
    assert lines[0].startswith(prefix), lines[0]
    assert "invalid YAML" in lines[0]


def test_document_without_kind_is_an_error(tmp_path: Path) -> None:
    path, text = write(tmp_path, "nokind.yaml", BASE, "apiVersion: v1  # <- HERE\nmetadata:\n  name: x\n")
    r = analyze(path)
    assert r.code == 1
    [line] = [x for x in r.lines if "warning: " not in x]
    assert line.startswith(f"{path}:{marked_line(text)}: ") and "kind" in line


def test_missing_path_is_a_usage_error(tmp_path: Path) -> None:
    r = analyze(tmp_path / "nope.yaml")
    assert r.code == 2
    assert "nope.yaml" in r.stderr


# --------------------------------------------------------------------------- hostile input (issue 14)


def alias_bomb() -> str:
    """The classic "billion laughs" (about 500 bytes, 9**9 strings once expanded)."""
    rows = ['  a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    rows += [f"  {c}: &{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)]
    return "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: lol\n  namespace: default\ndata:\n" + "\n".join(rows) + "\n"


def test_alias_bomb_exits_1_at_once_with_file_and_line(tmp_path: Path) -> None:
    path, text = write(tmp_path, "lol.yaml", alias_bomb())
    (tmp_path / "base.yaml").write_text(BASE)
    t0 = time.monotonic()
    r = analyze(tmp_path)
    # The interpreter's start-up included (~1 s here); expanding the 9**9 strings would take
    # minutes and gigabytes, so 60 s separates the two even on a 10x slower machine.
    assert time.monotonic() - t0 < 60
    assert r.code == 1
    [line] = [x for x in r.lines if "warning: " not in x]
    m = re.match(rf"^{re.escape(str(path))}:(\d+): ", line)
    assert m is not None, line
    assert "*" in text.splitlines()[int(m[1]) - 1]  # the line of the alias that went over the bound
    assert "alias bomb" in line
    assert "1 error(s)" in r.stderr


def test_symlink_out_of_the_directory_exits_1(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.mkdir()
    (config / "base.yaml").write_text(BASE)
    (tmp_path / "secret.yaml").write_text(BASE.replace("reviews", "ratings"))
    (config / "ratings.yaml").symlink_to(tmp_path / "secret.yaml")
    r = analyze(config)
    assert r.code == 1
    [line] = [x for x in r.lines if "warning: " not in x]
    assert line.startswith(f"{config / 'ratings.yaml'}:0: ")
    assert "outside the config directory" in line


def test_invalid_utf8_exits_1_with_the_line(tmp_path: Path) -> None:
    text = BASE.replace("version: v1", "version: v\xe91  # <- HERE", 1)  # a Latin-1 é
    path = tmp_path / "latin1.yaml"
    path.write_bytes(text.encode("latin-1"))
    r = analyze(path)
    assert r.code == 1
    [line] = r.lines
    assert line.startswith(f"{path}:{marked_line(text)}: ")
    assert "invalid UTF-8" in line and "0xe9" in line


# --------------------------------------------------------------------------- Istio fidelity (issue 16)


def test_unsupported_istio_and_gateway_api_kinds_are_named(tmp_path: Path) -> None:
    telemetry = "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata:\n  name: mesh-default\n" \
                "  namespace: default\nspec:\n  url: oci://example/plugin:1\n"
    route = "apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: UDPRoute\nmetadata:\n  name: r\n" \
            "  namespace: default\nspec:\n  parentRefs:\n  - name: gw\n"
    deployment = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: d\n  namespace: default\nspec: {}\n"
    path, _ = write(tmp_path, "kinds.yaml", BASE, telemetry, route, deployment)
    r = analyze(path)
    assert r.code == 0 and r.errors == []
    found = {(m["kind"], m["name"]): m["message"] for m in map(LINE.match, r.lines) if m is not None}
    assert set(found) == {("WasmPlugin", "mesh-default"), ("UDPRoute", "r")}
    assert found[("WasmPlugin", "mesh-default")].startswith(
        "warning: kind: WasmPlugin (extensions.istio.io/v1alpha1) is not supported by Meshline and is ignored: ")
    assert "UDPRoute (gateway.networking.k8s.io/v1alpha2)" in found[("UDPRoute", "r")]


def test_mesh_wide_policy_in_istio_system_is_not_mesh_wide_and_says_so(tmp_path: Path) -> None:
    pa = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: default\n" \
         "  namespace: istio-system  # <- HERE\nspec:\n  mtls:\n    mode: STRICT\n"
    path, text = write(tmp_path, "pa.yaml", pa)
    r = analyze(path)
    assert r.code == 0
    [line] = r.lines
    m = LINE.match(line)
    assert m is not None and int(m["line"]) == marked_line(text)
    assert m["message"].startswith("warning: metadata.namespace: NOT MESH-WIDE: istio-system is Istio's root "
                                   "namespace, but Meshline's root namespace is meshline-system")
