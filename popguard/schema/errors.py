"""pydantic's validation errors, located and in popguard's words.

A model's validators raise :func:`fail` with popguard's message (and, when
the error belongs at another node than the value validated, the path to
it).  :func:`issues_from` turns every error of a :class:`ValidationError`
into an :class:`~popguard.schema.issues.Issue` at its node, worded by a
:class:`Wording`: the loader's path labels (``listeners[0].listen``,
``rule 'x': set.idle_timeout``), its "did you mean" for unknown keys, and
the type errors said as an operator reads them (``expected a number of
seconds, got a string '600'; write numbers without quotes``).
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, NoReturn, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError
from yaml.nodes import Node, ScalarNode

from popguard.schema.issues import Issue
from popguard.schema.nodes import INT, NULL, Document, Opaque, Path, describe, number_hint

#: The error type of :func:`fail`.
POPGUARD_ERROR = "popguard"
#: The error type of :func:`fail_type`.
TYPE_ERROR = "popguard_type"


def fail(message: str, *, at: Path = (), key: bool = False) -> NoReturn:
    """Refuse a value with popguard's *message*.

    *at* is a path below the value validated, where the error is located
    (a model validator pointing at one of its fields); *key* locates it at
    that mapping key rather than its value.
    """
    raise PydanticCustomError(
        POPGUARD_ERROR, "{message}", {"message": message, "at": at, "key": key}
    )


def fail_type(expected: str) -> NoReturn:
    """Refuse a value of the wrong type: "*expected*, got <what was written>"."""
    raise PydanticCustomError(TYPE_ERROR, "{expected}", {"expected": expected})


def not_null(expected: str) -> Callable[[object], object]:
    """A before-validator for a key that may be left out but not set to null.

    (Its type is ``X | None`` with ``None`` as the default, meaning "left out".)
    """

    def check(value: object) -> object:
        if value is None:
            fail_type(expected)
        return value

    return check


def close_match(name: str, allowed: Sequence[str]) -> str | None:
    """The allowed name *name* was most likely meant to be, or None."""
    for candidate in (name, name.lower(), name.upper()):
        found = difflib.get_close_matches(candidate, list(allowed), n=1, cutoff=0.6)
        if found:
            return found[0]
    return None


def choice_message(value: object, allowed: Sequence[str], got: str, written: str = "") -> str:
    """``expected one of a, b, got 'x' (did you mean 'a'?)``.

    *got* describes a value that is no string; *written* is its text in
    the file, for the hint about YAML 1.1 booleans.
    """
    options = ", ".join(allowed)
    if not isinstance(value, str):
        hint = ""
        if isinstance(value, bool):
            hint = f"; YAML reads {written or str(value).lower()} as a boolean"
        return f"expected one of {options}, got {got}{hint}"
    lowered = {option.lower(): option for option in allowed}
    close = difflib.get_close_matches(
        value.replace("_", "-").lower(), list(lowered), n=1, cutoff=0.6
    )
    hint = f" (did you mean '{lowered[close[0]]}'?)" if close else ""
    return f"expected one of {options}, got {value!r}{hint}"


def pattern(path: Path) -> str:
    """A path with list indexes as ``*``: ``listeners.*.listen``."""
    return ".".join("*" if isinstance(part, int) else part for part in path)


@dataclass(frozen=True, slots=True)
class Wording:
    """How a loader words the errors of its files."""

    #: ``("listeners", 0, "listen")`` -> ``"listeners[0].listen"``.
    label: Callable[[Path], str]
    #: The whole message for an unknown key *name* in the mapping at *path*.
    unknown_key: Callable[[Path, str, Sequence[str]], str]
    #: The example in "write it as a plain decimal (e.g. ...)".
    number_example: str = "1000"
    #: By :func:`pattern`: a message for a value of the wrong type, ``{got}``
    #: standing for what was written (``listeners``: "expected a list of ...").
    type_messages: Mapping[str, str] = field(default_factory=dict)
    #: By :func:`pattern`: what follows "missing required key 'x'".
    missing_hints: Mapping[str, str] = field(default_factory=dict)
    #: By field name: an example value for "expected a string" errors.
    examples: Mapping[str, str] = field(default_factory=dict)


_EXPECTED: Mapping[str, str] = {
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number of seconds",
    "float_parsing": "expected a number of seconds",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "string_type": "expected a string",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "list_type": "expected a list",
    "tuple_type": "expected a list",
}


def _unwrap(annotation: object) -> object:
    """The type under ``Annotated[...]`` and ``X | None``."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            members = [arg for arg in get_args(annotation) if arg is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation


def model_fields_by_alias(model: type[BaseModel]) -> dict[str, Any]:
    return {info.alias or name: info for name, info in model.model_fields.items()}


def annotation_at(root: type[BaseModel], path: Path) -> object:
    """The declared type of the value at *path* (None when the schema has none)."""
    annotation: object = root
    for part in path:
        annotation = _unwrap(annotation)
        origin = get_origin(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            info = model_fields_by_alias(annotation).get(str(part))
            if info is None:
                return None
            annotation = info.annotation
        elif origin in (list, tuple, Sequence):
            annotation = get_args(annotation)[0]
        elif origin in (dict, Mapping):
            annotation = get_args(annotation)[1]
        else:
            return None
    return _unwrap(annotation)


def allowed_keys(root: type[BaseModel], path: Path) -> list[str]:
    """The keys the model at *path* accepts."""
    model = annotation_at(root, path)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model_fields_by_alias(model))
    return []


