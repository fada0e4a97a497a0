"""Envoy's evaluation of a StringMatcher (exact, prefix, suffix, safe_regex with RE2's full
match), for unit tests that check what a generated RBAC matcher admits without Envoy."""

from __future__ import annotations

import re2
from envoy.type.matcher.v3 import string_pb2


def string_matches(m: string_pb2.StringMatcher, value: str) -> bool:
    kind = m.WhichOneof("match_pattern")
    if kind == "exact":
        return value == m.exact
    if kind == "prefix":
        return value.startswith(m.prefix)
    if kind == "suffix":
        return value.endswith(m.suffix)
    if kind == "safe_regex":
        return re2.fullmatch(m.safe_regex.regex, value) is not None
    raise AssertionError(kind)
