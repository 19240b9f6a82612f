"""popguard.schema's shared layer: YAML to values with positions, one issue type.

And the layering the schema allows: the config is data, and importing it
brings in neither the shell, nor the sinks, nor the audit trail (nor trio).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from popguard.config import ConfigError, ConfigIssue
from popguard.policy.load import Issue as PolicyIssue
from popguard.policy.load import PolicyError
from popguard.schema.issues import Issue, IssueError
from popguard.schema.nodes import MAX_DEPTH, MAX_VALUES, Opaque, load_text


def test_one_issue_class_for_config_and_policy_files() -> None:
    assert ConfigIssue is Issue
    assert PolicyIssue is Issue
    assert issubclass(ConfigError, IssueError)
    assert issubclass(PolicyError, IssueError)


def test_scalars_are_typed_by_their_yaml_tag_and_keep_their_place() -> None:
    text = "a:\n  - 600\n  - '600'\n  - yes\n  - 1.5\n  - ~\n  - 2001-01-01\n  - !!int abc\n"
    loaded = load_text("f.yaml", text)
    assert loaded.document is not None
    assert loaded.issues == []
    data = loaded.document.data
    assert isinstance(data, dict)
    values = data["a"]
    assert values[:5] == [600, "600", True, 1.5, None]
    assert isinstance(values[5], Opaque)  # a timestamp popguard never reads
    assert isinstance(values[6], Opaque)  # !!int that is no integer
    assert loaded.document.position(("a", 1)) == (3, 5)
    assert loaded.document.position(("a",), key=True) == (1, 1)
    # A path below a scalar is located at the nearest value there is.
    assert loaded.document.position(("a", 1, "x")) == (3, 5)


def test_merge_keys_duplicates_and_non_string_keys_are_problems() -> None:
    loaded = load_text("f.yaml", "a: 1\na: 2\n<<: {b: 1}\n3: x\n")
    assert loaded.document is not None
    assert loaded.document.data == {"a": 1}
    assert [(p.path, p.node.start_mark.line + 1, p.message) for p in loaded.problems] == [
        ((), 2, "duplicate key 'a' (first given on line 1)"),
        ((), 3, "YAML merge keys ('<<') are not supported"),
        ((), 4, "keys must be strings, got an integer '3' as a key"),
    ]


def test_deep_nesting_is_a_located_error_not_a_recursion_error() -> None:
    loaded = load_text("f.yaml", "[" * 500 + "]" * 500)
    assert loaded.document is None
    (issue,) = loaded.issues
    assert (issue.line, issue.column) == (1, MAX_DEPTH + 1)
    assert f"nested more than {MAX_DEPTH} levels deep" in issue.message
    assert load_text("f.yaml", "[" * MAX_DEPTH + "]" * MAX_DEPTH).document is not None


def test_recursive_and_exponential_aliases_are_bounded() -> None:
    loaded = load_text("f.yaml", "a: &a [*a]\n")
    assert loaded.document is None
    assert "nested more than" in loaded.issues[0].message
    laughs = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for level in "bcdefgh":
        previous = chr(ord(level) - 1)
        laughs += f"{level}: &{level} [" + ", ".join([f"*{previous}"] * 10) + "]\n"
    loaded = load_text("f.yaml", laughs)
    assert loaded.document is None
    (issue,) = loaded.issues
    assert issue.line >= 1
    assert f"more than {MAX_VALUES} values" in issue.message


def test_the_config_imports_no_shell_sinks_or_trail() -> None:
    code = (
        "import sys, popguard.config, popguard.policy.load\n"
        "print(' '.join(sorted(m for m in sys.modules if m == 'trio' or m.startswith("
        "('popguard.shell', 'popguard.sinks', 'popguard.trail')))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == ""


def test_the_server_does_not_import_the_supervisor() -> None:
    # server.py and workers.py once imported each other; what they share
    # (a worker's role) has a module of its own.
    code = "import sys, popguard.shell.server\nprint('popguard.shell.workers' in sys.modules)\n"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "False"
    source = (Path(__file__).parent.parent / "popguard/shell/server.py").read_text()
    assert "popguard.shell.workers" not in source
