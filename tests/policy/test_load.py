"""popguard.policy.load: the policy directory into a PolicySet, errors located."""

from __future__ import annotations

import ipaddress
import os
import shutil
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from popguard.policy.load import (
    DECIDED_AT,
    Issue,
    PolicyError,
    load_policies,
    policy_files,
)
from popguard.policy.model import SETTINGS, Context, Match, PolicySet, Throttle

REPO = Path(__file__).resolve().parent.parent.parent
SHIPPED = REPO / "policies"


def write(directory: Path, text: str, name: str = "50-test.yaml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load(directory: Path, **kwargs: object) -> tuple[PolicySet, list[Issue]]:
    return load_policies(str(directory), **kwargs)  # type: ignore[arg-type]


def failure(directory: Path, **kwargs: object) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        load(directory, **kwargs)
    return info.value


def only_error(directory: Path) -> Issue:
    errors = failure(directory).errors
    assert len(errors) == 1, "\n".join(map(str, errors))
    return errors[0]


# --------------------------------------------------------------------------
# Valid files
# --------------------------------------------------------------------------

FULL = """\
rules:
  - name: alice-read-only
    mode: dry-run
    match:
      user: [alice, "*@example.org", "@example.org"]
      claimed_user: alice
      client: [10.0.0.0/8, "2001:db8::/32", 192.0.2.7]
      listener: [main]
      tls: false
    set:
      deny_commands: [dele, RSET]
      deny_reply: "Deletion is not permitted here"
      idle_timeout: 900
      max_session: 3600.5
  - name: everyone
    set:
      access: allow
      auth_mechanisms: [plain, user, Cram-MD5]
      require_tls: false
      max_sessions_total: 1000
      max_sessions_per_client: 10
      max_sessions_per_user: 3
      login_throttle: {failures: 5, window: 300, block: 900, by: [user]}
"""


def test_a_full_file_loads_with_the_documented_types(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    policies, warnings = load(tmp_path, listeners=["main"])
    assert warnings == []
    assert policies.source == str(tmp_path)
    first, second = policies.rules
    assert (first.name, first.file, first.line, first.mode) == (
        "alice-read-only",
        str(path),
        2,
        "dry-run",
    )
    assert first.match == Match(
        users=("alice", "*@example.org", "@example.org"),
        claimed_users=("alice",),
        clients=(
            ipaddress.ip_network("10.0.0.0/8"),
            ipaddress.ip_network("2001:db8::/32"),
            ipaddress.ip_network("192.0.2.7/32"),
        ),
        listeners=("main",),
        tls=False,
    )
    assert dict(first.settings) == {
        "deny_commands": ("DELE", "RSET"),
        "deny_reply": "Deletion is not permitted here",
        "idle_timeout": 900.0,
        "max_session": 3600.5,
    }
    assert isinstance(first.settings["idle_timeout"], float)
    assert (second.line, second.mode, second.match) == (15, "enforce", Match())
    assert dict(second.settings) == {
        "access": "allow",
        "auth_mechanisms": ("PLAIN", "USER", "CRAM-MD5"),
        "require_tls": False,
        "max_sessions_total": 1000,
        "max_sessions_per_client": 10,
        "max_sessions_per_user": 3,
        "login_throttle": Throttle(failures=5, window=300.0, block=900.0, by=("user",)),
    }


def test_settings_are_stored_in_explain_order(tmp_path: Path) -> None:
    write(tmp_path, "rules: [{name: r, set: {max_session: 10, access: deny, idle_timeout: 600}}]")
    (rule,) = load(tmp_path)[0].rules
    assert list(rule.settings) == ["access", "idle_timeout", "max_session"]
    assert all(name in SETTINGS for name in DECIDED_AT)
    assert set(DECIDED_AT) == set(SETTINGS)


def test_single_strings_stand_for_one_element_lists(tmp_path: Path) -> None:
    write(
        tmp_path,
        """\
        rules:
          - name: r
            match: {user: alice, client: "::1", listener: main}
            set: {deny_commands: dele, auth_mechanisms: apop}
        """,
    )
    (rule,) = load(tmp_path)[0].rules
    assert rule.match.users == ("alice",)
    assert rule.match.clients == (ipaddress.ip_network("::1/128"),)
    assert rule.match.listeners == ("main",)
    assert rule.settings["deny_commands"] == ("DELE",)
    assert rule.settings["auth_mechanisms"] == ("APOP",)


def test_duplicates_in_lists_are_dropped(tmp_path: Path) -> None:
    write(tmp_path, "rules: [{name: r, match: {user: [a, a]}, set: {deny_commands: [DELE, dele]}}]")
    (rule,) = load(tmp_path)[0].rules
    assert rule.match.users == ("a",)
    assert rule.settings["deny_commands"] == ("DELE",)


def test_throttle_by_defaults_to_both(tmp_path: Path) -> None:
    write(tmp_path, "rules: [{name: r, set: {login_throttle: {failures: 1, window: 1, block: 2}}}]")
    (rule,) = load(tmp_path)[0].rules
    assert rule.settings["login_throttle"] == Throttle(1, 1.0, 2.0, ("client", "user"))


def test_null_means_no_limit_and_wins_like_any_value(tmp_path: Path) -> None:
    write(
        tmp_path,
        """\
        rules:
          - name: monitoring
            match: {client: 192.0.2.10}
            set:
              login_throttle: null
              max_sessions_per_client: ~
              idle_timeout: null
              auth_mechanisms: null
          - name: everyone
            set:
              login_throttle: {failures: 5, window: 300, block: 900}
              max_sessions_per_client: 10
              idle_timeout: 900
              auth_mechanisms: [PLAIN]
        """,
    )
    policies, warnings = load(tmp_path)
    assert warnings == []
    monitoring = policies.resolve(Context(client=ipaddress.ip_address("192.0.2.10")))
    assert monitoring.value("login_throttle") is None
    assert monitoring.get("login_throttle") is not None  # set, to "no throttle"
    assert monitoring.value("max_sessions_per_client") is None
    other = policies.resolve(Context(client=ipaddress.ip_address("192.0.2.11")))
    assert other.value("max_sessions_per_client") == 10


def test_empty_deny_commands_overrides_later_rules(tmp_path: Path) -> None:
    write(
        tmp_path,
        """\
        rules:
          - name: admin-may-delete
            match: {user: admin}
            set: {deny_commands: []}
          - name: nobody-deletes
            set: {deny_commands: [DELE]}
        """,
    )
    policies, _ = load(tmp_path)
    admin = policies.resolve(Context(client=None, claimed_user="admin", user="admin"))
    assert admin.value("deny_commands") == ()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "# only comments\n",
        "rules:\n",
        "rules: []\n",
        "rules: null\n",
        "{}\n",
    ],
)
def test_empty_files_are_fine(tmp_path: Path, text: str) -> None:
    write(tmp_path, text)
    policies, warnings = load(tmp_path)
    assert policies.rules == ()
    assert warnings == []


