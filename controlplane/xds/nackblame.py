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
_VALIDATION = re.compile(r'Proto constraint validation failed \([^\n]*?\): name: "((?:[^"\\]|\\.)*)"')


def _entries(body: str, sep: str) -> Iterator[str]:
    """Each entry of a joined list, from its start to the end of the text ("NAME: REASON...")."""
    start = 0
    while start < len(body):
        yield body[start:]
        nxt = body.find(sep, start)
        if nxt < 0:
            return
        start = nxt + len(sep)


def named_in_nack(message: str, candidates: Collection[str]) -> set[str]:
    """The names of `candidates` (the rejected response's resources) Envoy's NACK message
    reports as rejected; empty when it names none of them in a known format."""
    found: set[str] = set()
    if not message or not candidates:
        return found
    odd: list[str] | None = None  # candidates whose name itself holds ": " (rare)
    for prefix, sep in _LISTS:
        at = message.find(prefix)
        if at < 0:
            continue
        body = message[at + len(prefix):].lstrip(" :")
        for entry in _entries(body, sep):
            colon = entry.find(": ")
            if colon > 0 and entry[:colon] in candidates:
                found.add(entry[:colon])
                continue
            if odd is None:
                odd = [n for n in candidates if ": " in n]
            found.update(n for n in odd if entry.startswith(n + ": "))
    for m in _VALIDATION.finditer(message):
        name = m.group(1).replace('\\"', '"').replace("\\\\", "\\")
        if name in candidates:
            found.add(name)
    return found
