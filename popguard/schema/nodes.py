"""YAML text to plain Python values, keeping where each value was written.

The files are never handed to ``yaml.safe_load``.  They are *composed* with
a bounded :class:`yaml.SafeLoader` (``yaml.compose``), which gives a tree of
nodes that carry their ``start_mark``, and :func:`load_yaml` turns the tree
into plain values (``dict``, ``list``, ``str``, ``int``, ``float``,
``bool``, ``None``) for the pydantic models, recording each value's node
under its path (``("listeners", 0, "listen")``) so that every later problem
can be reported at its line and column.

Scalars are typed by their YAML tag, as YAML 1.1 resolves it: ``600`` is an
``int``, ``"600"`` stays a ``str`` (and a strict model refuses it for a
number, with a hint), ``yes`` is a ``bool``.  What popguard never reads
(timestamps, binary, ``!!set``, custom tags, an explicit ``!!int abc`` that
is no integer) becomes an :class:`Opaque` value, which every field refuses.

What YAML allows and popguard refuses is reported here, as a
:class:`Problem` the loader words with its own path labels: keys that are
not strings, duplicate keys and merge keys (``<<``).  Nesting deeper than
:data:`MAX_DEPTH` levels and documents larger than :data:`MAX_VALUES`
values (aliases count each time they are used) are errors too, so no input
can exhaust the stack or the memory.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import yaml
from yaml.composer import ComposerError
from yaml.constructor import SafeConstructor
from yaml.error import Mark
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.reader import ReaderError

from popguard.schema.issues import Issue, Severity

TAG: Final = "tag:yaml.org,2002:"
STR: Final = TAG + "str"
INT: Final = TAG + "int"
FLOAT: Final = TAG + "float"
BOOL: Final = TAG + "bool"
NULL: Final = TAG + "null"
MERGE: Final = TAG + "merge"
MAP: Final = TAG + "map"
SEQ: Final = TAG + "seq"

KINDS: Final = {
    STR: "a string",
    INT: "an integer",
    FLOAT: "a float",
    BOOL: "a boolean",
    NULL: "null",
    TAG + "timestamp": "a timestamp",
    TAG + "binary": "binary data",
}

#: Deeper nesting is refused: popguard's files are a few levels deep, and
#: PyYAML's composer recurses (a 500-level document would overflow the stack).
MAX_DEPTH: Final = 64
#: More values than this (aliases counted each time they are used) are
#: refused: a "billion laughs" document would expand without end.
MAX_VALUES: Final = 100_000

Path = tuple[str | int, ...]


class Opaque:
    """A YAML value popguard never reads; every model field refuses it."""

    __slots__ = ("tag",)

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def __repr__(self) -> str:
        return f"Opaque({self.tag!r})"


@dataclass(frozen=True, slots=True)
class Problem:
    """Something YAML allows and popguard refuses, at *path* (worded by the loader)."""

    path: Path
    node: Node
    message: str


@dataclass(slots=True)
class Document:
    """A file's plain values and, for every path, the nodes it came from."""

    file: str
    data: object
    #: Each value's node, by path; the root is ``()``.
    values: dict[Path, Node] = field(default_factory=dict)
    #: Each mapping key's node, by the path of its value.
    keys: dict[Path, Node] = field(default_factory=dict)

    def node(self, path: Path, *, key: bool = False) -> Node | None:
        """The node at *path* (its key's, with *key*), else its nearest ancestor's."""
        if key and path in self.keys:
            return self.keys[path]
        for end in range(len(path), -1, -1):
            found = self.values.get(path[:end])
            if found is not None:
                return found
        return None

    def position(self, path: Path, *, key: bool = False) -> tuple[int, int]:
        node = self.node(path, key=key)
        return mark_position(node.start_mark if node is not None else None)

    def issue(
        self, path: Path, message: str, severity: Severity = "error", *, key: bool = False
    ) -> Issue:
        """An issue at the value at *path* (at its key, with *key*)."""
        line, column = self.position(path, key=key)
        return Issue(self.file, line, column, message, severity)