def test_an_empty_directory_is_an_empty_set(tmp_path: Path) -> None:
    policies, warnings = load(tmp_path)
    assert (policies.rules, warnings) == ((), [])


def test_files_load_in_name_order_and_only_yaml(tmp_path: Path) -> None:
    for name in ("20-b.yml", "10-a.yaml", "30-c.yaml.example", ".hidden.yaml", "notes.txt"):
        write(tmp_path, f"rules: [{{name: r{name[:2]}, set: {{access: allow}}}}]", name)
    write(tmp_path / "sub", "rules: [{name: nested, set: {access: deny}}]", "00-x.yaml")
    policies, _ = load(tmp_path)
    assert [rule.name for rule in policies.rules] == ["r10", "r20"]
    assert [os.path.basename(rule.file) for rule in policies.rules] == ["10-a.yaml", "20-b.yml"]
    assert [os.path.basename(f) for f in policy_files(tmp_path)] == ["10-a.yaml", "20-b.yml"]


def test_rule_files_keep_the_directory_as_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "policies", "rules: [{name: r, set: {access: allow}}]", "10-a.yaml")
    monkeypatch.chdir(tmp_path)
    policies, _ = load_policies("policies")
    assert policies.rules[0].file == os.path.join("policies", "10-a.yaml")
    assert policies.rules[0].where == os.path.join("policies", "10-a.yaml") + ":1"


