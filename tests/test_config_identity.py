"""The config's ``identity:`` section: how the upstream maps names to accounts."""

from __future__ import annotations

from pathlib import Path

import pytest

from popguard.config import ConfigError, build_config, load_config
from popguard.core.identity import DEFAULT_IDENTITY, DOVECOT_USERNAME_CHARS, IdentityRules

MINIMAL = """\
listeners:
  - name: main
    listen: "127.0.0.1:1110"
upstream:
  address: "127.0.0.1:110"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "popguard.yaml"
    path.write_text(MINIMAL + text, encoding="utf-8")
    return path


def test_default_is_dovecots_mapping(tmp_path: Path) -> None:
    config, warnings = load_config(write(tmp_path, ""))
    assert config.identity == DEFAULT_IDENTITY
    assert config.identity.case == "lower"
    assert config.identity.allowed_chars == DOVECOT_USERNAME_CHARS
    assert not warnings


def test_every_key(tmp_path: Path) -> None:
    text = (
        "identity:\n"
        "  case: exact\n"
        "  domain: strip\n"
        "  default_domain: example.org\n"
        "  master_separator: '*'\n"
        "  master_account: after\n"
        "  plain_authzid: refuse\n"
        "  allowed_chars: null\n"
    )
    config, _ = load_config(write(tmp_path, text))
    assert config.identity == IdentityRules(
        case="exact",
        domain="strip",
        default_domain="example.org",
        master_separator="*",
        master_account="after",
        plain_authzid="refuse",
        allowed_chars=None,
    )


@pytest.mark.parametrize(
    ("text", "line", "column", "fragment"),
    [
        ("identity:\n  case: upper\n", 7, 9, "expected one of lower, exact"),
        ("identity:\n  case: Lower\n", 7, 9, "did you mean 'lower'"),
        ("identity:\n  master_separator: '**'\n", 7, 21, "one character expected"),
        ("identity:\n  default_domain: '@x.org'\n", 7, 19, "without '@'"),
        ("identity:\n  allowed_chars: ''\n", 7, 18, "empty: no name could log in"),
        ("identity:\n  allowed_chars: 'a b'\n", 7, 18, "printable ASCII without spaces"),
        ("identity:\n  master_separator: 5\n", 7, 21, "expected a string"),
        ("identity:\n  cases: exact\n", 7, 3, "unknown key 'cases'"),
        ("identity: exact\n", 6, 11, "identity: expected a mapping"),
    ],
)
def test_errors_have_locations(
    tmp_path: Path, text: str, line: int, column: int, fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    [issue] = info.value.errors
    assert (issue.line, issue.column) == (line, column), str(issue)
    assert fragment in issue.message


def test_command_line_flags_keep_the_files_identity(tmp_path: Path) -> None:
    base, _ = load_config(write(tmp_path, "identity:\n  case: exact\n"))
    config, _ = build_config(base=base, listen=["127.0.0.1:2110"])
    assert config.identity.case == "exact"