@dataclass(slots=True)
class Loaded:
    """What :func:`load_yaml` found: the document (None if unreadable) and problems."""

    document: Document | None
    #: File-level issues: unreadable, not UTF-8, YAML syntax, too deep or large.
    issues: list[Issue] = field(default_factory=list)
    #: Structural problems, to be worded with the loader's path labels.
    problems: list[Problem] = field(default_factory=list)


def mark_position(mark: Mark | None) -> tuple[int, int]:
    """1-based (line, column) of a PyYAML mark; (0, 0) without one."""
    if mark is None:
        return (0, 0)
    return (mark.line + 1, mark.column + 1)


def _short_tag(tag: str) -> str:
    return "!!" + tag[len(TAG) :] if tag.startswith(TAG) else tag


_CONSTRUCT: Final[dict[str, Callable[[SafeConstructor, ScalarNode], object]]] = {
    INT: SafeConstructor.construct_yaml_int,
    FLOAT: SafeConstructor.construct_yaml_float,
    BOOL: SafeConstructor.construct_yaml_bool,
}
_CONSTRUCTOR: Final = SafeConstructor()


def _scalar(node: ScalarNode) -> object:
    """The Python value of a scalar node, by its tag (Opaque when popguard reads none)."""
    if node.tag == STR:
        value: str = node.value
        return value
    if node.tag == NULL:
        return None
    construct = _CONSTRUCT.get(node.tag)
    if construct is None:
        return Opaque(node.tag)
    try:
        return construct(_CONSTRUCTOR, node)
    except Exception:
        # raise ValueError (``!!int abc``), KeyError (``!!bool maybe``),
        # IndexError (``!!int ''``): whatever it is, the value is no number.
        return Opaque(node.tag)


#: Longer scalars are shown cut, in messages.
_SHOWN: Final = 60


def _shown(text: str) -> str:
    return repr(text) if len(text) <= _SHOWN else repr(text[:_SHOWN]) + "..."


def describe(node: Node) -> str:
    """``a string '600'``, ``a list``, ``null``: what the user wrote."""
    if isinstance(node, SequenceNode):
        return "a list" if node.tag == SEQ else f"a list tagged {_short_tag(node.tag)}"
    if isinstance(node, MappingNode):
        return "a mapping" if node.tag == MAP else f"a mapping tagged {_short_tag(node.tag)}"
    if node.tag == NULL:
        return "null"
    kind = KINDS.get(node.tag)
    if kind is None:
        return f"a value tagged {_short_tag(node.tag)} {_shown(str(node.value))}"
    if (
        isinstance(node, ScalarNode)
        and isinstance(_scalar(node), Opaque)
        and node.tag in _CONSTRUCT
    ):
        return f"{_shown(node.value)} tagged {_short_tag(node.tag)}, which is not {kind}"
    return f"{kind} {_shown(str(node.value))}"


def number_hint(node: Node | None, example: str = "1000") -> str:
    """Why a number-looking string is a string, for type errors."""
    if not (isinstance(node, ScalarNode) and node.tag == STR):
        return ""
    try:
        if not math.isfinite(float(node.value)):
            return ""
    except ValueError:
        return ""
    if node.style in ("'", '"'):
        return "; write numbers without quotes"
    return f"; YAML 1.1 reads this as a string, write it as a plain decimal (e.g. {example} or 1.5)"


class _BoundedLoader(yaml.SafeLoader):
    """A SafeLoader whose composer refuses nesting deeper than :data:`MAX_DEPTH`."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                event = self.peek_event()  # type: ignore[no-untyped-call]
                raise ComposerError(
                    None, None, f"nested more than {MAX_DEPTH} levels deep", event.start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _compose(text: str) -> Node | None:
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_node()
    finally:
        loader.dispose()


def text_position(text: str, index: int) -> tuple[int, int]:
    index = max(0, min(index, len(text)))
    line = text.count("\n", 0, index) + 1
    column = index - (text.rfind("\n", 0, index) + 1) + 1
    return (line, column)


def syntax_issue(
    file: str, text: str, exc: yaml.YAMLError, hint: Callable[[str], str] | None = None
) -> Issue:
    """A PyYAML error as a located issue; *hint* adds advice for the offending line."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        line, column = mark_position(mark)
        message = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.problem and exc.context_mark is not None:
            message = (
                f"{message} ({exc.context} started on line {mark_position(exc.context_mark)[0]})"
            )
        if mark is not None and hint is not None:
            lines = text.splitlines()
            message += hint(lines[mark.line] if mark.line < len(lines) else "")
        return Issue(file, line, column, f"YAML syntax error: {message}")
    if isinstance(exc, ReaderError):
        line, column = text_position(text, int(exc.position))
        return Issue(file, line, column, f"YAML syntax error: {exc.reason}")
    return Issue(file, 0, 0, f"YAML syntax error: {exc}")