def test_rule_lines_are_where_each_rule_starts(tmp_path: Path) -> None:
    write(
        tmp_path,
        """\
        # comment
        rules:

          - name: first
            set: {access: allow}
          -
            name: second
            set: {access: deny}
        """,
    )
    policies, _ = load(tmp_path)
    assert [rule.line for rule in policies.rules] == [4, 7]


# --------------------------------------------------------------------------
# The shipped directory
# --------------------------------------------------------------------------


def test_the_shipped_policies_load_with_no_rules_and_no_issues() -> None:
    policies, warnings = load_policies(str(SHIPPED))
    assert policies.rules == ()
    assert warnings == []
    assert [os.path.basename(f) for f in policy_files(SHIPPED)] == ["00-default.yaml"]


EXAMPLES = sorted(SHIPPED.glob("*.yaml.example"))


def test_examples_exist_for_every_setting() -> None:
    text = "\n".join(path.read_text(encoding="utf-8") for path in EXAMPLES)
    for name in SETTINGS:
        assert f"{name}:" in text, name
    assert "mode: dry-run" in text


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.name)
def test_each_example_is_valid_once_copied(tmp_path: Path, example: Path) -> None:
    shutil.copy(example, tmp_path / example.name.removesuffix(".example"))
    policies, warnings = load(tmp_path, listeners=["main", "legacy"])
    assert policies.rules
    assert warnings == []


def test_all_examples_together_are_valid(tmp_path: Path) -> None:
    for example in EXAMPLES:
        shutil.copy(example, tmp_path / example.name.removesuffix(".example"))
    policies, warnings = load(tmp_path, listeners=["main", "legacy"])
    assert len({rule.name for rule in policies.rules}) == len(policies.rules)
    assert warnings == []


# --------------------------------------------------------------------------
# Errors: each is located, and all of them are reported
# --------------------------------------------------------------------------

