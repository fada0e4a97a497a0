"""Typed field readers shared by the converters in `controlplane.model`. Pure, no I/O.

Every reader takes a `Ctx` (which collects `Issue`s for one raw object), a parent mapping,
a key and the dotted path of the parent. A wrong type, an out-of-range number, a bad
duration or an unknown field becomes an error issue naming the field path; the reader
then returns None and the caller carries on, so one object reports all of its problems at
once and no reader ever raises on user input.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Collection, Mapping, Sequence
from fractions import Fraction
from typing import Any

import re2

from controlplane.model.ir import Hostname, Issue, Labels, Severity
from controlplane.model.raw import RawObject

ENVOY_MAX_REGEX_PROGRAM_SIZE = 100
"""Envoy's default `re2.max_program_size.error_level`: bigger regexes are NACKed."""

_DURATION_RE = r"(?:(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h))+"
_DURATION_PART_RE = r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)"
_UNIT_MS: Mapping[str, Fraction] = {
    "ns": Fraction(1, 1_000_000),
    "us": Fraction(1, 1000),
    "µs": Fraction(1, 1000),
    "μs": Fraction(1, 1000),
    "ms": Fraction(1),
    "s": Fraction(1000),
    "m": Fraction(60_000),
    "h": Fraction(3_600_000),
}
_MAX_DURATION_MS = 315_576_000_000 * 1000  # protobuf Duration's limit
_DNS_LABEL_RE = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_HOST_LABEL_RE = r"[A-Za-z0-9_]([-A-Za-z0-9_]*[A-Za-z0-9_])?"
_HEADER_NAME_RE = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
INT32_MAX = 2**31 - 1


class Ctx:
    """Issue collector for one raw object (local to a single `convert` call)."""

    __slots__ = ("issues", "raw")

    def __init__(self, raw: RawObject) -> None:
        self.raw = raw
        self.issues: list[Issue] = []

    def add(self, path: str, message: str, severity: Severity) -> None:
        self.issues.append(Issue(self.raw.ref, path, message, severity, self.raw.line_of(path)))

    def error(self, path: str, message: str) -> None:
        self.add(path, message, "error")

    def warn(self, path: str, message: str) -> None:
        self.add(path, message, "warning")

    @property
    def failed(self) -> bool:
        return any(i.severity == "error" for i in self.issues)

    def error_count(self) -> int:
        return sum(1 for i in self.issues if i.severity == "error")


# --------------------------------------------------------------------------- paths and types


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def index(path: str, i: int) -> str:
    return f"{path}[{i}]"


def type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a map"
    if isinstance(value, list | tuple):
        return "a list"
    return type(value).__name__


