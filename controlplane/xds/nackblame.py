"""Which resources of a rejected xDS response Envoy rejected, from the names its NACK
reports (`error_detail.message`). Pure.

Envoy applies the valid resources of a response and keeps its previous copy of each one it
rejects. Its CDS and LDS handlers (SotW and delta alike) report every rejected resource by
name in a fixed format:

    Error adding/updating cluster(s) NAME: REASON, NAME: REASON
    Error adding/updating listener(s) NAME: REASON\nNAME: REASON\n

and a resource failing proto validation is reported as
`Proto constraint validation failed (...): name: "NAME" ...` (the message dump starts with
the resource's name, field 1 of Cluster, Listener, RouteConfiguration, Secret). Only these
anchored positions are read, and only names of resources the rejected response carried
count: no search of arbitrary text. When the message names none of them (EDS, RDS and SDS
errors mostly, whose subscriptions reject a response as a whole), every resource the
response changed is blamed.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator

_LISTS = (
    ("Error adding/updating cluster(s)", ", "),
    ("Error adding/updating listener(s)", "\n"),
)
# 'Proto constraint validation failed (...): name: "NAME"' (the "(...)" within one line). Read
# with str.find and an anchored match, in time linear in the message: the message is the proxy's
# (untrusted, up to a gRPC message of 4 MiB), and a pattern scanning to the end of the line from
# each of many starts took hours of the event loop for one NACK.
_VALIDATION_AT = "Proto constraint validation failed ("
_VALIDATION_NAME = '): name: "'
_QUOTED = re.compile(r'((?:[^"\\]|\\.)*)"')


def _entries(body: str, sep: str) -> Iterator[int]:
    """Where each entry of a joined list starts ("NAME: REASON...")."""
    start = 0
    while start < len(body):
        yield start
        nxt = body.find(sep, start)
        if nxt < 0:
            return
        start = nxt + len(sep)


def _validation_names(message: str) -> Iterator[str]:
    pos, t = 0, -1
    while True:
        at = message.find(_VALIDATION_AT, pos)
        if at < 0:
            return
        at += len(_VALIDATION_AT)
        if t < at:  # (the next '): name: "', looked for again only once passed)
            t = message.find(_VALIDATION_NAME, at)
            if t < 0:
                return
        eol = message.find("\n", at, t)
        if eol >= 0:
            pos = eol  # not on this line: no later start on it has its name either
            continue
        m = _QUOTED.match(message, t + len(_VALIDATION_NAME))
        if m is None:
            return  # no closing quote in the rest of the message
        yield m.group(1).replace('\\"', '"').replace("\\\\", "\\")
        pos = m.end()


def named_in_nack(message: str, candidates: Collection[str]) -> set[str]:
    """The names of `candidates` (the rejected response's resources) Envoy's NACK message
    reports as rejected; empty when it names none of them in a known format."""
    found: set[str] = set()
    if not message or not candidates:
        return found
    odd: list[str] | None = None  # candidates whose name itself holds ": " (rare), with ": "
    longest = max(map(len, candidates))
    for prefix, sep in _LISTS:
        at = message.find(prefix)
        if at < 0:
            continue
        body = message[at + len(prefix):].lstrip(" :")
        for start in _entries(body, sep):
            # (A name longer than every candidate's is none of them: look no further for its end.)
            colon = body.find(": ", start, start + longest + 2)
            if colon > start and body[start:colon] in candidates:
                found.add(body[start:colon])
                continue
            if odd is None:
                odd = [n + ": " for n in candidates if ": " in n]
            found.update(n[:-2] for n in odd if body.startswith(n, start))
    for name in _validation_names(message):
        if name in candidates:
            found.add(name)
    return found