ERRORS = [
    # (file text, line, column, part of the message)
    ("rules: [{name: r, set: {access: maybe}}]", 1, 33, "expected one of allow, deny, got 'maybe'"),
    ("rules: [{name: r, set: {access: no}}]", 1, 33, "YAML reads no as a boolean"),
    (
        "rules: [{name: r, set: {acess: deny}}]",
        1,
        25,
        "unknown key 'acess' (did you mean 'access'?)",
    ),
    (
        "rules: [{name: r, access: deny, set: {deny_commands: [DELE]}}]",
        1,
        19,
        "unknown key 'access' ('access' is a setting: put it under 'set:')",
    ),
    (
        "rules: [{name: r, set: {user: bob}}]",
        1,
        25,
        "'user' is a matcher: put it under 'match:'",
    ),
    (
        "rules: [{name: r, match: {users: bob}, set: {access: deny}}]",
        1,
        27,
        "unknown key 'users' (did you mean 'user'?)",
    ),
    (
        "rules: [{name: r, match: {ip: 10.0.0.0/8}, set: {access: deny}}]",
        1,
        27,
        "unknown key 'ip' (did you mean 'client'?)",
    ),
    ("rule: []", 1, 1, "unknown key 'rule' (did you mean 'rules'?)"),
    ("name: r\n", 1, 1, "unknown key 'name' (rules go in a list under 'rules:')"),
    ("- name: r", 1, 1, "start the file with 'rules:'"),
    ("rules: {name: r}", 1, 8, "rules: expected a list of rules, got a mapping"),
    ("rules: [{set: {access: deny}}]", 1, 9, "missing required key 'name'"),
    ("rules: [{name: r}]", 1, 9, "rule 'r': missing required key 'set'"),
    ("rules: [{name: r, set: {}}]", 1, 24, "sets nothing"),
    ("rules: [{name: r, set: null}]", 1, 24, "sets nothing"),
    ("rules: [{name: 'a b', set: {access: deny}}]", 1, 16, "invalid rule name 'a b'"),
    ("rules: [{name: 12, set: {access: deny}}]", 1, 16, "expected a string, got an integer"),
    (
        "rules: [{name: r, mode: dry_run, set: {access: deny}}]",
        1,
        25,
        "expected one of enforce, dry-run, got 'dry_run' (did you mean 'dry-run'?)",
    ),
    ("rules: [{name: r, match: [a], set: {access: deny}}]", 1, 26, "match: expected a mapping"),
    (
        "rules: [{name: r, match: {user: []}, set: {access: deny}}]",
        1,
        33,
        "the list is empty and would match nothing",
    ),
    (
        "rules: [{name: r, match: {user: [yes]}, set: {access: deny}}]",
        1,
        34,
        "got a boolean 'yes'; put it in quotes",
    ),
    (
        "rules: [{name: r, match: {claimed_user: '@'}, set: {access: deny}}]",
        1,
        41,
        "'@' needs a domain after it",
    ),
    (
        "rules: [{name: r, match: {user: '@*.example.org'}, set: {deny_commands: [DELE]}}]",
        1,
        33,
        "for a glob write '*@*.example.org'",
    ),
    (
        "rules: [{name: r, match: {user: '@a@b'}, set: {deny_commands: [DELE]}}]",
        1,
        33,
        "an @domain pattern has a single '@'",
    ),
    (
        "rules: [{name: r, match: {user: ' alice'}, set: {deny_commands: [DELE]}}]",
        1,
        33,
        "leading or trailing whitespace",
    ),
    (
        'rules: [{name: r, match: {user: "a\\u0001"}, set: {deny_commands: [DELE]}}]',
        1,
        33,
        "control character",
    ),
    (
        "rules: [{name: r, match: {client: 10.0.0.1/8}, set: {access: deny}}]",
        1,
        35,
        "'10.0.0.1/8' has host bits set: write the network 10.0.0.0/8 "
        "or the single address 10.0.0.1/32",
    ),
    (
        "rules: [{name: r, match: {client: '2001:db8::1/32'}, set: {access: deny}}]",
        1,
        35,
        "host bits set: write the network 2001:db8::/32 or the single address 2001:db8::1/128",
    ),
    (
        "rules: [{name: r, match: {client: 10.0.0.300}, set: {access: deny}}]",
        1,
        35,
        "invalid address or network '10.0.0.300'",
    ),
    (
        "rules: [{name: r, match: {client: 'fe80::1%eth0'}, set: {access: deny}}]",
        1,
        35,
        "zone indexes",
    ),
    (
        "rules: [{name: r, match: {client: 1:2:3:4:5:6:7:8}, set: {access: deny}}]",
        1,
        35,
        "YAML 1.1 reads 1:2:3:4:5:6:7:8 as a number: quote it",
    ),
    (
        "rules: [{name: r, match: {tls: 1}, set: {access: deny}}]",
        1,
        32,
        "match.tls: expected true or false",
    ),
    (
        "rules: [{name: r, match: {listener: ''}, set: {access: deny}}]",
        1,
        37,
        "empty listener name",
    ),
    (
        "rules: [{name: r, set: {deny_commands: [QUIT]}}]",
        1,
        41,
        "QUIT can never be denied",
    ),
    (
        "rules: [{name: r, set: {deny_commands: [pass]}}]",
        1,
        41,
        "login commands are not denied with deny_commands: use auth_mechanisms",
    ),
    (
        "rules: [{name: r, set: {deny_commands: [STLS]}}]",
        1,
        41,
        "STLS is not decided by policy",
    ),
    (
        "rules: [{name: r, set: {deny_commands: [RETRR]}}]",
        1,
        41,
        "unknown command 'RETRR' (did you mean 'RETR'?)",
    ),
    (
        "rules: [{name: r, set: {deny_commands: {DELE: 1}}}]",
        1,
        40,
        "expected a string or a list of strings, got a mapping",
    ),
    (
        "rules: [{name: r, set: {deny_commands: [DELE], deny_reply: ''}}]",
        1,
        60,
        "empty reply text",
    ),
    (
        'rules: [{name: r, set: {deny_commands: [DELE], deny_reply: "a\\r\\nb"}}]',
        1,
        60,
        "one line (no CR or LF)",
    ),
    (
        'rules: [{name: r, set: {deny_commands: [DELE], deny_reply: "caf\u00e9"}}]',
        1,
        60,
        "printable ASCII; 'é' (U+00E9) is not",
    ),
    (
        "rules: [{name: r, set: {deny_commands: [DELE], deny_reply: " + "x" * 201 + "}}]",
        1,
        60,
        "the reply is 201 characters, longer than 200",
    ),
    (
        "rules: [{name: r, set: {deny_commands: [DELE], deny_reply: 42}}]",
        1,
        60,
        "deny_reply: expected a string, got an integer '42'",
    ),
    (
        "rules: [{name: r, set: {deny_reply: nope}}]",
        1,
        25,
        "deny_reply without deny_commands",
    ),
    (
        "rules: [{name: r, set: {auth_mechanisms: [PASS]}}]",
        1,
        43,
        "PASS is part of USER/PASS: write USER",
    ),
    (
        "rules: [{name: r, set: {auth_mechanisms: [SCRAM-SHA-512]}}]",
        1,
        43,
        "unknown mechanism 'SCRAM-SHA-512' (did you mean",
    ),
    (
        "rules: [{name: r, set: {require_tls: null}}]",
        1,
        38,
        "require_tls: expected true or false, got null",
    ),
    (
        "rules: [{name: r, set: {idle_timeout: '600'}}]",
        1,
        39,
        "expected a number of seconds, got a string '600'; write numbers without quotes",
    ),
    ("rules: [{name: r, set: {idle_timeout: 0}}]", 1, 39, "must be greater than 0 seconds"),
    ("rules: [{name: r, set: {max_session: -5}}]", 1, 38, "must be greater than 0 seconds"),
    ("rules: [{name: r, set: {max_session: .inf}}]", 1, 38, "must be a finite number"),
    ("rules: [{name: r, set: {max_session: true}}]", 1, 38, "got a boolean"),
    (
        "rules: [{name: r, set: {max_sessions_total: 0}}]",
        1,
        45,
        "must be at least 1 (to refuse every session use access: deny",
    ),
    (
        "rules: [{name: r, set: {max_sessions_per_user: 1.5}}]",
        1,
        48,
        "expected an integer, got a float '1.5'",
    ),
    (
        "rules: [{name: r, set: {deny_reply: x, deny_commands: null}}]",
        1,
        55,
        "expected a string or a list of strings, got null",
    ),
    (
        "rules: [{name: r, set: {login_throttle: {failures: 5, window: 300}}}]",
        1,
        41,
        "missing required key 'block'",
    ),
    (
        "rules: [{name: r, set: {login_throttle: {failures: 0, window: 1, block: 1}}}]",
        1,
        52,
        "failures: must be at least 1",
    ),
    (
        "rules: [{name: r, set: {login_throttle: {failures: 1, window: 0, block: 1}}}]",
        1,
        63,
        "window: must be greater than 0 seconds",
    ),
    (
        "rules: [{name: r, set: {login_throttle: {failures: 1, window: 1, block: 1, by: [ip]}}}]",
        1,
        81,
        "by: expected client or user, got 'ip'",
    ),
    (
        "rules: [{name: r, set: {login_throttle: {failures: 1, window: 1, block: 1, by: []}}}]",
        1,
        80,
        "by: empty",
    ),
    (
        "rules: [{name: r, set: {login_throttle: {failures: 1, window: 1, block: 1, windw: 2}}}]",
        1,
        76,
        "unknown key 'windw' (did you mean 'window'?)",
    ),
    (
        "rules: [{name: r, set: {login_throttle: {}}}]",
        1,
        41,
        "expected failures, window and block",
    ),
    ("rules: [{name: r, set: {access: deny, access: allow}}]", 1, 39, "duplicate key 'access'"),
    ("rules: [{name: r, set: {<<: {access: deny}}}]", 1, 25, "merge keys"),
    ("rules: [{name: r, set: {1: deny}}]", 1, 25, "keys must be strings"),
]