def as_map(ctx: Ctx, value: object, path: str) -> Mapping[str, Any] | None:
    """`value` as a mapping; None (and an error unless it is null/absent) otherwise."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        ctx.error(path, f"expected a map, got {type_name(value)}")
        return None
    return value


def item_map(ctx: Ctx, value: object, path: str) -> Mapping[str, Any] | None:
    """A list item that must be a mapping (null is an error here, not "absent")."""
    if value is None:
        ctx.error(path, "expected a map, got null")
        return None
    return as_map(ctx, value, path)


def check_fields(
    ctx: Ctx,
    m: Mapping[str, Any],
    path: str,
    known: Collection[str],
    ignored: Mapping[str, str] | None = None,
) -> None:
    """Error on every key of `m` that is neither known nor ignored; warn on ignored ones.

    `ignored` maps accepted-but-unsupported field names to the warning to show."""
    ignored = ignored or {}
    for key in m:
        if isinstance(key, str) and key in known:
            continue
        if isinstance(key, str) and key in ignored:
            if m[key] is not None:
                ctx.warn(join(path, key), ignored[key])
            continue
        hint = ""
        if isinstance(key, str):
            close = difflib.get_close_matches(key, [*known, *ignored], n=1)
            if close:
                hint = f" (did you mean {close[0]!r}?)"
        ctx.error(join(path, str(key)), f"unknown field{hint}")


def child(ctx: Ctx, m: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any] | None:
    return as_map(ctx, m.get(key), join(path, key))


def get_str(ctx: Ctx, m: Mapping[str, Any], key: str, path: str, *, required: bool = False) -> str | None:
    value = m.get(key)
    p = join(path, key)
    if value is None:
        if required:
            ctx.error(p, "is required")
        return None
    if not isinstance(value, str):
        ctx.error(p, f"expected a string, got {type_name(value)}")
        return None
    if required and not value:
        ctx.error(p, "must not be empty")
        return None
    return value


def to_int(ctx: Ctx, value: object, p: str, lo: int | None = None, hi: int | None = None) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        ctx.error(p, f"expected an integer, got {type_name(value)}")
        return None
    if isinstance(value, float):
        if not value.is_integer():
            ctx.error(p, f"expected an integer, got {value}")
            return None
        value = int(value)
    if lo is not None and value < lo:
        ctx.error(p, f"must be {_range_text(lo, hi)}, got {value}")
        return None
    if hi is not None and value > hi:
        ctx.error(p, f"must be {_range_text(lo, hi)}, got {value}")
        return None
    return value


def _range_text(lo: int | float | None, hi: int | float | None) -> str:
    if lo is not None and hi is not None and hi < INT32_MAX:
        return f"between {lo} and {hi}"
    if lo is not None:
        return f"at least {lo}"
    return f"at most {hi}"


def get_int(
    ctx: Ctx,
    m: Mapping[str, Any],
    key: str,
    path: str,
    *,
    lo: int | None = None,
    hi: int | None = None,
    required: bool = False,
) -> int | None:
    value = m.get(key)
    p = join(path, key)
    if value is None:
        if required:
            ctx.error(p, "is required")
        return None
    return to_int(ctx, value, p, lo, hi)


def get_port(ctx: Ctx, m: Mapping[str, Any], key: str, path: str, *, required: bool = False) -> int | None:
    return get_int(ctx, m, key, path, lo=1, hi=65535, required=required)


def get_bool(ctx: Ctx, m: Mapping[str, Any], key: str, path: str) -> bool | None:
    value = m.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        ctx.error(join(path, key), f"expected true or false, got {type_name(value)}")
        return None
    return value


def get_number(
    ctx: Ctx, m: Mapping[str, Any], key: str, path: str, *, lo: float, hi: float, required: bool = False
) -> float | None:
    value = m.get(key)
    p = join(path, key)
    if value is None:
        if required:
            ctx.error(p, "is required")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        ctx.error(p, f"expected a number, got {type_name(value)}")
        return None
    if not lo <= value <= hi:
        ctx.error(p, f"must be {_range_text(lo, hi)}, got {value}")
        return None
    return float(value)


def get_percentage(ctx: Ctx, m: Mapping[str, Any], key: str, path: str) -> float | None:
    """Istio's `Percent` message: `{value: 0..100}`."""
    pm = child(ctx, m, key, path)
    if pm is None:
        return None
    p = join(path, key)
    check_fields(ctx, pm, p, ("value",))
    value = get_number(ctx, pm, "value", p, lo=0.0, hi=100.0)
    return 0.0 if value is None and "value" not in pm else value


def get_list(ctx: Ctx, m: Mapping[str, Any], key: str, path: str) -> Sequence[Any]:
    value = m.get(key)
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        ctx.error(join(path, key), f"expected a list, got {type_name(value)}")
        return ()
    return value


def get_str_list(ctx: Ctx, m: Mapping[str, Any], key: str, path: str) -> tuple[str, ...]:
    out: list[str] = []
    p = join(path, key)
    for i, item in enumerate(get_list(ctx, m, key, path)):
        if not isinstance(item, str):
            ctx.error(index(p, i), f"expected a string, got {type_name(item)}")
            continue
        out.append(item)
    return tuple(out)


def get_str_map(ctx: Ctx, m: Mapping[str, Any], key: str, path: str) -> tuple[tuple[str, str], ...]:
    """A string-to-string map (labels, header values) as pairs in the order written."""
    p = join(path, key)
    mm = as_map(ctx, m.get(key), p)
    if mm is None:
        return ()
    out: list[tuple[str, str]] = []
    for k, v in mm.items():
        if not isinstance(k, str):
            ctx.error(join(p, str(k)), f"keys must be strings, got {type_name(k)}")
            continue
        if not isinstance(v, str):
            ctx.error(join(p, k), f"expected a string value, got {type_name(v)} (quote it)")
            continue
        out.append((k, v))
    return tuple(out)


def get_labels(ctx: Ctx, m: Mapping[str, Any], key: str, path: str) -> Labels:
    return tuple(sorted(get_str_map(ctx, m, key, path)))


# --------------------------------------------------------------------------- durations


