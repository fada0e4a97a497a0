"""Parse multi-document Kubernetes YAML into RawObjects with line numbers. Pure (text in).

Field lines are recorded for every mapping key and sequence item, so a validation error
can point at `spec.http[0].match[0].uri.regex` on its own line.

Hostile input is refused in time linear in the file's size (`Limits`): a file is bounded in
characters and documents, nesting is bounded in depth, and the nodes that aliases add when
a document is expanded as a tree (what every consumer of the parsed object walks) are
counted on its composed graph before it is constructed, so an alias bomb ("billion
laughs", also through `<<` merge keys) or a recursive alias is refused before anything
expands it, at the line of the alias that crossed the bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING, Any

import yaml
from yaml.composer import Composer
from yaml.error import MarkedYAMLError
from yaml.events import AliasEvent
from yaml.nodes import Node, ScalarNode, SequenceNode
from yaml.reader import Reader, ReaderError
from yaml.resolver import Resolver

from controlplane.model.events import ParseError as ParseError
from controlplane.model.raw import RawObject

CLUSTER_SCOPED = frozenset({"Namespace"})


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on one YAML file. Generous for hand-written and generated meshes (a 2 MiB
    file of 400 objects and 40,000 endpoints uses a quarter of `max_chars`); far below what
    exhausts the control plane."""

    max_chars: int = 8 * 1024 * 1024  # characters of text (bytes on disk, for ASCII)
    max_documents: int = 10_000
    # Nodes that aliases add to the file's documents when expanded as trees, per file.
    max_alias_nodes: int = 100_000
    max_depth: int = 100  # nesting of mappings and sequences, aliases expanded


DEFAULT_LIMITS = Limits()