@pytest.mark.parametrize(("text", "line", "column", "message"), ERRORS)
def test_every_error_is_located(
    tmp_path: Path, text: str, line: int, column: int, message: str
) -> None:
    path = write(tmp_path, text)
    error = only_error(tmp_path)
    assert error.file == str(path)
    assert (error.line, error.column) == (line, column), str(error)
    assert message in error.message, str(error)
    assert str(error).startswith(f"{path}:{line}:{column}: error: ")


def test_yaml_syntax_errors_are_located_with_an_ipv6_hint(tmp_path: Path) -> None:
    write(tmp_path, "rules:\n  - name: r\n    match: {client: [::1]}\n    set: {access: deny}\n")
    error = only_error(tmp_path)
    assert (error.line, error.column) == (3, 22)
    assert error.message.startswith("YAML syntax error:")
    assert "quote IPv6 addresses" in error.message


def test_non_utf8_files_are_located(tmp_path: Path) -> None:
    path = tmp_path / "10-bad.yaml"
    path.write_bytes(b"rules:\n  - name: caf\xe9\n")
    error = only_error(tmp_path)
    assert (error.file, error.line, error.column) == (str(path), 2, 14)
    assert "not valid UTF-8" in error.message


def test_several_documents_in_one_file_are_an_error(tmp_path: Path) -> None:
    write(tmp_path, "rules: []\n---\nrules: []\n")
    error = only_error(tmp_path)
    assert error.line == 2
    assert "single document" in error.message