def _node(document: Document | None, path: Path) -> Node | None:
    """The node written at *path*; a lone scalar given for a list stands for its item 0."""
    if document is None:
        return None
    node = document.values.get(path)
    if node is None and path and path[-1] == 0:
        parent = document.values.get(path[:-1])
        if isinstance(parent, ScalarNode):
            return parent
    return node


def _got(document: Document | None, path: Path, value: object) -> str:
    node = _node(document, path)
    if node is not None:
        return describe(node)
    if isinstance(value, str):
        return repr(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean {value!r}"
    if isinstance(value, int):
        return f"an integer {value!r}"
    if isinstance(value, float):
        return f"a float {value!r}"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, Opaque):
        return f"a value tagged {value.tag}"
    return repr(value)


def type_message(
    error_type: str,
    document: Document | None,
    path: Path,
    value: object,
    wording: Wording,
    root: type[BaseModel],
) -> str | None:
    """The message for a value of the wrong type (None: not a type error)."""
    got = _got(document, path, value)
    node = _node(document, path)
    template = wording.type_messages.get(pattern(path))
    if template is not None and error_type in _EXPECTED:
        return template.format(got=got)
    if error_type == "literal_error":
        options = get_args(annotation_at(root, path))
        written = str(node.value) if isinstance(node, ScalarNode) else ""
        return choice_message(value, [str(option) for option in options], got, written)
    expected = _EXPECTED.get(error_type)
    if expected is None:
        return None
    hint = ""
    if error_type.startswith(("int", "float")):
        hint = number_hint(node, wording.number_example)
    elif error_type == "string_type":
        if isinstance(node, ScalarNode) and node.tag == INT and ":" in node.value:
            hint = f"; YAML 1.1 reads {node.value} as a number: quote it"
        elif isinstance(node, ScalarNode) and node.tag != NULL:
            hint = "; put it in quotes if you meant a string"
        names = [part for part in path if isinstance(part, str)]
        example = wording.examples.get(names[-1]) if names else None
        if example:
            hint += f" (e.g. {example})"
    return f"{expected}, got {got}{hint}"


def issues_from(
    error: ValidationError,
    document: Document,
    root: type[BaseModel],
    wording: Wording,
    *,
    base: Path = (),
) -> list[Issue]:
    """Every error of *error* as a located issue (*base*: where the model's input was)."""
    issues: list[Issue] = []
    for entry in error.errors(include_url=False):
        raw_loc = tuple(entry["loc"])
        on_key = bool(raw_loc) and raw_loc[-1] == "[key]"
        loc: Path = base + (raw_loc[:-1] if on_key else raw_loc)
        model_loc: Path = loc[len(base) :]
        error_type = entry["type"]
        ctx = entry.get("ctx") or {}
        where_path = loc[:-1] if on_key else loc
        at: Path = loc
        if error_type == POPGUARD_ERROR:
            at = loc + tuple(ctx.get("at", ()))
            on_key = on_key or bool(ctx.get("key"))
            message = f"{wording.label(where_path)}: {ctx['message']}"
        elif error_type == TYPE_ERROR:
            got = _got(document, loc, entry["input"])
            message = f"{wording.label(where_path)}: {ctx['expected']}, got {got}"
        elif error_type == "extra_forbidden":
            on_key = True
            message = wording.unknown_key(
                loc[:-1], str(loc[-1]), allowed_keys(root, model_loc[:-1])
            )
        elif error_type == "missing":
            parent = loc[:-1]
            hint = wording.missing_hints.get(pattern(loc), "")
            message = f"{wording.label(parent)}: missing required key '{loc[-1]}'{hint}"
            at = parent
        else:
            text = type_message(error_type, document, loc, entry["input"], wording, root)
            message = f"{wording.label(where_path)}: {text or entry['msg']}"
        line, column = document.position(at, key=on_key)
        issues.append(Issue(document.file, line, column, message))
    return issues


def flag_issues(error: ValidationError, flag: str) -> list[str]:
    """The messages of *error*, for a command-line *flag*'s value."""
    messages: list[str] = []
    for entry in error.errors(include_url=False):
        error_type = entry["type"]
        ctx = entry.get("ctx") or {}
        if error_type == POPGUARD_ERROR:
            text = str(ctx["message"])
        elif error_type == TYPE_ERROR:
            text = f"{ctx['expected']}, got {entry['input']!r}"
        elif error_type == "literal_error":
            text = choice_message(entry["input"], _literal_options(ctx), repr(entry["input"]))
        else:
            expected = _EXPECTED.get(error_type)
            text = f"{expected}, got {entry['input']!r}" if expected else str(entry["msg"])
        messages.append(f"{flag}: {text}")
    return messages


def _literal_options(ctx: Mapping[str, object]) -> list[str]:
    """``'a', 'b' or 'c'`` (pydantic's ``expected``) as a list."""
    text = str(ctx.get("expected", ""))
    return [part.strip().strip("'") for part in text.replace(" or ", ", ").split(", ") if part]