class _TooLarge(Exception):
    def __init__(self, node: Node, message: str) -> None:
        super().__init__(message)
        self.node = node
        self.message = message


class _Converter:
    def __init__(self, document: Document, problems: list[Problem]) -> None:
        self.document = document
        self.problems = problems
        self.count = 0

    def value(self, node: Node, path: Path) -> object:
        self.count += 1
        if self.count > MAX_VALUES:
            raise _TooLarge(
                node,
                f"the document is too large: more than {MAX_VALUES} values "
                "(aliases count each time)",
            )
        if len(path) > MAX_DEPTH:
            raise _TooLarge(node, f"nested more than {MAX_DEPTH} levels deep (through aliases)")
        self.document.values.setdefault(path, node)
        if isinstance(node, MappingNode):
            return self.mapping(node, path) if node.tag == MAP else Opaque(node.tag)
        if isinstance(node, SequenceNode):
            if node.tag != SEQ:
                return Opaque(node.tag)
            return [self.value(item, (*path, index)) for index, item in enumerate(node.value)]
        assert isinstance(node, ScalarNode)
        return _scalar(node)

    def mapping(self, node: MappingNode, path: Path) -> dict[str, object]:
        result: dict[str, object] = {}
        for key, value in node.value:
            if key.tag == MERGE:
                self.problems.append(Problem(path, key, "YAML merge keys ('<<') are not supported"))
                continue
            if not (isinstance(key, ScalarNode) and key.tag == STR):
                self.problems.append(
                    Problem(path, key, f"keys must be strings, got {describe(key)} as a key")
                )
                continue
            name: str = key.value
            if name in result:
                first = self.document.keys[(*path, name)]
                line, _ = mark_position(first.start_mark)
                self.problems.append(
                    Problem(path, key, f"duplicate key '{name}' (first given on line {line})")
                )
                continue
            self.document.keys[(*path, name)] = key
            result[name] = self.value(value, (*path, name))
        return result


def load_yaml(
    path: str | os.PathLike[str], what: str, hint: Callable[[str], str] | None = None
) -> Loaded:
    """Read, decode, compose and convert one YAML file; never raises.

    *what* names the file in messages (``"config file"``); *hint* adds
    advice to a syntax error from its source line.  A file that is empty
    or only comments is a document whose data is ``None``.
    """
    file = os.fspath(path)
    try:
        with open(file, "rb") as stream:
            data = stream.read()
    except OSError as exc:
        return Loaded(None, [Issue(file, 0, 0, f"cannot read {what}: {exc.strerror or exc}")])
    except ValueError:  # a NUL in the path: no file can have that name
        shown = file.replace("\0", "\\0")
        return Loaded(None, [Issue(shown, 0, 0, f"cannot read {what}: a path cannot hold NUL")])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        return Loaded(None, [Issue(file, line, column, f"the {what} is not valid UTF-8")])
    return load_text(file, text, hint)


def load_text(file: str, text: str, hint: Callable[[str], str] | None = None) -> Loaded:
    """:func:`load_yaml` for text already read (*file* names it in issues)."""
    try:
        root = _compose(text)
    except yaml.YAMLError as exc:
        return Loaded(None, [syntax_issue(file, text, exc, hint)])
    document = Document(file, None)
    loaded = Loaded(document)
    if root is None:
        return loaded
    try:
        document.data = _Converter(document, loaded.problems).value(root, ())
    except _TooLarge as exc:
        line, column = mark_position(exc.node.start_mark)
        return Loaded(None, [Issue(file, line, column, exc.message)])
    return loaded