def test_a_missing_directory_is_an_error(tmp_path: Path) -> None:
    error = only_error(tmp_path / "nope")
    assert (error.file, error.line) == (str(tmp_path / "nope"), 0)
    assert error.message == "policy directory not found"
    assert str(error) == f"{tmp_path / 'nope'}: error: policy directory not found"


def test_a_file_instead_of_a_directory_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "rules: []")
    error = only_error(path)
    assert "not a directory" in error.message


def test_a_dangling_symlink_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "10-gone.yaml").symlink_to(tmp_path / "nowhere.yaml")
    error = only_error(tmp_path)
    assert (error.file, error.line) == (str(tmp_path / "10-gone.yaml"), 0)
    assert "cannot read policy file: No such file or directory" in error.message


def test_a_directory_named_like_a_policy_file_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "10-dir.yaml").mkdir()
    policies, warnings = load(tmp_path)
    assert policies.rules == ()
    assert [(w.severity, w.message) for w in warnings] == [
        ("warning", "a directory, not a policy file: skipped")
    ]


def test_all_errors_of_all_files_are_collected_in_order(tmp_path: Path) -> None:
    write(
        tmp_path,
        """\
        rules:
          - name: a
            set: {access: maybe, idle_timeout: 0}
        """,
        "20-b.yaml",
    )
    write(tmp_path, "rules: [{name: b, set: {deny_commands: [QUIT]}}]", "10-a.yaml")
    write(tmp_path, "rules: [\n", "30-c.yaml")
    error = failure(tmp_path)
    assert [(os.path.basename(i.file), i.line) for i in error.errors] == [
        ("10-a.yaml", 1),
        ("20-b.yaml", 3),
        ("20-b.yaml", 3),
        ("30-c.yaml", 2),
    ]
    assert str(error).count("\n") == 3


def test_duplicate_names_across_files(tmp_path: Path) -> None:
    first = write(tmp_path, "rules: [{name: r, set: {access: allow}}]", "10-a.yaml")
    second = write(tmp_path, "rules:\n  - name: r\n    set: {access: deny}\n", "20-b.yaml")
    error = only_error(tmp_path)
    assert (error.file, error.line, error.column) == (str(second), 2, 11)
    assert f"duplicate rule name 'r': already used by the rule at {first}:1" in error.message


def test_errors_carry_the_warnings_found_alongside(tmp_path: Path) -> None:
    write(tmp_path, "rules: [{name: r, set: {idle_timeout: 60, access: maybe}}]")
    error = failure(tmp_path)
    assert len(error.errors) == 1
    assert len(error.warnings) == 1
    assert "RFC 1939" in error.warnings[0].message