def parse_duration_ms(text: str) -> int | str:
    """Milliseconds for a protobuf-JSON ("1.5s") or Go ("1m30s", "500us") duration, or the
    reason it is invalid. Sub-millisecond remainders round up, so "500us" is 1 ms rather
    than 0 (which Envoy reads as "no timeout")."""
    s = text.strip()
    if s == "0":
        return 0
    if s.startswith("-"):
        return "must not be negative"
    if not re.fullmatch(_DURATION_RE, s):
        return "expected a duration such as '1.5s', '100ms' or '1m30s'"
    total = Fraction(0)
    for number, unit in re.findall(_DURATION_PART_RE, s):
        total += Fraction(number) * _UNIT_MS[unit]
    ms = math.ceil(total)
    if ms > _MAX_DURATION_MS:
        return "is too long"
    return ms


def get_duration(ctx: Ctx, m: Mapping[str, Any], key: str, path: str, *, min_ms: int = 0) -> int | None:
    value = m.get(key)
    p = join(path, key)
    if value is None:
        return None
    if not isinstance(value, str):
        ctx.error(p, f"expected a duration string such as '1.5s', got {type_name(value)} {value!r}")
        return None
    parsed = parse_duration_ms(value)
    if isinstance(parsed, str):
        ctx.error(p, f"invalid duration {value!r}: {parsed}")
        return None
    if parsed < min_ms:
        ctx.error(p, f"duration {value!r} is too short: must be at least {min_ms}ms")
        return None
    return parsed


# --------------------------------------------------------------------------- regexes


def regex_problem(pattern: str) -> str | None:
    """Why Envoy's RE2 would reject `pattern`, or None when it is acceptable."""
    options = re2.Options()
    options.log_errors = False
    try:
        compiled = re2.compile(pattern, options)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else "invalid"
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        return f"invalid regex {pattern!r}: {reason}"
    size = int(compiled.programsize)
    if size > ENVOY_MAX_REGEX_PROGRAM_SIZE:
        return (
            f"regex {pattern!r} is too complex for Envoy: RE2 program size {size} "
            f"exceeds the limit of {ENVOY_MAX_REGEX_PROGRAM_SIZE}"
        )
    return None


def check_regex(ctx: Ctx, pattern: str, path: str) -> bool:
    problem = regex_problem(pattern)
    if problem is not None:
        ctx.error(path, problem)
        return False
    return True


# --------------------------------------------------------------------------- names


def is_dns_label(name: str) -> bool:
    return len(name) <= 63 and re.fullmatch(_DNS_LABEL_RE, name) is not None


def resolve_host(name: str, namespace: str) -> Hostname:
    """Resolve a VirtualService/DestinationRule host in `namespace`:
    `reviews` -> `reviews.<ns>.svc.cluster.local`, `reviews.other` ->
    `reviews.other.svc.cluster.local`, `reviews.other.svc` -> `...svc.cluster.local`;
    anything else is taken as a fully qualified name. A trailing dot is dropped and the
    result is lower-cased."""
    host = name.strip().rstrip(".").lower()
    parts = host.split(".")
    if len(parts) == 1:
        return Hostname(f"{host}.{namespace}.svc.cluster.local")
    if len(parts) == 2:
        return Hostname(f"{host}.svc.cluster.local")
    if len(parts) == 3 and parts[2] == "svc":
        return Hostname(f"{host}.cluster.local")
    return Hostname(host)


def host_problem(name: str) -> str | None:
    """Why `name` is not a usable host name, or None."""
    host = name.strip().rstrip(".")
    if not host:
        return "host must not be empty"
    if len(host) > 253:
        return f"host {name!r} is longer than 253 characters"
    for label in host.split("."):
        if len(label) > 63 or re.fullmatch(_HOST_LABEL_RE, label) is None:
            return f"{name!r} is not a valid host name"
    return None


def is_header_name(name: str) -> bool:
    return re.fullmatch(_HEADER_NAME_RE, name) is not None


def get_export_to(ctx: Ctx, m: Mapping[str, Any], path: str) -> tuple[str, ...]:
    """`exportTo`: ".", "*", "~" or namespace names."""
    out: list[str] = []
    p = join(path, "exportTo")
    for i, item in enumerate(get_str_list(ctx, m, "exportTo", path)):
        if item not in (".", "*", "~") and not is_dns_label(item):
            ctx.error(index(p, i), f"{item!r} is not '.', '*' or a namespace name")
            continue
        out.append(item)
    return tuple(out)