class _Bound(Exception):
    """A `Limits` bound exceeded while measuring a composed document."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


_OPEN = (-1, -1)  # a collection whose measurement is in progress


class _Expansion:
    """Sizes of composed YAML nodes as the trees every consumer walks, memoized per
    document (so measuring is linear in the document's distinct nodes), and the nodes
    that aliases add to one file (the alias budget)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.alias_nodes = 0
        self._sizes: dict[int, tuple[int, int]] = {}  # id(collection) -> (nodes, height)

    def new_document(self) -> None:
        self._sizes = {}

    def add_alias(self, nodes: int) -> None:
        self.alias_nodes += nodes
        if self.alias_nodes > self.limits.max_alias_nodes:
            raise _Bound(f"aliases expand this file by more than {self.limits.max_alias_nodes} nodes "
                         "(a possible alias bomb)")

    def tree(self, node: Node, depth: int, revisits_are_aliases: bool) -> tuple[int, int]:
        """(nodes, height) of `node` expanded as a tree, `depth` levels below the document
        root. In a composed graph a node reached twice is an alias: with
        `revisits_are_aliases` each such visit is charged to the alias budget. Recursion is
        bounded by max_depth."""
        max_depth = self.limits.max_depth
        if depth + 1 > max_depth:
            raise _Bound(f"nested deeper than {max_depth} levels")
        if isinstance(node, ScalarNode):
            return 1, 1
        known = self._sizes.get(id(node))
        if known is _OPEN or node.end_mark is None:  # a node still being composed
            raise _Bound("an alias refers to a node that contains it (recursive alias)")
        if known is not None:
            if depth + known[1] > max_depth:
                raise _Bound(f"an alias nests deeper than {max_depth} levels")
            if revisits_are_aliases:
                self.add_alias(known[0])
            return known
        self._sizes[id(node)] = _OPEN
        children = node.value if isinstance(node, SequenceNode) else chain.from_iterable(node.value)
        size, height = 1, 1
        for child in children:
            if child.__class__ is ScalarNode:  # most nodes: no call
                size += 1
                height = max(height, 2)
                continue
            s, h = self.tree(child, depth + 1, revisits_are_aliases)
            size += s
            height = max(height, h + 1)
        if depth + height > max_depth:
            raise _Bound(f"nested deeper than {max_depth} levels")
        self._sizes[id(node)] = result = (size, height)
        return result


if TYPE_CHECKING:
    from yaml._yaml import CParser as _EventSource
else:
    try:  # libyaml's C parser (several times faster on large meshes; same marks)
        from yaml._yaml import CParser as _EventSource
    except ImportError:  # PyYAML built without libyaml
        from yaml.parser import Parser
        from yaml.scanner import Scanner

        class _EventSource(Reader, Scanner, Parser):
            def __init__(self, stream: str) -> None:
                Reader.__init__(self, stream)
                Scanner.__init__(self)
                Parser.__init__(self)

_LIBYAML = _EventSource.__module__ == "yaml._yaml"
# The loader for every file: libyaml composes whole documents in C, then `_Expansion`
# checks each composed graph before anything expands it.
_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Refused(MarkedYAMLError):
    """A bound exceeded at a position in the text."""


class _BoundedComposer(Composer, _EventSource, Resolver):
    """PyYAML's composer (over libyaml's events) enforcing `Limits` as it goes, so a
    refusal names the alias (or the node) where the bound was exceeded. Slower than
    libyaml's own composer: run only to place a refusal that `_Expansion` found."""

    def __init__(self, stream: str, limits: Limits) -> None:
        _EventSource.__init__(self, stream)
        Composer.__init__(self)
        Resolver.__init__(self)
        self._expansion = _Expansion(limits)
        self._depth = 0

    def compose_document(self) -> Node | None:
        self._expansion.new_document()
        return super().compose_document()

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        event: Any = self.peek_event()
        if self.check_event(AliasEvent):
            target = self.anchors.get(event.anchor)
            if target is not None:
                try:
                    nodes, _height = self._expansion.tree(target, self._depth, revisits_are_aliases=False)
                    if not isinstance(target, ScalarNode):
                        self._expansion.add_alias(nodes)
                except _Bound as exc:
                    raise _Refused(problem=f"alias *{event.anchor}: {exc.problem}", problem_mark=event.start_mark) \
                        from None
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > self._expansion.limits.max_depth:
            raise _Refused(problem=f"nested deeper than {self._expansion.limits.max_depth} levels",
                           problem_mark=event.start_mark)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _place(text: str, limits: Limits) -> tuple[int, str] | None:
    """(line, problem) where composing `text` first exceeds `limits`, if it does."""
    composer = _BoundedComposer(text, limits)
    try:
        while composer.check_node():
            composer.get_node()
    except _Refused as exc:
        mark = exc.problem_mark
        return (mark.line + 1 if mark is not None else 0), exc.problem or ""
    except yaml.YAMLError:
        return None
    finally:
        composer.dispose()
    return None


def _lines(node: yaml.Node, path: str, out: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = str(k.value) if isinstance(k, ScalarNode) else "?"
            p = f"{path}.{key}" if path else key
            out[p] = k.start_mark.line + 1
            _lines(v, p, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            p = f"{path}[{i}]"
            out[p] = item.start_mark.line + 1
            _lines(item, p, out)


def _reader_line(text: str, position: int) -> int:
    """1-based line of a ReaderError's position (a byte offset for libyaml, else characters)."""
    if _LIBYAML:
        return text.encode("utf-8", "surrogatepass")[:position].count(b"\n") + 1
    return text.count("\n", 0, position) + 1


def parse_documents(text: str, file: str, limits: Limits = DEFAULT_LIMITS) -> tuple[list[RawObject], list[ParseError]]:
    """Every non-empty document of `text` as a RawObject; unreadable ones as ParseErrors.

    A YAML syntax error or an exceeded limit stops the file at that point (the YAML stream
    cannot be resumed): the error is `fatal` and the caller should keep the file's previous
    objects."""
    if len(text) > limits.max_chars:
        return [], [ParseError(file, 0, f"file too large: {len(text)} characters, the limit is {limits.max_chars}",
                               fatal=True)]
    objects: list[RawObject] = []
    errors: list[ParseError] = []
    loader = _Loader(text)
    expansion = _Expansion(limits)
    documents = 0
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            line = node.start_mark.line + 1
            documents += 1
            if documents > limits.max_documents:
                errors.append(ParseError(file, line, f"more than {limits.max_documents} YAML documents in one file",
                                         fatal=True))
                break
            expansion.new_document()
            try:
                expansion.tree(node, 0, revisits_are_aliases=True)
            except _Bound as exc:
                line, problem = _place(text, limits) or (line, exc.problem)
                errors.append(ParseError(file, line, f"refused: {problem}", fatal=True))
                break
            try:
                data: Any = loader.construct_document(node)
            except yaml.MarkedYAMLError as exc:
                mark = exc.problem_mark
                errors.append(ParseError(file, mark.line + 1 if mark is not None else line,
                                         f"invalid YAML: {exc.problem or exc}", fatal=True))
                continue
            except (yaml.YAMLError, ValueError, OverflowError) as exc:  # e.g. an integer of 5,000 digits
                errors.append(ParseError(file, line, f"invalid YAML: {exc}", fatal=True))
                continue
            if data is None:
                continue
            if not isinstance(data, dict):
                errors.append(ParseError(file, line, "document is not a mapping (expected a Kubernetes object)"))
                continue
            kind = data.get("kind")
            if data.get("apiVersion") == "v1" and kind == "List" and isinstance(data.get("items"), list):
                errors.append(ParseError(file, line, "kind List is not supported: write one document per object"))
                continue
            if not isinstance(kind, str) or not kind:
                errors.append(ParseError(file, line, "missing `kind`"))
                continue
            meta = data.get("metadata")
            meta = meta if isinstance(meta, dict) else {}
            name = meta.get("name")
            ns = meta.get("namespace")
            field_lines: dict[str, int] = {}
            _lines(node, "", field_lines)
            objects.append(
                RawObject(
                    kind=kind,
                    api_version=str(data.get("apiVersion", "")),
                    namespace="" if kind in CLUSTER_SCOPED else (str(ns) if ns else "default"),
                    name=str(name) if name is not None else "",
                    body=data,
                    file=file,
                    line=line,
                    field_lines=field_lines,
                )
            )
    except ReaderError as exc:
        errors.append(ParseError(file, _reader_line(text, exc.position), f"invalid YAML: {exc.reason} "
                                 f"(character {exc.character!r})", fatal=True))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 0
        problem = getattr(exc, "problem", None) or str(exc)
        errors.append(ParseError(file, line, f"invalid YAML: {problem}", fatal=True))
    finally:
        loader.dispose()
    return objects, errors