# --------------------------------------------------------------------------
# Warnings
# --------------------------------------------------------------------------


def only_warning(directory: Path, **kwargs: object) -> Issue:
    _, warnings = load(directory, **kwargs)
    assert len(warnings) == 1, "\n".join(map(str, warnings))
    assert warnings[0].severity == "warning"
    return warnings[0]


def test_a_short_idle_timeout_is_a_warning_citing_rfc1939(tmp_path: Path) -> None:
    path = write(tmp_path, "rules:\n  - name: r\n    set:\n      idle_timeout: 60\n")
    warning = only_warning(tmp_path)
    assert (warning.file, warning.line, warning.column) == (str(path), 4, 21)
    assert "60 seconds, below 600: RFC 1939 §3" in warning.message
    assert str(warning).startswith(f"{path}:4:21: warning: ")


def test_a_user_matcher_with_access_is_warned_about(tmp_path: Path) -> None:
    write(tmp_path, "rules:\n  - name: r\n    match: {user: bob}\n    set: {access: deny}\n")
    warning = only_warning(tmp_path)
    assert (warning.line, warning.column) == (3, 13)
    assert "a rule matching on 'user' cannot refuse a connection before login" in warning.message


@pytest.mark.parametrize(
    ("setting", "matcher"),
    [
        ("max_sessions_total: 5", "user"),
        ("max_sessions_per_client: 5", "user"),
        ("auth_mechanisms: [PLAIN]", "user"),
        ("login_throttle: {failures: 1, window: 1, block: 1}", "user"),
        ("max_sessions_total: 5", "claimed_user"),
        ("max_sessions_per_client: 5", "claimed_user"),
    ],
)
def test_settings_decided_before_the_user_is_known(
    tmp_path: Path, setting: str, matcher: str
) -> None:
    write(tmp_path, f"rules:\n  - name: r\n    match: {{{matcher}: bob}}\n    set: {{{setting}}}\n")
    warning = only_warning(tmp_path)
    assert warning.line == 3
    assert f"a rule matching on '{matcher}' never sets it" in warning.message


@pytest.mark.parametrize(
    ("setting", "matcher"),
    [
        ("max_sessions_per_user: 1", "user"),
        ("deny_commands: [DELE]", "user"),
        ("idle_timeout: 900", "user"),
        ("access: deny", "claimed_user"),
        ("auth_mechanisms: [PLAIN]", "claimed_user"),
        ("login_throttle: {failures: 1, window: 1, block: 1}", "claimed_user"),
    ],
)
def test_settings_decided_once_the_user_is_known(
    tmp_path: Path, setting: str, matcher: str
) -> None:
    write(tmp_path, f"rules:\n  - name: r\n    match: {{{matcher}: bob}}\n    set: {{{setting}}}\n")
    assert load(tmp_path)[1] == []


def test_require_tls_and_match_tls_load(tmp_path: Path) -> None:
    write(
        tmp_path,
        "rules: [{name: r, match: {tls: false}, set: {require_tls: true}}]",
    )
    policies, issues = load(tmp_path)
    assert issues == []
    assert policies.rules[0].settings["require_tls"] is True
    assert policies.rules[0].match.tls is False


def test_unknown_listeners_are_warned_about_when_listeners_are_given(tmp_path: Path) -> None:
    write(tmp_path, "rules: [{name: r, match: {listener: [mian]}, set: {access: deny}}]")
    assert load(tmp_path)[1] == []  # nothing to compare with
    warning = only_warning(tmp_path, listeners=["main", "legacy"])
    assert warning.column == 38
    assert "no listener is named 'mian' (did you mean 'main'?)" in warning.message
    assert "configured: legacy, main" in warning.message
    assert "this rule can never apply" in warning.message


def test_one_unknown_listener_of_several(tmp_path: Path) -> None:
    write(tmp_path, "rules: [{name: r, match: {listener: [main, other]}, set: {access: deny}}]")
    warning = only_warning(tmp_path, listeners=["main"])
    assert "'other'" in warning.message
    assert "never apply" not in warning.message


