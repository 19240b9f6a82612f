"""What the YAML readers (config file, policy files) share: node kinds.

Both read YAML as a node tree (``yaml.compose``) so that every problem can
be reported with its file, line and column; these helpers say what a node
is in the words an operator would use.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Final

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

TAG: Final = "tag:yaml.org,2002:"
STR: Final = TAG + "str"
INT: Final = TAG + "int"
FLOAT: Final = TAG + "float"
BOOL: Final = TAG + "bool"
NULL: Final = TAG + "null"
MERGE: Final = TAG + "merge"

KINDS: Final[Mapping[str, str]] = {
    STR: "a string",
    INT: "an integer",
    FLOAT: "a float",
    BOOL: "a boolean",
    NULL: "null",
    TAG + "timestamp": "a timestamp",
    TAG + "binary": "binary data",
}


def describe(node: Node) -> str:
    """``a string '600'``, ``a list``, ``null``: what the user wrote."""
    if isinstance(node, SequenceNode):
        return "a list"
    if isinstance(node, MappingNode):
        return "a mapping"
    if node.tag == NULL:
        return "null"
    kind = KINDS.get(node.tag, f"a value tagged {node.tag}")
    return f"{kind} {node.value!r}" if isinstance(node, ScalarNode) else kind


def number_hint(node: Node, example: str = "1000") -> str:
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