def test_an_empty_mechanism_list_refuses_every_login(tmp_path: Path) -> None:
    write(tmp_path, "rules: [{name: r, set: {auth_mechanisms: []}}]")
    warning = only_warning(tmp_path)
    assert "refuses every login" in warning.message
    assert load(tmp_path)[0].rules[0].settings["auth_mechanisms"] == ()


def test_a_rule_shadowed_by_a_catch_all(tmp_path: Path) -> None:
    write(
        tmp_path,
        """\
        rules:
          - name: everyone
            set: {idle_timeout: 900, access: allow}
          - name: alice
            match: {user: alice}
            set: {idle_timeout: 1200}
        """,
    )
    warning = only_warning(tmp_path)
    assert warning.line == 4
    assert "rule 'alice' can never apply: rule 'everyone'" in warning.message


def test_a_rule_partly_shadowed_by_one_with_the_same_match(tmp_path: Path) -> None:
    write(
        tmp_path,
        """\
        rules:
          - name: a
            match: {client: [10.0.0.0/8, 192.0.2.0/24]}
            set: {max_sessions_per_client: 3}
          - name: b
            match: {client: [192.0.2.0/24, 10.0.0.0/8]}
            set: {max_sessions_per_client: 5, access: deny}
        """,
    )
    warning = only_warning(tmp_path)
    assert warning.line == 5
    assert "rule 'b': max_sessions_per_client never applies: rule 'a'" in warning.message


def test_shadowing_by_a_dry_run_rule_says_nothing_is_enforced(tmp_path: Path) -> None:
    write(
        tmp_path,
        """\
        rules:
          - name: trial
            mode: dry-run
            set: {deny_commands: [DELE]}
          - name: real
            set: {deny_commands: [DELE, RSET]}
        """,
    )
    warning = only_warning(tmp_path)
    assert "can never apply" in warning.message
    assert "dry-run rule wins a setting like any other rule" in warning.message


def test_narrower_earlier_rules_do_not_shadow(tmp_path: Path) -> None:
    write(
        tmp_path,
        """\
        rules:
          - name: alice
            match: {user: alice}
            set: {deny_commands: []}
          - name: everyone
            set: {deny_commands: [DELE]}
        """,
    )
    assert load(tmp_path)[1] == []


# --------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------

_yamlish = st.text(
    alphabet=st.sampled_from(list("rules:- nameset{}[],'\"\n #@*?/.0123456789abcdefxyzTRUE~&!%|>")),
    max_size=120,
)


def _outcome(directory: Path) -> tuple[PolicySet | None, list[Issue]]:
    try:
        return load_policies(str(directory))
    except PolicyError as exc:
        return None, list(exc.issues)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.one_of(_yamlish, st.text(max_size=80)))
def test_any_text_loads_or_fails_with_located_issues(
    tmp_path_factory: pytest.TempPathFactory, text: str
) -> None:
    directory = tmp_path_factory.mktemp("p")
    (directory / "10-x.yaml").write_text(text, encoding="utf-8", errors="surrogatepass")
    policies, issues = _outcome(directory)
    assert all(issue.line >= 0 and issue.column >= 0 for issue in issues)
    if policies is None:
        assert any(issue.severity == "error" for issue in issues)
    else:
        assert all(issue.severity == "warning" for issue in issues)
        assert all(rule.settings for rule in policies.rules)


@settings(max_examples=100, deadline=None)
@given(
    seconds=st.one_of(
        st.integers(min_value=1, max_value=10**9),
        st.floats(min_value=1e-3, max_value=1e9, allow_nan=False, allow_infinity=False),
    )
)
def test_seconds_round_trip(tmp_path_factory: pytest.TempPathFactory, seconds: float) -> None:
    directory = tmp_path_factory.mktemp("p")
    (directory / "10-x.yaml").write_text(
        f"rules: [{{name: r, set: {{max_session: {seconds!r}}}}}]", encoding="utf-8"
    )
    (rule,) = load_policies(str(directory))[0].rules
    assert rule.settings["max_session"] == float(seconds)
